"""The `Volume` type and exact-geometry NIfTI / NRRD I/O with provenance.

A :class:`Volume` is a float32 voxel array in (i, j, k) order plus the 4×4 affine that
maps voxel indices to RAS millimetres (the nibabel convention; it equals Slicer's
IJK→RAS matrix). NIfTI is read and written with nibabel (sform/qform kept exactly);
NRRD with SimpleITK, converting its LPS physical space to RAS.

Every volume this project generates carries provenance: a machine-readable SYNTHETIC
marker plus model id, prompts, seed and the SHA-256 of the source file. NRRD stores
it as key/value header fields; NIfTI stores a short marker in ``descrip`` and the
full record in a JSON sidecar next to the image (``scan.nii.gz`` → ``scan.json``).

Writes are atomic (temp file in the same folder, then rename), so a failure never
leaves a half-written image behind, and inputs are only ever opened for reading.

Example:
    >>> import numpy as np, tempfile, os
    >>> v = Volume(np.zeros((4, 5, 6), np.float32), np.diag([0.7, 0.7, 3.0, 1.0]))
    >>> v.spacing_mm
    (0.7, 0.7, 3.0)
    >>> p = os.path.join(tempfile.mkdtemp(), "v.nrrd"); write_volume(v, p)
    >>> np.allclose(read_volume(p).affine_ras, v.affine_ras)
    True
"""

from __future__ import annotations

import datetime as _dt
import gzip
import hashlib
import json
import os
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import InputError

__all__ = [
    "Volume",
    "Provenance",
    "read_volume",
    "write_volume",
    "validate_volume",
    "sha256_file",
    "umask_mode",
    "sidecar_path",
    "SYNTHETIC_KEY",
    "DEFAULT_MAX_VOXELS",
]

#: Attribute / header key of the synthetic marker (same name as the Slicer node attribute).
SYNTHETIC_KEY = "CounterfactualGen.Synthetic"
_PREFIX = "CounterfactualGen."
#: Default voxel budget: 512³ voxels (0.5 GiB as float32). Larger inputs are refused.
DEFAULT_MAX_VOXELS = 512**3

# RAS <-> LPS: flip the first two world axes.
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")


@dataclass
class Volume:
    """A 3D scalar image with exact geometry.

    Args:
        array: voxel values, shape (I, J, K), converted to float32.
        affine_ras: 4×4 matrix mapping (i, j, k, 1) to RAS millimetres.
        metadata: free key/value strings (provenance lives under ``CounterfactualGen.*``).
        source_dtype: dtype of the file the voxels came from (e.g. ``"uint16"``), so an
            output can be written back in the same dtype class.
        nifti_codes: a NIfTI file's (sform_code, qform_code): what its space is (1 scanner,
            2 aligned to another scan, 3 Talairach, 4 MNI); ``None`` for other sources.
    """

    array: np.ndarray
    affine_ras: np.ndarray
    metadata: dict[str, str] = field(default_factory=dict)
    source_dtype: str = "float32"
    nifti_codes: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array, dtype=np.float32)
        self.affine_ras = np.asarray(self.affine_ras, dtype=np.float64)
        if self.affine_ras.shape != (4, 4):
            raise InputError(f"The affine must be 4×4, got shape {self.affine_ras.shape}.")

    # -- geometry -------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size along i, j, k in millimetres (column norms of the affine)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine_ras[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def direction_ras(self) -> np.ndarray:
        """3×3 direction cosines (columns = unit i, j, k axes in RAS)."""
        return self.affine_ras[:3, :3] / np.asarray(self.spacing_mm)[None, :]

    @property
    def origin_ras(self) -> np.ndarray:
        """RAS position (mm) of the centre of voxel (0, 0, 0)."""
        return self.affine_ras[:3, 3].copy()

    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine_ras[:3, :3])) / 1000.0)

    def with_array(self, array: np.ndarray, **metadata: str) -> "Volume":
        """A new volume on the same grid with other voxels (metadata copied and updated)."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise InputError(f"Array shape {array.shape} does not match the volume grid {self.array.shape}.")
        meta = dict(self.metadata)
        meta.update(metadata)
        return Volume(array, self.affine_ras.copy(), meta, self.source_dtype, self.nifti_codes)

    @property
    def is_synthetic(self) -> bool:
        return self.metadata.get(SYNTHETIC_KEY, "").lower() == "true"


@dataclass(frozen=True)
class Provenance:
    """What produced a synthetic volume. Stored with every generated file.

    Args:
        model_id: id of the model that produced it.
        prompts: the text prompts (for an edit: ``[from, to]``).
        seed: the random seed.
        source_sha256: SHA-256 of the scanned input file an edit started from, if any.
        kind: ``"counterfactual"``, ``"difference"``, ``"change_labels"``, ``"generated"``…
        extra: further string fields (e.g. strength, steps, guidance).
    """

    model_id: str
    prompts: Sequence[str] = ()
    seed: int | None = None
    source_sha256: str | None = None
    kind: str = "generated"
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_metadata(self) -> dict[str, str]:
        from . import __version__

        meta = {
            SYNTHETIC_KEY: "true",
            _PREFIX + "Kind": self.kind,
            _PREFIX + "Model": self.model_id,
            _PREFIX + "Prompts": json.dumps(list(self.prompts)),
            _PREFIX + "Seed": "" if self.seed is None else str(int(self.seed)),
            _PREFIX + "SourceSHA256": self.source_sha256 or "",
            _PREFIX + "Software": f"CounterfactualGen {__version__}",
            _PREFIX + "Created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        for k, v in self.extra.items():
            meta[_PREFIX + str(k)] = v if isinstance(v, str) else json.dumps(v)
        return meta

    def descrip(self) -> str:
        """The ≤80-byte NIfTI ``descrip`` text: starts with SYNTHETIC so any viewer shows it."""
        text = f"SYNTHETIC CounterfactualGen {self.kind} model={self.model_id} seed={self.seed}"
        return text.encode("ascii", "replace")[:79].decode("ascii")


# ---------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------
def validate_volume(vol: Volume, *, max_voxels: int = DEFAULT_MAX_VOXELS, name: str = "volume") -> None:
    """Refuse volumes no pipeline can use, with a message that says what to do.

    Raises:
        InputError: not 3D, empty, over the voxel budget, NaN/Inf values, constant
            intensities, or a singular / non-finite affine.
    """
    a = vol.array
    if a.ndim != 3:
        raise InputError(f"The {name} must be a 3D scalar volume; it has {a.ndim} dimensions {a.shape}.")
    if a.size == 0 or min(a.shape) < 2:
        raise InputError(f"The {name} is empty or flat (shape {a.shape}); a 3D scan needs ≥2 voxels per axis.")
    if a.size > max_voxels:
        raise InputError(
            f"The {name} has {a.size:,} voxels, over the limit of {max_voxels:,}. "
            "Crop or downsample it first, or raise the limit (--max-voxels)."
        )
    if not np.all(np.isfinite(vol.affine_ras)):
        raise InputError(f"The {name}'s geometry (affine) contains NaN or Inf values.")
    det = np.linalg.det(vol.affine_ras[:3, :3])
    if not np.isfinite(det) or abs(det) < 1e-9:
        raise InputError(f"The {name}'s geometry is singular (zero voxel size or collinear axes); fix the header.")
    if not np.all(vol.affine_ras[3] == [0, 0, 0, 1]):
        raise InputError(f"The {name}'s affine has an invalid last row {vol.affine_ras[3].tolist()}.")
    finite = np.isfinite(a)
    if not finite.all():
        bad = int(a.size - np.count_nonzero(finite))
        raise InputError(f"The {name} contains {bad:,} NaN/Inf voxels; replace them (e.g. with 0) before use.")
    if float(a.max()) == float(a.min()):
        raise InputError(f"The {name} is constant (every voxel is {float(a.min())}); it holds no image.")


# ---------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------
def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in NIFTI_SUFFIXES + NRRD_SUFFIXES:
        if name.endswith(s):
            return s
    return path.suffix.lower()


def umask_mode(directory: bool = False) -> int:
    """The permissions ``open()`` / ``mkdir()`` give under the process umask. ``tempfile.mkstemp`` and
    ``mkdtemp`` (used for atomic writes) create 0600 / 0700, which would hide every output from the
    other users of a shared machine; the atomic writers set this mode instead."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sidecar_path(path: str | os.PathLike) -> Path:
    """``scan.nii.gz`` → ``scan.json`` (BIDS-style sidecar)."""
    p = Path(path)
    name = p.name
    for s in NIFTI_SUFFIXES + NRRD_SUFFIXES:
        if name.lower().endswith(s):
            return p.with_name(name[: -len(s)] + ".json")
    return p.with_suffix(".json")


def check_image_path(path: str | Path, name: str = "input scan") -> Path:
    """Fail fast, before anything slow runs, on a path that cannot be an image file.

    Raises:
        InputError: the path does not exist, is a folder, or is an empty file.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"The {name} file does not exist: {p}")
    if p.is_dir():
        raise InputError(f"The {name} path is a folder, not an image file: {p}")
    if p.stat().st_size == 0:
        raise InputError(f"The {name} file is empty (0 bytes): {p}")
    return p


def read_volume(
    path: str | os.PathLike,
    *,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    validate: bool = True,
    name: str = "input volume",
) -> Volume:
    """Read a NIfTI (.nii, .nii.gz) or NRRD (.nrrd, .nhdr) file with exact geometry.

    The header is checked (3D, voxel budget) before voxels are loaded, so a huge file
    is refused without filling memory. A 4D file whose 4th axis has length 1 is read
    as 3D. The file is opened read-only and never modified.

    Args:
        path: the file.
        max_voxels: refuse volumes with more voxels than this.
        validate: run :func:`validate_volume` (NaN, constant, singular affine…).
        name: how error messages call the volume.

    Raises:
        InputError: missing, unreadable, truncated or unsupported files and bad values.
    """
    p = check_image_path(path, name)
    suffix = _suffix(p)
    try:
        if suffix in NIFTI_SUFFIXES:
            vol = _read_nifti(p, max_voxels, name)
        elif suffix in NRRD_SUFFIXES:
            vol = _read_nrrd(p, max_voxels, name)
        else:
            raise InputError(
                f"Unsupported file type '{p.name}'. Use NIfTI (.nii, .nii.gz) or NRRD (.nrrd); "
                "convert DICOM series with Slicer or dcm2niix first."
            )
    except InputError:
        raise
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError, ValueError, RuntimeError, MemoryError) as exc:
        raise InputError(
            f"Could not read the {name} '{p.name}': the file is truncated, corrupt or not a valid "
            f"{'NIfTI' if suffix in NIFTI_SUFFIXES else 'NRRD'} image ({type(exc).__name__}: {str(exc)[:200]})."
        ) from None
    if validate:
        validate_volume(vol, max_voxels=max_voxels, name=name)
    return vol


def _check_header_shape(shape: Sequence[int], max_voxels: int, name: str) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise InputError(
            f"The {name} must be a 3D scalar volume; the file holds {len(shape)}D data of shape {shape}. "
            "Pick one frame/channel first."
        )
    n = int(np.prod(shape, dtype=np.int64))
    if n > max_voxels:
        raise InputError(
            f"The {name} has {n:,} voxels (shape {shape}), over the limit of {max_voxels:,}. "
            "Crop or downsample it first, or raise the limit (--max-voxels)."
        )
    return shape  # type: ignore[return-value]


def _read_nifti(p: Path, max_voxels: int, name: str) -> Volume:
    import nibabel as nib

    try:
        img = nib.load(str(p))
    except nib.filebasedimages.ImageFileError as exc:
        raise InputError(f"'{p.name}' is not a readable NIfTI file ({exc}).") from None
    shape = _check_header_shape(img.shape, max_voxels, name)
    hdr = img.header
    if hdr.get_data_dtype().fields is not None or np.dtype(hdr.get_data_dtype()).kind == "c":
        raise InputError(f"The {name} holds RGB or complex voxels; a scalar image is required.")
    data = np.asanyarray(img.dataobj)  # applies scl_slope/inter; raises on truncated data
    data = np.asarray(data, dtype=np.float32).reshape(shape)
    # img.affine is the sform when its code > 0, else the qform: nibabel's documented choice.
    meta: dict[str, str] = {}
    descrip = hdr.get("descrip")
    if descrip is not None:
        text = bytes(np.asarray(descrip).tobytes()).split(b"\x00")[0].decode("latin-1", "replace").strip()
        if text:
            meta["descrip"] = text
    side = sidecar_path(p)
    if side.exists():
        try:
            side_meta = json.loads(side.read_text())
            if isinstance(side_meta, dict):
                meta.update({str(k): v if isinstance(v, str) else json.dumps(v) for k, v in side_meta.items()})
        except (OSError, json.JSONDecodeError):
            pass  # a sidecar is optional; a broken one must not block reading the image
    src_dtype = np.dtype(hdr.get_data_dtype()).name
    slope, _ = hdr.get_slope_inter()
    if slope is not None and slope not in (1.0,) and np.isfinite(slope):
        src_dtype = "float32"  # scaled integers are real-valued
    return Volume(data, np.asarray(img.affine, dtype=np.float64), meta, src_dtype,
                  (int(hdr["sform_code"]), int(hdr["qform_code"])))


def _read_nrrd(p: Path, max_voxels: int, name: str) -> Volume:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"'{p.name}' is not a readable NRRD file ({str(exc).strip().splitlines()[-1][:200]}).") from None
    size = reader.GetSize()
    if reader.GetNumberOfComponents() != 1:
        raise InputError(f"The {name} has {reader.GetNumberOfComponents()} components per voxel; a scalar image is required.")
    _check_header_shape(size, max_voxels, name)
    if len(size) != 3:
        raise InputError(f"The {name} must be a 3D NRRD; it has dimension {len(size)}.")
    img = reader.Execute()
    src_dtype = np.dtype(sitk.GetArrayViewFromImage(img).dtype).name
    data = sitk.GetArrayFromImage(img).astype(np.float32).transpose(2, 1, 0)  # (k,j,i) -> (i,j,k)
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3) @ np.diag(img.GetSpacing())
    affine_lps[:3, 3] = img.GetOrigin()
    meta = {k: img.GetMetaData(k) for k in img.GetMetaDataKeys() if not k.startswith(("ITK_", "NRRD_"))}
    return Volume(data, _LPS @ affine_lps, meta, src_dtype)


# ---------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------
def write_volume(
    vol: Volume,
    path: str | os.PathLike,
    *,
    provenance: Provenance | None = None,
    dtype: str | np.dtype | None = None,
    overwrite: bool = True,
    nifti_codes: tuple[int, int] | None = None,
) -> Path:
    """Write a volume atomically as NIfTI or NRRD (chosen by the extension).

    Args:
        vol: the volume.
        path: destination; ``.nii``, ``.nii.gz`` or ``.nrrd``.
        provenance: if given, the file is marked SYNTHETIC with this record (NRRD
            header fields; NIfTI ``descrip`` + JSON sidecar).
        dtype: voxel type on disk (default float32). Integer types are rounded and
            clipped to their range.
        overwrite: if False, refuse to replace an existing file.
        nifti_codes: (sform_code, qform_code) for a NIfTI file, e.g. the input scan's
            :attr:`Volume.nifti_codes` for a volume on its grid (default: the volume's own, else
            1 = scanner); a code of 0 (unknown) is written as 1, since the affine is always meant.

    Returns:
        The path written.
    """
    p = Path(path)
    suffix = _suffix(p)
    if suffix not in NIFTI_SUFFIXES + (".nrrd",):
        raise InputError(f"Cannot write '{p.name}': use .nii, .nii.gz or .nrrd.")
    if p.exists() and not overwrite:
        raise InputError(f"Refusing to overwrite existing file {p}.")
    if vol.array.ndim != 3:
        raise InputError(f"Only 3D volumes can be written (got shape {vol.array.shape}).")
    p.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(vol.metadata)
    if provenance is not None:
        meta.update(provenance.to_metadata())
    arr = _cast(vol.array, np.dtype(dtype) if dtype is not None else np.dtype(np.float32))

    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=suffix, dir=str(p.parent))
    os.close(fd)
    os.chmod(tmp, umask_mode())
    tmp_side = None
    try:
        if suffix in NIFTI_SUFFIXES:
            _write_nifti(arr, vol.affine_ras, meta, provenance, tmp, nifti_codes or vol.nifti_codes)
            if any(k.startswith(_PREFIX) for k in meta):
                tmp_side = tmp + ".json"
                with open(tmp_side, "w") as f:
                    json.dump({k: v for k, v in meta.items() if k.startswith(_PREFIX)}, f, indent=1, sort_keys=True)
        else:
            _write_nrrd(arr, vol.affine_ras, meta, tmp)
        if tmp_side:
            os.replace(tmp_side, sidecar_path(p))
        os.replace(tmp, p)
    except BaseException:
        for t in (tmp, tmp_side):
            if t and os.path.exists(t):
                os.unlink(t)
        raise
    return p


def _cast(a: np.ndarray, dt: np.dtype) -> np.ndarray:
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return np.clip(np.rint(a), info.min, info.max).astype(dt)
    return a.astype(dt, copy=False)


def _write_nifti(arr: np.ndarray, affine: np.ndarray, meta: Mapping[str, str], prov: Provenance | None, tmp: str,
                 codes: tuple[int, int] | None = None) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(arr, affine)
    img.header.set_xyzt_units("mm", "sec")
    # The source's space codes (scanner-anatomical when unknown) on both; nibabel stores the exact
    # affine in the sform and the nearest rigid+zoom approximation in the qform (exact when no shear).
    sform_code, qform_code = ((c if c > 0 else 1) for c in (codes or (1, 1)))
    img.set_sform(affine, code=int(sform_code))
    img.set_qform(affine, code=int(qform_code))
    if prov is not None:
        img.header["descrip"] = prov.descrip().encode("ascii")
    elif "descrip" in meta:
        img.header["descrip"] = meta["descrip"].encode("ascii", "replace")[:79]
    nib.save(img, tmp)


def _write_nrrd(arr: np.ndarray, affine_ras: np.ndarray, meta: Mapping[str, str], tmp: str) -> None:
    import SimpleITK as sitk

    affine_lps = _LPS @ affine_ras
    m = affine_lps[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    direction = m / spacing[None, :]
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-5):
        raise InputError(
            "This volume's axes are sheared (not orthogonal); NRRD/ITK cannot store that geometry. "
            "Write it as NIfTI (.nii.gz) instead."
        )
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in affine_lps[:3, 3]])
    img.SetDirection([float(d) for d in direction.ravel()])
    for k, v in meta.items():
        if k == "descrip":
            continue
        img.SetMetaData(str(k), str(v).replace("\n", " "))
    writer = sitk.ImageFileWriter()
    writer.SetFileName(tmp)
    writer.SetUseCompression(True)
    writer.Execute(img)
