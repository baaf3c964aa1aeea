"""Networks: Haar DWT/IDWT, the text-conditioned denoiser U-Net, the KL autoencoder,
and cross-attention control. Networks know nothing about noise (see ``sampling``).

Submodules are imported lazily so that ``nets.wavelet`` does not pull in MONAI.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "HAAR_BAND_NAMES": "wavelet",
    "haar_dwt3d": "wavelet",
    "haar_idwt3d": "wavelet",
    "Denoiser": "unet",
    "build_denoiser": "unet",
    "count_flops": "unet",
    "default_denoiser_config": "unet",
    "Autoencoder": "autoencoder",
    "build_autoencoder": "autoencoder",
    "default_autoencoder_config": "autoencoder",
    "AttentionControl": "attention",
    "AttentionController": "attention",
    "AttentionSite": "attention",
    "ReplaceAttention": "attention",
    "ReweightTokens": "attention",
    "StoreAttention": "attention",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
