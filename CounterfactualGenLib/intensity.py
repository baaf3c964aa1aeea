"""Robust intensity normalisation inside a brain mask, with its exact inverse.

MR intensities have no absolute scale, so a model sees intensities mapped linearly
so that 0 stays the background level and a high brain percentile (robust to bright
outliers such as vessels or lesions) lands at a fixed value. Being affine, the map
inverts exactly (to float rounding), which is what lets an edit computed in model
units land on the scan's own intensity scale.

Example:
    >>> import numpy as np
    >>> x = np.random.default_rng(0).gamma(5, 100, (16, 16, 16)).astype(np.float32)
    >>> n = IntensityNormalizer.fit(x, x > 0)
    >>> bool(np.allclose(n.inverse(n.forward(x)), x, rtol=1e-5))
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .errors import InputError

__all__ = ["IntensityNormalizer"]


@dataclass(frozen=True)
class IntensityNormalizer:
    """``y = out_low + (x − low)·(out_high − out_low)/(high − low)`` and its inverse.

    Attributes:
        low: input value mapped to ``out_low`` (the background level, 0 for MR).
        high: input value mapped to ``out_high`` (a brain percentile).
        out_low, out_high: the model's range (default −1 … 1).
    """

    low: float
    high: float
    out_low: float = -1.0
    out_high: float = 1.0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.low) and np.isfinite(self.high)) or self.high <= self.low:
            raise InputError(
                f"Cannot normalise intensities: the brain's intensity range [{self.low}, {self.high}] is empty. "
                "Check the brain mask covers the brain."
            )

    @classmethod
    def fit(
        cls,
        array: np.ndarray,
        mask: np.ndarray | None = None,
        *,
        upper_percentile: float = 99.5,
        lower_percentile: float | None = None,
        out_range: tuple[float, float] = (-1.0, 1.0),
    ) -> "IntensityNormalizer":
        """Fit on the voxels inside ``mask``.

        Args:
            array: the scan's voxels.
            mask: brain mask (same shape); all voxels when None.
            upper_percentile: brain percentile mapped to ``out_range[1]``.
            lower_percentile: brain percentile mapped to ``out_range[0]``; None maps 0
                (background) there, which keeps "no signal" fixed across scans.
        """
        a = np.asarray(array, dtype=np.float64)
        vals = a[mask > 0] if mask is not None else a.ravel()
        if mask is not None and np.shape(mask) != a.shape:
            raise InputError(f"The brain mask shape {np.shape(mask)} does not match the scan {a.shape}.")
        if vals.size < 10:
            raise InputError("The brain mask selects fewer than 10 voxels; it does not cover the brain.")
        high = float(np.percentile(vals, upper_percentile))
        low = 0.0 if lower_percentile is None else float(np.percentile(vals, lower_percentile))
        if lower_percentile is None and float(vals.min()) < 0:
            low = float(np.percentile(vals, 0.5))  # signed data (e.g. already normalised): no zero background
        return cls(low, high, float(out_range[0]), float(out_range[1]))

    @property
    def scale(self) -> float:
        return (self.out_high - self.out_low) / (self.high - self.low)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Scan units → model units (float32)."""
        return ((np.asarray(x, np.float64) - self.low) * self.scale + self.out_low).astype(np.float32)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """Model units → scan units (float32)."""
        return ((np.asarray(y, np.float64) - self.out_low) / self.scale + self.low).astype(np.float32)

    def inverse_delta(self, dy: np.ndarray) -> np.ndarray:
        """A *difference* in model units → the same difference in scan units."""
        return (np.asarray(dy, np.float64) / self.scale).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high, "out_low": self.out_low, "out_high": self.out_high}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "IntensityNormalizer":
        return cls(float(d["low"]), float(d["high"]), float(d.get("out_low", -1.0)), float(d.get("out_high", 1.0)))
