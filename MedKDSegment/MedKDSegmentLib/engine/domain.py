"""Is a scan inside a model's world? A record of what the model saw, and a check of each new scan against it.

A bundle's ``medkdsegment.domain`` records, over the model's own volumes, the per-channel mean and
standard deviation of its deepest feature map (``networks.feature_layer``) across each whole volume,
and the mean normalised entropy of its predictions. A scan is flagged when its feature statistics lie
far from the recorded ones (a diagonal Mahalanobis distance, RMS over channels) or the model is much
less sure of it than of any of its own volumes. How well that separates, per bundled model, on held-out
volumes of its own kind and on every real scan in ``../shared/data``: ``docs/domain_check.md``.
"""

from __future__ import annotations

import numpy as np

# Fixed before the real scans were checked: flag beyond 3 (recorded volumes sit near 1 by construction).
DISTANCE_LIMIT = 3.0
# A channel's spread is at least this share of its mean: a model trained on a few volumes has a tiny,
# unreliable spread, which would flag every new scan.
RELATIVE_SPREAD_FLOOR = 0.05
ENTROPY_FACTOR = 2.0  # unsure: mean entropy above twice the highest seen on the model's own volumes


def evidence(statistics: np.ndarray, entropy: np.ndarray, size: tuple[int, ...]) -> tuple[np.ndarray, float]:
    """What a scan is checked by, from a whole-volume pass (``prediction.WholeVolumeOutputs`` or its ONNX
    copy): the deepest features' per-channel mean and std (2K,), and the mean normalised entropy of the
    prediction over the unpadded ``size`` (z, y, x) of the entropy map (1, Z, Y, X)."""
    z, y, x = size
    return statistics.astype(np.float64), float(entropy[0, :z, :y, :x].mean(dtype=np.float64))


def record(statistics: list[np.ndarray], entropies: list[float], volumes: str) -> dict:
    """The bundle's ``domain`` section from the statistics of the model's own volumes."""
    stacked = np.stack(statistics)
    mean = stacked.mean(0)
    scale = _scale(mean, stacked.std(0))
    distances = [float(np.sqrt((((s - mean) / scale) ** 2).mean())) for s in stacked]
    return {
        "volumes": volumes,
        "count": len(statistics),
        "feature_mean": mean.round(6).tolist(),
        "feature_std": stacked.std(0).round(6).tolist(),
        "own_distance_max": round(max(distances), 3),
        "own_entropy_max": round(max(entropies), 4),
        "distance_limit": DISTANCE_LIMIT,
    }


def _scale(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return np.maximum(std, RELATIVE_SPREAD_FLOOR * np.abs(mean) + 1e-3)


def distance(domain: dict, statistics: np.ndarray) -> float:
    mean = np.array(domain["feature_mean"])
    return float(np.sqrt((((statistics - mean) / _scale(mean, np.array(domain["feature_std"]))) ** 2).mean()))


def domain_warnings(domain: dict | None, statistics: np.ndarray, entropy: float, model: str) -> list[str]:
    """Why a scan looks outside the model's world (empty when it does not, or nothing was recorded)."""
    if not domain:
        return []
    reasons = []
    found = distance(domain, statistics)
    if found > domain["distance_limit"]:
        reasons.append(
            f"its image features are {found:.1f} spreads from those of the model's own volumes "
            f"(they lie within {domain['own_distance_max']:.1f}; limit {domain['distance_limit']:.0f})"
        )
    if entropy > ENTROPY_FACTOR * domain["own_entropy_max"]:
        reasons.append(
            f"the model is unsure of it (mean entropy {entropy:.3f}, at most {domain['own_entropy_max']:.3f} "
            "on its own volumes)"
        )
    if not reasons:
        return []
    return [
        f"This scan looks unlike what '{model}' was trained on ({domain['volumes']}): {'; and '.join(reasons)}. "
        "The result was written, but check it before use, or pick a model made for this kind of scan."
    ]
