"""Evaluation: the oracle, metrics, and the ``counterfactualgen evaluate`` report.

* :mod:`.oracle` — a small 3D CNN trained on the synthetic engine's exact ground truth
  that reads lesion volume and CN/MCI/AD from a volume (Monteiro et al.'s pseudo-oracle).
* :mod:`.metrics` — PSNR, MAE, 3D SSIM/MS-SSIM, Dice, text alignment, diversity,
  oracle-feature Fréchet distance, PRISM directional score, counterfactual axioms.
* :mod:`.report` — evaluate a generation model: counterfactual series over seeds →
  ``report.json``, ``report.md`` and a plot.

Importing this package is cheap; torch is imported when a network is built.
"""

from .metrics import (
    alignment_accuracy,
    composition,
    dice,
    directional_score,
    effectiveness,
    frechet_distance,
    lesion_class_of_ml,
    mae,
    ms_ssim3d,
    pairwise_ms_ssim,
    psnr,
    reversibility,
    ssim3d,
)
from .oracle import Oracle, OracleSpec, load_oracle, resolve_oracle, save_oracle

__all__ = [
    "Oracle",
    "OracleSpec",
    "alignment_accuracy",
    "composition",
    "dice",
    "directional_score",
    "effectiveness",
    "frechet_distance",
    "lesion_class_of_ml",
    "load_oracle",
    "mae",
    "ms_ssim3d",
    "pairwise_ms_ssim",
    "psnr",
    "resolve_oracle",
    "reversibility",
    "save_oracle",
    "ssim3d",
]
