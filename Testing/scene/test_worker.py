"""The worker process: protocol lines (ready, progress, done, error), warm reuse, cancel; and the GUI path
through it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scene_helpers import node_content, scene_state

from MedKDSegmentLib.engine.errors import CancelledError, MedKDError
from MedKDSegmentLib.engine.volume import read_volume, write_volume
from MedKDSegmentLib.worker import LIB_PARENT, WorkerClient, WorkerError


@pytest.fixture(scope="module")
def client():
    """One warm worker for the protocol tests (its start-up imports torch and MONAI once)."""
    worker = WorkerClient()
    worker.wait_ready(timeout=300)
    yield worker
    worker.close()


@pytest.fixture
def job_files(tmp_path, ct_volume):
    write_volume(ct_volume, tmp_path / "input.nrrd", compress=False)
    return tmp_path


def segment_spec(folder: Path, models_dir: Path, **extra) -> dict:
    return {"job": "segment", "input": str(folder / "input.nrrd"), "modality": "CT",
            "model": str(models_dir / "selftest-ct-student"), "device": "cpu",
            "output": str(folder / "labels.nrrd"), **extra}


def test_raw_protocol_is_one_json_object_per_line(job_files, models_dir, ct_volume):
    """Speak to ``python -m MedKDSegmentLib.worker`` directly, as any client could."""
    env = {**os.environ, "PYTHONPATH": str(LIB_PARENT)}
    spec = segment_spec(job_files, models_dir, id="raw-1")
    result = subprocess.run([sys.executable, "-m", "MedKDSegmentLib.worker"], input=json.dumps(spec) + "\n",
                            capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]  # every stdout line is JSON
    assert events[0]["event"] == "ready" and "cpu" in events[0]["devices"]
    progress = [e for e in events if e["event"] == "progress"]
    fractions = [e["fraction"] for e in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert {e["stage"] for e in progress} >= {"preprocessing", "inference"}
    done = events[-1]
    assert done["event"] == "done" and done["id"] == "raw-1"
    labels = read_volume(done["outputs"]["labels"])
    assert labels.same_grid(ct_volume) and labels.array.max() <= 8
    assert done["outputs"]["model"] == "selftest-ct-student" and done["outputs"]["names"]["1"] == "liver"


def test_errors_are_reported_with_cause_and_the_worker_stays_warm(client, job_files, models_dir):
    pid = client.ready["pid"]
    with pytest.raises(WorkerError) as caught:
        client.run(segment_spec(job_files, models_dir, input=str(job_files / "missing.nrrd")), timeout=120)
    event = caught.value.event
    assert event["type"] == "InvalidInputError"
    assert "does not exist" in event["problem"] and event["fix"]
    with pytest.raises(WorkerError, match="is CT but model"):
        client.run(segment_spec(job_files, models_dir, model=str(models_dir / "selftest-mr-student")), timeout=120)
    outputs = client.run(segment_spec(job_files, models_dir), timeout=120)  # still alive, same process
    assert Path(outputs["labels"]).is_file()
    assert client.ready["pid"] == pid and client.running


def test_second_job_is_warm(client, job_files, models_dir):
    client.run(segment_spec(job_files, models_dir, output=str(job_files / "a.nrrd")), timeout=120)
    started = time.perf_counter()
    outputs = client.run(segment_spec(job_files, models_dir, output=str(job_files / "b.nrrd")), timeout=120)
    elapsed = time.perf_counter() - started
    # No torch import, no network loading: far below the worker's own start-up time.
    assert elapsed < client.ready["import_seconds"]
    assert outputs["seconds"] < 10


def test_cancel_kills_the_process_tree_and_a_new_worker_starts_cold(job_files, models_dir):
    worker = WorkerClient()
    try:
        worker.wait_ready(timeout=300)
        first_pid = worker.process.pid
        job = worker.submit(segment_spec(job_files, models_dir))
        worker.cancel()
        assert not worker.running
        events = worker.events()
        assert {"event": "cancelled", "id": job} in events
        assert not any(e.get("event") == "error" for e in events)  # a cancel is not a crash
        with pytest.raises(ProcessLookupError):
            os.kill(first_pid, 0)  # the process is gone
        outputs = worker.run(segment_spec(job_files, models_dir, output=str(job_files / "again.nrrd")), timeout=300)
        assert worker.process.pid != first_pid and Path(outputs["labels"]).is_file()
    finally:
        worker.close()


# --- the Logic through the worker (the GUI's path) -------------------------------------------------------


def test_background_job_reports_progress_then_creates_the_node(logic, scene, ct_node):
    before = node_content(ct_node)
    job = logic.startSegment(ct_node, model="selftest-ct-student", device="cpu")
    folder = Path(job.folder)
    assert (folder / "input.nrrd").is_file()
    state = scene_state(scene)
    seen = []
    while job.poll():
        seen.append((job.fraction, job.stage))
        assert scene_state(scene) == state  # nothing touches the scene while the worker runs
        time.sleep(0.01)
    assert job.state == "done", job.error
    node = job.result
    assert node.GetName() == "phantom CT - selftest-ct-student"
    assert node.GetSegmentation().GetNumberOfSegments() == 8
    stages = [stage for _, stage in job.history]
    assert "preprocessing" in stages and "inference" in stages and stages[-1].startswith("resampling")
    assert [f for f, _ in job.history] == sorted(f for f, _ in job.history)
    assert seen and all(0.0 <= fraction <= 1.0 for fraction, _ in seen)
    assert not folder.exists()  # the temporary NRRD files are gone
    assert node_content(ct_node) == before
    second = logic.startSegment(ct_node, model="selftest-ct-student", device="cpu")
    assert second.wait(timeout=120).GetName().startswith("phantom CT - selftest-ct-student")
    assert logic.workerInfo()["pid"] == logic.worker.process.pid  # the same warm worker did both


def test_cancel_through_the_logic_leaves_the_scene_exactly_as_it_was(logic, scene, ct_node):
    state = scene_state(scene)
    job = logic.startCompare(ct_node, device="cpu")
    folder = Path(job.folder)
    while job.poll() and job.stage in ("starting the worker", "queued", "worker ready"):
        time.sleep(0.01)
    job.cancel()
    assert job.state == "cancelled"
    with pytest.raises(CancelledError):
        job.raise_for_state()
    assert not job.poll()
    assert scene_state(scene) == state
    assert not folder.exists()
    assert not logic.worker.running


def test_worker_errors_reach_the_logic_with_their_cause(logic, scene, ct_node):
    state = scene_state(scene)
    job = logic.startSegment(ct_node, model="selftest-mr-student", device="cpu", modality="CT")
    with pytest.raises(MedKDError) as caught:
        job.wait(timeout=300)
    assert "is CT but model 'selftest-mr-student' is for MR" in caught.value.problem
    assert caught.value.fix
    assert scene_state(scene) == state
