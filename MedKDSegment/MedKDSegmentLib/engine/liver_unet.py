"""Liver U-Net of pyliverlesionseg (Tang et al., EJNMMI Physics 2020), rebuilt in torch with its own CT pipeline.

The package ships Keras 2.2 HDF5 weights (TensorFlow 1.12, Python 3.6). Their arrays are read with h5py
(no Keras, no code) into ``LiverUNet``: a U-Net over 3× max-pooling levels (27× in all) with 3×3×1 and
3×3×3 'same' convolutions, instance normalisation and leaky ReLU before each convolution but the first,
nearest 3× up-sampling followed by a 3³ stride-1 average ("linear" up-sampling, shrinking by 2),
centre-cropped skips and one sigmoid output. It takes the fixed 189×162×162 input and returns the central
163×136×136. ``segment_liver_unet`` reproduces the package's ``cnn_liver_lesion_seg_CT_MR_main`` for a
CT (no library ships these steps):

1. the volume in the closest canonical orientation with its first two axes reversed (LPS);
2. ``crop_ct``: the body's box in x and y, and in z from 20 mm below the hip to 70 mm above the lung's
   lower edge (found from air, lung and bone profiles), at most 489×408×408 mm;
3. resampled to 1.5 mm and 3 mm with pymirc's ``zoom3d`` (``zoom``), a 3³ median filter between them;
   HU/1000 clipped to ±0.2, ×2.5; the first two axes reversed back (RAS);
4. one 189×162×162 segment centred on the volume (zeros around), the network's 163×136×136 output put
   back around that centre, voxels it does not cover taken from the nearest covered one;
5. > 0.5 in LPS; eroded (18-connected), its largest 6-connected component, dilated; linearly resized to
   the box (> 0) and placed in the volume; back to the input's orientation.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage, signal
from torch import nn
from torch.nn import functional as F

from .errors import InvalidInputError
from .profiles import resample_probabilities
from .volume import Volume

INPUT_SHAPE = (189, 162, 162)
OUTPUT_SHAPE = (163, 136, 136)
SPACING = 3.0  # the weights file's header/voxel_size
BOX_MM = (489.0, 408.0, 408.0)
THRESHOLD = 0.5
# (in, out, kernel) of the 15 convolutions, in the Keras file's order
CONVOLUTIONS = (
    (1, 20, (3, 3, 1)), (20, 40, (3, 3, 3)),  # level 0
    (40, 40, (3, 3, 1)), (40, 80, (3, 3, 3)),  # level 1
    (80, 80, (3, 3, 1)), (80, 160, (3, 3, 3)),  # level 2
    (160, 160, (3, 3, 3)), (160, 160, (3, 3, 3)),  # bottom
    (320, 160, (3, 3, 3)), (160, 80, (3, 3, 1)),  # up to level 2
    (160, 80, (3, 3, 3)), (80, 40, (3, 3, 1)),  # up to level 1
    (80, 40, (3, 3, 3)), (40, 20, (3, 3, 1)),  # up to level 0
    (20, 1, (1, 1, 1)),  # output (sigmoid)
)


def _norm_act(x: torch.Tensor) -> torch.Tensor:
    """Keras' instance-normalisation Lambda ((x - mean) / (population std + 1e-7)), then leaky ReLU 0.01."""
    mean, std = _cpu_tensorflow_moments(x)
    return F.leaky_relu((x - mean) / (std + 1e-7), 0.01)


def _cpu_tensorflow_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and population std as the package computes them (TensorFlow 1.12 on a CPU): float32
    sums taken one voxel after another in Keras' (x, y, z, channel) order. Over the 5 M voxels of a level-0
    map these drift ~0.3 % from the exact values, and the liver's edge follows them: with exact moments the
    mask differs from the package's by Dice 0.97 on a real CT, with these by none. numpy's running sum
    (``add.accumulate``, unlike its pairwise ``sum``) is that sequential sum; it runs slab by slab to stay small."""
    channels = x.shape[1]

    def sequential_sum(slabs) -> np.ndarray:
        total = np.zeros(channels, np.float32)
        for slab in slabs:
            total = np.add.accumulate(np.concatenate([total[None], slab]), axis=0, dtype=np.float32)[-1]
        return total

    def slabs(item: torch.Tensor):
        for index in range(item.shape[1]):
            yield item[:, index].permute(1, 2, 0).reshape(-1, channels).float().cpu().numpy()

    count = np.float32(x[0, 0].numel())
    means, stds = [], []
    for item in x:
        mean = sequential_sum(slabs(item)) / count
        variance = sequential_sum(np.square(slab - mean) for slab in slabs(item)) / count
        means.append(mean)
        stds.append(np.sqrt(variance))
    shape = (len(x), channels, 1, 1, 1)
    return tuple(torch.from_numpy(np.stack(v)).to(x).view(shape) for v in (means, stds))  # type: ignore[return-value]


def _centre_crop(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    starts = [(have - want) // 2 for have, want in zip(x.shape[2:], shape)]
    return x[(..., *(slice(s, s + n) for s, n in zip(starts, shape)))]


class LiverUNet(nn.Module):
    """The published liver U-Net; axes as the Keras model's (x, y, z of its RAS array). Returns the liver
    logit (one channel: its sigmoid is the liver probability, so two classes)."""

    feature_layer = "convs.7"

    def __init__(self, in_channels: int = 1, out_channels: int = 2) -> None:
        super().__init__()
        if in_channels != 1 or out_channels != 2:
            raise ValueError("the liver U-Net has one input channel and one sigmoid output (two classes)")
        self.convs = nn.ModuleList(nn.Conv3d(cin, cout, k, padding=tuple(s // 2 for s in k))
                                   for cin, cout, k in CONVOLUTIONS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.convs
        skips = [c[1](_norm_act(c[0](x)))]
        for level in (1, 2, 3):
            y = F.max_pool3d(skips[-1], 3)
            skips.append(c[2 * level + 1](_norm_act(c[2 * level](_norm_act(y)))))
        y = skips.pop()
        for first in (8, 10, 12):
            y = F.avg_pool3d(F.interpolate(y, scale_factor=3, mode="nearest"), 3, stride=1)
            y = torch.cat([_centre_crop(skips.pop(), tuple(y.shape[2:])), y], dim=1)
            y = c[first + 1](_norm_act(c[first](_norm_act(y))))
        return c[14](_norm_act(y))


def keras_state_dict(data: bytes) -> dict[str, torch.Tensor]:
    """The convolutions of a Keras HDF5 weights file as ``LiverUNet``'s state dict (kernels (x, y, z, in,
    out) to (out, in, x, y, z)); the file's arrays only, in its layer order."""
    import h5py  # needed only to install this teacher

    def text(name) -> str:  # Keras writes these names as bytes
        return name.decode() if isinstance(name, bytes) else str(name)

    state = {}
    with h5py.File(io.BytesIO(data), "r") as file:
        layers = [text(name) for name in file.attrs["layer_names"]]
        weighted = [name for name in layers if len(file[name].attrs["weight_names"])]
        if len(weighted) != len(CONVOLUTIONS):
            raise ValueError(f"{len(weighted)} layers with weights, expected {len(CONVOLUTIONS)}")
        for index, name in enumerate(weighted):
            kernel, bias = (np.asarray(file[name][text(w)]) for w in file[name].attrs["weight_names"])
            state[f"convs.{index}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(4, 3, 0, 1, 2)))
            state[f"convs.{index}.bias"] = torch.from_numpy(bias)
    return state


@dataclass
class LiverUNetResult:
    labels: np.ndarray  # uint8 liver mask on the input's array (z, y, x)
    probability: np.ndarray  # float32 liver probability on the input's array (the network's, box-resized)
    seconds: dict[str, float]

    def probabilities_on(self, volume: Volume, target: sitk.Image) -> np.ndarray:
        """Background and liver probabilities (2, z, y, x) resampled linearly onto ``target``."""
        return resample_probabilities(np.stack([1 - self.probability, self.probability]), volume.to_sitk(), target)


def zoom(array: np.ndarray, factors: Sequence[float]) -> np.ndarray:
    """pymirc's ``zoom3d`` (cval 0): each axis in turn, up-sampled by linear interpolation between voxel
    centres or down-sampled by distributing each voxel over the bins it overlaps; centres stay aligned."""
    for axis, factor in enumerate(factors):
        if factor != 1:
            array = np.moveaxis((_upsample if factor > 1 else _downsample)(np.moveaxis(array, axis, 0), factor),
                                0, axis)
    return array


def _upsample(array: np.ndarray, factor: float) -> np.ndarray:
    delta = 1.0 / factor
    big = array.shape[0]
    small = math.ceil(big / delta)
    centres = delta * (np.arange(small) - 0.5 * small + 0.5) + 0.5 * big - 0.5
    left = np.floor(centres).astype(int)
    right = left + 1
    padded = np.concatenate([array, np.zeros((1, *array.shape[1:]))])  # index -1 and big read zeros
    def weight(w):
        return (w.reshape(-1, *[1] * (array.ndim - 1)))
    return (np.where(weight(left >= 0), padded[left] * weight(right - centres), 0)
            + np.where(weight(right < big), padded[np.minimum(right, big)] * weight(centres - left), 0))


def _downsample(array: np.ndarray, factor: float) -> np.ndarray:
    delta = 1.0 / factor
    small = array.shape[0]
    big = math.ceil(small / delta)
    out = np.zeros((big, *array.shape[1:]))
    for i in range(small):
        low = (1.0 / delta) * (i - 0.5 * small) + 0.5 * big
        high = (1.0 / delta) * (i + 1 - 0.5 * small) + 0.5 * big
        first, last = math.floor(low), math.ceil(high) - 1
        if first == last:
            out[first] += array[i] / delta
        else:
            middle = math.ceil(low)
            out[first] += array[i] * (middle - low)
            out[last] += array[i] * (high - middle)
    return out


def _largest_label(labels: np.ndarray, count: int) -> int:
    return int(np.argmax(np.bincount(labels.ravel(), minlength=count + 1)[1:])) + 1


def _bbox(mask: np.ndarray) -> tuple[slice, ...]:
    return ndimage.find_objects(mask.astype(np.int8))[0]


def _extremes(profile: np.ndarray, comparator, order: int, step: int) -> np.ndarray:
    """``argrelextrema`` with the order lowered by ``step`` (not below 1) until something is found."""
    found = signal.argrelextrema(profile, comparator, order=order)[0]
    while len(found) == 0:
        if order == 1:  # the package would loop for ever here
            raise InvalidInputError("The bone profile below the lungs of this CT has no peak or dip to find the "
                                    "hip by.", "Give an abdominal CT (in HU) reaching from the lung bases down.")
        order = max(1, order - step)
        found = signal.argrelextrema(profile, comparator, order=order)[0]
    return found


def crop_ct(
    ct: np.ndarray,
    spacing: np.ndarray,
    tissue: float = -150.0,
    lung: float = -600.0,
    bone: float = 500.0,
    hip_ratio: float = 0.7,
    liver_height: float = 400.0,
    dome_margin: float = 70.0,
    hip_margin: float = 20.0,
    box_mm: tuple[float, float, float] = BOX_MM,
) -> tuple[slice, slice, slice]:
    """The package's ``crop_ct_image`` (with the main function's settings) on an LPS array (x, y, z; z
    towards the head) with ``spacing`` (x, y, z mm): the abdomen's box. Thresholds in HU, lengths in mm."""
    body, count = ndimage.label(ndimage.binary_erosion(ct > tissue))
    if count == 0:
        raise InvalidInputError("No body found in this CT (nothing above -150 HU).", "Give an abdominal CT in HU.")
    body_box = _bbox(body == _largest_label(body, count))
    in_body = np.full(ct.shape, float(ct.min()))
    in_body[body_box] = ct[body_box]

    # Air: the largest component is the outside (the top slice set to 0 HU keeps cut lungs apart from it);
    # the rest of the air, summed per slice, peaks in the lungs.
    top_closed = in_body.copy()
    top_closed[:, :, -1] = 0
    air = top_closed < lung
    air[:, :, :-1] = ndimage.binary_opening(air[:, :, :-1], np.ones((5, 5, 5)))
    air_labels, air_count = ndimage.label(np.pad(air, ((3, 3), (3, 3), (0, 0)), constant_values=1))
    air_labels = air_labels[3:-3, 3:-3, :]
    if air_count < 3:
        raise InvalidInputError("No lungs found in this CT: the liver model needs the lung bases in view.",
                                "Give an abdominal CT that reaches up to the lungs.")
    labels = np.arange(1, air_count + 1)
    volumes = np.bincount(air_labels.ravel(), minlength=air_count + 1)[1:] * np.prod(spacing)
    ranked = np.sort(volumes)
    inner_air = (air_labels != labels[volumes == ranked[-1]][0]) & air
    if not inner_air.any():
        raise InvalidInputError("No lungs found in this CT: the liver model needs the lung bases in view.",
                                "Give an abdominal CT that reaches up to the lungs.")
    profile = signal.convolve(inner_air.sum(0).sum(0), np.ones(7), "same")
    low, high = profile.min(), profile.max()
    lung_slices = np.where(profile > low + 0.5 * (high - low))[0]
    starts = np.where(signal.convolve(lung_slices, np.array([1, -1]), "same") != 1)[0]
    dome = lung_slices[0]
    if len(starts) > 1:
        gap = profile[lung_slices[starts[1] - 1]:lung_slices[starts[1]]]
        if np.any(gap < low + 0.2 * (high - low)):  # two separate air bands: the lower one is the lungs
            dome = lung_slices[starts[1]]
    air_box = _bbox(inner_air)
    centre_x = (air_box[0].start + air_box[0].stop + 1) // 2
    centre_y = (air_box[1].start + air_box[1].stop + 1) // 2
    lungs = [labels[volumes == ranked[-2]][0], labels[volumes == ranked[-3]][0]]
    lower = lungs[int(np.argmax([_bbox(air_labels == lung_label)[2].start for lung_label in lungs]))]
    dome = max(dome, _bbox(air_labels == lower)[2].start)

    # Bone per slice below the dome: the hip is a bone peak near the deepest minimum.
    bones = signal.convolve((ct > bone).astype(np.int16).sum(0).sum(0), np.ones(7), "same")[:dome]
    if len(bones) == 0:
        raise InvalidInputError("The lungs reach the lowest slice of this CT: no abdomen below them.",
                                "Give an abdominal CT.")
    most = int(np.argmax(bones))
    minima = _extremes(bones, np.less, 15, 3)
    least = minima[np.argsort(bones[minima])[0]]
    maxima = _extremes(bones, np.greater, 15, 3)
    second = maxima[np.argsort(bones[maxima])[-2 if len(maxima) > 1 else -1]]
    if least < most and least < second:
        least = second + int(np.argmin(bones[second:]))
    peaks = _extremes(bones, np.greater, 5, 1)
    ratio = hip_ratio
    while True:
        candidates = np.where(bones > ratio * (bones[most] - bones[least]) + bones[least])[0]
        hip_peaks = np.intersect1d(peaks, candidates)
        if len(candidates) and len(hip_peaks):
            break
        if ratio == 0.05:  # the package would loop for ever here
            raise InvalidInputError("No bone structure found below the lungs in this CT.",
                                    "Give an abdominal CT in HU.")
        ratio = max(ratio - 0.1, 0.05)
    below = hip_peaks[hip_peaks < least]
    hip = below[-1] if len(below) >= 2 else 0
    if (dome - hip) * spacing[2] > liver_height:
        hip = dome - int(liver_height / spacing[2])
    z = slice(max(0, hip - int(hip_margin / spacing[2])), min(ct.shape[2], dome + int(dome_margin / spacing[2])))

    # The body again in that slab, more strongly eroded, for x and y.
    slab = ct[body_box[0], body_box[1], z]
    inner, count = ndimage.label(ndimage.binary_erosion(slab > tissue, np.ones((5, 5, 5))))
    if count == 0:
        raise InvalidInputError("No body found in the abdominal slab of this CT.", "Give an abdominal CT in HU.")
    inner_box = _bbox(inner == _largest_label(inner, count))
    box = [slice(body_box[axis].start + inner_box[axis].start, body_box[axis].start + inner_box[axis].stop)
           for axis in (0, 1)]

    # At most box_mm: x and y shrink around the air's centre, z from below.
    for axis, centre in ((0, centre_x), (1, centre_y)):
        size = box[axis].stop - box[axis].start
        excess = size * spacing[axis] - box_mm[axis]
        if excess > 0:
            cut_low = int(np.ceil((centre - box[axis].start) / size * excess / spacing[axis]))
            cut_high = int(np.ceil((box[axis].stop - centre) / size * excess / spacing[axis]))
            box[axis] = slice(box[axis].start + cut_low, box[axis].stop - cut_high)
    excess = (z.stop - z.start) * spacing[2] - box_mm[2]
    if excess > 0:
        z = slice(z.start + int(np.ceil(excess / spacing[2])), z.stop)
    return box[0], box[1], z


def _predict(image: np.ndarray, network: LiverUNet, device: torch.device) -> np.ndarray:
    """DeepVoxNet's centre-sampled prediction: one input segment centred on ``image`` (zeros around), the
    output placed around the same centre, uncovered voxels from the nearest covered one."""
    segment = np.zeros(INPUT_SHAPE, np.float32)
    source, target, placed, taken = [], [], [], []
    for size, window, out in zip(image.shape, INPUT_SHAPE, OUTPUT_SHAPE):
        centre = math.ceil((size - 1) / 2)
        left = min(centre, window // 2)
        right = min(size - centre - 1, window // 2 - (1 - window % 2))
        source.append(slice(centre - left, centre + right + 1))
        target.append(slice(window // 2 - left, window // 2 + right + 1))
        middle = centre if window % 2 else centre - 0.5
        start, end = middle - (out - 1) / 2, middle + (out - 1) / 2
        under, over = max(0.0, -start), max(0.0, end - (size - 1))
        placed.append(slice(round(start + under - 1e-7), round(end - over + 1 - 1e-7)))
        taken.append(slice(math.ceil(under), -math.ceil(over) or None))
    segment[tuple(target)] = image[tuple(source)]
    with torch.inference_mode():
        output = torch.sigmoid(network(torch.from_numpy(segment)[None, None].to(device)))[0, 0].cpu().numpy()
    result = np.full(image.shape, np.nan, np.float32)
    result[tuple(placed)] = output[tuple(taken)]
    missing = np.isnan(result)
    if missing.any():
        result = result[tuple(ndimage.distance_transform_edt(missing, return_distances=False, return_indices=True))]
    return result


def segment_liver_unet(volume: Volume, network: LiverUNet, device: torch.device | str = "cpu") -> LiverUNetResult:
    """The package's CT liver pipeline on ``volume`` (see the module docstring); labels on its array."""
    device = torch.device(device)
    network = network.to(device).eval()
    started = time.perf_counter()
    lps = sitk.DICOMOrient(volume.to_sitk(), "LPS")
    ct = sitk.GetArrayFromImage(lps).transpose(2, 1, 0).astype(np.float64)
    spacing = np.array(lps.GetSpacing())
    box = crop_ct(ct, spacing)
    fine = ndimage.median_filter(zoom(ct[box], spacing / (SPACING / 2)), size=3)
    prepared = np.clip(zoom(fine, [0.5] * 3) / 1000, -0.2, 0.2) * 2.5
    probability_ras = _predict(np.flip(prepared, (0, 1)).astype(np.float32), network, device)
    probability = np.flip(probability_ras, (0, 1))
    mask = _postprocess(probability > THRESHOLD)
    shape = ct[box].shape
    labels, soft = np.zeros(ct.shape, np.uint8), np.zeros(ct.shape, np.float32)
    labels[box] = ndimage.zoom(mask.astype(np.int16), np.divide(shape, mask.shape), order=1, prefilter=False) > 0
    soft[box] = ndimage.zoom(probability, np.divide(shape, probability.shape), order=1, prefilter=False)
    orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines([float(v) for v in volume.direction])
    back = [_from_lps(array, lps, orientation) for array in (labels, soft)]
    return LiverUNetResult(back[0], back[1], {"total": time.perf_counter() - started})


def _postprocess(mask: np.ndarray) -> np.ndarray:
    """Eroded (18-connected), the largest 6-connected component, dilated back."""
    structure = ndimage.generate_binary_structure(3, 2)
    eroded = ndimage.binary_erosion(mask, structure=structure)
    components, count = ndimage.label(eroded)
    if count == 0:  # the package would mark the whole box as liver here
        raise InvalidInputError("The liver model found no liver in this CT.", "Give an abdominal CT in HU.")
    return ndimage.binary_dilation(components == _largest_label(components, count), structure=structure)


def _from_lps(array: np.ndarray, lps: sitk.Image, orientation: str) -> np.ndarray:
    """An (x, y, z) array on the LPS grid, back in the volume's own orientation as (z, y, x)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.CopyInformation(lps)
    return sitk.GetArrayFromImage(sitk.DICOMOrient(image, orientation))
