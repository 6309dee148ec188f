"""Which scans each bundled model flags as outside its world, and the record that decides it.

    scripts/medkd-python scripts/domain_check.py [--record] [--output docs/domain_check]

``--record`` (re)writes each bundled model's ``medkdsegment.domain`` from its own training volumes (the
phantom training set of ``build_models.py``, seed 0; the three real heads for the brain student). The
report then checks, with the rule of ``engine/domain.py`` (fixed before any real scan was checked):
- volumes of the model's own kind it never saw (phantoms of a held-out seed; for the brain student,
  leave-one-subject-out: the record of two heads against the third), which should not be flagged;
- every real volume in ../shared/data of the model's modality, and which of them it flags.
Writes <output>.md and <output>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MedKDSegment"))

from MedKDSegmentLib.engine.bundle import BUNDLED_MODELS, METADATA, load_bundle  # noqa: E402
from MedKDSegmentLib.engine.domain import distance, domain_warnings, record  # noqa: E402
from MedKDSegmentLib.engine.measure import machine_description  # noqa: E402
from MedKDSegmentLib.engine.phantom import case_seed, generate_phantom  # noqa: E402
from MedKDSegmentLib.engine.prediction import scan_statistics  # noqa: E402
from MedKDSegmentLib.engine.profiles import to_model_grid  # noqa: E402
from MedKDSegmentLib.engine.report import markdown_table, write_json, write_text  # noqa: E402
from MedKDSegmentLib.engine.volume import read_volume  # noqa: E402
from MedKDSegmentLib.engine.windowing import pad_to_multiple_of_8  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
HEADS = ["mr-brain-itk/t1_head.nii.gz", "mr-brain-tumor-pyradiomics/brain1_image.nrrd",
         "mr-brain-tumor-pyradiomics/brain2_image.nrrd"]
TRAINING_PHANTOMS = 20  # build_models.py: write_phantom_dataset(..., 20, seed=0)
HELD_OUT_SEED, HELD_OUT_COUNT = 777, 8  # the engine benchmark's held-out phantoms


def real_volumes(modality: str) -> dict[str, Path]:
    if modality == "CT":
        names = ["ct-mr-abdomen-totalseg/ct.nii.gz", "ct-mr-abdomen-totalseg/ct_large_unlabelled.nii.gz",
                 "ct-mr-abdomen-totalseg/ct_dicom"]
    else:
        names = ["ct-mr-abdomen-totalseg/mr.nii.gz", *HEADS, "mr-brain-aseg/t1.nii.gz",
                 *sorted(str(p.relative_to(DATA)) for p in DATA.glob("mr-brain-tumor-brats/*/*/*.nii.gz")
                         if "brainmask" not in p.name and "OT" not in p.name)]
    return {name: DATA / name for name in names if (DATA / name).exists()}


def statistics(bundle, network, volume) -> tuple[np.ndarray, float]:
    image, _ = to_model_grid(volume, bundle.profile)
    return scan_statistics(network, pad_to_multiple_of_8(image), image.shape)


def own_volumes(bundle) -> tuple[str, list]:
    """The model's training volumes, regenerated or read, with how to describe them."""
    if bundle.name.startswith("phantom-abdomen"):
        modality = bundle.profile.modality
        volumes = [generate_phantom(modality, case_seed(0, i))[0] for i in range(TRAINING_PHANTOMS)]
        return f"{TRAINING_PHANTOMS} {modality} phantom abdomens", volumes
    return "3 real MR heads with the skull on (T1, T1c)", [read_volume(DATA / h, "MR") for h in HEADS]


def write_record(bundle, domain: dict) -> None:
    """Replace the bundle's metadata atomically with the record added (weights untouched)."""
    path = bundle.path / METADATA
    metadata = json.loads(path.read_text())
    metadata["medkdsegment"]["domain"] = domain
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(metadata, indent=2))
    os.replace(temporary, path)


def check(bundle, network) -> dict:
    domain = bundle.info["domain"]
    rows = []
    if bundle.name.startswith("phantom-abdomen"):
        for i in range(HELD_OUT_COUNT):
            volume = generate_phantom(bundle.profile.modality, case_seed(HELD_OUT_SEED, i))[0]
            features, entropy = statistics(bundle, network, volume)
            rows.append(_row(f"held-out phantom {i}", "own kind", domain, features, entropy, bundle.name))
    else:  # leave one head out of the record, check it against the other two
        heads = [statistics(bundle, network, read_volume(DATA / h, "MR")) for h in HEADS]
        for k, head in enumerate(HEADS):
            others = [h for j, h in enumerate(heads) if j != k]
            partial = record([f for f, _ in others], [e for _, e in others], "two heads")
            rows.append(_row(head, "own kind (left out)", partial, *heads[k], bundle.name))
    for name, path in real_volumes(bundle.profile.modality).items():
        if bundle.name.startswith("hdbet") and name in HEADS:
            continue  # its own training heads, above
        features, entropy = statistics(bundle, network, read_volume(path, bundle.profile.modality))
        rows.append(_row(name, "real scan", domain, features, entropy, bundle.name))
    return {"domain": {k: v for k, v in domain.items() if not k.startswith("feature_")}, "rows": rows}


def _row(name, kind, domain, features, entropy, model) -> dict:
    return {"volume": name, "kind": kind, "distance": round(distance(domain, features), 2),
            "entropy": round(entropy, 4), "flagged": bool(domain_warnings(domain, features, entropy, model))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--record", action="store_true", help="(re)write the bundled models' domain records")
    parser.add_argument("--models", nargs="+", default=["phantom-abdomen-ct-student", "phantom-abdomen-mr-student",
                                                       "phantom-abdomen-ct-teacher", "phantom-abdomen-mr-teacher",
                                                       "hdbet-brain-mr-student"])
    parser.add_argument("--output", default=str(ROOT / "docs" / "domain_check"))
    args = parser.parse_args()
    results = {"machine": machine_description(), "models": {}}
    for name in args.models:
        bundle = load_bundle(BUNDLED_MODELS / name)
        network = bundle.load_network()
        if args.record:
            description, volumes = own_volumes(bundle)
            stats = [statistics(bundle, network, v) for v in volumes]
            write_record(bundle, record([f for f, _ in stats], [e for _, e in stats], description))
            bundle = load_bundle(bundle.path)
        results["models"][name] = check(bundle, network)
        print(name, [(r["volume"], r["distance"], r["flagged"]) for r in results["models"][name]["rows"]], flush=True)
    write_json(results, f"{args.output}.json")
    write_text(render(results), f"{args.output}.md")
    return 0


def render(results: dict) -> str:
    lines = [
        "# Scans outside a model's world",
        "",
        "Reproduce: `scripts/medkd-python scripts/domain_check.py --record`. Rule (`engine/domain.py`, fixed "
        "before any real scan was checked): a scan is flagged when the per-channel mean and spread of the "
        "model's deepest features over the whole scan lie more than 3 spreads (RMS over channels) from "
        "those of its own training volumes, or its mean prediction entropy is over twice the highest on them. "
        f"Machine: {results['machine']['cpu']}, torch {results['machine']['torch']}.",
        "",
    ]
    for name, entry in results["models"].items():
        domain, rows = entry["domain"], entry["rows"]
        own = [r for r in rows if r["kind"] != "real scan"]
        real = [r for r in rows if r["kind"] == "real scan"]
        lines += [
            f"## {name}",
            "",
            f"Recorded over {domain['volumes']} (own volumes within {domain['own_distance_max']} spreads; "
            f"entropy ≤ {domain['own_entropy_max']}).",
            f"Own kind, never seen: {sum(r['flagged'] for r in own)} of {len(own)} flagged. "
            f"Real scans: {sum(r['flagged'] for r in real)} of {len(real)} flagged.",
            "",
            markdown_table(rows, {"volume": "volume", "kind": "kind", "distance": "feature distance",
                                  "entropy": "mean entropy", "flagged": "flagged"}),
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
