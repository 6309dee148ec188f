"""The worker outlives lines that are JSON but not a job spec (issue 19, case 15)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tiny import make_bundle

from MedKDSegmentLib.engine.phantom import generate_phantom
from MedKDSegmentLib.engine.volume import read_volume, write_volume

LIB_PARENT = os.path.join(os.path.dirname(__file__), "..", "..", "MedKDSegment")


def test_json_that_is_not_an_object_gets_a_protocol_error_and_the_next_job_runs(tmp_path):
    model = make_bundle(tmp_path / "tiny-student").path
    image, _ = generate_phantom("CT", 3, size=(32, 32, 16), spacing=(8.0, 8.0, 8.0))
    write_volume(image, tmp_path / "input.nrrd", compress=False)
    spec = {"job": "segment", "id": "after", "input": str(tmp_path / "input.nrrd"), "modality": "CT",
            "model": str(model), "device": "cpu", "output": str(tmp_path / "labels.nrrd")}
    lines = ["[1, 2, 3]", '"segment"', "42", "null", json.dumps(spec)]
    result = subprocess.run([sys.executable, "-m", "MedKDSegmentLib.worker"], input="\n".join(lines) + "\n",
                            capture_output=True, text=True, timeout=300, check=False,
                            env={**os.environ, "PYTHONPATH": LIB_PARENT})
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    errors = [e for e in events if e["event"] == "error"]
    assert len(errors) == 4 and all(e["type"] == "protocol" and "JSON object" in e["message"] for e in errors)
    assert events[-1]["event"] == "done" and events[-1]["id"] == "after"
    assert read_volume(tmp_path / "labels.nrrd").shape == image.shape
