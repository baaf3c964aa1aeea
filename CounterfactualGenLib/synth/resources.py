"""Loading (once per process) of the template anatomy and the real lesion library.

Both are read from ``Resources/`` (see ``Resources/Templates/NOTICE-templates.md`` and
``Resources/LesionLibrary/ATTRIBUTION.md``) and cached in memory, together with the
template-space maps the engine derives from them (CSF, ventricle distance, cortical
depth, candidate lesion locations), so only the first subject pays for I/O (≈ 2 s).
The folder can be overridden with the ``COUNTERFACTUALGEN_RESOURCES`` environment
variable (e.g. when the library is installed without the Slicer extension tree).
"""

from __future__ import annotations

import csv
import functools
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

__all__ = [
    "ANATOMY_FILES",
    "ANATOMY_TITLES",
    "resources_dir",
    "TemplateMaps",
    "load_template",
    "LesionComponent",
    "LesionLibrary",
    "load_lesion_library",
    "library_ids",
    "preload",
]

#: The anatomies a subject can be made from (``SubjectSpec.anatomy``) → their maps' file prefix in
#: ``Resources/Templates``: the ICBM152 2009a population average, and Colin27, one person's brain
#: with individual folds, and two MS patients' brains from routine clinical scans (their own
#: lesions filled as white matter), all registered affinely into the same MNI frame
#: (``build_resources.py``).
ANATOMY_FILES = {"icbm152": "mni_icbm152_2009a", "colin27": "colin27",
                 "clinical04": "clinical04", "clinical12": "clinical12"}
#: Each anatomy's name in model cards and reports.
ANATOMY_TITLES = {"icbm152": "MNI ICBM152 2009a", "colin27": "Colin27",
                  "clinical04": "clinical MS patient 04 (Lesjak et al. 2016)",
                  "clinical12": "clinical MS patient 12 (Lesjak et al. 2016)"}
_LOCK = threading.Lock()


def resources_dir() -> Path:
    """The ``Resources`` folder (``$COUNTERFACTUALGEN_RESOURCES`` or the extension tree's)."""
    env = os.environ.get("COUNTERFACTUALGEN_RESOURCES")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "Resources"


def _load_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    if not path.is_file():
        raise InputError(
            f"Missing resource {path}. Reinstall the extension, or point COUNTERFACTUALGEN_RESOURCES "
            "at a folder with Templates/ and LesionLibrary/ (see synth/build_resources.py)."
        )
    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), np.asarray(img.affine, np.float64)


@dataclass(frozen=True, eq=False)
class TemplateMaps:
    """Template anatomy in MNI space (1 mm, cropped), float32 unless noted.

    Attributes:
        affine_ras: voxel → MNI mm of every map.
        brain: intracranial (brain + CSF) mask, 0/1.
        gm, wm, csf: tissue probabilities in [0, 1] (CSF = brain − GM − WM).
        ventricle_prob: CSF probability inside the lateral ventricles (their partial volume).
        ventricle_sdist_mm: distance (mm) outside the lateral ventricles (0 inside, 99 far away).
        cortex_depth_mm: distance from the nearest non-tissue (CSF/outside) voxel.
        periventricular_mm: (n, 3) candidate centres of periventricular lesions (MNI mm).
        juxtacortical_mm: (n, 3) candidate centres of juxtacortical lesions (MNI mm).
        tissue_stack: (X, Y, Z, 3) interleaved gm, wm, ventricle_prob;
        distance_stack: (X, Y, Z, 2) interleaved ventricle_sdist_mm, cortex_depth_mm.
            The maps above are views into these; interleaving lets one trilinear
            gather fetch all of a voxel's values at once.
    """

    affine_ras: np.ndarray
    brain: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    ventricle_prob: np.ndarray
    ventricle_sdist_mm: np.ndarray
    cortex_depth_mm: np.ndarray
    periventricular_mm: np.ndarray
    juxtacortical_mm: np.ndarray
    tissue_stack: np.ndarray
    distance_stack: np.ndarray


@functools.lru_cache(maxsize=4)
def _load_template_cached(root: str, anatomy: str) -> TemplateMaps:
    from scipy import ndimage as ndi

    folder = Path(root) / "Templates"
    name = ANATOMY_FILES[anatomy] + "_{}.nii.gz"
    gm_u8, affine = _load_nifti(folder / name.format("gm"))
    wm_u8, _ = _load_nifti(folder / name.format("wm"))
    brain_u8, _ = _load_nifti(folder / name.format("brainmask"))
    vent_u8, _ = _load_nifti(folder / name.format("ventricles"))
    gm = gm_u8.astype(np.float32) / 255.0
    wm = wm_u8.astype(np.float32) / 255.0
    brain = (brain_u8 > 0).astype(np.float32)
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    vent = vent_u8 > 0
    # The ventricle label is csf > 0.5; one voxel of dilation keeps its partial-volume rim.
    ventricle_prob = (csf * ndi.binary_dilation(vent)).astype(np.float32)
    # Only distances up to ~10 mm outside the ventricles matter (growth ≤ ~8 mm; lesion
    # candidates ≤ 12 mm), so the transform runs on the ventricles' box + 16 mm only.
    sdist = np.full(vent.shape, 99.0, np.float32)
    nz = np.nonzero(vent)
    box = tuple(slice(max(int(x.min()) - 16, 0), int(x.max()) + 17) for x in nz)
    sdist[box] = ndi.distance_transform_edt(~vent[box])
    sdist[vent] = 0.0  # the engine only uses the distance outside (max(d, 0))
    exterior = (1.0 - gm - wm) > 0.5
    depth = ndi.distance_transform_edt(~exterior).astype(np.float32)
    # Candidate lesion centres: where MS lesions typically sit, and inside deep-enough WM
    # that a few-mm blob stays mostly in WM. On a 3 mm subgrid: plenty of choices, and the
    # GM distance is 27× cheaper there.
    sub = (slice(None, None, 3),) * 3
    gm_dist = ndi.distance_transform_edt(gm[sub] < 0.5, sampling=3.0)
    peri = (wm[sub] > 0.7) & (sdist[sub] >= 1.0) & (sdist[sub] <= 6.0)
    juxta = (wm[sub] > 0.6) & (gm_dist >= 1.5) & (gm_dist <= 4.5) & (sdist[sub] > 12.0)

    def to_mm(mask: np.ndarray) -> np.ndarray:
        idx = np.argwhere(mask) * 3
        return (idx @ affine[:3, :3].T + affine[:3, 3]).astype(np.float64)

    tissue_stack = np.stack([gm, wm, ventricle_prob], axis=-1).astype(np.float32)
    distance_stack = np.stack([sdist, depth], axis=-1).astype(np.float32)
    return TemplateMaps(
        affine_ras=affine,
        brain=brain,
        gm=tissue_stack[..., 0],
        wm=tissue_stack[..., 1],
        csf=csf.astype(np.float32),
        ventricle_prob=tissue_stack[..., 2],
        ventricle_sdist_mm=distance_stack[..., 0],
        cortex_depth_mm=distance_stack[..., 1],
        periventricular_mm=to_mm(peri),
        juxtacortical_mm=to_mm(juxta),
        tissue_stack=tissue_stack,
        distance_stack=distance_stack,
    )


def load_template(anatomy: str = "icbm152") -> TemplateMaps:
    """An anatomy's maps (:data:`ANATOMY_FILES`; loaded and derived once per process and resources folder)."""
    if anatomy not in ANATOMY_FILES:
        raise InputError(f"Unknown anatomy {anatomy!r}; choose one of {', '.join(ANATOMY_FILES)}.")
    with _LOCK:
        return _load_template_cached(str(resources_dir()), anatomy)


@dataclass(frozen=True, eq=False)
class LesionComponent:
    """One connected component of a library lesion mask.

    Attributes:
        library_id: mask id, e.g. ``"patient05"``.
        index: component number within that mask (ordered by first voxel).
        voxels: (n, 3) int32 voxel indices on the library grid.
        volume_ml: n × 1 mm³.
    """

    library_id: str
    index: int
    voxels: np.ndarray
    volume_ml: float


@dataclass(frozen=True, eq=False)
class LesionLibrary:
    """The real lesion masks' grid and their recorded volumes.

    Attributes:
        affine_ras: voxel → MNI mm of the (FSL MNI152 1 mm) library grid.
        shape: grid shape (182, 218, 182).
        volumes_ml: id → lesion volume listed in ``lesion_volumes.csv``.
        folder: where the masks are.
    """

    affine_ras: np.ndarray
    shape: tuple[int, int, int]
    volumes_ml: dict[str, float]
    folder: Path

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(sorted(self.volumes_ml))

    def components(self, library_id: str) -> tuple[LesionComponent, ...]:
        """Connected components (26-connectivity) of one mask, loaded on first use.

        Raises:
            InputError: unknown ``library_id``.
        """
        if library_id not in self.volumes_ml:
            raise InputError(f"Unknown lesion library id {library_id!r}; valid ids are {', '.join(self.ids)}.")
        with _LOCK:
            return _components_cached(str(self.folder), library_id)


@functools.lru_cache(maxsize=64)
def _components_cached(folder: str, library_id: str) -> tuple[LesionComponent, ...]:
    from scipy import ndimage as ndi

    mask, _ = _load_nifti(Path(folder) / f"{library_id}_lesions_mni.nii.gz")
    nz = np.nonzero(mask)
    if nz[0].size == 0:
        return ()
    lo = np.array([x.min() for x in nz])
    box = tuple(slice(a, x.max() + 1) for a, x in zip(lo, nz))
    lab, n = ndi.label(mask[box] > 0, structure=np.ones((3, 3, 3), bool))
    idx = np.argwhere(lab > 0)
    labels = lab[tuple(idx.T)]
    order = np.argsort(labels, kind="stable")
    idx, labels = idx[order], labels[order]
    splits = np.searchsorted(labels, np.arange(1, n + 1))
    comps = []
    for c, vox in enumerate(np.split(idx, splits[1:])):
        vox = (vox + lo).astype(np.int32)
        comps.append(LesionComponent(library_id, c, vox, vox.shape[0] / 1000.0))
    return tuple(comps)


@functools.lru_cache(maxsize=2)
def _load_library_cached(root: str) -> LesionLibrary:
    import nibabel as nib

    folder = Path(root) / "LesionLibrary"
    table = folder / "lesion_volumes.csv"
    if not table.is_file():
        raise InputError(f"Missing resource {table}; the lesion library is not installed.")
    with open(table, newline="") as fh:
        volumes = {row["patient"]: float(row["lesion_volume_ml"]) for row in csv.DictReader(fh)}
    files = sorted(folder.glob("*_lesions_mni.nii.gz"))
    ids = {re.sub(r"_lesions_mni\.nii\.gz$", "", f.name) for f in files}
    volumes = {k: v for k, v in volumes.items() if k in ids}
    if not volumes:
        raise InputError(f"No lesion masks found in {folder}.")
    img = nib.load(str(folder / f"{sorted(volumes)[0]}_lesions_mni.nii.gz"))
    return LesionLibrary(np.asarray(img.affine, np.float64), tuple(int(s) for s in img.shape[:3]), volumes, folder)  # type: ignore[arg-type]


def load_lesion_library() -> LesionLibrary:
    """The lesion library index (masks are read lazily by :meth:`LesionLibrary.components`)."""
    with _LOCK:
        return _load_library_cached(str(resources_dir()))


def library_ids() -> tuple[str, ...]:
    """Ids of the real lesion masks, e.g. ``("patient01", …, "patient30")``."""
    return load_lesion_library().ids


def preload() -> None:
    """Load the template and every lesion mask's components now (a few seconds, ≈ 300 MB).

    Call it once before forking data-loader workers so they share the caches instead
    of each paying the first-use cost of every donor mask.
    """
    load_template()
    lib = load_lesion_library()
    for library_id in lib.ids:
        lib.components(library_id)
