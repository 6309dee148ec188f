"""Out of GPU memory, without a GPU: the allocation failure is injected where it happens on a GPU (in the
network's forward pass, on the whole volume or on a window), and the fallback chain of a CUDA job runs with the
CPU standing in for the GPU (``prediction.device_attempts``). Each fallback must give what the unfailed run of
the same kind gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from MedKDSegmentLib.engine import prediction
from MedKDSegmentLib.engine.bundle import resolve_bundle
from MedKDSegmentLib.engine.phantom import generate_phantom
from MedKDSegmentLib.engine.profiles import to_model_grid
from MedKDSegmentLib.engine.windowing import pad_to_multiple_of_8

CPU = torch.device("cpu")
STAND_IN_GPU = torch.device("cpu", 0)  # the CPU under another name: the chain tells its devices apart


class ShortOfMemory(nn.Module):
    """The student, whose first ``failures`` forward passes fail as CUDA's allocator fails."""

    def __init__(self, network: nn.Module, failures: int) -> None:
        super().__init__()
        self.network, self.failures, self.calls = network, failures, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls <= self.failures:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected, call {self.calls})")
        return self.network(x)


@pytest.fixture(scope="module")
def student_and_image():
    bundle = resolve_bundle("phantom-abdomen-ct-student")
    image, _ = generate_phantom("CT", seed=77, size=(160, 128, 72), spacing=(3.0, 3.0, 3.0))
    prepared, _ = to_model_grid(image, bundle.profile)
    return bundle.load_network(), prepared


def run_as_on_cuda(network: nn.Module, image: np.ndarray, monkeypatch) -> tuple[np.ndarray, torch.device, int, list]:
    monkeypatch.setattr(prediction, "device_attempts",
                        lambda device: [(STAND_IN_GPU, STAND_IN_GPU), (STAND_IN_GPU, CPU), (CPU, CPU)])
    stages = []
    scores, used, _, windows, _ = prediction.predict(network, image, torch.device("cuda"),
                                                    lambda fraction, stage: stages.append(stage))
    return scores, used, windows, stages


def test_a_whole_volume_pass_out_of_gpu_memory_gives_the_windows_stitched_on_the_cpu(student_and_image,
                                                                                    monkeypatch):
    network, image = student_and_image
    scores, used, windows, stages = run_as_on_cuda(ShortOfMemory(network, 1), image, monkeypatch)
    padded = pad_to_multiple_of_8(image)
    expected = prediction._sliding_window(network, padded, CPU, CPU, windows, lambda f, s: None, None)
    assert windows == prediction.count_windows(padded.shape) > 1 and used == STAND_IN_GPU
    np.testing.assert_array_equal(scores, expected)  # exactly what the unfailed sliding window gives
    assert sum("out of memory" in stage for stage in stages) == 1


def test_out_of_gpu_memory_twice_gives_the_whole_volume_pass_on_the_cpu(student_and_image, monkeypatch):
    network, image = student_and_image
    failing = ShortOfMemory(network, 2)  # the whole pass, then the first window
    scores, used, windows, stages = run_as_on_cuda(failing, image, monkeypatch)
    expected = prediction.predict(network, image, CPU)[0]
    assert used == CPU and windows == 1 and failing.calls == 3
    np.testing.assert_array_equal(scores, expected)  # exactly the unfailed CPU run
    assert sum("out of memory" in stage for stage in stages) == 2


def test_out_of_memory_on_the_cpu_too_is_raised_not_hidden(student_and_image, monkeypatch):
    network, image = student_and_image
    with pytest.raises(torch.cuda.OutOfMemoryError):
        run_as_on_cuda(ShortOfMemory(network, 3), image, monkeypatch)
