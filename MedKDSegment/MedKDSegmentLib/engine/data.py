"""Training data: a folder of image/label pairs prepared on the model grid, and patch sampling.

Layout: ``DIR/images/<case>`` and, for labelled cases, ``DIR/labels/<case>`` with the same
file name (the layout ``medkd phantom`` writes). Images without labels are unlabelled
cases (teacher soft targets only when distilling).

Privileged inputs (KD-Net, Hu et al. 2020): other scans of the same subjects, on the same grid, that a teacher
sees and the student does not (``PRIVILEGED_DIR/images/<case>``, same file names). They ride along as extra
channels after the image's; each network takes the first ``networks.input_channels`` of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .errors import InvalidInputError
from .profiles import Profile, labels_to_model_grid, to_model_grid
from .segfile import read_seg_nrrd_names
from .segment_names import labels_by_segment_name
from .volume import (
    VOLUME_SUFFIXES,
    Volume,
    check_image,
    check_label_values,
    check_labels_match,
    check_modality,
    read_volume,
)


@dataclass
class Case:
    name: str
    image: np.ndarray  # normalised, on the model grid (z, y, x)
    labels: np.ndarray | None  # uint8 on the same grid, or None when unlabelled
    teacher: np.ndarray | None = None  # cached teacher logits (C, z, y, x), float16
    teacher_source: tuple | None = None  # which teachers filled ``teacher``
    # The teachers' outputs (C,) on the padding value: what ``teacher`` holds beyond the volume's edge.
    teacher_fill: np.ndarray | None = None
    _teacher_labels: tuple | None = None  # (teacher_source, argmax of the cached outputs), built when first needed
    source: Path | None = None  # the image file: a published teacher reads it through its own pipeline
    grid: sitk.Image | None = None  # the model grid ``image`` lies on
    privileged: np.ndarray | None = None  # (K, z, y, x): teacher-only channels (KD-Net), normalised, same grid

    def inputs(self, channels: int = 1) -> np.ndarray:
        """The first ``channels`` input channels: the image (z, y, x) alone, or with privileged ones (C, z, y, x)."""
        if channels == 1:
            return self.image
        available = 1 + (0 if self.privileged is None else len(self.privileged))
        if channels > available:
            raise InvalidInputError(
                f"A network here takes {channels} input channels; case '{self.name}' has {available}.",
                "Give the privileged scans the teacher was trained with (--privileged MODALITY=FOLDER).")
        return np.concatenate([self.image[None], self.privileged[: channels - 1]])

    def guide_labels(self) -> np.ndarray | None:
        """Labels that steer patch sampling: the reference, else the cached teacher's prediction.

        Without this, unlabelled volumes would be sampled at random centres (mostly background),
        and a semi-supervised student would rarely see the structures its teacher segments.
        """
        if self.labels is not None or self.teacher is None:
            return self.labels
        if self._teacher_labels is None or self._teacher_labels[0] != self.teacher_source:
            teachers = max(len(self.teacher_source or ()) - 1, 1)  # several teachers are stacked on channels
            classes = self.teacher.shape[0] // teachers
            self._teacher_labels = (self.teacher_source, self.teacher[:classes].argmax(0).astype(np.uint8))
        return self._teacher_labels[1]


def _is_volume(path: Path) -> bool:
    return path.is_dir() or any(path.name.endswith(s) for s in VOLUME_SUFFIXES)


def find_pairs(folder: str | Path) -> list[tuple[Path, Path | None]]:
    folder = Path(folder)
    images = folder / "images"
    if not images.is_dir():
        raise InvalidInputError(
            f"'{folder}' has no 'images' folder.",
            "Put images in DIR/images and labels with the same file names in DIR/labels "
            "(as 'medkd phantom' writes them).",
        )
    pairs = []
    for image in sorted(p for p in images.iterdir() if _is_volume(p) and not p.name.startswith(".")):
        # The same file name, or a Slicer segmentation of it (<stem>.seg.nrrd)
        candidates = [folder / "labels" / image.name, folder / "labels" / f"{image.name.split('.')[0]}.seg.nrrd"]
        pairs.append((image, next((c for c in candidates if c.exists()), None)))
    if not pairs:
        raise InvalidInputError(f"'{images}' holds no volumes.", "Add NIfTI/NRRD/MHA files or DICOM folders.")
    return pairs


def load_cases(
    folder: str | Path,
    profile: Profile,
    label_table: dict[int, str],
    progress: Callable[[float, str], None] | None = None,
    privileged: list[tuple[str | Path, Profile]] | None = None,
) -> list[Case]:
    """Read, check and prepare every case; bad cases are reported by name, not skipped silently.

    Args:
        folder: ``images/`` and, optionally, ``labels/``.
        profile: how the images are prepared.
        label_table: the model's (value -> name): a Slicer segmentation's values are matched to it by
            segment name, a plain label map's must be its values.
        progress: ``(fraction, message)`` callback.
        privileged: (folder, profile) per privileged input (KD-Net): ``folder/images/<same file name>``, on the
            image's grid, prepared with its own profile at the image's model spacing.
    """
    pairs = find_pairs(folder)
    cases = []
    for index, (image_path, label_path) in enumerate(pairs):
        image = read_volume(image_path)
        check_modality(image, profile.modality, f"'{image_path}'")
        image.modality = profile.modality
        check_image(image, f"'{image_path}'")
        array, grid = to_model_grid(image, profile)
        labels = None
        if label_path is not None:
            label_volume = read_volume(label_path)
            label_volume = check_labels_match(image, label_volume, f"'{label_path}'")
            segments = read_seg_nrrd_names(label_path)  # {} unless it is a Slicer segmentation
            if segments:
                label_volume = label_volume.with_array(
                    labels_by_segment_name(label_volume.array, segments, label_table, what=f"'{label_path}'"))
            check_label_values(label_volume, set(label_table), f"'{label_path}'")
            labels = labels_to_model_grid(label_volume, grid)
        extra = [_privileged_channel(Path(source) / "images" / image_path.name, other, image, grid)
                 for source, other in privileged or []]
        cases.append(Case(image_path.name.split(".")[0], array, labels, source=image_path, grid=grid,
                          privileged=np.stack(extra) if extra else None))
        if progress:
            progress((index + 1) / len(pairs), f"loaded {image_path.name}")
    return cases


def _privileged_channel(path: Path, profile: Profile, image: Volume, grid: sitk.Image) -> np.ndarray:
    """A privileged scan of the case in ``path``, prepared with its ``profile`` onto the case's model ``grid``
    (it must lie on the image's own grid: the same subject, registered)."""
    if not path.exists():
        raise InvalidInputError(f"The privileged scan '{path}' is missing (every case needs one, same file name).",
                                f"Add it, or leave out --privileged for '{path.parents[1]}'.")
    volume = read_volume(path)
    check_image(volume, f"'{path}'")
    check_modality(volume, profile.modality, f"'{path}'")
    if not volume.same_grid(image):
        raise InvalidInputError(f"The privileged scan '{path}' does not lie on its image's grid.",
                                "Resample it onto the image (the same subject, registered) first.")
    volume.modality = profile.modality
    return to_model_grid(volume, replace(profile, spacing=tuple(grid.GetSpacing())))[0]


def sample_batch(
    cases: list[Case],
    batch_size: int,
    patch: tuple[int, int, int],
    rng: np.random.Generator,
    foreground_fraction: float = 0.67,
    labelled_share: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Random patches (N, 1 + K, *patch): the image and, when every case has them, its K privileged channels;
    labels (N, 1, *patch), a labelled flag per item and, when every case has them, the cached teacher logits
    (N, C, *patch).

    Cropping straight from in-memory arrays (padded where a patch leaves the volume)
    keeps a training step cheap; centres favour a random present structure so small
    structures are seen often. When labelled and unlabelled cases mix (semi-supervised), a fixed
    ``labelled_share`` of each batch is labelled, as in mean-teacher style training: drawn at random,
    10 % labels would leave most steps without any supervised term.
    """
    images, labels, labelled, teacher = [], [], [], []
    with_teacher = all(case.teacher is not None for case in cases)
    channels = 1 + min(0 if case.privileged is None else len(case.privileged) for case in cases)
    with_labels = [c for c in cases if c.labels is not None]
    without_labels = [c for c in cases if c.labels is None]
    mixed = bool(with_labels) and bool(without_labels)
    labelled_items = max(1, round(batch_size * labelled_share)) if mixed else 0
    for index in range(batch_size):
        pool = (with_labels if index < labelled_items else without_labels) if mixed else cases
        case = pool[rng.integers(len(pool))]
        shape = np.array(case.image.shape)
        centre = rng.integers(0, shape)
        guide = case.guide_labels()
        if guide is not None and rng.random() < foreground_fraction:
            present = [v for v in np.unique(guide[::4, ::4, ::4]) if v != 0]
            if present:
                candidates = np.argwhere(guide == rng.choice(present))
                centre = candidates[rng.integers(len(candidates))]
        start = centre - np.array(patch) // 2
        images.append(np.stack([_crop(channel, start, patch, float(channel.min()))
                                for channel in case.inputs(channels).reshape(-1, *case.image.shape)]))
        label = case.labels if case.labels is not None else np.zeros(case.image.shape, np.uint8)
        labels.append(_crop(label, start, patch, 0))
        labelled.append(case.labels is not None)
        if with_teacher:
            # Beyond the edge the image is padded with its minimum, so the teacher's target there is what
            # the teacher says about that value (a constant 0 would be a uniform class distribution, and
            # for CWD's spatial softmax the most salient place of every class).
            fill = case.teacher_fill if case.teacher_fill is not None else np.zeros(len(case.teacher))
            teacher.append(np.stack([_crop(channel, start, patch, float(value))
                                     for channel, value in zip(case.teacher, fill)]))
    return (
        torch.from_numpy(np.stack(images)).float(),
        torch.from_numpy(np.stack(labels)[:, None].astype(np.int64)),
        torch.tensor(labelled),
        torch.from_numpy(np.stack(teacher)).float() if with_teacher else None,
    )


def _crop(array: np.ndarray, start: np.ndarray, patch: tuple[int, int, int], fill: float) -> np.ndarray:
    out = np.full(patch, fill, dtype=array.dtype)
    source = tuple(slice(max(s, 0), min(s + p, n)) for s, p, n in zip(start, patch, array.shape))
    target = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(source, start))
    out[target] = array[source]
    return out
