"""Published teachers' own pipelines: segmenting with them, and teaching with them on a student's grid.

A published teacher (``bundle.pipeline`` set, e.g. HD-BET) prepares its input its own way (its
spacing, orientation and intensity normalisation), so it cannot run on a student's prepared patches.
As a teacher it runs once per whole training volume through its own pipeline; its probabilities are
resampled onto the student's model grid and cached (offline distillation). Only output-based
distillation terms can use it: there are no teacher features on the student's input.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from .bundle import Bundle
from .data import Case
from .deepbet import segment_deepbet
from .errors import BundleError, InvalidInputError
from .hdbet import segment_hdbet
from .liver_unet import segment_liver_unet
from .monai_bundle import segment_monai_bundle
from .nnunet import segment_nnunet
from .tissue_vnet import segment_tissue_vnet
from .volume import read_volume

# Floor of cached probabilities before the log: float16 holds log(1e-30) = -69 exactly enough, and a
# target this small is zero for every temperature used (unlike the old 1e-6 floor, see issue 16).
PROBABILITY_FLOOR = 1e-30


# name: (function, whether it takes options: HD-BET's folds, mirroring, post-processing and cancel)
PIPELINES = {
    "hd-bet": (segment_hdbet, True),
    "deepbet": (segment_deepbet, False),
    "tissue-vnet": (segment_tissue_vnet, False),
    "liver-unet": (segment_liver_unet, False),
    "nnunet-v2": (segment_nnunet, True),
    "monai-bundle": (segment_monai_bundle, False),
}


def run_pipeline(
    bundle: Bundle,
    network: nn.Module,
    volume,
    device: torch.device,
    cancel: Callable[[], bool] | None = None,
    **overrides,
):
    """``bundle``'s own pipeline on ``volume`` with its recorded settings (``overrides`` replace them);
    the result has ``labels`` on the volume's array, ``seconds`` and ``probabilities_on(volume, grid)``.
    When CUDA runs out of memory the whole pipeline runs again on the CPU, with ``network`` moved there
    (so the caller can tell from where the network is)."""
    settings = {**bundle.pipeline, **overrides}
    name = settings.pop("name")
    if name not in PIPELINES:
        raise BundleError(f"Bundle '{bundle.name}' needs the pipeline '{name}', unknown to this MedKDSegment.",
                          "Update MedKDSegment.")
    pipeline, takes_options = PIPELINES[name]
    if settings and not takes_options:
        raise InvalidInputError(f"{name} takes no options (given: {sorted(settings)}).",
                                "Leave them out (--fast and --mirror are HD-BET's).")
    options = {"cancel": cancel, **settings} if takes_options else {}
    try:
        return pipeline(volume, network, device, **options)
    except torch.cuda.OutOfMemoryError:
        if device.type != "cuda":
            raise
    # Retried outside the handler, so the failed attempt's tensors (held by its traceback) are freed.
    network.to("cpu")
    torch.cuda.empty_cache()
    return pipeline(volume, network, torch.device("cpu"), **options)


class PipelineTeacher(nn.Module):
    """A published teacher as ``fit`` sees it: its cached outputs come from ``outputs_on`` (whole volumes
    through its own pipeline), never from running it on a student's patch."""

    def __init__(self, bundle: Bundle, network: nn.Module) -> None:
        super().__init__()
        self.bundle = bundle
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise InvalidInputError(
            f"Teacher '{self.bundle.name}' runs only on whole volumes through its own pipeline.",
            "Use output-based methods with it (kd, ctkd, dist, cwd), not feature hints (hint, at).",
        )

    def outputs_on(self, case: Case, device: torch.device) -> np.ndarray:
        """Log-probabilities (C, z, y, x) on ``case``'s model grid, from its source volume. For an
        ensemble they are the log of the averaged probabilities, which also serve as its logits."""
        if case.source is None or case.grid is None:
            raise InvalidInputError(
                f"Case '{case.name}' has no source volume, which teacher '{self.bundle.name}' needs.",
                "Load training data from a folder (images/), so the teacher can read each volume.",
            )
        volume = read_volume(case.source, self.bundle.profile.modality)
        probabilities = run_pipeline(self.bundle, self.network, volume, device).probabilities_on(volume, case.grid)
        return np.log(np.maximum(probabilities, PROBABILITY_FLOOR))

    def padding_output(self) -> np.ndarray:
        """Beyond a volume's edge lies background, whatever the padding value."""
        fill = np.full(self.bundle.num_classes, np.log(PROBABILITY_FLOOR), dtype=np.float32)
        fill[0] = 0.0
        return fill
