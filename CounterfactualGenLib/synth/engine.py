"""Synthetic brain MRI subjects with exact ground truth, and their exact counterfactual twins.

A subject is the MNI ICBM152 2009a tissue anatomy (Fonov et al. 2009, 2011), or Colin27's
(one person's brain, Holmes et al. 1998; ``SubjectSpec.anatomy``), seen
through a random smooth deformation and a random global size/pose, optionally with
atrophy (ventricular enlargement and cortical thinning), white-matter lesions from
the real MS lesion library (Lesjak et al. 2018) or procedural blobs, a FLAIR- or
T1-like contrast with partial volume, a multiplicative bias field and Rician noise.

Every random draw comes from its own stream of the spec's seed (anatomy, texture,
bias, noise, atrophy modulation) or lesion seed (lesions), so two specs that differ
only in lesions or atrophy give *exact twins*: the same person, bias and noise
realisation, with bit-identical voxels wherever the change does not reach.

Example:
    >>> spec = SubjectSpec(seed=1, target_lesion_ml=10.0)
    >>> s = make_subject(spec, shape=(32, 32, 32), spacing_mm=6.0)
    >>> s.attributes["lesion_load"], s.image.spacing_mm
    ('moderate', (6.0, 6.0, 6.0))
    >>> healthy = make_twin(spec, shape=(32, 32, 32), spacing_mm=6.0, lesion_class="none")
    >>> bool(((s.image.array != healthy.image.array) <= (s.lesion_mask > 0)).all())
    True
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import InputError
from ..volume import Provenance, Volume
from .fields import SmoothFieldSampler
from .lesions import LesionPiece, cached_pool, explicit_pieces, paint_ranks
from .resources import load_lesion_library, load_template
from .spec import (
    DIAGNOSES,
    DIAGNOSIS_ATROPHY,
    LESION_CLASS_TARGET_ML,
    LESION_CLASSES,
    SubjectSpec,
    diagnosis_class,
    lesion_class,
)

__all__ = [
    "ENGINE_ID",
    "DEFAULT_CENTER_MM",
    "CONTRAST_INTENSITIES",
    "Subject",
    "output_grid",
    "make_subject",
    "make_twin",
    "lesion_load_series",
    "atrophy_series",
]

log = logging.getLogger(__name__)

#: Engine id recorded in every subject's provenance; bump when outputs change for a given spec.
ENGINE_ID = "counterfactualgen-synth-1"
#: Default grid centre: the centre of the template brain's bounding box (MNI mm).
DEFAULT_CENTER_MM = (0.0, -17.0, 7.0)
#: Mean tissue intensities per contrast (image units; each subject jitters them ±4 %).
#: ``lesion_ratio`` multiplies the white-matter intensity inside lesions.
CONTRAST_INTENSITIES: dict[str, dict[str, float]] = {
    # FLAIR: CSF suppressed, GM brighter than WM, lesions hyperintense (~1.3 × NAWM).
    "FLAIR": {"csf": 0.10, "gm": 0.72, "wm": 0.55, "lesion_ratio": 1.30, "background": 0.03},
    # T1: CSF dark, GM < WM, MS lesions slightly hypointense.
    "T1": {"csf": 0.20, "gm": 0.50, "wm": 0.80, "lesion_ratio": 0.85, "background": 0.03},
}
#: Outward growth of the lateral ventricles into surrounding tissue at atrophy 1 (mm).
VENTRICLE_GROWTH_MM = 4.5
#: Cortical grey matter turned into CSF from the pial side at atrophy 1 (mm).
CORTEX_THINNING_MM = 1.2
#: Lesions only occupy voxels whose white-matter probability is at least this.
LESION_MIN_WM = 0.5

# Independent random streams (second element of the seed sequence) of ``spec.seed``.
_STREAM_ANATOMY = 1
_STREAM_TEXTURE = 2
_STREAM_BIAS = 3
_STREAM_NOISE = 4
_STREAM_ATROPHY = 5
_STREAM_LESION_TEXTURE = 6


@dataclass(frozen=True, eq=False)
class Subject:
    """A synthetic subject: the scan and its exact ground truth, all on one grid.

    Attributes:
        spec: the spec it was made from.
        image: the scan (float32, RAS affine in MNI millimetres), marked SYNTHETIC.
        brain_mask: uint8 0/1 intracranial mask (brain + CSF).
        lesion_mask: uint8 0/1 exact lesion mask.
        tissue: float32 probability maps ``gm``, ``wm``, ``csf``, ``ventricles`` of the
            lesion-free anatomy (lesions replace white matter only in the image).
        attributes: ground truth: ``lesion_ml`` (= lesion voxels × voxel volume),
            ``lesion_voxels``, ``lesion_load`` (class), ``n_lesions`` (connected
            components), ``ventricle_ml``, ``gm_ml``, ``wm_ml``, ``csf_ml``,
            ``brain_ml``, ``intracranial_ml``, ``atrophy``, ``diagnosis``, ``contrast``,
            ``seed``, ``target_lesion_ml``, ``voxel_ml``.
        lesion_sources: where each placed lesion piece came from.
        timings_s: seconds per generation stage.
    """

    spec: SubjectSpec
    image: Volume
    brain_mask: np.ndarray
    lesion_mask: np.ndarray
    tissue: dict[str, np.ndarray]
    attributes: dict[str, Any]
    lesion_sources: tuple[str, ...] = ()
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def affine_ras(self) -> np.ndarray:
        """Voxel → RAS (MNI) mm of every array of this subject."""
        return self.image.affine_ras

    def volume(self, name: str) -> Volume:
        """Any array of the subject as a :class:`Volume` on the image grid.

        Args:
            name: ``"image"``, ``"brain_mask"``, ``"lesion_mask"`` or a tissue name.

        Returns:
            The volume (masks as float32 0/1), with the image's provenance metadata.
        """
        if name == "image":
            return self.image
        arrays = {"brain_mask": self.brain_mask, "lesion_mask": self.lesion_mask, **self.tissue}
        if name not in arrays:
            raise InputError(f"Unknown subject array {name!r}; choose image or one of {', '.join(arrays)}.")
        return self.image.with_array(arrays[name], **{"CounterfactualGen.Kind": f"synthetic-{name}"})


@dataclass(frozen=True)
class _Grid:
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    center_mm: tuple[float, float, float]

    @property
    def affine_ras(self) -> np.ndarray:
        a = np.diag([*self.spacing_mm, 1.0])
        a[:3, 3] = np.asarray(self.center_mm) - np.asarray(self.spacing_mm) * (np.asarray(self.shape) - 1) / 2.0
        return a

    @property
    def axes_mm(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a = self.affine_ras
        return tuple(a[d, 3] + a[d, d] * np.arange(n) for d, n in enumerate(self.shape))  # type: ignore[return-value]


def output_grid(
    shape: Sequence[int] = (64, 64, 64),
    spacing_mm: float | Sequence[float] = 3.0,
    center_mm: Sequence[float] | None = None,
) -> np.ndarray:
    """The RAS affine of a subject grid (axis-aligned, centred on the brain by default).

    Args:
        shape: three voxel counts (each 8…512).
        spacing_mm: voxel size, one number or three (each in (0, 20] mm).
        center_mm: MNI position of the grid centre (default :data:`DEFAULT_CENTER_MM`).

    Returns:
        4×4 voxel → RAS mm matrix.

    Raises:
        InputError: a shape that is not 3D or out of range, a non-positive spacing.
    """
    return _make_grid(shape, spacing_mm, center_mm).affine_ras


def _make_grid(shape: Any, spacing_mm: Any, center_mm: Any) -> _Grid:
    try:
        shp = tuple(int(s) for s in shape)
        ok = len(shp) == 3 and all(float(s) == int(s) for s in shape)
    except (TypeError, ValueError):
        ok = False
    if not ok or not all(8 <= s <= 512 for s in shp):
        raise InputError(f"shape must be three voxel counts between 8 and 512, e.g. (64, 64, 64); got {shape!r}.")
    try:
        sp = (float(spacing_mm),) * 3 if np.ndim(spacing_mm) == 0 else tuple(float(s) for s in spacing_mm)
    except (TypeError, ValueError):
        sp = ()
    if len(sp) != 3 or not all(math.isfinite(s) and 0 < s <= 20 for s in sp):
        raise InputError(f"spacing_mm must be a positive voxel size in mm (≤ 20), one value or three; got {spacing_mm!r}.")
    c = DEFAULT_CENTER_MM if center_mm is None else tuple(float(v) for v in center_mm)
    if len(c) != 3 or not all(math.isfinite(v) for v in c):
        raise InputError(f"center_mm must be three finite MNI coordinates, got {center_mm!r}.")
    return _Grid(shp, sp, c)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=16)
def _sampler(grid: _Grid) -> SmoothFieldSampler:
    # Cached per grid: the spline weight matrices are the only per-grid precomputation.
    return SmoothFieldSampler(grid.axes_mm)


def _small_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    rot = np.eye(3)
    for axis in range(3):
        a = math.radians(rng.uniform(-max_deg, max_deg))
        c, s = math.cos(a), math.sin(a)
        i, j = [d for d in range(3) if d != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rot = r @ rot
    return rot


class _Trilinear:
    """Trilinear interpolation at fixed points, reusable across several arrays.

    Corner indices and weights are computed once; :meth:`sample` then costs 8 gathers
    per array, and arrays with interleaved channels (X, Y, Z, C) fetch all channels of
    a corner in one gather. Points whose 8-voxel cell is not fully inside the array
    read 0 (the template keeps a zero margin around the brain).

    Args:
        q: (3, n) voxel coordinates.
        shape: the (X, Y, Z) shape of the arrays that will be sampled.
    """

    def __init__(self, q: np.ndarray, shape: tuple[int, int, int]) -> None:
        shp = np.asarray(shape)
        self.n = q.shape[1]
        self.shape = tuple(int(s) for s in shape)
        i0 = np.floor(q).astype(np.int64)
        self.points = np.flatnonzero(np.all((i0 >= 0) & (i0 < shp[:, None] - 1), axis=0))
        i0 = i0[:, self.points]
        f = (q[:, self.points] - i0).astype(np.float32)
        g = 1.0 - f
        base = np.ravel_multi_index(tuple(i0), self.shape)
        sy, sz = self.shape[1] * self.shape[2], self.shape[2]
        self.corners = []
        for dx, wx in ((0, g[0]), (1, f[0])):
            for dy, wy in ((0, g[1]), (1, f[1])):
                wxy = wx * wy
                for dz, wz in ((0, g[2]), (1, f[2])):
                    self.corners.append((base + (dx * sy + dy * sz + dz), wxy * wz))

    def restrict(self, keep: np.ndarray) -> None:
        """Keep only the valid points whose position in :attr:`points` is in ``keep``."""
        self.points = self.points[keep]
        self.corners = [(i[keep], w[keep]) for i, w in self.corners]

    def sample(self, array: np.ndarray) -> np.ndarray:
        """Values at the valid points: (m,) for a 3D array, (m, C) for (X, Y, Z, C)."""
        flat = array.reshape(int(np.prod(self.shape)), -1)
        acc = np.zeros((self.points.size, flat.shape[1]), np.float32)
        for idx, w in self.corners:
            acc += np.take(flat, idx, axis=0) * w[:, None]
        return acc[:, 0] if array.ndim == 3 else acc


def make_subject(
    spec: SubjectSpec,
    *,
    shape: Sequence[int] = (64, 64, 64),
    spacing_mm: float | Sequence[float] = 3.0,
    center_mm: Sequence[float] | None = None,
) -> Subject:
    """Generate one synthetic subject, deterministically from its spec.

    Args:
        spec: what to generate (seed, lesions, atrophy, contrast, noise, bias).
        shape: output grid size in voxels.
        spacing_mm: output voxel size (one value or three).
        center_mm: MNI position of the grid centre (default: the brain's centre).

    Returns:
        The :class:`Subject` (image, masks, tissue maps, exact attributes).

    Raises:
        InputError: bad grid arguments or an unusable spec.
    """
    if not isinstance(spec, SubjectSpec):
        raise InputError(f"spec must be a SubjectSpec (see synth.random_spec), got {type(spec).__name__}.")
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    grid = _make_grid(shape, spacing_mm, center_mm)
    tpl = load_template(spec.anatomy)
    lib = load_lesion_library()
    sampler = _sampler(grid)
    times["resources"] = time.perf_counter() - t0

    # --- anatomy: global size/pose + smooth deformation, then template lookup ---------
    t = time.perf_counter()
    rng = np.random.default_rng([spec.seed, _STREAM_ANATOMY])
    size = float(np.clip(np.exp(rng.normal(0.0, 0.05)), 0.9, 1.1)) * np.exp(rng.normal(0.0, 0.02, 3))
    rotation = _small_rotation(rng, 4.0)
    jitter = np.exp(rng.normal(0.0, 0.04, 3))  # csf, gm, wm contrast of this person
    disp = [sampler.field(rng, step_mm=24.0, clip_sigma=3.0) for _ in range(3)]
    # Subject point x sees template point p = c + (R S)⁻¹ (x − c) + u(x).
    to_tpl = np.linalg.inv(rotation @ np.diag(size))
    c = np.asarray(DEFAULT_CENTER_MM)
    xs = [a - c[d] for d, a in enumerate(grid.axes_mm)]
    inv_tpl = np.linalg.inv(tpl.affine_ras)
    m = inv_tpl[:3, :3] @ to_tpl  # straight to template voxel coordinates
    off = inv_tpl[:3, :3] @ c + inv_tpl[:3, 3]
    q = np.empty((3, *grid.shape), np.float32)
    for d in range(3):
        q[d] = (
            (m[d, 0] * xs[0])[:, None, None] + (m[d, 1] * xs[1])[None, :, None] + (m[d, 2] * xs[2])[None, None, :] + off[d]
        )
        q[d] += sum(inv_tpl[d, e] * disp[e] * spec.deform_mm for e in range(3))
    q = q.reshape(3, -1)
    # Brain first everywhere, then the other maps only inside the brain (~⅓ of the grid).
    interp = _Trilinear(q, tpl.brain.shape)
    brain_valid = interp.sample(tpl.brain)
    keep = np.flatnonzero(brain_valid > 0)
    interp.restrict(keep)
    inside = interp.points
    brain = np.zeros(q.shape[1], np.float32)
    brain[inside] = brain_in = brain_valid[keep]
    tissue3 = interp.sample(tpl.tissue_stack)  # gm, wm, ventricle_prob
    gm, wm, vent = tissue3[:, 0], tissue3[:, 1], tissue3[:, 2]
    csf = np.clip(brain_in - gm - wm, 0.0, 1.0)
    times["anatomy"] = time.perf_counter() - t

    # --- atrophy: CSF grows into tissue around the ventricles and into the cortex -----
    t = time.perf_counter()
    if spec.atrophy > 0:
        rng_at = np.random.default_rng([spec.seed, _STREAM_ATROPHY])
        mod_v = sampler.field(rng_at, step_mm=30.0, clip_sigma=2.0).ravel()[inside] / 2.0
        mod_c = sampler.field(rng_at, step_mm=30.0, clip_sigma=2.0).ravel()[inside] / 2.0
        # Distance-driven conversion = an erosion-type deformation of tissue by CSF whose
        # reach is the atrophy level × a subject-specific smooth rate (±35 %).
        dist2 = interp.sample(tpl.distance_stack)
        sdist, depth = dist2[:, 0], dist2[:, 1]
        grow = spec.atrophy * VENTRICLE_GROWTH_MM * (1.0 + 0.35 * mod_v)
        conv_v = np.clip((grow - np.maximum(sdist, 0.0)) / 1.5, 0.0, 1.0)
        thin = spec.atrophy * CORTEX_THINNING_MM * (1.0 + 0.35 * mod_c)
        conv_c = np.clip((thin - np.maximum(depth - 0.5, 0.0)) / 1.0, 0.0, 1.0)
        lost_gm = gm * conv_c
        gm = gm - lost_gm
        csf = csf + lost_gm
        moved = (gm + wm) * conv_v
        gm = gm - gm * conv_v
        wm = wm - wm * conv_v
        csf = csf + moved
        vent = vent + moved
    times["atrophy"] = time.perf_counter() - t

    # --- lesions: exact binary mask on the output grid, inside white matter -----------
    t = time.perf_counter()
    cand = np.flatnonzero(wm >= LESION_MIN_WM)
    inv_lib = np.linalg.inv(lib.affine_ras)
    # Lesions follow the anatomy: sample library-grid labels at the same template points.
    p_cand = np.linalg.inv(inv_tpl) @ np.vstack([q[:, inside[cand]].astype(np.float64), np.ones(cand.size)])
    lib_idx = np.rint(inv_lib @ p_cand)[:3].astype(np.int64)
    in_lib = np.all((lib_idx >= 0) & (lib_idx < np.asarray(lib.shape)[:, None]), axis=0)
    voxel_ml = float(np.prod(grid.spacing_mm)) / 1000.0

    def ranks(pieces: list[LesionPiece]) -> np.ndarray:
        labels = np.zeros(cand.size, np.int64)
        if pieces:
            canvas = paint_ranks(pieces, lib.shape)
            labels[in_lib] = canvas[tuple(lib_idx[:, in_lib])]
        return labels

    pieces = explicit_pieces(spec, tpl, lib)
    if spec.target_lesion_ml is None:
        labels = ranks(pieces)
        keep = len(pieces)
    elif spec.target_lesion_ml == 0:
        labels, keep = np.zeros(cand.size, np.int64), 0
    else:
        target = spec.target_lesion_ml
        pool = cached_pool(spec, tpl, lib)
        need_ml, exhausted, pool_ml, n_pool = 1.5 * target + 3.0, False, 0.0, 0
        while True:
            # Take pool pieces until their library volume comfortably exceeds the target
            # (WM restriction and coarse grids lose some); double the margin if short.
            while pool_ml < need_ml and not exhausted:
                piece = pool.get(n_pool)
                if piece is None:
                    exhausted = True
                else:
                    pieces.append(piece)
                    n_pool += 1
                    pool_ml += piece.voxels.shape[0] / 1000.0
            labels = ranks(pieces)
            counts = np.bincount(labels, minlength=len(pieces) + 1)
            counts[0] = 0  # label 0 = no lesion; cum_ml[k] = volume of the first k pieces
            cum_ml = np.cumsum(counts) * voxel_ml
            if cum_ml[-1] >= target or exhausted:
                break
            need_ml *= 2.0
        keep = _choose_prefix(cum_ml, target)
    lesion_flat = np.zeros(int(np.prod(grid.shape)), np.uint8)
    in_lesion = (labels >= 1) & (labels <= keep)
    lesion_flat[inside[cand[in_lesion]]] = 1
    used = sorted(set(labels[in_lesion].tolist()))
    sources = tuple(pieces[r - 1].source for r in used)
    times["lesions"] = time.perf_counter() - t

    # --- contrast, texture, bias, noise ---------------------------------------------
    t = time.perf_counter()
    ci = CONTRAST_INTENSITIES[spec.contrast]
    i_csf, i_gm, i_wm = ci["csf"] * jitter[0], ci["gm"] * jitter[1], ci["wm"] * jitter[2]
    bg = ci["background"]
    signal = np.full(lesion_flat.size, bg, np.float32)
    signal[inside] = gm * i_gm + wm * i_wm + csf * i_csf + (1.0 - brain_in) * bg
    les_in = cand[in_lesion]
    if les_in.size:
        rng_lt = np.random.default_rng([spec.seed, _STREAM_LESION_TEXTURE])
        les_tex = sampler.field(rng_lt, step_mm=6.0, clip_sigma=2.0).ravel()[inside[les_in]]
        # Lesions replace the white-matter fraction of a voxel (partial volume kept).
        signal[inside[les_in]] += wm[les_in] * i_wm * (ci["lesion_ratio"] * (1.0 + 0.05 * les_tex) - 1.0)
    signal = signal.reshape(grid.shape)
    texture = sampler.field(np.random.default_rng([spec.seed, _STREAM_TEXTURE]), step_mm=8.0, clip_sigma=3.0)
    signal *= 1.0 + 0.03 * texture
    if spec.bias_strength > 0:
        bias = sampler.field(np.random.default_rng([spec.seed, _STREAM_BIAS]), step_mm=60.0, clip_sigma=3.0)
        signal *= np.exp(spec.bias_strength * bias)
    if spec.noise_sigma > 0:
        # Rician magnitude noise; the draw depends only on seed and grid, never on lesions.
        rng_n = np.random.default_rng([spec.seed, _STREAM_NOISE])
        n_re = rng_n.standard_normal(grid.shape, dtype=np.float32)
        n_im = rng_n.standard_normal(grid.shape, dtype=np.float32)
        sigma = np.float32(spec.noise_sigma)
        signal = np.sqrt((signal + sigma * n_re) ** 2 + (sigma * n_im) ** 2)
    times["contrast_noise"] = time.perf_counter() - t

    # --- outputs and exact attributes -----------------------------------------------
    t = time.perf_counter()

    def full(values: np.ndarray) -> np.ndarray:
        out = np.zeros(lesion_flat.size, np.float32)
        out[inside] = values
        return out.reshape(grid.shape)

    tissue = {"gm": full(gm), "wm": full(wm), "csf": full(csf), "ventricles": full(vent)}
    brain_mask = (brain >= 0.5).astype(np.uint8).reshape(grid.shape)
    lesion_mask = lesion_flat.reshape(grid.shape)
    lesion_voxels = int(lesion_flat.sum(dtype=np.int64))
    lesion_ml = lesion_voxels * voxel_ml
    n_lesions = 0
    if lesion_voxels:
        from scipy import ndimage as ndi

        n_lesions = int(ndi.label(lesion_mask, structure=np.ones((3, 3, 3), bool))[1])
    attributes: dict[str, Any] = {
        "lesion_ml": lesion_ml,
        "lesion_voxels": lesion_voxels,
        "lesion_load": lesion_class(lesion_ml),
        "n_lesions": n_lesions,
        "target_lesion_ml": spec.target_lesion_ml,
        "ventricle_ml": float(vent.sum(dtype=np.float64)) * voxel_ml,
        "gm_ml": float(gm.sum(dtype=np.float64)) * voxel_ml,
        "wm_ml": float(wm.sum(dtype=np.float64)) * voxel_ml,
        "csf_ml": float(csf.sum(dtype=np.float64)) * voxel_ml,
        "brain_ml": float((gm + wm).sum(dtype=np.float64)) * voxel_ml,
        "intracranial_ml": float(brain_in.sum(dtype=np.float64)) * voxel_ml,
        "atrophy": spec.atrophy,
        "diagnosis": diagnosis_class(spec.atrophy),
        "contrast": spec.contrast,
        "anatomy": spec.anatomy,
        "seed": spec.seed,
        "voxel_ml": voxel_ml,
    }
    prov = Provenance(
        model_id=ENGINE_ID,
        seed=spec.seed,
        kind="synthetic-subject",
        extra={"SubjectSpec": spec.to_json(), "LesionML": f"{lesion_ml:.4f}", "Contrast": spec.contrast},
    )
    image = Volume(signal.astype(np.float32, copy=False), grid.affine_ras, prov.to_metadata())
    times["outputs"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0
    log.debug("synthetic subject seed=%d %s: %s", spec.seed, grid.shape, {k: round(v, 3) for k, v in times.items()})
    return Subject(spec, image, brain_mask, lesion_mask, tissue, attributes, sources, times)


def _choose_prefix(cum_ml: np.ndarray, target_ml: float) -> int:
    """Number of pool pieces whose volume is closest to the target within its class.

    ``cum_ml`` is non-decreasing, so the chosen count never decreases as the target
    grows: twins asked for larger loads get supersets of lesions.
    """
    want = lesion_class(target_ml)
    same = np.flatnonzero([lesion_class(float(v)) == want for v in cum_ml])
    ks = same if same.size else np.arange(cum_ml.size)
    return int(ks[np.argmin(np.abs(cum_ml[ks] - target_ml))])


def make_twin(
    spec: SubjectSpec,
    *,
    shape: Sequence[int] = (64, 64, 64),
    spacing_mm: float | Sequence[float] = 3.0,
    center_mm: Sequence[float] | None = None,
    lesion_class: str | None = None,
    diagnosis: str | None = None,
    **changes: Any,
) -> Subject:
    """An exact counterfactual twin: the same person with some attributes changed.

    Args:
        spec: the factual subject's spec.
        shape, spacing_mm, center_mm: output grid (as :func:`make_subject`).
        lesion_class: set the lesion load to a class (none / minimal / moderate / high),
            i.e. ``target_lesion_ml`` = :data:`LESION_CLASS_TARGET_ML` of that class.
        diagnosis: set the atrophy to a named level (CN / MCI / AD).
        **changes: any other :class:`SubjectSpec` fields (``target_lesion_ml``,
            ``library_lesions``, ``atrophy``, ``lesion_scale`` …).

    Returns:
        The twin. Anatomy, bias and noise are shared with ``make_subject(spec)`` on the
        same grid; voxels outside the changed region are bit-identical.

    Example:
        >>> twin = make_twin(SubjectSpec(seed=4), shape=(32,) * 3, spacing_mm=6.0, diagnosis="AD")
        >>> twin.attributes["diagnosis"]
        'AD'
    """
    if lesion_class is not None:
        if lesion_class not in LESION_CLASS_TARGET_ML:
            raise InputError(f"Unknown lesion class {lesion_class!r}; choose one of {', '.join(LESION_CLASSES)}.")
        changes["target_lesion_ml"] = LESION_CLASS_TARGET_ML[lesion_class]
    if diagnosis is not None:
        if diagnosis not in DIAGNOSIS_ATROPHY:
            raise InputError(f"Unknown diagnosis {diagnosis!r}; choose one of {', '.join(DIAGNOSES)}.")
        changes["atrophy"] = DIAGNOSIS_ATROPHY[diagnosis]
    try:
        twin_spec = spec.replace(**changes)
    except TypeError as exc:  # an unknown field name
        raise InputError(f"Cannot change the spec: {exc}") from None
    return make_subject(twin_spec, shape=shape, spacing_mm=spacing_mm, center_mm=center_mm)


def lesion_load_series(
    spec: SubjectSpec,
    classes: Iterable[str] = LESION_CLASSES,
    *,
    shape: Sequence[int] = (64, 64, 64),
    spacing_mm: float | Sequence[float] = 3.0,
    center_mm: Sequence[float] | None = None,
) -> list[Subject]:
    """Exact twins of one subject at several lesion-load classes.

    Each twin keeps the pool prefix closest to its class's target volume
    (:data:`LESION_CLASS_TARGET_ML`), so lesion masks are nested in class order and
    each twin's ``attributes["lesion_load"]`` is the class asked for.

    Args:
        spec: the subject (its lesion seed and explicit lesions define the pool).
        classes: lesion-load classes, e.g. ``("none", "high")``.
        shape, spacing_mm, center_mm: output grid.

    Returns:
        One subject per class, in the given order.
    """
    return [make_twin(spec, shape=shape, spacing_mm=spacing_mm, center_mm=center_mm, lesion_class=c) for c in classes]


def atrophy_series(
    spec: SubjectSpec,
    levels: Iterable[str | float] = DIAGNOSES,
    *,
    shape: Sequence[int] = (64, 64, 64),
    spacing_mm: float | Sequence[float] = 3.0,
    center_mm: Sequence[float] | None = None,
) -> list[Subject]:
    """Exact twins of one subject at several atrophy levels.

    Args:
        spec: the subject.
        levels: diagnosis names (CN / MCI / AD) or atrophy levels in [0, 1].
        shape, spacing_mm, center_mm: output grid.

    Returns:
        One subject per level, in the given order; ventricle volume grows with the level.
    """
    out = []
    for level in levels:
        if isinstance(level, str):
            if level not in DIAGNOSIS_ATROPHY:
                raise InputError(f"Unknown diagnosis {level!r}; choose one of {', '.join(DIAGNOSES)} or a number in [0, 1].")
            level = DIAGNOSIS_ATROPHY[level]
        out.append(make_twin(spec, shape=shape, spacing_mm=spacing_mm, center_mm=center_mm, atrophy=float(level)))
    return out
