"""Text-conditioned 3D denoiser U-Net (MONAI ``DiffusionModelUNet`` with cross-attention).

The design follows Imagining Alternatives (Mohamed et al. 2025) and Simple Diffusion
(Hoogeboom et al. 2023): text enters by cross-attention only at low resolution, where
tokens are few; the low-resolution levels are deeper (more ResNet blocks) and get
dropout. The network knows nothing about noise: it maps ``(x, t, context)`` to a
prediction whose meaning (velocity, epsilon, …) the training objective decides.

Config (every value JSON-serialisable; stored in the model spec):

========================  ======================================================================
key                       meaning
========================  ======================================================================
in_channels, out_channels channels of the diffused representation (8 for a 1-channel WDM
                          volume: 8 Haar bands; 4 for the latent model)
channels                  feature channels per level, e.g. [64, 128, 256]
attention_levels          per level: cross-attention (+ self-attention) blocks there; the
                          middle block always has them
num_res_blocks            int or per-level list (deeper at low resolution)
num_head_channels         int or per-level list: channels per attention head
norm_num_groups           GroupNorm groups (must divide every entry of ``channels``)
cross_attention_dim       width D of the text embedding (BiomedCLIP 512, MiniLM 384)
dropout_cattn             dropout inside the attention blocks
lowres_dropout            dropout probability in the ResNet blocks of the low-resolution levels
lowres_dropout_levels     per level: which levels count as low resolution (default: the
                          attention levels); the middle block always does
transformer_num_layers    transformer layers per attention block
timestep_scale            MONAI timestep = t · timestep_scale (1000: MAISI / DDPM convention)
upcast_attention          attention logits in float32 under autocast
use_flash_attention       use SDPA kernels (inference speed; no effect on the weights)
========================  ======================================================================
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, ModelError

__all__ = ["Denoiser", "build_denoiser", "count_flops", "default_denoiser_config"]

logger = logging.getLogger(__name__)

_DEFAULTS: dict[str, Any] = {
    "num_res_blocks": 2,
    "num_head_channels": 32,
    "norm_num_groups": 32,
    "dropout_cattn": 0.0,
    "lowres_dropout": 0.0,
    "lowres_dropout_levels": None,
    "transformer_num_layers": 1,
    "timestep_scale": 1000.0,
    "upcast_attention": False,
    "use_flash_attention": False,
}
_REQUIRED = ("in_channels", "out_channels", "channels", "attention_levels", "cross_attention_dim")


def _per_level(value: int | Sequence[int], n: int, key: str) -> list[int]:
    if isinstance(value, int):
        return [value] * n
    out = [int(v) for v in value]
    if len(out) != n:
        raise ModelError(f"denoiser config '{key}' must be an int or a list of {n} ints (one per level); got {value}.")
    return out


def _resolve_config(config: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults, check consistency, and return a JSON-friendly copy (lists, not tuples)."""
    unknown = set(config) - set(_DEFAULTS) - set(_REQUIRED)
    if unknown:
        known = sorted([*_REQUIRED, *_DEFAULTS])
        raise ModelError(f"unknown denoiser config key(s) {sorted(unknown)}; known: {known}.")
    missing = [k for k in _REQUIRED if k not in config]
    if missing:
        raise ModelError(f"denoiser config is missing {missing}; see default_denoiser_config().")
    cfg = {**_DEFAULTS, **copy.deepcopy(config)}
    n = len(cfg["channels"])
    cfg["channels"] = [int(c) for c in cfg["channels"]]
    cfg["attention_levels"] = [bool(a) for a in cfg["attention_levels"]]
    if len(cfg["attention_levels"]) != n:
        raise ModelError(f"attention_levels must have {n} entries (one per level); got {cfg['attention_levels']}.")
    cfg["num_res_blocks"] = _per_level(cfg["num_res_blocks"], n, "num_res_blocks")
    cfg["num_head_channels"] = _per_level(cfg["num_head_channels"], n, "num_head_channels")
    if cfg["lowres_dropout_levels"] is None:
        cfg["lowres_dropout_levels"] = list(cfg["attention_levels"])
    cfg["lowres_dropout_levels"] = [bool(a) for a in cfg["lowres_dropout_levels"]]
    if len(cfg["lowres_dropout_levels"]) != n:
        raise ModelError(f"lowres_dropout_levels must have {n} entries; got {cfg['lowres_dropout_levels']}.")
    for key in ("dropout_cattn", "lowres_dropout"):
        if not 0.0 <= float(cfg[key]) < 1.0:
            raise ModelError(f"denoiser config '{key}' must be in [0, 1); got {cfg[key]}.")
        cfg[key] = float(cfg[key])
    g = int(cfg["norm_num_groups"])
    if any(c % g for c in cfg["channels"]):
        raise ModelError(f"every entry of channels {cfg['channels']} must be a multiple of norm_num_groups={g}.")
    for c, att, hc in zip(cfg["channels"], cfg["attention_levels"], cfg["num_head_channels"]):
        if att and (hc <= 0 or c % hc):
            raise ModelError(f"num_head_channels={hc} must divide the {c} channels of an attention level.")
    if cfg["num_head_channels"][-1] <= 0 or cfg["channels"][-1] % cfg["num_head_channels"][-1]:
        raise ModelError("the lowest level's num_head_channels must divide its channels (the middle block attends).")
    cfg["timestep_scale"] = float(cfg["timestep_scale"])
    for key in ("in_channels", "out_channels", "cross_attention_dim", "norm_num_groups", "transformer_num_layers"):
        cfg[key] = int(cfg[key])
    return cfg


def _dropout_pre_hook(module: nn.Module, args: tuple[Any, ...], p: float) -> tuple[Any, ...]:
    # Dropout right before the last convolution of a ResNet block, as in DDPM/ADM and
    # Simple Diffusion. It reads ``module.training`` so that .train()/.eval() and
    # deep copies (EMA) behave without any extra state.
    return (F.dropout(args[0], p=p, training=module.training), *args[1:])


class Denoiser(nn.Module):
    """Denoiser ``(x, t, context) -> prediction`` around MONAI's ``DiffusionModelUNet``.

    Args:
        config: resolved config (see module docstring); kept as ``self.config``.

    Example:
        >>> cfg = default_denoiser_config("latent", cross_attention_dim=16, size="tiny")
        >>> net = build_denoiser(cfg)
        >>> x = torch.zeros(2, 4, 8, 8, 8)
        >>> net(x, torch.rand(2), torch.zeros(2, 3, 16)).shape
        torch.Size([2, 4, 8, 8, 8])
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        from monai.networks.nets import DiffusionModelUNet  # heavy import, deferred

        self.config = _resolve_config(config)
        c = self.config
        self.unet = DiffusionModelUNet(
            spatial_dims=3,
            in_channels=c["in_channels"],
            out_channels=c["out_channels"],
            num_res_blocks=c["num_res_blocks"],
            channels=c["channels"],
            attention_levels=c["attention_levels"],
            norm_num_groups=c["norm_num_groups"],
            num_head_channels=c["num_head_channels"],
            with_conditioning=True,
            transformer_num_layers=c["transformer_num_layers"],
            cross_attention_dim=c["cross_attention_dim"],
            upcast_attention=c["upcast_attention"],
            dropout_cattn=c["dropout_cattn"],
            use_flash_attention=c["use_flash_attention"],
        )
        self._install_lowres_dropout()

    def _install_lowres_dropout(self) -> None:
        p = self.config["lowres_dropout"]
        if p <= 0:
            return
        n = len(self.config["channels"])
        levels = self.config["lowres_dropout_levels"]
        blocks: list[nn.Module] = [self.unet.down_blocks[i] for i in range(n) if levels[i]]
        blocks += [self.unet.up_blocks[n - 1 - i] for i in range(n) if levels[i]]
        blocks.append(self.unet.middle_block)
        hook = functools.partial(_dropout_pre_hook, p=p)
        from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock

        for block in blocks:
            for m in block.modules():
                if isinstance(m, DiffusionUNetResnetBlock):
                    m.conv2.register_forward_pre_hook(hook)

    def train(self, mode: bool = True) -> Denoiser:
        """Switch train/eval mode; also switches MONAI's SDPA attention dropout.

        With ``use_flash_attention`` MONAI passes ``dropout_p=dropout_rate`` to
        ``scaled_dot_product_attention`` whatever the mode, which would make inference
        random; the rate is therefore zeroed in eval mode and restored for training.
        """
        super().train(mode)
        from monai.networks.blocks import CrossAttentionBlock, SABlock

        rate = self.config["dropout_cattn"] if mode else 0.0
        for m in self.unet.modules():
            if isinstance(m, (CrossAttentionBlock, SABlock)):
                m.dropout_rate = rate
        return self

    @property
    def spatial_multiple(self) -> int:
        """Every spatial size of ``x`` must be a multiple of this (2 per downsampling level)."""
        return 2 ** (len(self.config["channels"]) - 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Predict from a noisy sample.

        Args:
            x: noisy sample (B, in_channels, D, H, W); sizes multiples of :attr:`spatial_multiple`.
            t: (B,) times in [0, 1], 1 = pure noise (MONAI sees ``t · timestep_scale``).
            context: text tokens (B, L, cross_attention_dim). Required: MONAI would
                silently fall back to self-attention without it; pass the embedding of
                the empty prompt for unconditional predictions.

        Returns:
            Prediction (B, out_channels, D, H, W).
        """
        c = self.config
        if context is None:
            raise InputError(
                "Denoiser needs a text context (B, L, D); for an unconditional prediction pass the "
                "embedding of the empty prompt (classifier-free guidance's null context)."
            )
        if x.ndim != 5 or x.shape[1] != c["in_channels"]:
            raise InputError(f"Denoiser expects x of shape (B, {c['in_channels']}, D, H, W); got {tuple(x.shape)}.")
        m = self.spatial_multiple
        if any(s % m for s in x.shape[2:]):
            raise InputError(
                f"spatial size {tuple(x.shape[2:])} is not a multiple of {m}; pad the volume to a multiple of {m}."
            )
        b = x.shape[0]
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != c["cross_attention_dim"]:
            raise InputError(
                f"context must be (B={b}, L, D={c['cross_attention_dim']}); got {tuple(context.shape)}. "
                "Check that the text encoder matches the model."
            )
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise InputError(f"t must be a scalar or have shape (B,) = ({b},); got {tuple(t.shape)}.")
        timesteps = t.to(torch.float32) * c["timestep_scale"]
        return self.unet(x, timesteps=timesteps, context=context.to(x.dtype))


def build_denoiser(config: dict[str, Any]) -> Denoiser:
    """Build a :class:`Denoiser` from a config dict (see the module docstring for keys).

    Args:
        config: at least ``in_channels, out_channels, channels, attention_levels,
            cross_attention_dim``; the rest default.

    Returns:
        A freshly initialised denoiser; its resolved config is ``.config``.

    Raises:
        ModelError: unknown or inconsistent keys.
    """
    return Denoiser(config)


_PRESETS: dict[tuple[str, str], dict[str, Any]] = {
    # WDM: a 128³ volume becomes 8×64³ Haar bands; levels 64³ 32³ 16³ 8³ 4³ and attention at 8³/4³.
    ("wdm", "tiny"): {"channels": [8, 16, 16], "num_res_blocks": [1, 1, 2], "num_head_channels": 8,
                      "norm_num_groups": 8, "attention_levels": [False, False, True]},
    ("wdm", "small"): {"channels": [32, 64, 64, 128], "num_res_blocks": [1, 1, 2, 2], "num_head_channels": 32,
                       "norm_num_groups": 32, "attention_levels": [False, False, False, True]},
    ("wdm", "base"): {"channels": [64, 128, 128, 256, 256], "num_res_blocks": [1, 1, 2, 2, 3],
                      "num_head_channels": 32, "norm_num_groups": 32,
                      "attention_levels": [False, False, False, True, True]},
    # Latent: a 128³ volume becomes 4×32³ latents; levels 32³ 16³ 8³ 4³ and attention at 8³/4³.
    ("latent", "tiny"): {"channels": [8, 16, 16], "num_res_blocks": [1, 1, 2], "num_head_channels": 8,
                         "norm_num_groups": 8, "attention_levels": [False, False, True]},
    ("latent", "small"): {"channels": [32, 64, 128], "num_res_blocks": [1, 2, 2], "num_head_channels": 32,
                          "norm_num_groups": 32, "attention_levels": [False, True, True]},
    ("latent", "base"): {"channels": [64, 128, 256, 256], "num_res_blocks": [1, 2, 2, 3], "num_head_channels": 32,
                         "norm_num_groups": 32, "attention_levels": [False, False, True, True]},
}


def default_denoiser_config(
    family: Literal["wdm", "latent"],
    cross_attention_dim: int,
    size: Literal["tiny", "small", "base"] = "base",
    *,
    image_channels: int = 1,
) -> dict[str, Any]:
    """Preset denoiser configs (Simple Diffusion: deeper and with dropout at low resolution).

    Args:
        family: ``"wdm"`` (Haar sub-bands: 8 channels per image channel) or ``"latent"``
            (4 autoencoder latent channels).
        cross_attention_dim: width of the text embedding.
        size: ``"tiny"`` (tests, CPU), ``"small"`` or ``"base"``. Measured with
            D = 512 and 77 tokens: WDM base ~100 M parameters and ~1.1 TFLOP per call on
            64³ sub-bands (a 128³ volume; WDM itself: ~1.05); latent base ~96 M
            parameters and ~0.2 TFLOP per call on 32³ latents.
        image_channels: image channels (WDM only; a T1+FLAIR pair has 2).

    Returns:
        A complete, JSON-serialisable config for :func:`build_denoiser`.
    """
    if (family, size) not in _PRESETS:
        raise ModelError(
            f"no preset for family={family!r}, size={size!r}; families: wdm, latent; sizes: tiny, small, base."
        )
    channels = 8 * image_channels if family == "wdm" else 4
    preset = copy.deepcopy(_PRESETS[(family, size)])
    cfg = {
        "in_channels": channels,
        "out_channels": channels,
        "cross_attention_dim": int(cross_attention_dim),
        "dropout_cattn": 0.0 if size == "tiny" else 0.1,
        "lowres_dropout": 0.0 if size == "tiny" else 0.1,
        **preset,
    }
    return _resolve_config(cfg)


def count_flops(module: nn.Module, example_inputs: Sequence[Any]) -> int:
    """Floating-point operations of one call ``module(*example_inputs)``.

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions, matmuls,
    attention; a multiply-add counts 2). Runs on the meta device — no memory, no time —
    and falls back to a real call (under ``no_grad``) if an operation has no meta kernel.

    Args:
        module: the network (its weights are not touched).
        example_inputs: positional inputs of one call; only their shapes and dtypes matter
            on the meta path.

    Returns:
        Total FLOPs.
    """
    from torch.func import functional_call
    from torch.utils.flop_counter import FlopCounterMode

    def to_meta(v: Any) -> Any:
        return torch.empty_like(v, device="meta") if isinstance(v, torch.Tensor) else v

    try:
        state = {k: to_meta(v) for k, v in (*module.named_parameters(), *module.named_buffers())}
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            functional_call(module, state, tuple(to_meta(v) for v in example_inputs))
        return int(counter.get_total_flops())
    except (NotImplementedError, RuntimeError) as exc:  # no meta kernel for some op
        logger.debug("meta-device FLOP count failed (%s); counting with a real call", exc)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(*example_inputs)
    return int(counter.get_total_flops())
