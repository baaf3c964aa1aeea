"""Noise schedules: rectified flow (with resolution shift) and DDPM/DDIM.

Stateless: a schedule is a function or a frozen dataclass; timestep grids are float64
(RFlow) or int64 (DDPM) tensors on the CPU that the samplers read. Schedules know
nothing about networks.

Time convention shared by every sampler and the denoiser: ``t`` in [0, 1], ``t = 1`` is
pure noise, ``t = 0`` is data.

* Rectified flow (Liu et al. 2023; MONAI MAISI ``RFlowScheduler``):
  ``x_t = (1 - t) * x0 + t * noise`` and the network predicts the velocity
  ``v = x0 - noise`` (so ``dx/dt = -v``; sampling moves from t = 1 to t = 0).
* DDPM (Ho et al. 2020) with ``T`` training steps and integer timesteps ``k`` in
  ``[0, T)``: ``x_k = sqrt(abar_k) * x0 + sqrt(1 - abar_k) * eps``. The network sees
  ``t = k / T``. Supported prediction types: ``"epsilon"`` (predict eps),
  ``"v"`` (Salimans & Ho 2022: ``v = sqrt(abar) * eps - sqrt(1 - abar) * x0``) and
  ``"x0"`` (predict the clean sample, as WDM does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..errors import InputError

__all__ = [
    "DDPMPrediction",
    "DDPMSchedule",
    "resolution_shift_ratio",
    "rflow_timesteps",
    "sample_rflow_train_t",
    "shift_time",
]

DDPMPrediction = Literal["epsilon", "v", "x0"]

# Grid values are rounded to multiples of 2**-_GRID_BITS. Every difference and every
# partial sum of such numbers in [0, 1] is exactly representable in float64, so the
# step sizes of a grid sum to exactly 1.0 in any summation order. The rounding moves a
# time by at most 2**-41 ≈ 5e-13, far below anything a network can notice.
_GRID_BITS = 40


def resolution_shift_ratio(numel: int, base_numel: int = 32**3) -> float:
    """Resolution shift ratio ``r = (numel / base_numel) ** (1/3)`` for 3D volumes.

    Simple Diffusion (Hoogeboom et al. 2023) shifts the log-SNR by ``2·log(base/d)`` for
    side length d; in 3D that is the ratio of side lengths, as MONAI MAISI's
    ``timestep_transform`` computes it.

    Args:
        numel: voxels (or latent voxels) per channel of the volume being sampled, D·H·W.
        base_numel: voxels per channel of the reference resolution (MAISI: 32³).

    Returns:
        ``r`` > 0; r > 1 for volumes larger than the reference (more steps spent at high noise).
    """
    if numel <= 0 or base_numel <= 0:
        raise InputError(f"resolution_shift_ratio needs positive sizes; got numel={numel}, base_numel={base_numel}.")
    return float((numel / base_numel) ** (1.0 / 3.0))


def shift_time(t: torch.Tensor | float, r: float) -> torch.Tensor | float:
    """Shift times towards noise: ``t' = r·t / (1 + (r − 1)·t)`` (Simple Diffusion; MAISI).

    Keeps 0 and 1 fixed, is the identity for ``r = 1`` and increases with ``r``.

    Args:
        t: time(s) in [0, 1] (float or tensor).
        r: shift ratio > 0, e.g. from :func:`resolution_shift_ratio`.

    Returns:
        Shifted time(s), same type as ``t``.
    """
    if r <= 0:
        raise InputError(f"shift ratio must be > 0; got {r}.")
    return r * t / (1.0 + (r - 1.0) * t)


def rflow_timesteps(num_steps: int, *, shift: float = 1.0) -> torch.Tensor:
    """Rectified-flow sampling grid from exactly 1.0 to exactly 0.0 (MAISI RFlow, shifted).

    Uniform in ``t`` before the shift, like MONAI's ``RFlowScheduler.set_timesteps``,
    but kept in float64 with exact end points so the step sizes sum to exactly 1
    (MONAI's float16 grid does not).

    Args:
        num_steps: number of Euler steps (network calls), ≥ 1.
        shift: resolution shift ratio (:func:`resolution_shift_ratio`); 1.0 = no shift.

    Returns:
        Strictly decreasing float64 CPU tensor of shape ``(num_steps + 1,)`` with
        ``grid[0] == 1.0`` and ``grid[-1] == 0.0``.

    Example:
        >>> g = rflow_timesteps(4)
        >>> g.tolist()
        [1.0, 0.75, 0.5, 0.25, 0.0]
        >>> float((g[:-1] - g[1:]).sum())
        1.0
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise InputError(f"num_steps must be an integer ≥ 1; got {num_steps!r}.")
    if not shift > 0:
        raise InputError(f"shift must be > 0; got {shift}.")
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    t = shift_time(t, float(shift))
    scale = float(2**_GRID_BITS)
    t = torch.round(t * scale) / scale
    t[0], t[-1] = 1.0, 0.0
    if not bool((t[:-1] > t[1:]).all()):
        raise InputError(
            f"rflow_timesteps({num_steps}, shift={shift}) is not strictly decreasing; "
            "use fewer steps or a shift ratio closer to 1."
        )
    return t


def sample_rflow_train_t(
    batch: int,
    *,
    shift: float = 1.0,
    distribution: Literal["logit_normal", "uniform"] = "logit_normal",
    loc: float = 0.0,
    scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw training times for rectified flow.

    Logit-normal sampling (Esser et al. 2024, SD3) concentrates training on mid times;
    the resolution shift is then applied as at sampling time (MAISI does the same).

    Args:
        batch: number of times to draw.
        shift: resolution shift ratio; 1.0 = none.
        distribution: ``"logit_normal"`` (``sigmoid(N(loc, scale²))``) or ``"uniform"`` on [0, 1).
        loc: mean of the normal before the sigmoid.
        scale: standard deviation of the normal before the sigmoid.
        generator: CPU random generator for reproducibility.

    Returns:
        float32 CPU tensor ``(batch,)`` of times in [0, 1]; move it to the device yourself.
    """
    if batch < 1:
        raise InputError(f"batch must be ≥ 1; got {batch}.")
    if distribution == "logit_normal":
        t = torch.sigmoid(loc + scale * torch.randn(batch, generator=generator, dtype=torch.float64))
    elif distribution == "uniform":
        t = torch.rand(batch, generator=generator, dtype=torch.float64)
    else:
        raise InputError(f"distribution must be 'logit_normal' or 'uniform'; got {distribution!r}.")
    return shift_time(t, float(shift)).to(torch.float32)


@dataclass(frozen=True)
class DDPMSchedule:
    """DDPM noise schedule (Ho et al. 2020) with DDIM helpers (Song et al. 2021).

    Args:
        num_train_steps: number of training timesteps ``T`` (integer steps 0 … T−1).
        beta_start: beta at step 0.
        beta_end: beta at step T−1.
        kind: ``"linear"`` (betas linear; WDM, Ho et al.) or ``"scaled_linear"``
            (sqrt of betas linear; latent diffusion / MAISI DDPM).

    Attributes:
        alphas_cumprod: float64 CPU tensor ``(T,)`` of ``abar_k = prod_{i≤k} (1 − beta_i)``.

    Example:
        >>> s = DDPMSchedule()
        >>> s.ddim_timesteps(4).tolist()
        [750, 500, 250, 0]
    """

    num_train_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    kind: Literal["linear", "scaled_linear"] = "linear"
    alphas_cumprod: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.num_train_steps < 2:
            raise InputError(f"num_train_steps must be ≥ 2; got {self.num_train_steps}.")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise InputError(
                f"need 0 < beta_start ≤ beta_end < 1; got beta_start={self.beta_start}, beta_end={self.beta_end}."
            )
        n = self.num_train_steps
        if self.kind == "linear":
            betas = torch.linspace(self.beta_start, self.beta_end, n, dtype=torch.float64)
        elif self.kind == "scaled_linear":
            betas = torch.linspace(math.sqrt(self.beta_start), math.sqrt(self.beta_end), n, dtype=torch.float64) ** 2
        else:
            raise InputError(f"kind must be 'linear' or 'scaled_linear'; got {self.kind!r}.")
        object.__setattr__(self, "alphas_cumprod", torch.cumprod(1.0 - betas, dim=0))

    def _abar(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """abar at integer ``timesteps`` (B,), shaped to broadcast against ``like`` (B, ...)."""
        k = torch.as_tensor(timesteps, dtype=torch.long).cpu()
        if k.numel() and (int(k.min()) < 0 or int(k.max()) >= self.num_train_steps):
            raise InputError(f"DDPM timesteps must lie in [0, {self.num_train_steps - 1}]; got {k.tolist()}.")
        a = self.alphas_cumprod[k].to(device=like.device, dtype=like.dtype)
        return a.reshape(-1, *([1] * (like.ndim - 1)))

    def t_of(self, timesteps: torch.Tensor | int) -> torch.Tensor:
        """Network time ``t = k / T`` in [0, 1) for integer timesteps ``k`` (float64, CPU)."""
        return torch.as_tensor(timesteps, dtype=torch.float64) / self.num_train_steps

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward process ``x_k = sqrt(abar_k)·x0 + sqrt(1 − abar_k)·noise``.

        Args:
            x0: clean samples (B, ...).
            noise: standard normal noise, same shape.
            timesteps: integer timesteps (B,).

        Returns:
            Noisy samples, same shape and dtype as ``x0``.
        """
        a = self._abar(timesteps, x0)
        return a.sqrt() * x0 + (1.0 - a).sqrt() * noise

    def velocity_target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Training target for ``prediction="v"`` (Salimans & Ho 2022).

        Returns:
            ``v = sqrt(abar)·noise − sqrt(1 − abar)·x0`` at integer ``timesteps`` (B,).
        """
        a = self._abar(timesteps, x0)
        return a.sqrt() * noise - (1.0 - a).sqrt() * x0

    def split_prediction(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        prediction: DDPMPrediction,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Convert a network output into ``(x0_hat, eps_hat)``.

        Args:
            model_output: network prediction (B, ...).
            x_t: the noisy input it was computed from.
            timesteps: integer timesteps (B,).
            prediction: ``"epsilon"``, ``"v"`` or ``"x0"``.

        Returns:
            Predicted clean sample and predicted noise, in ``x_t``'s dtype.
        """
        a = self._abar(timesteps, x_t)
        sa, s1a = a.sqrt(), (1.0 - a).sqrt()
        out = model_output.to(x_t.dtype)
        if prediction == "epsilon":
            eps = out
            x0 = (x_t - s1a * eps) / sa
        elif prediction == "v":
            x0 = sa * x_t - s1a * out
            eps = s1a * x_t + sa * out
        elif prediction == "x0":
            x0 = out
            eps = (x_t - sa * x0) / s1a
        else:
            raise InputError(f"prediction must be 'epsilon', 'v' or 'x0'; got {prediction!r}.")
        return x0, eps

    def ddim_timesteps(self, num_steps: int) -> torch.Tensor:
        """DDIM sub-sequence of training steps, descending, "leading" spacing (MONAI/diffusers default).

        Args:
            num_steps: number of sampling steps, 1 … T.

        Returns:
            int64 CPU tensor ``(num_steps,)``: ``(num_steps−1)·s, …, s, 0`` with ``s = T // num_steps``.
        """
        if not isinstance(num_steps, int) or not 1 <= num_steps <= self.num_train_steps:
            raise InputError(f"num_steps must be an integer in [1, {self.num_train_steps}]; got {num_steps!r}.")
        stride = self.num_train_steps // num_steps
        return torch.arange(num_steps - 1, -1, -1, dtype=torch.long) * stride
