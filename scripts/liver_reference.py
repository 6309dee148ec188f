"""One-off reference: pyliverlesionseg 0.3's own liver pipeline on the real CT volumes in ../shared/data.

The package needs Python 3.6, TensorFlow 1.12 and Keras 2.2.4, so it runs in a throwaway environment of
its own (Python 3.6 from pyenv or any other source), never in the project's:

    python3.6 -m venv /tmp/liver-env
    /tmp/liver-env/bin/pip install "pip<22"
    /tmp/liver-env/bin/pip install tensorflow==1.12.0 keras==2.2.4 h5py==2.10 pymirc==0.29.1 nibabel pydicom \\
        "pynetdicom<2" scipy "numpy<1.17"
    tar xzf pyliverlesionseg-0.3.tar.gz     # the sha256-verified sdist of 'medkd teachers get liver-unet'
    /tmp/liver-env/bin/python scripts/liver_reference.py --package pyliverlesionseg-0.3 --output REFERENCE_DIR

For each CT it writes the package's liver mask, ``<case>_liver.nii.gz`` (its
``cnn_liver_lesion_seg_CT_MR_main(..., seg_liver=True, input_nifti=True, Modality='CT')``, the command line's
``--seg_liver --input_nifti --Modality CT``; canonical RAS orientation, as the package writes it), and
``liver_reference.json`` with seconds and the package's file hashes. Python 3.6: no annotations from the future here.
"""

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct-mr-abdomen-totalseg"
CASES = {"ct": DATA / "ct.nii.gz", "ct_large": DATA / "ct_large_unlabelled.nii.gz"}
MODEL = "model_unet_ct_mr_liv_seg_resize_1.5mm_med_3_resize_3mm_20201011_dice_loss_val_binary_dice_mean.hdf5"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--package", required=True, help="the unpacked sdist folder (pyliverlesionseg-0.3)")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(args.package).resolve()))
    import pyliverlesionseg  # the original package; only in the throwaway environment

    models = Path(pyliverlesionseg.__file__).parent / "trained_models"
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    record = {
        "package": "pyliverlesionseg 0.3",
        "files_sha256": {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                         for p in sorted(Path(pyliverlesionseg.__file__).parent.glob("*.py"))},
        "model_sha256": hashlib.sha256((models / MODEL).read_bytes()).hexdigest(),
        "cases": {},
    }
    for case, path in CASES.items():
        with tempfile.TemporaryDirectory() as scratch:  # the package writes beside its input
            given = Path(scratch) / (case + ".nii.gz")
            shutil.copyfile(str(path), str(given))
            started = time.perf_counter()
            pyliverlesionseg.cnn_liver_lesion_seg_CT_MR_main(
                str(given), None, str(models / MODEL), None, seg_liver=True, seg_lesion=False, save_nifti=True,
                input_nifti=True, Modality="CT")
            seconds = time.perf_counter() - started
            shutil.copyfile(str(Path(scratch) / (given.name + "_cnn_pred_liver.nii.gz")),
                            str(output / (case + "_liver.nii.gz")))
        record["cases"][case] = {"seconds": round(seconds, 2)}
        print(case, f"{seconds:.1f} s")
    (output / "liver_reference.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
