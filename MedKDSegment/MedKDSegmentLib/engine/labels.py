"""Label tables (phantom abdomen, BRATS brain tumour, liver, brain, brain tissue): the one place that names
structures and colours."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Structure:
    value: int
    name: str
    color: tuple[float, float, float]  # RGB in 0..1, Slicer's GenericAnatomyColors where one exists


ABDOMEN_STRUCTURES: tuple[Structure, ...] = (
    Structure(1, "liver", (0.867, 0.510, 0.396)),
    Structure(2, "spleen", (0.616, 0.424, 0.635)),
    Structure(3, "right kidney", (0.722, 0.478, 0.345)),
    Structure(4, "left kidney", (0.804, 0.557, 0.412)),
    Structure(5, "aorta", (0.882, 0.290, 0.263)),
    Structure(6, "vertebral bodies", (0.945, 0.839, 0.569)),
    Structure(7, "pancreas", (0.980, 0.859, 0.541)),
    Structure(8, "inferior vena cava", (0.000, 0.592, 0.808)),
)

# BRATS 2013 multi-class labels (used by the methods benchmark on the real brain tumour MRI).
BRATS_STRUCTURES: tuple[Structure, ...] = (
    Structure(1, "necrosis", (0.863, 0.078, 0.235)),
    Structure(2, "oedema", (0.196, 0.804, 0.196)),
    Structure(3, "non-enhancing tumour", (0.118, 0.565, 1.000)),
    Structure(4, "enhancing tumour", (1.000, 0.843, 0.000)),
)

# The liver U-Net's one label (the phantom's liver colour).
LIVER_STRUCTURES: tuple[Structure, ...] = tuple(s for s in ABDOMEN_STRUCTURES if s.name == "liver")

# The published brain-extraction teachers' one label.
BRAIN: tuple[Structure, ...] = (Structure(1, "brain", (0.863, 0.608, 0.529)),)

# The tissue VNet's classes (colours of FreeSurfer's table: ventricle, cortex, cerebral white matter).
BRAIN_TISSUE_STRUCTURES: tuple[Structure, ...] = (
    Structure(1, "cerebrospinal fluid", (0.471, 0.071, 0.525)),
    Structure(2, "grey matter", (0.804, 0.243, 0.306)),
    Structure(3, "white matter", (0.961, 0.961, 0.961)),
)


def channel_def(structures: tuple[Structure, ...] = ABDOMEN_STRUCTURES) -> dict[str, str]:
    """MONAI bundle ``channel_def``: output channel index (as a string) to label name."""
    return {"0": "background", **{str(s.value): s.name for s in structures}}


def label_names(structures: tuple[Structure, ...] = ABDOMEN_STRUCTURES) -> dict[int, str]:
    return {s.value: s.name for s in structures}
