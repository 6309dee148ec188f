"""Published teachers as the real-weight tests find them: installed in the user's models folder, or skipped."""

from __future__ import annotations

import pytest

from MedKDSegmentLib.engine.bundle import Bundle, resolve_bundle
from MedKDSegmentLib.engine.errors import BundleError

REFERENCE_ENV = "MEDKDSEGMENT_TEACHER_REFERENCE"  # masks of the original packages (scripts/*_reference.py)


def installed_teacher(name: str) -> Bundle:
    """The installed teacher ``name``; the test is skipped, saying how to install it, when it is not."""
    try:
        return resolve_bundle(name)
    except BundleError:
        pytest.skip(f"{name} is not installed in the user's models folder ('medkd teachers get {name}')")
