"""``python -m MedKDSegmentLib`` runs the engine CLI (with ``MedKDSegment/`` on sys.path)."""

import sys

from MedKDSegmentLib.engine.cli import main

sys.exit(main())
