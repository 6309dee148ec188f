"""Several processes under torchrun (gloo on CPU, as CI has no GPU): the same commands data-parallel, one bundle,
resume with another number of processes, a sharded teacher cache and folder segmentation."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import NUM_CLASSES, TINY_STUDENT, TINY_TEACHER

from MedKDSegmentLib.engine.bundle import load_bundle
from MedKDSegmentLib.engine.data import Case
from MedKDSegmentLib.engine.distributed import process_seed
from MedKDSegmentLib.engine.inference import segment
from MedKDSegmentLib.engine.networks import build_network
from MedKDSegmentLib.engine.runs import CHECKPOINT_FILE, checkpoint_dir_for
from MedKDSegmentLib.engine.training import cache_teacher_outputs, local_batch_norm
from MedKDSegmentLib.engine.volume import read_volume

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(REPO / "MedKDSegment"), OMP_NUM_THREADS="1")
# Small runs of the real default networks: a few epochs of a few 16³ patches.
SHORT = ["--epochs", 4, "--steps-per-epoch", 4, "--patch-size", 16, 16, 16, "--device", "cpu"]
# Two processes draw other patches than one, so their losses differ as runs with other seeds do: two
# single-process runs with seeds 0 and 1 differed by up to 7.5 % per epoch on these phantoms.
LOSS_TOLERANCE = 0.10


def command(*args, processes: int = 1) -> list[str]:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    return [sys.executable, *launcher, "-m", "MedKDSegmentLib", "--quiet", *map(str, args)]


def medkd(*args, processes: int = 1, check_exit: int | None = 0) -> subprocess.CompletedProcess:
    result = subprocess.run(command(*args, processes=processes), capture_output=True, text=True, env=ENV, timeout=600)
    if check_exit is not None:
        assert result.returncode == check_exit, result.stderr[-3000:]
    return result


def train_loss(bundle: Path) -> list[float]:
    return load_bundle(bundle).info["metrics"]["train_loss"]


def assert_valid(bundle_path: Path, scan: Path) -> None:
    """A bundle that loads with verified weights and segments a scan on its grid."""
    bundle = load_bundle(bundle_path)
    volume = read_volume(scan)
    labels = segment(volume, bundle, "cpu").labels
    assert labels.array.shape == volume.array.shape
    assert not checkpoint_dir_for(bundle_path).exists()  # the run's folder went with the bundle


def assert_curves_match(parallel: list[float], single: list[float]) -> None:
    assert len(parallel) == len(single)
    assert parallel[-1] < 0.95 * parallel[0], (parallel, single)  # it learnt
    for epoch, (a, b) in enumerate(zip(parallel, single)):
        assert abs(a - b) <= LOSS_TOLERANCE * b, (epoch, parallel, single)


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ddp") / "ct"
    medkd("phantom", "--modality", "CT", "--count", 4, "--size", 48, 40, 32, "--spacing", 7, 7, 7, "--seed", 3,
          "--output", folder)
    return folder


@pytest.fixture(scope="module")
def teachers(ct) -> tuple[Path, Path]:
    """The same teacher run in one process with batch 2 and in two processes with batch 1 each."""
    one, two = ct.parent / "teacher-1", ct.parent / "teacher-2"
    medkd("train-teacher", "--data", ct, "--modality", "CT", "--output", one, "--batch-size", 2, *SHORT)
    result = medkd("train-teacher", "--data", ct, "--modality", "CT", "--output", two, "--batch-size", 1, *SHORT,
                   processes=2)
    assert "2 processes x batch 1 = effective batch 2" in result.stderr
    assert result.stdout.count('"path"') == 1  # the bundle's summary, printed once (by rank 0)
    return one, two


def test_train_teacher_in_two_processes_writes_one_valid_bundle_learning_as_one_process(ct, teachers):
    one, two = teachers
    assert_valid(two, ct / "images" / "case_000.nii.gz")
    assert_curves_match(train_loss(two), train_loss(one))


def test_distill_in_two_processes_matches_one_process(ct, teachers, tmp_path):
    teacher = teachers[0]
    # kd + hint: the hint adapter's gradients (outside the student) are averaged across processes too.
    common = ["--data", ct, "--teacher", teacher, "--method", "kd+hint", *SHORT]
    medkd("distill", *common, "--output", tmp_path / "one", "--batch-size", 2)
    medkd("distill", *common, "--output", tmp_path / "two", "--batch-size", 1, processes=2)
    assert_valid(tmp_path / "two", ct / "images" / "case_001.nii.gz")
    assert_curves_match(train_loss(tmp_path / "two"), train_loss(tmp_path / "one"))
    method = load_bundle(tmp_path / "two").info["method"]
    assert [term["name"] for term in method["methods"]] == ["kd", "hint"]


def test_a_killed_two_process_run_resumes_in_one_process(ct, tmp_path):
    output = tmp_path / "teacher"
    args = ["train-teacher", "--data", ct, "--modality", "CT", "--output", output, "--batch-size", 1,
            "--epochs", 12, "--steps-per-epoch", 2, "--patch-size", 16, 16, 16, "--device", "cpu"]
    run = subprocess.Popen(command(*args, processes=2), env=ENV, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = checkpoint_dir_for(output) / CHECKPOINT_FILE
    try:
        deadline = time.monotonic() + 300
        while not checkpoint.exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert checkpoint.exists(), "no epoch finished"
    finally:  # torchrun stops its workers (in sessions of their own) when it is terminated
        os.killpg(run.pid, signal.SIGTERM)
        run.wait(timeout=120)
    assert not output.exists()
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["processes"] == 2 and 1 <= saved["epoch"] < 12

    refused = medkd(*args, check_exit=2)  # never restarted silently
    assert "--resume" in refused.stderr
    medkd(*args, "--resume")
    assert_valid(output, ct / "images" / "case_002.nii.gz")
    assert len(train_loss(output)) == 12


def test_two_ranks_segment_a_folder_once_each_like_one_process(ct, teachers, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    for image in sorted((ct / "images").iterdir()):
        (scans / image.name).write_bytes(image.read_bytes())
    (scans / "broken.nii.gz").write_bytes(b"not a volume")  # fails; the others go on
    model = teachers[1]
    one = medkd("segment", "--model", model, "--input", scans, "--output", tmp_path / "one", "--format", "nifti",
                "--device", "cpu", check_exit=2)
    two = medkd("segment", "--model", model, "--input", scans, "--output", tmp_path / "two", "--format", "nifti",
                "--device", "cpu", processes=2, check_exit=1)  # torchrun's code for a failed process
    assert "1 of 5 volumes could not be segmented" in one.stderr
    assert two.stderr.count("1 of 5 volumes could not be segmented") == 1  # reported once, by rank 0
    written = sorted(p.name for p in (tmp_path / "two").glob("*.nii.gz"))
    assert written == sorted(p.name for p in (tmp_path / "one").glob("*.nii.gz"))
    assert len(written) == 4
    for name in written:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    rows = list(csv.DictReader((tmp_path / "two" / "summary.csv").open()))
    assert [row["input"] for row in rows] == sorted(p.name for p in scans.iterdir())  # each case exactly once
    assert [row["status"] for row in rows] == ["failed", "done", "done", "done", "done"]
    assert "could not be read" in rows[0]["message"]


def test_single_process_commands_refuse_torchrun(tmp_path):
    result = subprocess.run(command("phantom", "--modality", "CT", "--count", 1, "--output", tmp_path / "p"),
                            capture_output=True,
                            text=True, env=dict(ENV, WORLD_SIZE="2", RANK="0"), timeout=120)
    assert result.returncode == 2
    assert "runs in one process" in result.stderr
    assert not (tmp_path / "p").exists()


CASE_SHAPE = (16, 16, 16)  # one sliding window per case; the padding probe runs on a larger block


class CountingTeacher(torch.nn.Module):
    """A tiny teacher that counts the cases it runs on."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.network = build_network(TINY_TEACHER, NUM_CLASSES)
        self.cases = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.cases += tuple(x.shape[2:]) == CASE_SHAPE
        return self.network(x)


def tiny_cases(count: int) -> list[Case]:
    rng = np.random.default_rng(0)
    return [Case(f"c{i}", rng.normal(size=CASE_SHAPE).astype(np.float32), None) for i in range(count)]


def test_a_teacher_cache_on_disk_resumes_where_it_stopped(tmp_path):
    teacher = CountingTeacher().eval()
    first = tiny_cases(3)
    cache_teacher_outputs(teacher, first, torch.device("cpu"), lambda f, m: None, tmp_path)
    stored = sorted(tmp_path.glob("*.npz"))
    assert len(stored) == 3
    assert teacher.cases == 3
    stored[1].unlink()  # as if the run was killed before that case
    again = tiny_cases(3)
    cache_teacher_outputs(teacher, again, torch.device("cpu"), lambda f, m: None, tmp_path)
    assert teacher.cases == 4  # only the missing case ran again
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.teacher, b.teacher)
        np.testing.assert_array_equal(a.teacher_fill, b.teacher_fill)
    assert len(list(tmp_path.glob("*.npz"))) == 3 and not list(tmp_path.glob("*partial*"))


SHARDED_CACHE = """
import json, sys, numpy as np, torch
sys.path.insert(0, sys.argv[1])
from test_distributed import CountingTeacher, tiny_cases
from MedKDSegmentLib.engine.distributed import current, process_group
from MedKDSegmentLib.engine.training import cache_teacher_outputs, local_batch_norm
with process_group("cpu"):
    teacher, cases = CountingTeacher().eval(), tiny_cases(5)
    cache_teacher_outputs(teacher, cases, torch.device("cpu"), lambda f, m: None)
    if current().main:
        np.save(sys.argv[2], np.stack([case.teacher for case in cases]))
    print(json.dumps({"rank": current().rank, "cases": teacher.cases}))
"""


def test_teacher_outputs_are_cached_in_shares_across_processes(tmp_path):
    cases = tiny_cases(5)
    cache_teacher_outputs(CountingTeacher().eval(), cases, torch.device("cpu"), lambda f, m: None)
    script = tmp_path / "cache.py"
    script.write_text(SHARDED_CACHE)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
         str(Path(__file__).parent), str(tmp_path / "cached.npy")],
        capture_output=True, text=True, env=dict(ENV, PYTHONPATH=f"{ENV['PYTHONPATH']}:{REPO / 'Testing'}"),
        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert {row["rank"]: row["cases"] for row in rows} == {0: 3, 1: 2}  # cases 0, 2, 4 and 1, 3
    np.testing.assert_array_equal(np.load(tmp_path / "cached.npy"), np.stack([case.teacher for case in cases]))


def test_one_process_keeps_the_random_stream_of_earlier_runs():
    assert process_seed(1234) == 1234


def test_synchronised_batch_norm_is_made_plain_again_with_its_statistics():
    network = build_network(TINY_STUDENT, NUM_CLASSES)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    torch.nn.SyncBatchNorm.convert_sync_batchnorm(network)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in network.modules())
    local_batch_norm(network)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in network.modules())
    after = network.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value)


def job_processes() -> list[str]:
    """Command lines of running processes of a multi-process training job."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "MedKDSegmentLib.jobs" in text:
            found.append(text)
    return found


def training_spec(ct: Path, output: Path) -> dict:
    settings = {"epochs": 2, "steps_per_epoch": 2, "batch_size": 1, "patch_size": [16, 16, 16], "device": "cpu",
                "architecture": TINY_TEACHER}
    return {"job": "train_teacher", "data": str(ct), "modality": "CT", "output": str(output), "processes": 2,
            "settings": settings}


def test_a_training_job_of_the_module_runs_in_several_local_processes(ct, tmp_path):
    from MedKDSegmentLib import jobs

    stages = []
    summary = jobs.train_model(training_spec(ct, tmp_path / "teacher"), lambda f, stage: stages.append(stage))
    assert any(stage.startswith("epoch 2/2 loss") for stage in stages)  # rank 0's progress, relayed
    assert len(summary["epoch_loss"]) == 2
    assert load_bundle(tmp_path / "teacher").info["architecture"] == TINY_TEACHER
    assert not job_processes()


def test_cancelling_a_multi_process_training_job_stops_every_process_and_writes_no_model(ct, tmp_path):
    from MedKDSegmentLib import jobs
    from MedKDSegmentLib.engine.errors import CancelledError

    stages = []
    with pytest.raises(CancelledError):
        jobs.train_model(training_spec(ct, tmp_path / "teacher"), lambda f, stage: stages.append(stage),
                         cancel=lambda: any(stage.startswith("epoch 1/") for stage in stages))
    assert not (tmp_path / "teacher").exists()
    deadline = time.monotonic() + 30
    while job_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not job_processes()
