"""Label tables (phantom abdomen, BRATS brain tumour, liver, brain, brain tissue): the one place that names
structures, their colours and their coded terminology."""

from __future__ import annotations

from dataclasses import dataclass

Code = tuple[str, str, str]  # coding scheme, code value, code meaning (DICOM's triplet)
GENERAL_ANATOMY = "Segmentation category and type - 3D Slicer General Anatomy list"
DICOM_MASTER = "Segmentation category and type - DICOM master list"
ANATOMIC_REGIONS = "Anatomic codes - DICOM master list"
# Slicer's terminology lists keep SNOMED CT's older code for the category (DICOM's CID 7150 now has 91723000);
# Slicer matches entries by code, so its lists' codes are used here.
ANATOMICAL_STRUCTURE: Code = ("SCT", "123037004", "Anatomical Structure")
ABNORMAL_STRUCTURE: Code = ("SCT", "49755003", "Morphologically Abnormal Structure")


@dataclass(frozen=True)
class Terminology:
    """A segment's SNOMED CT category, type and modifier, from one of Slicer's terminology contexts."""

    context: str
    type: Code
    modifier: Code | None = None
    category: Code = ANATOMICAL_STRUCTURE

    def serialized(self) -> str:
        """Slicer's terminology entry string (``vtkSlicerTerminologiesModuleLogic::SerializeTerminologyEntry``):
        context ~ category ~ type ~ modifier ~ region context ~ region ~ region modifier, codes as
        scheme^value^meaning, an empty code as ^^."""
        codes = ["^".join(code) if code else "^^" for code in (self.category, self.type, self.modifier)]
        return "~".join([self.context, *codes, ANATOMIC_REGIONS, "^^", "^^"])

    def to_dict(self) -> dict:
        """As a bundle records it (``medkdsegment.terminology``): codes as [scheme, value, meaning]."""
        return {"context": self.context, "category": list(self.category), "type": list(self.type),
                "modifier": list(self.modifier) if self.modifier else None}

    @classmethod
    def from_dict(cls, data: dict) -> Terminology:
        """``to_dict``'s inverse; ``ValueError`` for an entry that is not three strings per code."""
        def code(value) -> Code:
            if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, str) and v for v in value)):
                raise ValueError(f"a code must be [scheme, value, meaning], not {value!r}")
            return tuple(value)

        return cls(str(data.get("context", "")), code(data.get("type")),
                   code(data["modifier"]) if data.get("modifier") else None, code(data.get("category")))


@dataclass(frozen=True)
class Structure:
    value: int
    name: str
    color: tuple[float, float, float]  # RGB in 0..1; distinct within a table, Slicer's anatomy colours where they are
    terminology: Terminology | None = None


def _rgb(red: int, green: int, blue: int) -> tuple[float, float, float]:
    return (round(red / 255, 3), round(green / 255, 3), round(blue / 255, 3))


_KIDNEY: Code = ("SCT", "64033007", "Kidney")
# Codes as Slicer's terminology lists have them (the General Anatomy list where it has the structure, else the
# DICOM master list: it alone has the vena cava and the vertebra, the nearest code for the vertebral bodies).
# Slicer gives both kidneys, and liver and aorta, near-identical colours; these stay apart at 50 % fill.
ABDOMEN_STRUCTURES: tuple[Structure, ...] = (
    Structure(1, "liver", _rgb(221, 130, 101), Terminology(GENERAL_ANATOMY, ("SCT", "10200004", "Liver"))),
    Structure(2, "spleen", _rgb(157, 108, 162), Terminology(GENERAL_ANATOMY, ("SCT", "78961009", "Spleen"))),
    Structure(3, "right kidney", _rgb(74, 156, 96),
              Terminology(GENERAL_ANATOMY, _KIDNEY, ("SCT", "24028007", "Right"))),
    Structure(4, "left kidney", _rgb(170, 220, 90), Terminology(GENERAL_ANATOMY, _KIDNEY, ("SCT", "7771000", "Left"))),
    Structure(5, "aorta", _rgb(224, 60, 60), Terminology(GENERAL_ANATOMY, ("SCT", "15825003", "Aorta"))),
    Structure(6, "vertebral bodies", _rgb(241, 214, 145), Terminology(DICOM_MASTER, ("SCT", "51282000", "Vertebra"))),
    Structure(7, "pancreas", _rgb(240, 120, 200), Terminology(GENERAL_ANATOMY, ("SCT", "15776009", "Pancreas"))),
    Structure(8, "inferior vena cava", _rgb(0, 151, 206),
              Terminology(DICOM_MASTER, ("SCT", "64131007", "Inferior vena cava"))),
)

# BRATS 2013 multi-class labels (used by the methods benchmark on the real brain tumour MRI), coded as DICOM's
# CID 7168 (Brain Lesion Segmentation Type With Necrosis) codes them: its lesion types are NCI Thesaurus codes.
BRATS_STRUCTURES: tuple[Structure, ...] = (
    Structure(1, "necrosis", (0.863, 0.078, 0.235),
              Terminology(DICOM_MASTER, ("SCT", "6574001", "Necrosis"), category=ABNORMAL_STRUCTURE)),
    Structure(2, "oedema", (0.196, 0.804, 0.196),
              Terminology(DICOM_MASTER, ("SCT", "79654002", "Edema"), category=ABNORMAL_STRUCTURE)),
    Structure(3, "non-enhancing tumour", (0.118, 0.565, 1.000),
              Terminology(DICOM_MASTER, ("NCIt", "C81175", "Non-Enhancing Lesion"), category=ABNORMAL_STRUCTURE)),
    Structure(4, "enhancing tumour", (1.000, 0.843, 0.000),
              Terminology(DICOM_MASTER, ("NCIt", "C113842", "Enhancing Lesion"), category=ABNORMAL_STRUCTURE)),
)

# The liver U-Net's one label (the phantom's liver colour).
LIVER_STRUCTURES: tuple[Structure, ...] = tuple(s for s in ABDOMEN_STRUCTURES if s.name == "liver")

# The published brain-extraction teachers' one label.
BRAIN: tuple[Structure, ...] = (
    Structure(1, "brain", (0.863, 0.608, 0.529), Terminology(GENERAL_ANATOMY, ("SCT", "12738006", "Brain"))),)

# The tissue VNet's classes (colours of FreeSurfer's table: ventricle, cortex, cerebral white matter; codes of
# DICOM's CID 7153, CNS Segmentation Types).
BRAIN_TISSUE_STRUCTURES: tuple[Structure, ...] = (
    Structure(1, "cerebrospinal fluid", (0.471, 0.071, 0.525),
              Terminology(DICOM_MASTER, ("SCT", "65216001", "Cerebrospinal Fluid"))),
    Structure(2, "grey matter", (0.804, 0.243, 0.306), Terminology(DICOM_MASTER, ("SCT", "389081007", "Gray Matter"))),
    Structure(3, "white matter", (0.961, 0.961, 0.961),
              Terminology(DICOM_MASTER, ("SCT", "389080008", "White Matter"))),
)


def channel_def(structures: tuple[Structure, ...] = ABDOMEN_STRUCTURES) -> dict[str, str]:
    """MONAI bundle ``channel_def``: output channel index (as a string) to label name."""
    return {"0": "background", **{str(s.value): s.name for s in structures}}


def label_names(structures: tuple[Structure, ...] = ABDOMEN_STRUCTURES) -> dict[int, str]:
    return {s.value: s.name for s in structures}


_KNOWN = {s.name: s for table in (ABDOMEN_STRUCTURES, BRATS_STRUCTURES, BRAIN, BRAIN_TISSUE_STRUCTURES)
          for s in table}


def known_structure(name: str) -> Structure | None:
    """The table entry of a label name (its colour and terminology), or None for a name no table has."""
    return _KNOWN.get(name)


def terminology_of(name: str) -> Terminology | None:
    """The coded terminology of a label name, where a table gives one."""
    known = _KNOWN.get(name)
    return known.terminology if known is not None else None


def label_colors(names: dict[int, str], recorded: dict[int, tuple[float, float, float]]) -> dict[int, tuple]:
    """Label value -> RGB: a table's colour for a name it knows (this module is the one home of colours), else
    the colour a bundle recorded; labels with neither are left out (shown grey)."""
    colors = {}
    for value, name in names.items():
        known = known_structure(name)
        if known is not None or value in recorded:
            colors[value] = known.color if known is not None else tuple(recorded[value])
    return colors
