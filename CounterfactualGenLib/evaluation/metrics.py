"""Metrics of a counterfactual generator: image similarity, alignment, diversity, axioms.

All functions take numpy arrays (volumes in model units unless said otherwise: background
−1, brain p99.5 +1, so the default ``data_range`` is 2) and return plain floats.

* :func:`psnr`, :func:`mae` — inside an optional mask.
* :func:`ssim3d`, :func:`ms_ssim3d` — Gaussian-window 3D SSIM (Wang et al. 2004) and
  multi-scale SSIM (Wang, Simoncelli, Bovik 2003) with as many scales as the volume allows.
* :func:`dice` — overlap of two masks.
* :func:`lesion_class_of_ml`, :func:`alignment_accuracy` — text alignment (Imagining
  Alternatives' "text-alignment accuracy": a classifier's class vs the prompt's class).
* :func:`seed_interval` — a 95 % interval for a fraction measured over seeds (Wilson,
  widened by the seeds' design effect, because the members of one series share a noise).
* :func:`pairwise_ms_ssim` — diversity (mean pairwise MS-SSIM; lower = more diverse).
* :func:`frechet_distance` — Fréchet distance between Gaussian fits of two feature sets
  (Heusel et al. 2017). On oracle features it is an **oracle-feature FD**, not FID:
  values are not comparable with any published FID.
* :func:`directional_score` — PRISM's directional score (Kumar et al., MIDL 2025) in 3D.
* :func:`composition`, :func:`reversibility`, :func:`effectiveness` — the counterfactual
  axioms of Monteiro et al. (ICLR 2023).

Example:
    >>> import numpy as np
    >>> x = np.random.default_rng(0).uniform(-1, 1, (16, 16, 16)).astype(np.float32)
    >>> psnr(x, x), round(ssim3d(x, x), 6), dice(x > 0, x > 0)
    (inf, 1.0, 1.0)
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Callable, Sequence

import numpy as np

from ..errors import InputError

__all__ = [
    "DATA_RANGE",
    "NONE_MAX_ML",
    "MS_SSIM_WEIGHTS",
    "psnr",
    "mae",
    "ssim3d",
    "ms_ssim3d",
    "dice",
    "lesion_class_of_ml",
    "prompt_classes",
    "alignment_accuracy",
    "pairwise_ms_ssim",
    "seed_interval",
    "mean_pairwise",
    "frechet_distance",
    "fit_text_to_feature_projection",
    "directional_score",
    "composition",
    "reversibility",
    "effectiveness",
]

#: Intensity range of model units (−1 background … +1 brain p99.5).
DATA_RANGE = 2.0
#: A continuous lesion-volume estimate below this counts as "no lesions" (ml). The engine's
#: smallest "minimal" loads are 0.8 ml; an oracle's probability map is never exactly 0.
NONE_MAX_ML = 0.5
#: Scale weights of MS-SSIM (Wang et al. 2003); fewer scales use the first ones, renormalised.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise InputError(f"The two volumes differ in shape: {a.shape} vs {b.shape}.")
    return a, b


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, *, data_range: float = DATA_RANGE) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(L² / MSE)``, over ``mask`` (all voxels if None).

    Standard definition (e.g. Wang et al. 2004 §I); identical inputs give ``inf``.
    """
    a, b = _check_pair(a, b)
    m = np.ones(a.shape, bool) if mask is None else np.asarray(mask, bool)
    if not m.any():
        raise InputError("The PSNR mask selects no voxels.")
    mse = float(np.mean((a[m] - b[m]) ** 2))
    return math.inf if mse == 0 else float(10.0 * math.log10(data_range**2 / mse))


def mae(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean absolute error over ``mask`` (the L1 distance of Monteiro et al. 2023's axioms)."""
    a, b = _check_pair(a, b)
    m = np.ones(a.shape, bool) if mask is None else np.asarray(mask, bool)
    if not m.any():
        raise InputError("The MAE mask selects no voxels.")
    return float(np.mean(np.abs(a[m] - b[m])))


def _gauss_filter_valid(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable 'valid' convolution along the three axes."""
    from scipy.ndimage import correlate1d

    k = len(kernel)
    h = k // 2
    for ax in range(3):
        x = correlate1d(x, kernel, axis=ax, mode="constant")
        sl = [slice(None)] * 3
        sl[ax] = slice(h, x.shape[ax] - (k - 1 - h))
        x = x[tuple(sl)]
    return x


def _ssim_parts(a: np.ndarray, b: np.ndarray, kernel_size: int, sigma: float, data_range: float,
                k1: float = 0.01, k2: float = 0.03) -> tuple[float, float]:
    """Mean luminance×contrast×structure and mean contrast×structure (the ``cs`` term)."""
    if min(a.shape) < kernel_size:
        raise InputError(f"SSIM with a {kernel_size}-voxel window needs volumes of at least that size; got {a.shape}.")
    r = np.arange(kernel_size) - (kernel_size - 1) / 2.0
    g = np.exp(-(r**2) / (2 * sigma**2))
    g /= g.sum()
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_a, mu_b = _gauss_filter_valid(a, g), _gauss_filter_valid(b, g)
    saa = _gauss_filter_valid(a * a, g) - mu_a**2
    sbb = _gauss_filter_valid(b * b, g) - mu_b**2
    sab = _gauss_filter_valid(a * b, g) - mu_a * mu_b
    cs = (2 * sab + c2) / (saa + sbb + c2)
    lum = (2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1)
    return float(np.mean(lum * cs)), float(np.mean(cs))


def ssim3d(a: np.ndarray, b: np.ndarray, *, data_range: float = DATA_RANGE, kernel_size: int = 7,
           sigma: float = 1.5) -> float:
    """Structural similarity of two volumes (Wang, Bovik, Sheikh, Simoncelli, IEEE TIP 2004) in 3D.

    Gaussian window (σ = 1.5 voxels, ``kernel_size``³ voxels; 7 rather than the 2D 11
    because our volumes are ~32 voxels wide, as the 3D MS-SSIM diversity metric of the
    3D generative literature uses kernel 7), K1 = 0.01, K2 = 0.03, mean over the valid
    region. ``ssim3d(x, x) == 1``.
    """
    a, b = _check_pair(a, b)
    if a.ndim != 3:
        raise InputError(f"ssim3d needs 3D volumes; got {a.ndim}D.")
    return _ssim_parts(a, b, kernel_size, sigma, data_range)[0]


def _downsample2(x: np.ndarray) -> np.ndarray:
    """2× average pooling (odd trailing voxels dropped), as in Wang et al. 2003's low-pass + subsample."""
    s = [n // 2 * 2 for n in x.shape]
    x = x[: s[0], : s[1], : s[2]]
    return x.reshape(s[0] // 2, 2, s[1] // 2, 2, s[2] // 2, 2).mean(axis=(1, 3, 5))


def ms_ssim3d(a: np.ndarray, b: np.ndarray, *, data_range: float = DATA_RANGE, kernel_size: int = 7,
              sigma: float = 1.5, scales: int | None = None) -> float:
    """Multi-scale SSIM (Wang, Simoncelli, Bovik, Asilomar 2003) of two volumes in 3D.

    ``MS-SSIM = l_M^w_M · Π_j cs_j^w_j``. The original uses 5 scales; a 32-voxel volume
    supports only as many scales as keep the coarsest level ≥ ``kernel_size`` voxels
    (3 for 32³ with kernel 7), so by default that many are used with the first
    :data:`MS_SSIM_WEIGHTS` renormalised to sum 1. Negative ``cs`` terms are clamped to 0
    so fractional powers stay real. ``ms_ssim3d(x, x) == 1``.
    """
    a, b = _check_pair(a, b)
    if a.ndim != 3:
        raise InputError(f"ms_ssim3d needs 3D volumes; got {a.ndim}D.")
    max_scales = 1
    while max_scales < len(MS_SSIM_WEIGHTS) and min(a.shape) // 2**max_scales >= kernel_size:
        max_scales += 1
    n = max_scales if scales is None else int(scales)
    if not 1 <= n <= max_scales:
        raise InputError(f"A volume of shape {a.shape} supports 1…{max_scales} MS-SSIM scales with a "
                         f"{kernel_size}-voxel window; got {n}.")
    w = np.asarray(MS_SSIM_WEIGHTS[:n])
    w = w / w.sum()
    out = 1.0
    for j in range(n):
        s, cs = _ssim_parts(a, b, kernel_size, sigma, data_range)
        out *= max(s if j == n - 1 else cs, 0.0) ** w[j]
        if j < n - 1:
            a, b = _downsample2(a), _downsample2(b)
    return float(out)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap ``2|A∩B| / (|A|+|B|)`` (Dice 1945) of two binary masks; 1 when both are empty."""
    a = np.asarray(a, bool)
    b = np.asarray(b, bool)
    if a.shape != b.shape:
        raise InputError(f"The two masks differ in shape: {a.shape} vs {b.shape}.")
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(a, b).sum() / denom)


def lesion_class_of_ml(lesion_ml: float, *, none_max_ml: float = NONE_MAX_ML) -> str:
    """Lesion-load class of an *estimated* volume: none < ``none_max_ml`` ≤ minimal ≤ 5 < moderate ≤ 15 < high.

    The thresholds of the synthetic engine (:func:`CounterfactualGenLib.synth.lesion_class`:
    none = 0, minimal ≤ 5, moderate ≤ 15, high > 15 ml), with "none" widened to
    :data:`NONE_MAX_ML` because an oracle's sum of probabilities is never exactly zero.
    """
    v = float(lesion_ml)
    if not math.isfinite(v) or v < 0:
        raise InputError(f"lesion_ml must be a finite volume ≥ 0 ml, got {lesion_ml}.")
    if v < none_max_ml:
        return "none"
    return "minimal" if v <= 5.0 else ("moderate" if v <= 15.0 else "high")


def prompt_classes(prompts: Sequence[str]) -> list[dict[str, str | None]]:
    """The lesion-load and diagnosis classes each prompt asks for (``text.prompts.classify_prompt``)."""
    from ..text.prompts import classify_prompt

    return [classify_prompt(p) for p in prompts]


def alignment_accuracy(prompts: Sequence[str], predicted: Sequence[str], attribute: str) -> float:
    """Text-alignment accuracy (Imagining Alternatives, Mohamed et al. 2025, Table 1).

    Fraction of generated volumes whose class, as read by a classifier (our oracle),
    equals the class the prompt asked for.

    Args:
        prompts: the prompts the volumes were generated from.
        predicted: the class read from each volume.
        attribute: ``"lesion_load"`` or ``"diagnosis"``; prompts without that class are an error.
    """
    if len(prompts) != len(predicted) or not prompts:
        raise InputError("alignment_accuracy needs one predicted class per prompt, and at least one.")
    wanted = [c[attribute] for c in prompt_classes(prompts)]
    if any(w is None for w in wanted):
        bad = [p for p, w in zip(prompts, wanted) if w is None]
        raise InputError(f"These prompts name no {attribute} class: {bad[:3]}.")
    return float(np.mean([w == p for w, p in zip(wanted, predicted)]))


def seed_interval(hits: Sequence[Sequence[bool]], *, level: float = 0.95) -> list[float]:
    """Wilson score interval of a pooled fraction over seeds, widened by the design effect of the seeds.

    The members of one series come from one noise, so they are not independent draws.
    The interval is Wilson's (1927) on an effective sample size ``N / deff``, where
    ``deff ≥ 1`` is the ratio of the between-seed (cluster) variance of the pooled fraction
    to its binomial variance (Kish's design effect; clamped at 1 so that members that are
    more regular than independent draws never narrow the interval). Unlike a bootstrap it
    stays honest at 0 % and 100 %: 40 of 40 seeds gives about 91–100 %, not 100–100 %.

    Args:
        hits: one sequence of booleans per seed (e.g. the 4 lesion members' "read as the
            prompt's class"); seeds may have different lengths.
        level: coverage of the interval.

    Returns:
        ``[low, high]`` fractions rounded to 4 digits.

    Example:
        >>> seed_interval([[True]] * 40)
        [0.9124, 1.0]
    """
    from statistics import NormalDist

    rows = [np.asarray(h, bool) for h in hits]
    if not rows or any(r.size == 0 for r in rows):
        raise InputError("An interval needs at least one seed with at least one member.")
    if not 0.0 < level < 1.0:
        raise InputError(f"level must be in (0, 1), got {level}.")
    k = np.array([r.sum() for r in rows], float)
    n = np.array([r.size for r in rows], float)
    total, m = float(n.sum()), len(rows)
    p = float(k.sum() / total)
    deff = 1.0
    if m >= 2 and 0.0 < p < 1.0:
        var_cluster = m / (m - 1) * float(((k - p * n) ** 2).sum()) / total ** 2
        deff = max(1.0, var_cluster / (p * (1.0 - p) / total))
    n_eff = total / deff
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    centre = (p + z * z / (2 * n_eff)) / (1 + z * z / n_eff)
    half = z / (1 + z * z / n_eff) * math.sqrt(p * (1 - p) / n_eff + z * z / (4 * n_eff * n_eff))
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def mean_pairwise(volumes: Sequence[np.ndarray], fn: Callable[[np.ndarray, np.ndarray], float]) -> float:
    """Mean of ``fn`` over all unordered pairs of volumes (finite values only; NaN if none)."""
    vals = [fn(a, b) for a, b in combinations(volumes, 2)]
    vals = [v for v in vals if math.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def pairwise_ms_ssim(volumes: Sequence[np.ndarray], **kw) -> float:
    """Diversity: mean pairwise 3D MS-SSIM of a set of volumes (lower = more diverse).

    The diversity metric of Imagining Alternatives Table 1 and of 3D generative models
    generally (e.g. Pinaya et al. 2022 brain LDM); needs ≥ 2 volumes.
    """
    if len(volumes) < 2:
        raise InputError("Diversity needs at least two volumes.")
    return mean_pairwise(volumes, lambda a, b: ms_ssim3d(a, b, **kw))


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussian fits of two feature sets (Heusel et al., NeurIPS 2017).

    ``‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa Σb)^½)``. Fed with oracle features it is an
    **oracle-feature FD**: a distribution distance in the oracle's own feature space,
    *not* FID (no Inception/MedicalNet features), not comparable with published values,
    and biased upwards for small samples (report N beside it).
    """
    a = np.asarray(feats_a, np.float64)
    b = np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise InputError(f"frechet_distance needs two (N≥2, F) feature arrays of equal width; got {a.shape}, {b.shape}.")
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr (Σa Σb)^½ = Σ √λ over the eigenvalues of the symmetric PSD Σa^½ Σb Σa^½ (same spectrum as Σa Σb):
    # symmetric eigensolvers only (scipy.linalg.sqrtm of the non-symmetric product changed its signature
    # in SciPy 1.18 and can return complex values from rounding).
    w, v = np.linalg.eigh(sa)
    ra = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh(ra @ sb @ ra), 0.0, None)).sum())
    return float(max(mu @ mu + np.trace(sa) + np.trace(sb) - 2.0 * tr_covmean, 0.0))


def fit_text_to_feature_projection(text_emb: np.ndarray, feats: np.ndarray, *, ridge: float = 1e-2) -> np.ndarray:
    """Ridge least-squares map P (D_text × F) with ``text_emb @ P ≈ feats``.

    PRISM's directional score needs image and text directions in one space; CLIP gives
    that in 2D, our 3D oracle and text encoder do not share one. Fitting this map on
    reference subjects (their canonical prompts' pooled embeddings → their oracle
    features) carries a text direction into oracle-feature space.
    """
    t = np.asarray(text_emb, np.float64)
    f = np.asarray(feats, np.float64)
    if t.ndim != 2 or f.ndim != 2 or len(t) != len(f):
        raise InputError("fit_text_to_feature_projection needs (N, D) text embeddings and (N, F) features.")
    t_mean, f_mean = t.mean(0), f.mean(0)
    tc, fc = t - t_mean, f - f_mean
    return np.linalg.solve(tc.T @ tc + ridge * np.eye(t.shape[1]), tc.T @ fc)


def directional_score(img_src: np.ndarray, img_tgt: np.ndarray, text_src: np.ndarray, text_tgt: np.ndarray,
                      projection: np.ndarray | None = None) -> np.ndarray:
    """PRISM directional score (Kumar et al., MIDL 2025), adapted to 3D.

    ``S = cos(E_I(edited) − E_I(original), E_T(new text) − E_T(old text))``. In 3D,
    E_I is the oracle's pooled features; the text direction is the difference of pooled
    text embeddings, mapped into oracle-feature space by ``projection`` (see
    :func:`fit_text_to_feature_projection`) when the widths differ.

    Args:
        img_src, img_tgt: (N, F) oracle features of the original and the counterfactual.
        text_src, text_tgt: (N, D) or (D,) pooled text embeddings of the two prompts.
        projection: (D, F) map, required when D ≠ F.

    Returns:
        (N,) cosines in [−1, 1] (0 where a direction is zero).
    """
    di = np.atleast_2d(np.asarray(img_tgt, np.float64) - np.asarray(img_src, np.float64))
    dt = np.atleast_2d(np.asarray(text_tgt, np.float64) - np.asarray(text_src, np.float64))
    if projection is not None:
        dt = dt @ np.asarray(projection, np.float64)
    if dt.shape[1] != di.shape[1]:
        raise InputError(f"Image features (width {di.shape[1]}) and text directions (width {dt.shape[1]}) "
                         "live in different spaces; pass a projection (fit_text_to_feature_projection).")
    dt = np.broadcast_to(dt, di.shape)
    num = (di * dt).sum(1)
    den = np.linalg.norm(di, axis=1) * np.linalg.norm(dt, axis=1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def composition(edit: Callable[[np.ndarray], np.ndarray], x: np.ndarray, m: int = 1,
                mask: np.ndarray | None = None) -> float:
    """Composition axiom (Monteiro et al., ICLR 2023): L1 between x and m null edits of x.

    A null edit leaves the attribute unchanged (e.g. edit to the prompt that already
    describes x); a sound model returns x, so the value is 0 for a perfect model.

    Args:
        edit: x → counterfactual with the attribute unchanged.
        x: the factual volume.
        m: number of repeated applications (Monteiro et al. use 1, 2, 10).
        mask: L1 over these voxels (default all).
    """
    if m < 1:
        raise InputError(f"composition needs m ≥ 1 null edits; got {m}.")
    y = np.asarray(x)
    for _ in range(int(m)):
        y = edit(y)
    return mae(x, y, mask)


def reversibility(edit_to_b: Callable[[np.ndarray], np.ndarray], edit_to_a: Callable[[np.ndarray], np.ndarray],
                  x: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Reversibility axiom (Monteiro et al., ICLR 2023): L1 between x (attribute a) and its A→B→A cycle."""
    return mae(x, edit_to_a(edit_to_b(np.asarray(x))), mask)


def effectiveness(predicted: Sequence, intended: Sequence) -> float:
    """Effectiveness axiom (Monteiro et al., ICLR 2023): the pseudo-oracle's accuracy on the intended attribute.

    For class labels: fraction where the oracle's reading equals the intended class.
    """
    if len(predicted) != len(intended) or not len(predicted):
        raise InputError("effectiveness needs one oracle reading per intended value, and at least one.")
    return float(np.mean([p == i for p, i in zip(predicted, intended)]))
