"""3D KL autoencoder for the latent diffusion model (MONAI ``AutoencoderKL``; MAISI-style).

Rombach et al. 2022 (latent diffusion) and Pinaya et al. 2022 (brain LDM): an encoder
maps a volume to a diagonal Gaussian over latents (4 channels, 4× smaller per axis, as
MAISI's VAE), a decoder maps latents back. Diffusion runs on *scaled* latents
``z_scaled = latent_scale · z`` so they have roughly unit standard deviation (LDM's
``scale_factor``); the scale is measured once after training with
:meth:`Autoencoder.estimate_latent_scale` and stored in the config.

Config keys (JSON-serialisable): ``in_channels``, ``out_channels``, ``channels`` (per
level; ``len(channels) − 1`` downsamplings), ``attention_levels``, ``num_res_blocks``,
``latent_channels``, ``norm_num_groups``, ``with_encoder_nonlocal_attn``,
``with_decoder_nonlocal_attn``, ``latent_scale``, ``use_checkpoint``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn

from ..errors import InputError, ModelError

__all__ = ["Autoencoder", "build_autoencoder", "default_autoencoder_config"]

_DEFAULTS: dict[str, Any] = {
    "in_channels": 1,
    "out_channels": 1,
    "channels": [64, 128, 256],
    "attention_levels": [False, False, False],
    "num_res_blocks": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "with_encoder_nonlocal_attn": False,
    "with_decoder_nonlocal_attn": False,
    "latent_scale": 1.0,
    "use_checkpoint": False,
}

# MONAI clamps log-variances to this range before exponentiating (AutoencoderKL.encode).
_LOGVAR_RANGE = (-30.0, 20.0)


def _resolve_config(config: dict[str, Any]) -> dict[str, Any]:
    unknown = set(config) - set(_DEFAULTS)
    if unknown:
        raise ModelError(f"unknown autoencoder config key(s) {sorted(unknown)}; known: {sorted(_DEFAULTS)}.")
    cfg = {**_DEFAULTS, **copy.deepcopy(config)}
    n = len(cfg["channels"])
    cfg["channels"] = [int(c) for c in cfg["channels"]]
    cfg["attention_levels"] = [bool(a) for a in cfg["attention_levels"]]
    if len(cfg["attention_levels"]) != n:
        raise ModelError(f"attention_levels must have {n} entries (one per level); got {cfg['attention_levels']}.")
    nrb = cfg["num_res_blocks"]
    cfg["num_res_blocks"] = [int(nrb)] * n if isinstance(nrb, int) else [int(v) for v in nrb]
    if len(cfg["num_res_blocks"]) != n:
        raise ModelError(f"num_res_blocks must be an int or a list of {n} ints; got {nrb}.")
    if any(c % int(cfg["norm_num_groups"]) for c in cfg["channels"]):
        raise ModelError(f"channels {cfg['channels']} must be multiples of norm_num_groups={cfg['norm_num_groups']}.")
    cfg["latent_scale"] = float(cfg["latent_scale"])
    if not cfg["latent_scale"] > 0:
        raise ModelError(f"latent_scale must be > 0; got {cfg['latent_scale']}.")
    return cfg


class Autoencoder(nn.Module):
    """KL autoencoder with scaled-latent helpers.

    Args:
        config: see the module docstring; resolved copy kept as ``self.config``.

    Example:
        >>> ae = build_autoencoder(default_autoencoder_config("tiny"))
        >>> z = ae.encode_latent(torch.zeros(1, 1, 16, 16, 16), sample=False)
        >>> z.shape, ae.decode(z).shape
        (torch.Size([1, 4, 4, 4, 4]), torch.Size([1, 1, 16, 16, 16]))
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        from monai.networks.nets import AutoencoderKL  # heavy import, deferred

        self.config = _resolve_config(config)
        c = self.config
        self.net = AutoencoderKL(
            spatial_dims=3,
            in_channels=c["in_channels"],
            out_channels=c["out_channels"],
            num_res_blocks=c["num_res_blocks"],
            channels=c["channels"],
            attention_levels=c["attention_levels"],
            latent_channels=c["latent_channels"],
            norm_num_groups=c["norm_num_groups"],
            with_encoder_nonlocal_attn=c["with_encoder_nonlocal_attn"],
            with_decoder_nonlocal_attn=c["with_decoder_nonlocal_attn"],
            use_checkpoint=c["use_checkpoint"],
        )

    @property
    def downsample_factor(self) -> int:
        """Latent voxels are this many image voxels wide per axis."""
        return 2 ** (len(self.config["channels"]) - 1)

    @property
    def latent_scale(self) -> float:
        """Multiplier that gives latents ~unit std (``z_scaled = latent_scale · mu``)."""
        return float(self.config["latent_scale"])

    @latent_scale.setter
    def latent_scale(self, value: float) -> None:
        if not value > 0:
            raise ModelError(f"latent_scale must be > 0; got {value}.")
        self.config["latent_scale"] = float(value)

    def _check_image(self, x: torch.Tensor) -> None:
        f = self.downsample_factor
        if x.ndim != 5 or x.shape[1] != self.config["in_channels"]:
            raise InputError(
                f"autoencoder expects (B, {self.config['in_channels']}, D, H, W); got {tuple(x.shape)}."
            )
        if any(s % f for s in x.shape[2:]):
            raise InputError(f"spatial size {tuple(x.shape[2:])} must be a multiple of {f}; pad the volume.")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior parameters of the (unscaled) latent.

        Args:
            x: images (B, in_channels, D, H, W), sizes multiples of :attr:`downsample_factor`.

        Returns:
            ``(mu, logvar)``, each (B, latent_channels, D/f, H/f, W/f); ``logvar`` is
            clamped to [−30, 20] as in MONAI.
        """
        self._check_image(x)
        net = self.net
        if net.use_checkpoint and torch.is_grad_enabled():
            h = torch.utils.checkpoint.checkpoint(net.encoder, x, use_reentrant=False)
        else:
            h = net.encoder(x)
        mu = net.quant_conv_mu(h)
        logvar = torch.clamp(net.quant_conv_log_sigma(h), *_LOGVAR_RANGE)
        return mu, logvar

    def encode_latent(
        self, x: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Scaled latent for diffusion: ``latent_scale · (mu [+ sigma·eps])``.

        Args:
            x: images (B, in_channels, D, H, W).
            sample: draw from the posterior (training) instead of taking its mean (editing).
            generator: random generator for ``sample=True`` (on the generator's device).

        Returns:
            Scaled latents (B, latent_channels, D/f, H/f, W/f).
        """
        mu, logvar = self.encode(x)
        z = mu
        if sample:
            dev = generator.device if generator is not None else mu.device
            eps = torch.randn(mu.shape, generator=generator, device=dev, dtype=mu.dtype).to(mu.device)
            z = mu + torch.exp(0.5 * logvar) * eps
        return z * self.latent_scale

    def decode(self, z_scaled: torch.Tensor) -> torch.Tensor:
        """Decode *scaled* latents (as produced by :meth:`encode_latent` or a sampler).

        Args:
            z_scaled: (B, latent_channels, d, h, w).

        Returns:
            Images (B, out_channels, f·d, f·h, f·w).
        """
        if z_scaled.ndim != 5 or z_scaled.shape[1] != self.config["latent_channels"]:
            raise InputError(
                f"decode expects latents (B, {self.config['latent_channels']}, d, h, w); got {tuple(z_scaled.shape)}."
            )
        return self.net.decode(z_scaled / self.latent_scale)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: ``(reconstruction, mu, logvar)`` with a posterior sample in between."""
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        return self.net.decode(z), mu, logvar

    @staticmethod
    def kl_loss(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """KL(q(z|x) ‖ N(0, I)) summed over latent elements, averaged over the batch (Kingma & Welling 2014)."""
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)
        return kl.flatten(1).sum(1).mean()

    @torch.no_grad()
    def estimate_latent_scale(self, volumes: Iterable[torch.Tensor]) -> float:
        """Measure ``1 / std(mu)`` over some training volumes (LDM's scale factor) and store it.

        Args:
            volumes: batches (B, in_channels, D, H, W) on the module's device.

        Returns:
            The new :attr:`latent_scale` (also written into ``config``).
        """
        total, total_sq, count = 0.0, 0.0, 0
        for x in volumes:
            mu, _ = self.encode(x)
            mu = mu.double()
            total += float(mu.sum())
            total_sq += float((mu * mu).sum())
            count += mu.numel()
        if count == 0:
            raise InputError("estimate_latent_scale needs at least one volume.")
        var = total_sq / count - (total / count) ** 2
        if not var > 0:
            raise ModelError("latents have zero variance; is the encoder trained?")
        self.latent_scale = 1.0 / var**0.5
        return self.latent_scale


def build_autoencoder(config: dict[str, Any]) -> Autoencoder:
    """Build an :class:`Autoencoder` from a config dict (missing keys take defaults)."""
    return Autoencoder(config)


def default_autoencoder_config(size: Literal["tiny", "small", "base"] = "base") -> dict[str, Any]:
    """Preset autoencoder configs: 4× downsampling per axis, 4 latent channels (as MAISI's VAE).

    Args:
        size: ``"tiny"`` (tests), ``"small"`` or ``"base"``.

    Returns:
        A complete, JSON-serialisable config.
    """
    presets: dict[str, dict[str, Any]] = {
        "tiny": {"channels": [8, 8, 16], "num_res_blocks": 1, "norm_num_groups": 8},
        "small": {"channels": [32, 64, 64], "num_res_blocks": 1, "norm_num_groups": 32},
        "base": {"channels": [64, 128, 256], "num_res_blocks": 2, "norm_num_groups": 32},
    }
    if size not in presets:
        raise ModelError(f"no autoencoder preset {size!r}; choose tiny, small or base.")
    return _resolve_config({**presets[size], "attention_levels": [False, False, False], "latent_channels": 4})
