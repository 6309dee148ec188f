"""Python dependencies inside Slicer: checked on first use (never at import time), installed after asking.

torch comes through the PyTorch extension's ``PyTorchUtils`` when it is installed (it picks the
build matching the CUDA driver), plain pip otherwise; the rest through Slicer's pip helpers.
Nothing is imported to check: package metadata says what is installed.
"""

from __future__ import annotations

import importlib.metadata
import logging

import slicer

from ..engine.errors import MedKDError

logger = logging.getLogger(__name__)
TORCH_REQUIREMENT = "torch>=2.1"
REQUIREMENTS = ("monai>=1.3", "SimpleITK>=2.2", "scipy>=1.10", "numpy>=1.24", "h5py>=3.10", "nibabel>=5.2",
                "onnxruntime>=1.17", "onnx>=1.15")
_checked = False


def _satisfied(requirement: str) -> bool:
    try:
        from packaging.requirements import Requirement
    except ImportError:  # without packaging, presence is all that can be checked
        name = requirement.split(">")[0].split("=")[0].strip()
        try:
            importlib.metadata.version(name)
            return True
        except importlib.metadata.PackageNotFoundError:
            return False
    parsed = Requirement(requirement)
    try:
        installed = importlib.metadata.version(parsed.name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return parsed.specifier.contains(installed, prereleases=True)


def missing_requirements() -> list[str]:
    return [r for r in (TORCH_REQUIREMENT, *REQUIREMENTS) if not _satisfied(r)]


def in_slicer_application() -> bool:
    return hasattr(slicer, "app")


def ensure_dependencies(ask: bool = True) -> None:
    """Make sure torch, MONAI, SimpleITK and scipy are importable; raise ``MedKDError`` if not possible."""
    global _checked
    if _checked:
        return
    missing = missing_requirements()
    if not missing:
        _checked = True
        return
    if not in_slicer_application():
        raise MedKDError(f"Missing Python packages: {', '.join(missing)}.",
                         f"Install them in this Python: pip install {' '.join(repr(m) for m in missing)}")
    if ask and not slicer.util.confirmOkCancelDisplay(
        "MedKDSegment needs these Python packages, which are not installed yet:\n\n"
        + "\n".join(f"  {m}" for m in missing)
        + "\n\nInstall them now? This can take several minutes (torch is large).",
        "MedKDSegment: install dependencies",
    ):
        raise MedKDError("The dependencies were not installed.", "Click again and accept the installation to segment.")
    if TORCH_REQUIREMENT in missing:
        _install_torch()
    rest = [r for r in missing if r != TORCH_REQUIREMENT]
    if rest:
        try:
            from slicer import packaging  # Slicer >= 5.12

            packaging.pip_ensure(rest, prompt_install=False, requester="MedKDSegment")
        except ImportError:  # Slicer before 5.12
            slicer.util.pip_install(" ".join(rest))
    still_missing = missing_requirements()
    if still_missing:
        raise MedKDError(f"Installing {', '.join(still_missing)} failed.", "See the Python console log, then retry.")
    _checked = True


def _install_torch() -> None:
    try:
        import PyTorchUtils
    except ImportError:
        logger.info("MedKDSegment: PyTorch extension not found; installing torch with pip")
        slicer.util.pip_install(TORCH_REQUIREMENT)
        return
    torchLogic = PyTorchUtils.PyTorchUtilsLogic()
    if not torchLogic.torchInstalled():
        torch = torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT[5:])
        if torch is None:
            raise MedKDError("PyTorch could not be installed.", "Install it from the PyTorch Utils module, then retry.")
