"""Every label a bundled model or published teacher gives has coded terminology (SNOMED CT, or NCI Thesaurus where
DICOM's own lists use it), recorded in its bundle, and each code means what DICOM's dictionary says it means."""

from __future__ import annotations

import pytest
from pydicom.sr.codedict import codes
from tiny import TINY_CT, TINY_STUDENT

from MedKDSegmentLib.engine.bundle import find_bundles, load_bundle, save_bundle
from MedKDSegmentLib.engine.errors import BundleError
from MedKDSegmentLib.engine.labels import (
    ABDOMEN_STRUCTURES,
    ABNORMAL_STRUCTURE,
    ANATOMICAL_STRUCTURE,
    BRAIN,
    BRAIN_TISSUE_STRUCTURES,
    BRATS_STRUCTURES,
    LIVER_STRUCTURES,
    Structure,
    Terminology,
)
from MedKDSegmentLib.engine.networks import build_network
from MedKDSegmentLib.engine.published import PUBLISHED_TEACHERS

TABLES = (*ABDOMEN_STRUCTURES, *BRATS_STRUCTURES, *BRAIN, *BRAIN_TISSUE_STRUCTURES, *LIVER_STRUCTURES)


def dicom_meanings(scheme: str, value: str) -> set[str]:
    """The meanings DICOM's code dictionary (as pydicom ships it) gives a code (lower case; several for some)."""
    collection = {"SCT": codes.SCT, "NCIt": codes.NCIt}[scheme]
    return {getattr(collection, name).meaning.lower() for name in collection.dir()
            if getattr(collection, name).value == value}


def test_every_bundled_and_published_label_is_coded():
    for bundle in find_bundles():
        assert all(s.terminology is not None for s in bundle.structures), bundle.name
        assert set(bundle.info["terminology"]) == {str(s.value) for s in bundle.structures}, bundle.name
    for teacher in PUBLISHED_TEACHERS.values():
        assert all(s.terminology is not None for s in teacher.structures), teacher.name


@pytest.mark.parametrize("structure", TABLES, ids=lambda s: s.name)
def test_codes_mean_what_dicom_says(structure: Structure):
    terminology = structure.terminology
    for code in (terminology.type, terminology.modifier, terminology.category):
        if code is None or code == ANATOMICAL_STRUCTURE:  # Slicer's lists keep SNOMED's older category code
            continue
        assert code[2].lower() in dicom_meanings(*code[:2]), code


def test_a_bundle_records_the_terminology_of_labels_no_table_knows(tmp_path):
    lesion = Terminology("", ("SCT", "52988006", "Lesion"), category=ABNORMAL_STRUCTURE)
    bundle = save_bundle(tmp_path / "lesion", build_network(TINY_STUDENT, 2), name="lesion", role="student",
                         architecture=TINY_STUDENT, profile=TINY_CT, method={"name": "untrained"},
                         structures=(Structure(1, "my lesion", (1.0, 0.0, 0.0), lesion),))
    assert bundle.structures[0].terminology == lesion
    metadata = bundle.path / "configs" / "metadata.json"
    metadata.write_text(metadata.read_text().replace('"52988006"', '7'))
    with pytest.raises(BundleError, match="invalid terminology"):
        load_bundle(bundle.path).structures  # noqa: B018
