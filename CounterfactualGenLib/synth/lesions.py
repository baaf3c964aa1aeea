"""Lesion pieces on the lesion-library grid: library parts and procedural blobs.

Every lesion the engine can place is a *piece*: a set of voxels on the 1 mm lesion
library grid (FSL MNI152, 182×218×182). Pieces come in an ordered list (the *pool*):
first the spec's explicit lesions, then — when a target volume is asked for — a
seeded, endless-until-exhausted stream of real library components and procedural
blobs. Components larger than :data:`PIECE_ML` are cut into Voronoi parts ordered
outward from a random start, so a prefix of the pool is a lesion that "grows" in
steps of ≤ ~1.5 ml: fine enough to hit any lesion-load class, and every larger
prefix is a superset of a smaller one (monotone counterfactual series).
"""

from __future__ import annotations

import itertools
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .resources import LesionComponent, LesionLibrary, TemplateMaps
from .spec import ProceduralLesion, SubjectSpec

__all__ = ["PIECE_ML", "LesionPiece", "explicit_pieces", "pool_pieces", "cached_pool", "paint_ranks"]

#: Components larger than this (ml at 1 mm) are split into parts of about this size.
PIECE_ML = 1.5
#: Pool components smaller than this (1 mm voxels, ≈ 3.4 mm diameter) are skipped: below
#: the usual 3 mm lesion criterion, and on coarse grids they would turn into isolated
#: full-intensity voxels many times their true volume.
MIN_POOL_VOXELS = 20
# Independent random streams (second element of the seed sequence).
_STREAM_SUBSET = 101
_STREAM_POOL = 102
_STREAM_SPLIT = 103


@dataclass(frozen=True, eq=False)
class LesionPiece:
    """Voxels of one lesion piece on the library grid.

    Attributes:
        voxels: (n, 3) int32 library-grid indices (inside the grid).
        source: where it came from, e.g. ``"patient05#12.3"`` or ``"procedural:juxtacortical"``.
    """

    voxels: np.ndarray
    source: str


def _random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """Rotation about a random axis by an angle uniform in ±max_deg."""
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    a = math.radians(rng.uniform(-max_deg, max_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * (k @ k)


def _light_deformation(rng: np.random.Generator) -> np.ndarray:
    """A light random linear map: ±15 % per axis (log-uniform) and a ±15° rotation."""
    return _random_rotation(rng, 15.0) @ np.diag(np.exp(rng.uniform(-0.15, 0.15, 3)))


def _transform_voxels(vox: np.ndarray, linear: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Voxels of a set mapped by ``x → c + L (x − c)`` about its centroid (nearest neighbour).

    Exact pull-back resampling (a target voxel is kept iff L⁻¹ sends it into the set),
    evaluated only on candidates near the forward-mapped voxels instead of the whole
    bounding box: sprawling confluent lesions have boxes 10–30× their volume.
    """
    if np.allclose(linear, np.eye(3)):
        return vox
    c = vox.mean(axis=0)
    fwd = np.rint((vox - c) @ linear.T + c).astype(np.int64)
    # A kept voxel t pulls back to a set voxel s; |t − fwd(s)|∞ ≤ 0.5·‖L‖∞ + 0.5 and is
    # an integer, so the r-neighbourhood of the forward-mapped voxels holds every candidate.
    r = int(math.floor(0.5 * np.abs(linear).sum(axis=1).max() + 0.5 + 1e-9))
    lo = fwd.min(axis=0) - r  # unclipped box with an r margin: no bounds checks below
    mark = np.zeros(tuple(fwd.max(axis=0) + r + 1 - lo), bool)
    rel = fwd - lo
    for off in itertools.product(range(-r, r + 1), repeat=3):
        p = rel + np.asarray(off)
        mark[p[:, 0], p[:, 1], p[:, 2]] = True
    cand = np.argwhere(mark) + lo
    cand = cand[np.all((cand >= 0) & (cand < np.asarray(shape)), axis=1)]
    lo_src = vox.min(axis=0)
    src = np.zeros(tuple(vox.max(axis=0) - lo_src + 1), bool)
    src[tuple((vox - lo_src).T)] = True
    back = np.rint((cand - c) @ np.linalg.inv(linear).T + c).astype(np.int64) - lo_src
    ok = np.all((back >= 0) & (back < np.asarray(src.shape)), axis=1)
    keep = np.zeros(cand.shape[0], bool)
    keep[ok] = src[tuple(back[ok].T)]
    return cand[keep].astype(np.int32)


def _split(vox: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Cut a voxel set into ~PIECE_ML Voronoi parts, ordered outward from a random voxel.

    Seeds are placed by farthest-point sampling so parts are compact; ordering by the
    seeds' distance to the first one makes every prefix of parts a connected-looking
    growing lesion rather than scattered fragments.
    """
    n_parts = int(math.ceil(vox.shape[0] / 1000.0 / PIECE_ML))
    if n_parts <= 1:
        return [vox]
    pts = vox.astype(np.float32)
    seeds = [int(rng.integers(vox.shape[0]))]
    d = np.linalg.norm(pts - pts[seeds[0]], axis=1)
    for _ in range(n_parts - 1):
        seeds.append(int(np.argmax(d)))
        d = np.minimum(d, np.linalg.norm(pts - pts[seeds[-1]], axis=1))
    centres = pts[seeds]
    owner = np.argmin(((pts[:, None, :] - centres[None, :, :]) ** 2).sum(-1), axis=1)
    order = np.argsort(np.linalg.norm(centres - centres[0], axis=1), kind="stable")
    return [vox[owner == j] for j in order if np.any(owner == j)]


def _component_pieces(
    comp: LesionComponent, linear: np.ndarray, rng: np.random.Generator, shape: tuple[int, int, int]
) -> list[LesionPiece]:
    vox = _transform_voxels(comp.voxels, linear, shape)
    if vox.shape[0] == 0:
        return []
    parts = _split(vox, rng)
    name = f"{comp.library_id}#{comp.index}"
    return [LesionPiece(p, f"{name}.{j}" if len(parts) > 1 else name) for j, p in enumerate(parts)]


def _procedural_piece(
    les: ProceduralLesion, scale: float, tpl: TemplateMaps, lib: LesionLibrary
) -> LesionPiece:
    """An ovoid blob with a lumpy border (random low-order radial modulation)."""
    rng = np.random.default_rng([les.seed, 7919])
    cands = tpl.periventricular_mm if les.kind == "periventricular" else tpl.juxtacortical_mm
    if les.center_mm is not None:
        centre_mm = np.asarray(les.center_mm, float)
    else:
        centre_mm = cands[int(rng.integers(cands.shape[0]))] + rng.uniform(-1.0, 1.0, 3)
    inv = np.linalg.inv(lib.affine_ras)
    centre = inv[:3, :3] @ centre_mm + inv[:3, 3]
    radii = les.radius_mm * scale * np.exp(rng.uniform(-0.3, 0.3, 3))
    rot = _random_rotation(rng, 180.0)
    dirs = rng.standard_normal((3, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    amps = rng.uniform(-0.2, 0.2, 3)
    half = int(math.ceil(1.4 * radii.max())) + 1
    lo = np.maximum(np.floor(centre).astype(int) - half, 0)
    hi = np.minimum(np.floor(centre).astype(int) + half + 1, np.asarray(lib.shape))
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1).reshape(-1, 3)
    # Library voxel size is 1 mm, so index offsets are mm offsets.
    local = ((grid - centre) @ rot) / radii
    r = np.linalg.norm(local, axis=1)
    unit = local / np.maximum(r[:, None], 1e-9)
    border = 1.0 + (unit @ dirs.T) ** 2 @ amps
    vox = grid[r <= border].astype(np.int32)
    if vox.shape[0] == 0:  # a sub-voxel blob still marks its centre voxel
        vox = np.clip(np.rint(centre), 0, np.asarray(lib.shape) - 1).astype(np.int32)[None]
    return LesionPiece(vox, f"procedural:{les.kind}")


def explicit_pieces(spec: SubjectSpec, tpl: TemplateMaps, lib: LesionLibrary) -> list[LesionPiece]:
    """The pieces of the lesions listed in the spec, in order (library first, then procedural)."""
    pieces: list[LesionPiece] = []
    seed = spec.effective_lesion_seed
    for n, les in enumerate(spec.library_lesions):
        comps = lib.components(les.library_id)
        rng = np.random.default_rng([seed, _STREAM_SUBSET, n])
        k = max(1, int(round(les.subset_fraction * len(comps)))) if comps else 0
        chosen = sorted(rng.choice(len(comps), size=k, replace=False).tolist()) if k < len(comps) else range(len(comps))
        split_rng = np.random.default_rng([seed, _STREAM_SPLIT, n])
        for c in chosen:
            linear = spec.lesion_scale * np.eye(3)
            if les.deform_seed is not None:
                linear = linear @ _light_deformation(np.random.default_rng([les.deform_seed, c]))
            pieces += _component_pieces(comps[c], linear, split_rng, lib.shape)
    for les in spec.procedural_lesions:
        pieces.append(_procedural_piece(les, spec.lesion_scale, tpl, lib))
    return pieces


def pool_pieces(spec: SubjectSpec, tpl: TemplateMaps, lib: LesionLibrary) -> Iterator[LesionPiece]:
    """The seeded stream of extra lesion pieces used to reach ``spec.target_lesion_ml``.

    Donor masks are visited in a random order; each donor's components (of at least
    :data:`MIN_POOL_VOXELS`) in random order,
    each lightly deformed, scaled by ``lesion_scale`` and split into growing parts; about
    one component in four is followed by a procedural blob (2–4.5 mm radius). Draws are
    strictly sequential, so the first n pieces never depend on how many are consumed.
    """
    rng = np.random.default_rng([spec.effective_lesion_seed, _STREAM_POOL])
    for library_id in rng.permutation(np.array(lib.ids)).tolist():
        comps = lib.components(library_id)
        for c in rng.permutation(len(comps)).tolist():
            if comps[c].voxels.shape[0] < MIN_POOL_VOXELS:
                continue
            linear = spec.lesion_scale * _light_deformation(rng)
            yield from _component_pieces(comps[c], linear, rng, lib.shape)
            if rng.random() < 0.25:
                kind = "periventricular" if rng.random() < 0.5 else "juxtacortical"
                blob = ProceduralLesion(kind, float(rng.uniform(2.0, 4.5)), None, int(rng.integers(2**31 - 1)))
                yield _procedural_piece(blob, spec.lesion_scale, tpl, lib)


class _CachedPool:
    """A pool stream whose pieces are kept, so twins of one subject build it once."""

    def __init__(self, stream: Iterator[LesionPiece]) -> None:
        self._stream: Iterator[LesionPiece] | None = stream
        self._pieces: list[LesionPiece] = []
        self._lock = threading.Lock()

    def get(self, i: int) -> LesionPiece | None:
        """Piece ``i`` of the pool, or ``None`` once the library is exhausted."""
        with self._lock:
            while len(self._pieces) <= i and self._stream is not None:
                piece = next(self._stream, None)
                if piece is None:
                    self._stream = None
                else:
                    self._pieces.append(piece)
            return self._pieces[i] if i < len(self._pieces) else None


_POOLS: "OrderedDict[tuple, _CachedPool]" = OrderedDict()
_POOLS_LOCK = threading.Lock()


def cached_pool(spec: SubjectSpec, tpl: TemplateMaps, lib: LesionLibrary) -> _CachedPool:
    """The (memoised) :func:`pool_pieces` stream of a spec; it depends only on the lesion
    seed and lesion scale, so all twins of a subject share it (16 most recent kept)."""
    key = (spec.effective_lesion_seed, spec.lesion_scale, id(tpl), id(lib))
    with _POOLS_LOCK:
        pool = _POOLS.pop(key, None) or _CachedPool(pool_pieces(spec, tpl, lib))
        _POOLS[key] = pool
        while len(_POOLS) > 16:
            _POOLS.popitem(last=False)
        return pool


def paint_ranks(pieces: list[LesionPiece], shape: tuple[int, int, int]) -> np.ndarray:
    """Library-grid volume holding, per voxel, 1 + the lowest rank of the pieces covering it.

    Painting from the last piece to the first lets the lowest rank win, so the voxels of
    "the first k pieces" are exactly ``1 ≤ value ≤ k`` for every k at once.
    """
    dtype = np.uint16 if len(pieces) < np.iinfo(np.uint16).max else np.uint32
    canvas = np.zeros(shape, dtype)
    for rank in range(len(pieces) - 1, -1, -1):
        v = pieces[rank].voxels
        canvas[v[:, 0], v[:, 1], v[:, 2]] = rank + 1
    return canvas

