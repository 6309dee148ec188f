"""Synthetic abdominal phantoms: a CT or T1-weighted MR image with its organ labels.

The anatomy is a set of implicit shapes in patient millimetres (LPS: +x patient left, +y posterior,
+z superior; body centre at the origin) warped by a smooth random deformation. A seed therefore fixes
the subject whatever the grid: a finer or anisotropic grid samples the same body, a smaller field of
view crops it. Labelled structures follow ``labels.ABDOMEN_STRUCTURES``; bowel, stomach, gallbladder,
ribs, lungs, discs and the posterior vertebral arch are present but unlabelled, as in real data.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import InvalidInputError
from .labels import ABDOMEN_STRUCTURES
from .volume import Volume, atomic_path, check_output_path, normalize_modality, write_volume

DEFAULT_SIZE = (128, 128, 80)  # (x, y, z) voxels
DEFAULT_SPACING = (3.0, 3.0, 3.0)  # (x, y, z) mm
MAX_VOXELS = 2**29  # about 2 GiB of float32 image; larger grids are almost certainly a typo
SEED_STRIDE = 100003  # case i of a dataset with seed s uses s * SEED_STRIDE + i
MAX_CASES = SEED_STRIDE - 1  # so datasets with different seeds never share a case

_SLAB_VOXELS = 1 << 22  # render in z-slabs of about this many voxels to bound memory


@dataclass(frozen=True)
class DomainShift:
    """A change of scanner or protocol; the default changes nothing."""

    contrast_scale: float = 1.0  # multiplies every tissue's contrast against fat
    intensity_offset: float = 0.0  # HU for CT; a fraction of the fat intensity for MR
    noise_scale: float = 1.0  # multiplies the noise standard deviation
    bias_strength: float = 1.0  # multiplies the MR bias-field amplitude (CT has none)

    def __post_init__(self) -> None:
        for name in ("contrast_scale", "intensity_offset", "noise_scale", "bias_strength"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise InvalidInputError(
                    f"DomainShift.{name} is {value!r}.", "Give a finite number (the default is no shift)."
                )
        if self.contrast_scale <= 0:
            raise InvalidInputError(
                f"DomainShift.contrast_scale is {self.contrast_scale}; it must be positive.",
                "Use 1.0 for unchanged contrast, below 1 for flatter, above 1 for stronger.",
            )
        for name in ("noise_scale", "bias_strength"):
            if getattr(self, name) < 0:
                raise InvalidInputError(
                    f"DomainShift.{name} is {getattr(self, name)}; it must not be negative.",
                    "Use 0 to switch it off and 1.0 for the default.",
                )


# --------------------------------------------------------------------------------------------
# Tissues: code -> (name, CT HU, MR T1 arbitrary units, enhances with CT contrast)
# --------------------------------------------------------------------------------------------

_TISSUES = (
    ("air", -1000.0, 0.0, False),
    ("subcutaneous fat", -105.0, 800.0, False),
    ("visceral fat", -95.0, 760.0, False),
    ("muscle", 50.0, 230.0, False),
    ("lung", -850.0, 25.0, False),
    ("heart", 150.0, 90.0, True),
    ("bowel gas", -950.0, 0.0, False),
    ("bowel wall", 45.0, 260.0, True),
    ("bowel fluid", 15.0, 110.0, False),
    ("stool", -30.0, 330.0, False),
    ("gastric content", 25.0, 150.0, False),
    ("gallbladder", 10.0, 90.0, False),
    ("rib", 380.0, 330.0, False),
    ("csf", 10.0, 70.0, False),
    ("disc", 80.0, 190.0, False),
    ("posterior arch", 450.0, 360.0, False),
    ("liver", 110.0, 450.0, True),
    ("spleen", 120.0, 320.0, True),
    ("kidney cortex", 175.0, 300.0, True),
    ("kidney medulla", 135.0, 210.0, True),
    ("artery", 180.0, 40.0, True),
    ("vein", 140.0, 70.0, True),
    ("pancreas", 90.0, 470.0, True),
    ("cancellous bone", 250.0, 560.0, False),
    ("cortical bone", 600.0, 50.0, False),
)
_T = {name: code for code, (name, *_rest) in enumerate(_TISSUES)}
_AIR_LIKE = (_T["air"], _T["lung"], _T["bowel gas"])  # keep their physical values under contrast shifts
_L = {s.name: s.value for s in ABDOMEN_STRUCTURES}


# --------------------------------------------------------------------------------------------
# Shapes: each gives a "level" array, below 1 inside, on (warped) mm coordinates
# --------------------------------------------------------------------------------------------


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """Local-to-world rotation Rz @ Ry @ Rx, angles in degrees."""
    a, b, c = np.radians([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass
class _Ellipsoid:
    centre: np.ndarray  # (3,) mm
    semi: np.ndarray  # (3,) mm, local axes
    rot: np.ndarray = field(default_factory=lambda: np.eye(3))  # local -> world

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        half = np.sqrt(((self.rot * self.semi[None, :]) ** 2).sum(axis=1))
        return self.centre - half, self.centre + half

    def level(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        d = (x - np.float32(self.centre[0]), y - np.float32(self.centre[1]), z - np.float32(self.centre[2]))
        total = None
        for i in range(3):
            w = (self.rot[:, i] / self.semi[i]).astype(np.float32)  # local coordinate i, normalised
            q = w[0] * d[0] + w[1] * d[1] + w[2] * d[2]
            q *= q
            total = q if total is None else total + q
        return total


@dataclass
class _Tube:
    """A generalised cylinder along one axis: centre and radii are polynomials of that coordinate."""

    axis: int  # 0 x, 1 y, 2 z
    start: float  # extent along the axis (rounded caps beyond)
    stop: float
    centre: tuple[np.ndarray, np.ndarray]  # polynomial coefficients of the two other coordinates
    radius: tuple[np.ndarray, np.ndarray]

    def _others(self) -> tuple[int, int]:
        return tuple(i for i in range(3) if i != self.axis)  # type: ignore[return-value]

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        t = np.linspace(self.start, self.stop, 33)
        lo, hi = np.zeros(3), np.zeros(3)
        cap = max(np.polyval(r, t).max() for r in self.radius)
        lo[self.axis], hi[self.axis] = self.start - cap, self.stop + cap
        for other, c, r in zip(self._others(), self.centre, self.radius, strict=True):
            lo[other] = (np.polyval(c, t) - np.polyval(r, t)).min()
            hi[other] = (np.polyval(c, t) + np.polyval(r, t)).max()
        return lo, hi

    def level(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        coords = (x, y, z)
        t = coords[self.axis]
        tc = np.clip(t, np.float32(self.start), np.float32(self.stop))
        total = None
        for other, c, r in zip(self._others(), self.centre, self.radius, strict=True):
            q = (coords[other] - _polyval32(c, tc)) / _polyval32(r, tc)
            q *= q
            total = q if total is None else total + q
        # Rounded ends: distance past the end, in units of the end's smaller radius.
        for end in (self.start, self.stop):
            cap = np.float32(min(np.polyval(r, end) for r in self.radius))
            past = np.abs(t - tc) * (tc == np.float32(end)) / cap
            total += past * past
        return total


def _polyval32(coefficients: np.ndarray, t: np.ndarray) -> np.ndarray:
    out = np.full_like(t, np.float32(coefficients[0]))
    for c in coefficients[1:]:
        out *= t
        out += np.float32(c)
    return out


def _through(points: Sequence[tuple[float, float]]) -> np.ndarray:
    """Polynomial through the given (t, value) points (degree len - 1)."""
    t, v = zip(*points, strict=True)
    return np.polyfit(t, v, len(points) - 1)


# --------------------------------------------------------------------------------------------
# Smooth random deformation: cubic B-spline on a coarse control grid in a fixed physical box
# --------------------------------------------------------------------------------------------

_BOX = np.array([220.0, 170.0, 220.0])  # control-grid half extent (x, y, z) mm; fixed, so grid-free
_LEVELS = ((6, 6.0, 10.0), (12, 1.0, 2.0))  # (control points per axis, RMS amplitude range mm)


def _bspline_basis(coords: np.ndarray, half: float, n: int) -> np.ndarray:
    t = np.clip((coords + half) / (2 * half), 0.0, 1.0) * (n - 1)
    a = np.abs(t[:, None] - np.arange(n)[None, :])
    inner = (4 - 6 * a**2 + 3 * a**3) / 6
    outer = np.clip(2 - a, 0, None) ** 3 / 6
    weights = np.where(a < 1, inner, outer)
    weights[weights < 1e-7] = 0.0  # float32 denormals would make the products crawl
    return weights.astype(np.float32)


class _Deformation:
    """Sum of B-spline displacement fields, one per control grid (coarse bends, fine wobble)."""

    def __init__(self, levels: Sequence[np.ndarray]) -> None:
        self.levels = [c.astype(np.float32) for c in levels]  # each (3, z, y, x) control displacements mm
        # The largest displacement per axis, sampled finely enough (4 per knot of the finest grid)
        # that the cubic can only overshoot it by a fraction of a mm; shapes are searched this far.
        n = max(c.shape[-1] for c in levels)
        probe = self.field(*(np.linspace(-h, h, 4 * (n - 1) + 1) for h in _BOX))
        self.margin = np.array([np.abs(c).max() * 1.05 + 2.0 for c in probe])

    def field(self, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray) -> list[np.ndarray]:
        """Displacement (dx, dy, dz) in mm, each (nz, ny, nx), at the grid of the 1D mm axes."""
        bases = [
            [_bspline_basis(c, h, levels.shape[-1]) for c, h in zip((xs, ys, zs), _BOX, strict=True)]
            for levels in self.levels
        ]
        bx = np.concatenate([b[0] for b in bases], axis=1)  # every level in one product
        out = []
        for component in range(3):
            parts = []
            for (_, by, bz), coefficients in zip(bases, self.levels, strict=True):
                t = np.tensordot(bz, coefficients[component], axes=(1, 0))  # (nz, y, x)
                parts.append(np.einsum("zji,yj->zyi", t, by))  # (nz, ny, x)
            t = np.concatenate(parts, axis=2)
            out.append((t.reshape(-1, t.shape[2]) @ bx.T).reshape(len(zs), len(ys), len(xs)))
        return out


# --------------------------------------------------------------------------------------------
# Subject: every random anatomical parameter, drawn in a fixed order from the seed
# --------------------------------------------------------------------------------------------


@dataclass
class _Subject:
    deformation: _Deformation
    body: tuple[float, float]  # outer semi-axes (x, y)
    wall: tuple[float, float]  # outer semi-axes of the muscle wall (inside the fat)
    cavity: tuple[float, float]  # semi-axes of the abdominal cavity
    cavity_y: float  # cavity centre y (fat is thicker in front than behind, or not)
    rectus: list[_Ellipsoid]
    ribs: dict[str, float]
    diaphragm: dict[str, float]
    heart: _Ellipsoid
    spine: dict[str, float]
    psoas: list[_Tube]
    paraspinal: list[_Ellipsoid]
    liver: list[_Ellipsoid]
    liver_cut: dict[str, float]
    gallbladder: _Ellipsoid | None
    pancreas: _Tube
    spleen: _Ellipsoid
    spleen_notch: _Ellipsoid
    kidneys: list[tuple[_Ellipsoid, _Ellipsoid, bool]]  # (kidney, hilum, mirrored), right then left
    ivc: _Tube
    aorta: _Tube
    iliac_veins: list[_Tube]
    iliac_arteries: list[_Tube]
    stomach: _Ellipsoid
    stomach_gas: float  # fraction of the stomach's depth filled with gas
    colon: list[tuple[_Tube, float]]  # (segment, gas fraction)
    small_bowel: list[tuple[_Ellipsoid, str]]


def _draw_subject(rng: np.random.Generator) -> _Subject:
    def jitter(sd: float, limit: float) -> float:
        return float(np.clip(rng.normal(0.0, sd), -limit, limit))

    def scale(sd: float = 0.06, limit: float = 0.15) -> float:
        return 1.0 + jitter(sd, limit)

    def small_rotation(base: tuple[float, float, float] = (0.0, 0.0, 0.0), sd: float = 4.0) -> np.ndarray:
        return _rotation(*(b + jitter(sd, 10.0) for b in base))

    def column(x: float, y: float, bottom: float, top: float, rx: float, ry: float, taper: float = 0.0) -> _Tube:
        """A tube along z centred at (x, y); ``taper`` widens it by that fraction per mm upwards."""
        return _Tube(
            2,
            bottom,
            top,
            (np.array([x]), np.array([y])),
            (rx * np.array([taper, 1.0]), ry * np.array([taper, 1.0])),
        )

    # Deformation first so it does not depend on how many bowel loops follow.
    levels = []
    for n, low, high in _LEVELS:
        coefficients = rng.normal(0.0, 1.0, size=(3, n, n, n))
        probe = _Deformation([coefficients]).field(*(np.linspace(-h, h, 2 * n) for h in (150.0, 110.0, 150.0)))
        rms = math.sqrt(float(sum((c.astype(np.float64) ** 2).mean() for c in probe)))
        levels.append(coefficients * (rng.uniform(low, high) / rms))
    deformation = _Deformation(levels)

    # Trunk: the cavity is set by the skeleton, fat and muscle are laid around it.
    sx, sy = scale(0.04, 0.1), scale(0.04, 0.1)
    cavity = (133.0 * sx, 88.0 * sy)
    muscle = rng.uniform(8.0, 14.0)
    obesity = rng.beta(2.0, 2.5)
    fat_lat = 8.0 + 30.0 * obesity * scale(0.1, 0.25)
    fat_ant = 10.0 + 32.0 * obesity * scale(0.1, 0.25)
    fat_post = 8.0 + 20.0 * obesity * scale(0.1, 0.25)
    cavity_y = (fat_ant - fat_post) / 2
    wall = (cavity[0] + muscle, cavity[1] + muscle)
    body = (wall[0] + fat_lat, wall[1] + (fat_ant + fat_post) / 2)

    def place(x: float, y: float, z: float, sd: float = 4.0) -> np.ndarray:
        """Cavity-frame position (mm for an average subject) to world mm, with jitter."""
        return np.array([x * sx + jitter(sd, 10.0), cavity_y + y * sy + jitter(sd, 10.0), z + jitter(sd, 10.0)])

    def size(*semi: float, sd: float = 0.06, common: float | None = None) -> np.ndarray:
        overall = scale(sd, 0.15) if common is None else common
        return np.array([s * overall * scale(0.03, 0.08) for s in semi])

    rectus_y = cavity_y - cavity[1] - muscle * 0.5
    rectus_semi = np.array([32.0 * scale(), muscle * 0.5 + rng.uniform(2.0, 5.0), 400.0])
    rectus = [_Ellipsoid(np.array([side * 33.0, rectus_y, 0.0]), rectus_semi) for side in (-1, 1)]
    ribs = {
        "first": rng.uniform(-5.0, 20.0),  # lowest rib centre at the mid-axillary line
        "period": rng.uniform(22.0, 27.0),
        "thickness": rng.uniform(8.0, 11.0),
        "slope": rng.uniform(20.0, 35.0),  # posterior end higher than anterior
    }
    diaphragm = {
        "base": 80.0 + jitter(6.0, 15.0),
        "dome": rng.uniform(18.0, 28.0),
        "dome_x": 62.0 * sx,
        "right": rng.uniform(4.0, 12.0),  # the right dome sits higher, over the liver
        "recess": rng.uniform(28.0, 40.0),  # posterior costophrenic recess dips lower
    }
    heart = _Ellipsoid(place(15.0, -25.0, 135.0, sd=2.0), size(62.0, 52.0, 60.0), small_rotation())

    # Spine: a column of vertebral bodies and discs, canal and arch behind.
    height, disc = rng.uniform(24.0, 30.0), rng.uniform(7.0, 11.0)
    spine_semi = (23.0 * scale(0.05), 17.0 * scale(0.05))
    spine_y = cavity_y + cavity[1] - 53.0 + jitter(2.0, 5.0)
    spine = {
        "y": spine_y,
        "a": spine_semi[0],
        "b": spine_semi[1],
        "height": height,
        "period": height + disc,
        "phase": rng.uniform(0.0, height + disc),  # vertebral level offset along z
        "cortex": 2.5,
        "canal_y": spine_y + spine_semi[1] + 9.0,
        "canal_a": 11.0 * scale(0.05),
        "canal_b": 8.0 * scale(0.05),
    }
    psoas = []
    psoas_top = 30.0 + jitter(6.0, 15.0)
    for side in (-1, 1):
        grow = 22.0 * scale(0.08, 0.2) / 160.0  # radius gained per mm going down
        radius = np.array([-grow, grow * psoas_top + 3.0])
        centre_x = side * 0.9 * radius
        centre_x[-1] += side * (spine_semi[0] + 4.0)
        psoas.append(_Tube(2, psoas_top - 230.0, psoas_top, (centre_x, np.array([spine_y])), (radius, 0.85 * radius)))
    paraspinal = [
        _Ellipsoid(
            np.array([side * 34.0, spine_y + 50.0 + jitter(2.0, 5.0), 0.0]),
            np.array([27.0 * scale(), 20.0 * scale(), 400.0]),
        )
        for side in (-1, 1)
    ]

    # Liver: right lobe and left lobe, cut below by an oblique plane and above by the diaphragm.
    liver_scale = scale()
    liver = [
        _Ellipsoid(place(-64.0, 4.0, 35.0), size(75.0, 82.0, 75.0, common=liver_scale), small_rotation()),
        _Ellipsoid(place(10.0, -50.0, 55.0), size(60.0, 30.0, 40.0, common=liver_scale), small_rotation((0, 0, -15))),
    ]
    liver_cut = {"z0": -11.0 + jitter(6.0, 12.0), "slope": 0.35 * scale(0.1, 0.25), "cavity_y": cavity_y}
    gallbladder = None
    if rng.random() < 0.75:
        gallbladder = _Ellipsoid(place(-42.0, -45.0, -3.0), size(14.0, 15.0, 35.0, sd=0.12), small_rotation())

    # Pancreas: tail at the splenic hilum, body over the aorta, head to the right and lower.
    tail, body_mid, head = place(82.0, 12.0, 30.0), place(8.0, -24.0, 17.0), place(-28.0, -14.0, -3.0)
    thickness = scale(0.08, 0.2)
    xs = [tail[0], body_mid[0], head[0]]
    pancreas = _Tube(
        0,
        head[0] - 8.0,
        tail[0] - 6.0,
        (
            _through(list(zip(xs, (tail[1], body_mid[1], head[1]), strict=True))),
            _through(list(zip(xs, (tail[2], body_mid[2], head[2]), strict=True))),
        ),
        (
            _through(list(zip(xs, np.array([11.0, 12.0, 16.0]) * thickness, strict=True))),
            _through(list(zip(xs, np.array([13.0, 15.0, 22.0]) * thickness, strict=True))),
        ),
    )

    # Spleen: long axis along the posterolateral wall, concave towards the hilum.
    spleen_rot = small_rotation((0.0, 0.0, 126.9))
    spleen = _Ellipsoid(place(96.0, 22.0, 45.0), size(50.0, 21.0, 46.0, sd=0.07), spleen_rot)
    notch_centre = spleen.centre + spleen_rot @ np.array([0.0, 44.0, 0.0])
    spleen_notch = _Ellipsoid(notch_centre, np.full(3, 31.0))

    # Kidneys, drawn as left kidneys; the right one is evaluated on mirrored x. Left sits higher.
    kidneys = []
    left_z = -10.0 + jitter(5.0, 10.0)
    right_z = left_z - rng.uniform(8.0, 25.0)  # the liver pushes the right kidney down
    for mirrored, z in ((True, right_z), (False, left_z)):
        centre = place(72.0, 50.0, 0.0)
        centre[2] = z
        rot = small_rotation((-10.0, -12.0, 25.0))
        semi = size(29.0, 23.0, 58.0, sd=0.05)
        hilum_centre = centre + rot @ np.array([-0.95 * semi[0], -0.25 * semi[1], 0.0])
        hilum = _Ellipsoid(hilum_centre, np.array([0.45, 0.45, 0.42]) * semi, rot)
        kidneys.append((_Ellipsoid(centre, semi, rot), hilum, mirrored))

    # Great vessels: aorta anterior-left of the spine, IVC anterior-right, both forking low down.
    bifurcation = -108.0 + jitter(8.0, 18.0)
    a_radius = 11.0 * scale(0.08, 0.2)
    a_x, a_y = 14.0 * sx + jitter(2.0, 5.0), spine_y - spine_semi[1] - a_radius - 2.0
    aorta = column(a_x, a_y, bifurcation, 300.0, a_radius, a_radius, taper=0.0008)
    v_semi = (13.0 * scale(0.08, 0.2), 9.0 * scale(0.08, 0.2))
    v_x, v_y = -22.0 * sx + jitter(2.0, 5.0), spine_y - spine_semi[1] - v_semi[1] - 1.0
    confluence = bifurcation - rng.uniform(8.0, 20.0)
    ivc = column(v_x, v_y, confluence, 300.0, *v_semi)
    spread = rng.uniform(0.4, 0.55)

    def branches(x: float, y: float, top: float, r: float) -> list[_Tube]:
        # Common iliac vessels: diverge laterally and run backwards below the fork.
        return [
            _Tube(
                2,
                -400.0,
                top,
                (
                    np.array([-side * spread, x + side * (spread * top + r * 0.5)]),
                    np.array([-0.25, y + 0.25 * top]),
                ),
                (np.array([r]), np.array([r])),
            )
            for side in (-1, 1)
        ]

    iliac_arteries = branches(a_x, a_y, bifurcation, 0.68 * a_radius)
    iliac_veins = branches(v_x, v_y, confluence, 0.75 * v_semi[0])

    # Bowel: stomach, colon frame and small-bowel loops (unlabelled distractors).
    stomach = _Ellipsoid(place(48.0, -42.0, 47.0), size(44.0, 32.0, 44.0, sd=0.1), small_rotation((0, 0, 30)))
    stomach_gas = rng.uniform(0.15, 0.5)
    asc, desc = place(-98.0, 12.0, -7.0), place(104.0, 22.0, 30.0)
    colon = [
        (column(asc[0], asc[1], -400.0, asc[2], 22.0 * scale(), 20.0 * scale()), rng.uniform(0.2, 0.6)),
        (column(desc[0], desc[1], -400.0, desc[2], 17.0 * scale(), 16.0 * scale()), rng.uniform(0.2, 0.6)),
    ]
    # Transverse colon: from flexure to flexure along x, sagging in the middle.
    sag = rng.uniform(10.0, 45.0)
    tc = place(0.0, -62.0, -3.0)
    radius = np.array([19.0 * scale()])
    sagging = (np.array([tc[1]]), np.array([sag / 100.0**2, 0.0, tc[2] - sag]))
    colon.append((_Tube(0, asc[0] + 10.0, desc[0] - 10.0, sagging, (radius, radius)), rng.uniform(0.3, 0.8)))
    small_bowel = []
    for _ in range(int(rng.integers(10, 18))):
        centre = np.array([rng.uniform(-75, 75) * sx, cavity_y + rng.uniform(-75, 0) * sy, rng.uniform(-165, -10)])
        semi = np.array([rng.uniform(10, 17), rng.uniform(9, 14), rng.uniform(14, 30)])
        rot = _rotation(rng.uniform(-60, 60), rng.uniform(-60, 60), rng.uniform(0, 180))
        content = ("bowel fluid", "bowel wall", "bowel gas")[int(rng.choice(3, p=(0.5, 0.35, 0.15)))]
        small_bowel.append((_Ellipsoid(centre, semi, rot), content))

    return _Subject(
        deformation=deformation,
        body=body,
        wall=wall,
        cavity=cavity,
        cavity_y=cavity_y,
        rectus=rectus,
        ribs=ribs,
        diaphragm=diaphragm,
        heart=heart,
        spine=spine,
        psoas=psoas,
        paraspinal=paraspinal,
        liver=liver,
        liver_cut=liver_cut,
        gallbladder=gallbladder,
        pancreas=pancreas,
        spleen=spleen,
        spleen_notch=spleen_notch,
        kidneys=kidneys,
        ivc=ivc,
        aorta=aorta,
        iliac_veins=iliac_veins,
        iliac_arteries=iliac_arteries,
        stomach=stomach,
        stomach_gas=stomach_gas,
        colon=colon,
        small_bowel=small_bowel,
    )


# --------------------------------------------------------------------------------------------
# Rendering: paint tissue codes and labels, lowest priority first
# --------------------------------------------------------------------------------------------

_ALL = (slice(None), slice(None), slice(None))
_FAR = 1.0e4  # mm; "unbounded" along an axis


class _Canvas:
    """One z-slab of the grid: warped mm coordinates and the tissue and label arrays to paint."""

    def __init__(
        self,
        axes: tuple[np.ndarray, np.ndarray, np.ndarray],
        subject: _Subject,
        tissue: np.ndarray,
        labels: np.ndarray,
    ) -> None:
        xs, ys, zs = axes
        self.axes = axes
        self.margin = subject.deformation.margin
        dx, dy, dz = subject.deformation.field(xs, ys, zs)
        dx += xs.astype(np.float32)[None, None, :]
        dy += ys.astype(np.float32)[None, :, None]
        dz += zs.astype(np.float32)[:, None, None]
        self.x, self.y, self.z = dx, dy, dz
        self.tissue, self.labels = tissue, labels

    def region(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[slice, slice, slice] | None:
        """Array slices (z, y, x) of the voxels whose warped position can fall in the mm box."""
        slices = []
        for coords, low, high, margin in zip(self.axes, lo, hi, self.margin, strict=True):
            start = int(np.searchsorted(coords, low - margin, "left"))
            stop = int(np.searchsorted(coords, high + margin, "right"))
            if start >= stop:
                return None
            slices.append(slice(start, stop))
        return slices[2], slices[1], slices[0]

    def coords(self, sl: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.x[sl], self.y[sl], self.z[sl]

    def paint(self, sl: tuple[slice, slice, slice], mask: np.ndarray, tissue: str, label: int | None = None):
        self.tissue[sl][mask] = _T[tissue]
        if label is not None:
            self.labels[sl][mask] = label


def _union_bounds(*shapes: _Ellipsoid | _Tube) -> tuple[np.ndarray, np.ndarray]:
    bounds = [shape.bounds() for shape in shapes]
    return np.min([b[0] for b in bounds], axis=0), np.max([b[1] for b in bounds], axis=0)


def _ellipse(x: np.ndarray, y: np.ndarray, cy: float, a: float, b: float) -> np.ndarray:
    qx = x * np.float32(1.0 / a)
    qy = (y - np.float32(cy)) * np.float32(1.0 / b)
    qx *= qx
    qy *= qy
    qx += qy
    return qx


def _draw(c: _Canvas, s: _Subject) -> None:
    x, y = c.x, c.y
    body = _ellipse(x, y, 0.0, *s.body) < 1
    wall = (_ellipse(x, y, s.cavity_y, *s.wall) < 1) & body
    cavity = (_ellipse(x, y, s.cavity_y, *s.cavity) < 1) & body
    c.paint(_ALL, body, "subcutaneous fat")
    c.paint(_ALL, wall, "muscle")
    for rectus in s.rectus:
        sl = c.region(*rectus.bounds())
        if sl:
            c.paint(sl, (rectus.level(*c.coords(sl)) < 1) & body[sl] & ~cavity[sl], "muscle")
    c.paint(_ALL, cavity, "visceral fat")
    _draw_ribs(c, s, wall & ~cavity)
    abdomen = _draw_thorax(c, s, cavity)
    _draw_bowel(c, s, abdomen)
    for muscle in (*s.psoas, *s.paraspinal):
        sl = c.region(*muscle.bounds())
        if sl:
            c.paint(sl, (muscle.level(*c.coords(sl)) < 1) & body[sl], "muscle")
    _draw_organs(c, s, body, cavity, abdomen)
    _draw_spine(c, s)


def _draw_ribs(c: _Canvas, s: _Subject, ring: np.ndarray) -> None:
    r = s.ribs
    sl = c.region((-_FAR, -_FAR, r["first"] - r["slope"] - r["thickness"]), (_FAR, _FAR, _FAR))
    if not sl:
        return
    x, y, z = c.coords(sl)
    ap = (y - np.float32(s.cavity_y)) / np.float32(s.cavity[1])  # -1 front .. +1 back
    phase = (z - np.float32(r["first"]) - np.float32(r["slope"]) * ap) / np.float32(r["period"])
    k = np.round(phase)
    rib = (np.abs(phase - k) < r["thickness"] / 2 / r["period"]) & (k >= 0) & ring[sl]
    rib &= ~((ap < -0.3) & (np.abs(x) < 0.55 * s.cavity[0]))  # costal cartilage gap in front
    rib &= np.abs(x) > 25.0  # the spine and its muscles, not ribs
    c.paint(sl, rib, "rib")


def _draw_thorax(c: _Canvas, s: _Subject, cavity: np.ndarray) -> np.ndarray:
    """Diaphragm, lung bases and heart; returns the cavity below the diaphragm."""
    d = s.diaphragm
    abdomen = cavity.copy()
    sl = c.region((-_FAR, -_FAR, d["base"] - d["recess"] - 1.0), (_FAR, _FAR, _FAR))
    if not sl:
        return abdomen
    x, y, z = c.coords(sl)
    ap = np.clip((y - np.float32(s.cavity_y)) / np.float32(s.cavity[1]), 0, 1)
    top = np.exp(-(((np.abs(x) - np.float32(d["dome_x"])) / np.float32(55.0)) ** 2)) * np.float32(d["dome"])
    top += np.float32(d["base"]) + np.float32(d["right"] / 2) * (1 - np.tanh(x / np.float32(30.0)))
    top -= np.float32(d["recess"]) * ap * ap
    above = cavity[sl] & (z > top)
    c.paint(sl, above, "muscle")  # the diaphragm itself, about 5 mm thick
    lung = above & (z > top + np.float32(5.0))
    c.paint(sl, lung, "lung")
    c.paint(sl, lung & (s.heart.level(x, y, z) < 1), "heart")
    abdomen[sl] &= ~above
    return abdomen


def _draw_bowel(c: _Canvas, s: _Subject, abdomen: np.ndarray) -> None:
    # Supine patient: gas floats to the front (negative y), fluid and stool lie behind it.
    hollow = [(s.stomach, s.stomach_gas, "gastric content", 4.0)]
    hollow += [(segment, gas, "stool", 3.0) for segment, gas in s.colon]
    for shape, gas, content, wall in hollow:
        lo, hi = shape.bounds()
        sl = c.region(lo, hi)
        if not sl:
            continue
        x, y, z = c.coords(sl)
        level = shape.level(x, y, z)
        inside = (level < 1) & abdomen[sl]
        thickness = min(shape.semi) if isinstance(shape, _Ellipsoid) else 18.0
        lumen = inside & (level < (1 - wall / thickness) ** 2)
        c.paint(sl, inside, "bowel wall")
        c.paint(sl, lumen, content)
        c.paint(sl, lumen & (y < np.float32(lo[1] + gas * (hi[1] - lo[1]))), "bowel gas")
    for loop, content in s.small_bowel:
        sl = c.region(*loop.bounds())
        if not sl:
            continue
        level = loop.level(*c.coords(sl))
        inside = (level < 1) & abdomen[sl]
        c.paint(sl, inside, "bowel wall")
        c.paint(sl, inside & (level < 0.65), content)


def _draw_organs(c: _Canvas, s: _Subject, body: np.ndarray, cavity: np.ndarray, abdomen: np.ndarray) -> None:
    # Liver: union of two lobes, cut below by an oblique plane and kept off the spine.
    sl = c.region(*_union_bounds(*s.liver))
    if sl:
        x, y, z = c.coords(sl)
        inside = s.liver[0].level(x, y, z) < 1
        inside |= s.liver[1].level(x, y, z) < 1
        cut = s.liver_cut
        inside &= z > np.float32(cut["z0"]) + np.float32(cut["slope"]) * x
        # Behind the vessels the liver stays lateral: the spine, crus and kidney live there.
        behind = y - np.float32(cut["cavity_y"] + 10.0)
        inside &= (behind < 0) | (x < -25.0 - 0.8 * behind)
        c.paint(sl, inside & abdomen[sl], "liver", _L["liver"])
    if s.gallbladder is not None:
        sl = c.region(*s.gallbladder.bounds())
        if sl:
            c.paint(sl, (s.gallbladder.level(*c.coords(sl)) < 1) & abdomen[sl], "gallbladder", 0)
    sl = c.region(*s.pancreas.bounds())
    if sl:
        c.paint(sl, (s.pancreas.level(*c.coords(sl)) < 1) & abdomen[sl], "pancreas", _L["pancreas"])
    sl = c.region(*s.spleen.bounds())
    if sl:
        x, y, z = c.coords(sl)
        inside = (s.spleen.level(x, y, z) < 1) & (s.spleen_notch.level(x, y, z) >= 1)
        c.paint(sl, inside & abdomen[sl], "spleen", _L["spleen"])
    for kidney, hilum, mirrored in s.kidneys:
        lo, hi = kidney.bounds()
        if mirrored:
            lo, hi = lo * [-1, 1, 1], hi * [-1, 1, 1]
            lo[0], hi[0] = hi[0], lo[0]
        sl = c.region(lo, hi)
        if not sl:
            continue
        x, y, z = c.coords(sl)
        if mirrored:
            x = -x
        level = kidney.level(x, y, z)
        inside = (level < 1) & (hilum.level(x, y, z) >= 1) & cavity[sl]
        label = _L["right kidney" if mirrored else "left kidney"]
        c.paint(sl, inside, "kidney cortex", label)
        c.paint(sl, inside & (level < 0.45), "kidney medulla")
    # Vessels: veins under arteries; the iliac branches are unlabelled, as in most datasets.
    for vessel, tissue, label in (
        *((v, "vein", 0) for v in s.iliac_veins),
        (s.ivc, "vein", _L["inferior vena cava"]),
        *((a, "artery", 0) for a in s.iliac_arteries),
        (s.aorta, "artery", _L["aorta"]),
    ):
        sl = c.region(*vessel.bounds())
        if sl:
            c.paint(sl, (vessel.level(*c.coords(sl)) < 1) & body[sl], tissue, label)


def _draw_spine(c: _Canvas, s: _Subject) -> None:
    sp = s.spine
    height, period, phase = np.float32(sp["height"]), np.float32(sp["period"]), np.float32(sp["phase"])
    # Posterior arch and canal (unlabelled), then the column on top so vertebrae win.
    ca, cb, cy = sp["canal_a"], sp["canal_b"], sp["canal_y"]
    sl = c.region((-ca - 40.0, cy - cb - 7.0, -_FAR), (ca + 40.0, cy + cb + 45.0, _FAR))
    if sl:
        x, y, z = c.coords(sl)
        u = np.mod(z - phase, period)
        canal = _ellipse(x, y, cy, ca, cb)
        arch = (_ellipse(x, y, cy, ca + 6.0, cb + 6.0) < 1) & (canal >= 1) & (y > np.float32(sp["y"]))
        arch &= u < height
        ax = np.abs(x)
        arch |= (ax < 4) & (y > cy + cb) & (y < cy + cb + 38.0) & (u > 0.15 * height) & (u < 0.85 * height)
        arch |= (
            (ax > ca)
            & (ax < ca + 32.0)
            & (np.abs(y - np.float32(cy - 3.0)) < 5.0)
            & (u > 0.3 * height)
            & (u < 0.7 * height)
        )
        c.paint(sl, arch, "posterior arch", 0)
        c.paint(sl, canal < 1, "csf", 0)
    a, b, ys = sp["a"], sp["b"], sp["y"]
    sl = c.region((-a, ys - b, -_FAR), (a, ys + b, _FAR))
    if sl:
        x, y, z = c.coords(sl)
        r2 = _ellipse(x, y, ys, a, b)
        column = r2 < 1
        u = np.mod(z - phase, period)
        vertebra = column & (u < height)
        rim = np.float32(sp["cortex"])
        cortex = (1 - np.sqrt(r2)) * np.float32(b) < rim
        cortex |= (u < rim) | (u > height - rim)
        c.paint(sl, column & ~vertebra, "disc", 0)
        c.paint(sl, vertebra, "cancellous bone", _L["vertebral bodies"])
        c.paint(sl, vertebra & cortex, "cortical bone")


# --------------------------------------------------------------------------------------------
# Appearance: tissue values, blur, bias field and noise
# --------------------------------------------------------------------------------------------


def _tissue_values(modality: str, rng: np.random.Generator, shift: DomainShift) -> np.ndarray:
    n = len(_TISSUES)
    enhancing = np.array([t[3] for t in _TISSUES])
    if modality == "CT":
        values = np.array([t[1] for t in _TISSUES])
        values *= 1 + np.clip(rng.normal(0.0, 0.03, n), -0.08, 0.08)
        values[enhancing] *= rng.uniform(0.92, 1.08)  # contrast timing and dose
        values[_T["air"]] = -1000.0
        values[_T["lung"]] = -850.0 + rng.normal(0.0, 20.0)
        values[_T["bowel gas"]] = -950.0 + rng.normal(0.0, 20.0)
    else:
        values = np.array([t[2] for t in _TISSUES])
        values *= rng.uniform(0.85, 1.15) * (1 + np.clip(rng.normal(0.0, 0.05, n), -0.12, 0.12))
    fat = values[_T["subcutaneous fat"]]
    keep = np.zeros(n, bool)
    keep[list(_AIR_LIKE)] = True
    values[~keep] = fat + (values[~keep] - fat) * shift.contrast_scale
    values += shift.intensity_offset * (1.0 if modality == "CT" else fat)
    return values.astype(np.float32)


def _kernel(sigma: float) -> np.ndarray:
    radius = max(1, math.ceil(2.5 * sigma))
    w = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return w / w.sum()


def _blur(array: np.ndarray, sigmas: Sequence[float]) -> np.ndarray:
    """Separable Gaussian blur (sigma per array axis, in voxels), edges replicated; float32."""
    # Shifted multiply-adds: for these 3- to 7-tap kernels far faster than conv3d on a CPU.
    current = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    for axis, sigma in enumerate(sigmas):
        n = current.shape[axis]
        if sigma < 0.05 or n < 2:
            continue
        w = _kernel(sigma)
        r = (len(w) - 1) // 2
        out = current * float(w[r])
        for k in range(1, r + 1):
            weight, m = float(w[r + k]), min(k, n)
            if k < n:
                out.narrow(axis, k, n - k).add_(current.narrow(axis, 0, n - k), alpha=weight)
                out.narrow(axis, 0, n - k).add_(current.narrow(axis, k, n - k), alpha=weight)
            out.narrow(axis, 0, m).add_(current.narrow(axis, 0, 1), alpha=weight)
            out.narrow(axis, n - m, m).add_(current.narrow(axis, n - 1, 1), alpha=weight)
        current = out
    return current.numpy()


def _correlated_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian noise, lightly spatially correlated, with standard deviation ``sigma``."""
    smoothing = 0.6
    noise = _blur(rng.standard_normal(shape, dtype=np.float32), (smoothing,) * 3)
    w = _kernel(smoothing)
    noise *= np.float32(sigma / math.sqrt(float((w**2).sum()) ** 3))
    return noise


def _bias_field(rng: np.random.Generator, axes: Sequence[np.ndarray], strength: float) -> np.ndarray:
    """Smooth multiplicative field exp(p), p a random quadratic in physical mm (grid independent)."""
    amplitude = rng.uniform(0.2, 0.3) * strength
    coefficients = rng.normal(0.0, 1.0, 9)
    probe = [np.linspace(-1, 1, 9)] * 3

    def poly(px: np.ndarray, py: np.ndarray, pz: np.ndarray) -> np.ndarray:
        c = coefficients.astype(np.float32)
        lin = (c[0] * px + c[3] * px * px)[None, None, :] + (c[1] * py + c[4] * py * py)[None, :, None]
        lin = lin + (c[2] * pz + c[5] * pz * pz)[:, None, None]
        return (
            lin
            + c[6] * px[None, None, :] * py[None, :, None]
            + c[7] * px[None, None, :] * pz[:, None, None]
            + c[8] * py[None, :, None] * pz[:, None, None]
        )

    peak = float(np.abs(poly(*(p.astype(np.float32) for p in probe))).max())
    scale = math.log1p(amplitude) / max(peak, 1e-6)
    normalised = [(a / h).astype(np.float32) for a, h in zip(axes, (150.0, 110.0, 150.0), strict=True)]
    field = poly(*normalised)
    field *= np.float32(scale)
    return np.exp(field, out=field)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _triple(value: object, name: str, integer: bool) -> tuple:
    fix = (
        f"Give {name} as three positive {'whole numbers of voxels' if integer else 'numbers in mm'} "
        f"(x, y, z), for example {DEFAULT_SIZE if integer else DEFAULT_SPACING}."
    )
    try:
        items = tuple(value)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidInputError(f"{name} is {value!r}, not three numbers.", fix) from None
    if isinstance(value, str) or len(items) != 3:
        raise InvalidInputError(f"{name} is {value!r}, not three numbers.", fix)
    for item in items:
        if isinstance(item, bool) or not isinstance(item, numbers.Real) or not math.isfinite(item) or item <= 0:
            raise InvalidInputError(f"{name} {value!r} holds {item!r}, not a positive number.", fix)
        if integer and (item != int(item) or item < 2):
            raise InvalidInputError(f"{name} {value!r} holds {item!r}; each axis needs at least 2 voxels.", fix)
    return tuple(int(v) for v in items) if integer else tuple(float(v) for v in items)


def _check_modality(modality: object) -> str:
    fix = "Use 'CT' or 'MR' (any case; 'MRI' is accepted)."
    if not isinstance(modality, str):
        raise InvalidInputError(f"Unknown phantom modality {modality!r}.", fix)
    try:
        return normalize_modality(modality)  # type: ignore[return-value]
    except InvalidInputError:
        raise InvalidInputError(f"Unknown phantom modality {modality!r}.", fix) from None


def _check_seed(seed: object, name: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise InvalidInputError(f"{name} is {seed!r}.", f"Give {name} as a whole number, 0 or more.")
    return int(seed)


def _check_grid(size: object, spacing: object) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    size = _triple(size, "size", integer=True)
    spacing = _triple(spacing, "spacing", integer=False)
    voxels = size[0] * size[1] * size[2]
    if voxels > MAX_VOXELS:
        raise InvalidInputError(
            f"size {size} is {voxels:,} voxels, more than the {MAX_VOXELS:,} a phantom may have.",
            "Use fewer voxels (a coarser spacing covers the same body).",
        )
    return size, spacing  # type: ignore[return-value]


def _check_shift(shift: object) -> DomainShift:
    if not isinstance(shift, DomainShift):
        raise InvalidInputError(f"shift is {shift!r}.", "Give a DomainShift (DomainShift() for none).")
    return shift


def generate_phantom(
    modality: str,
    seed: int,
    size: Sequence[int] = DEFAULT_SIZE,
    spacing: Sequence[float] = DEFAULT_SPACING,
    shift: DomainShift = DomainShift(),
) -> tuple[Volume, Volume]:
    """(image, labels) on the same grid; deterministic from the seed.

    ``size`` is (x, y, z) voxels and ``spacing`` (x, y, z) mm; the grid is centred on the body, so
    the same seed gives the same subject on any grid. CT images are int16 Hounsfield units, MR
    images float32 T1-weighted arbitrary units (fat about 800); labels are uint8
    ``labels.ABDOMEN_STRUCTURES`` values.
    """
    key = _check_modality(modality)
    seed = _check_seed(seed)
    size, spacing = _check_grid(size, spacing)
    shift = _check_shift(shift)

    anatomy_rng, appearance_rng, noise_rng = (np.random.default_rng([seed, stream]) for stream in range(3))
    subject = _draw_subject(anatomy_rng)
    origin = tuple(-(n - 1) / 2 * d for n, d in zip(size, spacing, strict=True))
    axes = tuple(o + np.arange(n) * d for o, n, d in zip(origin, size, spacing, strict=True))
    nx, ny, nz = size
    tissue = np.zeros((nz, ny, nx), np.uint8)
    labels = np.zeros((nz, ny, nx), np.uint8)
    step = max(1, _SLAB_VOXELS // (nx * ny))
    for z0 in range(0, nz, step):
        part = slice(z0, z0 + step)
        _draw(_Canvas((axes[0], axes[1], axes[2][part]), subject, tissue[part], labels[part]), subject)

    values = _tissue_values(key, appearance_rng, shift)
    image = values[tissue]
    del tissue
    image = _blur(image, (0.5, 0.5, 0.5))  # partial volume; the labels stay crisp
    if key == "CT":
        sigma = appearance_rng.uniform(15.0, 25.0) * shift.noise_scale
        if sigma > 0:
            image += _correlated_noise(noise_rng, image.shape, sigma)
        image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    else:
        fat = float(values[_T["subcutaneous fat"]])
        bias = _bias_field(appearance_rng, axes, shift.bias_strength)
        sigma = appearance_rng.uniform(0.02, 0.035) * fat * shift.noise_scale
        np.clip(image, 0, None, out=image)
        image *= bias
        del bias
        if sigma > 0:
            # Rician: the magnitude of a complex signal with Gaussian noise in both channels.
            real = image + _correlated_noise(noise_rng, image.shape, sigma)
            imaginary = _correlated_noise(noise_rng, image.shape, sigma)
            image = np.sqrt(real * real + imaginary * imaginary)
    geometry = {"spacing": spacing, "origin": origin, "modality": key}
    metadata = {"phantom_seed": str(seed), "phantom_shift": json.dumps(asdict(shift))}
    return (
        Volume(array=image, metadata=metadata, **geometry),  # type: ignore[arg-type]
        Volume(array=labels, metadata=dict(metadata), **geometry),  # type: ignore[arg-type]
    )


def case_seed(seed: int, index: int) -> int:
    """The phantom seed of case ``index`` in a dataset generated with ``seed``."""
    return seed * SEED_STRIDE + index


def write_phantom_dataset(
    folder: str | Path,
    modality: str,
    count: int,
    seed: int = 0,
    size: Sequence[int] = DEFAULT_SIZE,
    spacing: Sequence[float] = DEFAULT_SPACING,
    shift: DomainShift = DomainShift(),
    progress: Callable[[float, str], object] | None = None,
) -> list[tuple[Path, Path]]:
    """Write ``count`` phantoms as folder/images/case_XXX.nii.gz and folder/labels/case_XXX.nii.gz.

    Case i uses seed ``case_seed(seed, i)``, so datasets with different seeds never share a case.
    folder/dataset.json (removed first, written last, so it only ever describes a complete dataset)
    records modality, count, seed, size, spacing, shift, the label names and the case files. Each file
    is written atomically; ``progress(fraction, message)`` is called before each case and at the end,
    and may raise (for example ``CancelledError``) to stop. Returns the (image, label) paths.
    """
    key = _check_modality(modality)
    if isinstance(count, bool) or not isinstance(count, numbers.Integral) or not 1 <= count <= MAX_CASES:
        raise InvalidInputError(f"count is {count!r}.", f"Give a whole number of cases from 1 to {MAX_CASES}.")
    seed = _check_seed(seed)
    size, spacing = _check_grid(size, spacing)
    shift = _check_shift(shift)
    if not str(folder).strip():
        raise InvalidInputError("The dataset folder is empty.", "Give a folder path for the dataset.")
    folder = Path(folder)
    check_output_path(folder / "dataset.json")
    if folder.exists() and not folder.is_dir():
        raise InvalidInputError(f"'{folder}' is a file, not a folder.", "Give a folder path for the dataset.")

    count = int(count)
    width = max(3, len(str(count - 1)))
    # An older description would claim a complete dataset while its cases are being replaced.
    (folder / "dataset.json").unlink(missing_ok=True)
    pairs = []
    for index in range(count):
        if progress is not None:
            progress(index / count, f"Generating {key} phantom {index + 1} of {count}")
        image, labels = generate_phantom(key, case_seed(seed, index), size, spacing, shift)
        name = f"case_{index:0{width}d}.nii.gz"
        pair = (folder / "images" / name, folder / "labels" / name)
        write_volume(image, pair[0])
        write_volume(labels, pair[1])
        pairs.append(pair)
    description = {
        "modality": key,
        "count": count,
        "seed": seed,
        "size": list(size),
        "spacing": list(spacing),
        "shift": asdict(shift),
        "labels": {str(s.value): s.name for s in ABDOMEN_STRUCTURES},
        "cases": [
            {
                "image": image_path.relative_to(folder).as_posix(),
                "label": label_path.relative_to(folder).as_posix(),
                "seed": case_seed(seed, n),
            }
            for n, (image_path, label_path) in enumerate(pairs)
        ],
    }
    with atomic_path(folder / "dataset.json") as temporary:
        temporary.write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    if progress is not None:
        progress(1.0, f"Wrote {count} {key} phantoms to {folder}")
    return pairs
