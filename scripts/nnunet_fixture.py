"""Make the nnU-Net v2 test model in ``Testing/data/nnunet`` the way nnU-Net makes one, and its reference output.

Run it in a throwaway environment with nnU-Net itself, never in the project's (nnunetv2 pulls in timm and
torchvision, which replace the pinned torch):

    python3 -m venv /tmp/nnenv
    /tmp/nnenv/bin/pip install torch==2.13.0 && /tmp/nnenv/bin/pip install nnunetv2==2.8.1 monai==1.6.1
    /tmp/nnenv/bin/python scripts/nnunet_fixture.py --output Testing/data/nnunet

1. Six CT phantoms (liver, spleen, kidneys) as an ``nnUNet_raw`` dataset; nnU-Net's own fingerprint
   extraction and experiment planner write ``dataset.json`` and ``nnUNetPlans.json``.
2. The ``3d_fullres`` network is made tiny (3 stages of 4, 8 and 16 features, 32-voxel patches) so the
   checkpoints stay small; everything else is the planner's.
3. Two folds are trained for a few steps on nnU-Net's own preprocessing of the phantoms (its
   ``DefaultPreprocessor``), with the network from its ``get_network_from_plans``; each checkpoint is the
   dictionary ``nnUNetTrainer.save_checkpoint`` writes (network and optimizer state, logging with numpy
   floats, init arguments with a ``torch.device``, trainer name, mirroring axes).
4. nnU-Net's ``nnUNetPredictor`` segments a held-out phantom on another grid (anisotropic, so its
   separate-z resampling runs; a zero border, so its crop runs) with both folds and mirroring, and with
   fold 0 alone without mirroring: ``reference_folds_0_1.nii.gz``, ``reference_fold_0_nomirror.nii.gz``.

``--full-size`` keeps the planner's own network and patch size (nnU-Net's default ``3d_fullres`` for 1.5 mm
phantoms of a whole abdomen, about 30 M parameters) and trains one fold on 32³ crops: a realistically sized
teacher for ``scripts/imported_teachers.py`` (too large to commit).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "MedKDSegment"))
from MedKDSegmentLib.engine.phantom import generate_phantom  # noqa: E402

DATASET = "Dataset901_Phantom"
LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidneys": 3}
TRAINING_SEEDS = range(6)
TEST_SEED = 50
STEPS = 400


def phantom(seed: int, size, spacing) -> tuple[sitk.Image, sitk.Image]:
    image, labels = generate_phantom("CT", seed, size=size, spacing=spacing)
    mapped = np.zeros_like(labels.array)
    mapped[labels.array == 1] = 1
    mapped[labels.array == 2] = 2
    mapped[np.isin(labels.array, (3, 4))] = 3
    out = []
    for array in (image.array, mapped):
        item = sitk.GetImageFromArray(array)
        item.SetSpacing(image.spacing)
        item.SetOrigin(image.origin)
        out.append(item)
    return out[0], out[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--full-size", action="store_true", help="the planner's own network, one fold")
    args = parser.parse_args()
    grid = ((160, 128, 96), (2.0, 2.0, 2.5)) if args.full_size else ((48, 40, 32), (3.0, 3.0, 4.0))
    folds = (0,) if args.full_size else (0, 1)
    torch.manual_seed(0)
    np.random.seed(0)
    work = Path(tempfile.mkdtemp(prefix="nnunet-fixture-"))
    env = {**os.environ, "nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "preprocessed"),
           "nnUNet_results": str(work / "results")}
    os.environ.update(env)
    raw = work / "raw" / DATASET
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    for seed in TRAINING_SEEDS:
        image, labels = phantom(seed, *grid)
        sitk.WriteImage(image, str(raw / "imagesTr" / f"case_{seed:03d}_0000.nii.gz"))
        sitk.WriteImage(labels, str(raw / "labelsTr" / f"case_{seed:03d}.nii.gz"))
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": len(TRAINING_SEEDS),
        "file_ending": ".nii.gz", "name": "Phantom", "description": "MedKDSegment's nnU-Net test model",
    }, indent=2))
    tools = Path(sys.executable).parent
    subprocess.run([str(tools / "nnUNetv2_extract_fingerprint"), "-d", "901", "-np", "1"], check=True, env=env)
    subprocess.run([str(tools / "nnUNetv2_plan_experiment"), "-d", "901"], check=True, env=env)

    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_file = work / "preprocessed" / DATASET / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    configuration = plans["configurations"]["3d_fullres"]
    if not args.full_size:
        configuration["patch_size"] = [32, 32, 32]
        configuration["batch_size"] = 2
        configuration["architecture"]["arch_kwargs"].update(
            n_stages=3, features_per_stage=[4, 8, 16], kernel_sizes=[[3, 3, 3]] * 3,
            strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]], n_conv_per_stage=[2, 2, 2], n_conv_per_stage_decoder=[2, 2],
        )
    plans_file.write_text(json.dumps(plans, indent=4))
    dataset_json = json.loads((work / "preprocessed" / DATASET / "dataset.json").read_text())
    manager = PlansManager(plans)
    config = manager.get_configuration("3d_fullres")
    preprocessor = DefaultPreprocessor()
    cases = [
        preprocessor.run_case([str(raw / "imagesTr" / f"case_{s:03d}_0000.nii.gz")],
                              str(raw / "labelsTr" / f"case_{s:03d}.nii.gz"), manager, config, dataset_json)[:2]
        for s in TRAINING_SEEDS
    ]
    folder = args.output / DATASET / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    shutil.copy(plans_file, folder / "plans.json")
    shutil.copy(work / "preprocessed" / DATASET / "dataset.json", folder / "dataset.json")
    shutil.copy(work / "preprocessed" / DATASET / "dataset_fingerprint.json", folder / "dataset_fingerprint.json")
    arch = config.network_arch_init_kwargs
    # training crops: at least twice the network's total stride (instance norm needs > 1 voxel at the bottom)
    divisors = np.prod(np.array(arch["strides"]), axis=0)
    crop = [int(min(p, max(2 * d, 32))) for p, d in zip(configuration["patch_size"], divisors, strict=True)]
    steps = 150 if args.full_size else STEPS
    for fold in folds:
        rng = np.random.default_rng(fold)
        torch.manual_seed(fold)
        network = get_network_from_plans(config.network_arch_class_name, arch,
                                         config.network_arch_init_kwargs_req_import, 1, len(LABELS),
                                         allow_init=True, deep_supervision=True)
        optimizer = torch.optim.SGD(network.parameters(), 0.05, momentum=0.99, nesterov=True, weight_decay=3e-5)
        losses = []
        for _ in range(steps):
            images, targets = [], []
            for _ in range(2):
                data, seg = cases[rng.integers(len(cases))]
                corner = [rng.integers(0, max(1, n - c) + 1) for n, c in zip(data.shape[1:], crop, strict=True)]
                box = tuple(slice(a, a + c) for a, c in zip(corner, crop, strict=True))
                patch = np.zeros((1, *crop), np.float32)
                target = np.zeros(crop, np.int64)
                cut = data[(0, *box)]
                patch[(0, *tuple(slice(0, n) for n in cut.shape))] = cut
                target[tuple(slice(0, n) for n in cut.shape)] = np.maximum(seg[(0, *box)], 0)
                images.append(patch)
                targets.append(target)
            output = network(torch.from_numpy(np.stack(images)))[0]  # deep supervision: full resolution first
            loss = torch.nn.functional.cross_entropy(output, torch.from_numpy(np.stack(targets)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        print(f"fold {fold}: loss {losses[0]:.3f} -> {np.mean(losses[-10:]):.3f}")
        (folder / f"fold_{fold}").mkdir()
        now = time.time()
        checkpoint = {  # the keys and value types of nnUNetTrainer.save_checkpoint
            "network_weights": network.state_dict(),
            "optimizer_state": optimizer.state_dict(),
            "grad_scaler_state": None,
            "logging": {
                "mean_fg_dice": [np.float64(0.5)], "ema_fg_dice": [np.float64(0.5)],
                "dice_per_class_or_region": [[np.float64(0.5)] * 3], "train_losses": [np.mean(losses)],
                "val_losses": [np.float32(losses[-1])], "lrs": [0.05], "epoch_start_timestamps": [now - 1.0],
                "epoch_end_timestamps": [now],
            },
            "_best_ema": np.float64(0.5),
            "current_epoch": 1,
            "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": fold,
                          "dataset_json": dataset_json, "device": torch.device("cpu")},
            "trainer_name": "nnUNetTrainer",
            "inference_allowed_mirroring_axes": (0, 1, 2),
        }
        torch.save(checkpoint, folder / f"fold_{fold}" / "checkpoint_final.pth")

    if args.full_size:
        print("parameters", sum(p.numel() for p in network.parameters()), "patch", configuration["patch_size"])
        (args.output / "reference.json").write_text(json.dumps({"torch": torch.__version__, "full_size": True}))
        shutil.rmtree(work)
        return
    image, truth = phantom(TEST_SEED, (60, 50, 18), (2.0, 2.0, 7.0))  # anisotropic: nnU-Net resamples z apart
    array = sitk.GetArrayFromImage(image)
    array[:, :2] = 0  # a zero border, which nnU-Net crops away
    array[:, :, -3:] = 0
    test = sitk.GetImageFromArray(array)
    test.CopyInformation(image)
    test.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))  # RAS-stored, as many NIfTI files are
    sitk.WriteImage(test, str(args.output / "test_image.nii.gz"))
    truth_array = sitk.GetArrayFromImage(truth)
    print("truth", {int(v): int((truth_array == v).sum()) for v in np.unique(truth_array)})

    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    timings = {}
    for name, folds, mirror in (("folds_0_1", (0, 1), True), ("fold_0_nomirror", (0,), False)):
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirror,
                                    device=torch.device("cpu"), allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(folder), use_folds=folds)
        started = time.perf_counter()
        out = work / f"out_{name}"
        predictor.predict_from_files([[str(args.output / "test_image.nii.gz")]], [str(out / "test")],
                                     num_processes_preprocessing=1, num_processes_segmentation_export=1)
        timings[name] = round(time.perf_counter() - started, 2)
        shutil.copy(out / "test.nii.gz", args.output / f"reference_{name}.nii.gz")
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(args.output / f"reference_{name}.nii.gz")))
        print(name, {int(v): int((labels == v).sum()) for v in np.unique(labels)})
    import nnunetv2

    (args.output / "reference.json").write_text(json.dumps({
        "nnunetv2": nnunetv2.__version__ if hasattr(nnunetv2, "__version__") else "2.8.1",
        "torch": torch.__version__, "predict_seconds": timings,
    }, indent=2))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
