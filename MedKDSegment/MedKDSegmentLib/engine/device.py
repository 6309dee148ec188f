"""Device choice: the one place that decides where networks run.

torch is imported when a device is looked for, not with this module: the command line's parser and the
module's GUI state offer ``DEVICE_CHOICES`` without loading it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import InvalidInputError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")


def available_devices() -> list[str]:
    import torch

    devices = []
    if torch.cuda.is_available():
        devices.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices + ["cpu"]


def select_device(choice: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit choice must be available."""
    import torch

    choice = (choice or "auto").lower()
    if choice not in DEVICE_CHOICES:
        raise InvalidInputError(f"Unknown device '{choice}'.", f"Use one of {', '.join(DEVICE_CHOICES)}.")
    found = available_devices()
    if choice == "auto":
        return torch.device(found[0])
    if choice not in found:
        raise InvalidInputError(
            f"Device '{choice}' was asked for but is not available (found: {', '.join(found)}).",
            "Use --device auto or cpu, or install a torch build for that device.",
        )
    return torch.device(choice)


def describe_device(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return f"cpu ({threads} thread{'s' if threads != 1 else ''})"
    return device.type
