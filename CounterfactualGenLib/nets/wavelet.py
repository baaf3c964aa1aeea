"""Exact orthonormal 3D Haar wavelet transform (WDM's input/output transform).

WDM (Friedrich et al., DGM4MICCAI 2024) runs diffusion on the 8 Haar sub-bands of a
volume at half its size; Simple Diffusion (Hoogeboom et al., ICML 2023) recommends the
same trick ("downsample at the input") to spend compute at low resolution.

Conventions used everywhere in this project:

* Filters are orthonormal (``1/sqrt(2)`` per axis), exactly as ``pywt.dwtn(x, "haar")``:
  along each axis ``a = (x[2k] + x[2k+1]) / sqrt(2)`` and ``d = (x[2k] - x[2k+1]) / sqrt(2)``.
  Orthonormality means the transform preserves the L2 norm and maps white Gaussian
  noise to white Gaussian noise, so noise can be drawn directly in wavelet space.
* The three spatial axes are (D, H, W) = the last three tensor axes; the band name
  lists the filter of each axis in that order, as pywt's keys do.
* Band order (index ``b``) is pywt's key order:
  ``0 'aaa', 1 'aad', 2 'ada', 3 'add', 4 'daa', 5 'dad', 6 'dda', 7 'ddd'``,
  i.e. ``b = 4*[D is detail] + 2*[H is detail] + [W is detail]``.
* Channel layout is **band-major**: output channel ``b * C + c`` holds band ``b`` of
  input channel ``c``. The low-pass band of all input channels is therefore the first
  ``C`` channels (``y[:, :C]``), which is what WDM's "divide the low band by 3"
  normalisation touches.

Example:
    >>> import torch
    >>> x = torch.randn(1, 1, 8, 8, 8)
    >>> y = haar_dwt3d(x)
    >>> y.shape
    torch.Size([1, 8, 4, 4, 4])
    >>> bool(torch.allclose(haar_idwt3d(y), x, atol=1e-6))
    True
"""

from __future__ import annotations

import math

import torch

from ..errors import InputError

__all__ = ["HAAR_BAND_NAMES", "haar_dwt3d", "haar_idwt3d"]

#: Names of the 8 sub-bands in channel-block order (same order as ``pywt.dwtn`` keys).
HAAR_BAND_NAMES: tuple[str, ...] = ("aaa", "aad", "ada", "add", "daa", "dad", "dda", "ddd")


def _haar_matrix_3d(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The 8×8 orthonormal matrix ``kron(h, h, h)`` with ``h = [[1, 1], [1, -1]] / sqrt(2)``.

    Row ``b`` is band ``b`` (see module docstring); column ``4p + 2q + r`` is the voxel
    at offset (p, q, r) inside a 2×2×2 block. The matrix is symmetric and orthogonal,
    so it is its own inverse.
    """
    # Built in float64 then cast, so float64 callers get the exact 1/sqrt(8) entries.
    h = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) / math.sqrt(2.0)
    m = torch.kron(torch.kron(h, h), h)
    return m.to(dtype=dtype, device=device)


def _check_volume(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 5:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"{name} must be a 5D tensor (B, C, D, H, W); got {shape}.")
    if not x.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor; got dtype {x.dtype}. Convert it with .float().")


def haar_dwt3d(x: torch.Tensor) -> torch.Tensor:
    """One level of the orthonormal 3D Haar DWT (WDM, Friedrich et al. 2024).

    Args:
        x: volume batch ``(B, C, D, H, W)``, floating point; D, H and W must be even.

    Returns:
        Sub-bands ``(B, 8*C, D/2, H/2, W/2)`` in band-major layout (channel ``b*C + c``
        is band ``HAAR_BAND_NAMES[b]`` of input channel ``c``), same dtype and device.

    Raises:
        InputError: if ``x`` is not 5D floating point or a spatial size is odd.
    """
    _check_volume(x, "haar_dwt3d input")
    b, c, d, h, w = x.shape
    if d % 2 or h % 2 or w % 2:
        raise InputError(
            f"haar_dwt3d needs even spatial sizes; got (D, H, W) = ({d}, {h}, {w}). "
            "Pad or crop the volume to even sizes (the model grid is normally a multiple of 16)."
        )
    m = _haar_matrix_3d(x.dtype, x.device)
    # Split every axis into (block index, offset in block) and move the 2×2×2 offsets last.
    blocks = x.reshape(b, c, d // 2, 2, h // 2, 2, w // 2, 2).permute(0, 1, 2, 4, 6, 3, 5, 7)
    blocks = blocks.reshape(b, c, d // 2, h // 2, w // 2, 8)
    bands = blocks @ m.T  # (B, C, D/2, H/2, W/2, 8)
    return bands.permute(0, 5, 1, 2, 3, 4).reshape(b, 8 * c, d // 2, h // 2, w // 2)


def haar_idwt3d(y: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`haar_dwt3d` (exact up to floating-point rounding).

    Args:
        y: sub-bands ``(B, 8*C, D', H', W')`` in the band-major layout produced by
            :func:`haar_dwt3d`.

    Returns:
        Volume ``(B, C, 2*D', 2*H', 2*W')``, same dtype and device.

    Raises:
        InputError: if ``y`` is not 5D floating point or its channel count is not a
            multiple of 8.
    """
    _check_volume(y, "haar_idwt3d input")
    b, c8, d, h, w = y.shape
    if c8 % 8:
        raise InputError(
            f"haar_idwt3d needs a multiple of 8 channels (8 Haar sub-bands per image channel); got {c8}."
        )
    c = c8 // 8
    m = _haar_matrix_3d(y.dtype, y.device)
    bands = y.reshape(b, 8, c, d, h, w).permute(0, 2, 3, 4, 5, 1)  # (B, C, D', H', W', 8)
    blocks = bands @ m  # m is orthogonal: its inverse is its transpose
    blocks = blocks.reshape(b, c, d, h, w, 2, 2, 2).permute(0, 1, 2, 5, 3, 6, 4, 7)
    return blocks.reshape(b, c, 2 * d, 2 * h, 2 * w)
