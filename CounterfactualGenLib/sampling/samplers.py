"""Sampler loops: small pure functions over a precomputed CPU timestep grid.

Every sampler takes ``model_fn(x, t_batch) -> prediction`` (k-diffusion style), where
``t_batch`` is a (B,) tensor of times in [0, 1] (1 = pure noise) on ``x``'s device.
The network, its parameterisation (velocity / epsilon / v / x0) and the ODE solver
are separate: :func:`guided` turns a conditional network into a ``model_fn``; the
schedules in :mod:`.schedules` provide the grids.

Numerics: the sampler state and every update are kept in float32 (float64 if the input
is float64) even if the network runs in bf16/fp16 — the diffusers habit, because
low-precision accumulation over many steps drifts.

Progress and cancellation: ``callback(step_index, total)`` is called after each step
with ``step_index`` = number of completed steps (1 … total); ``should_cancel()`` is
polled before each step and a True answer raises :class:`~CounterfactualGenLib.errors.Cancelled`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from ..errors import Cancelled, InputError
from .schedules import DDPMPrediction, DDPMSchedule

__all__ = [
    "ConditionalModel",
    "ModelFn",
    "guided",
    "invert_ddim",
    "inpaint_rflow",
    "invert_rflow",
    "rflow_training_target",
    "sample_ddim",
    "sample_rflow",
]

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ProgressCallback = Callable[[int, int], None]
CancelCheck = Callable[[], bool]


class ConditionalModel(Protocol):
    """A network called as ``model(x, t, context)`` (e.g. :class:`~CounterfactualGenLib.nets.unet.Denoiser`)."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor: ...


def _state_dtype(x: torch.Tensor) -> torch.dtype:
    # float64 inputs stay float64 (tests, exactness); everything else is updated in float32.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_cancel(should_cancel: CancelCheck | None) -> None:
    if should_cancel is not None and should_cancel():
        raise Cancelled("sampling was cancelled")


def _check_grid(timesteps: torch.Tensor, what: str) -> torch.Tensor:
    grid = torch.as_tensor(timesteps).detach().cpu()
    if grid.ndim != 1 or grid.numel() < 2:
        raise InputError(f"{what} needs a 1D time grid with at least 2 entries (use rflow_timesteps(n)).")
    if not bool((grid[:-1] > grid[1:]).all()):
        raise InputError(f"{what} needs a strictly decreasing time grid from noise (t=1) to data (t=0).")
    return grid.to(torch.float64)


def _t_batch(t: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)


def rflow_training_target(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectified-flow training pair (Liu et al. 2023; MAISI): ``x_t = (1−t)·x0 + t·noise``, ``v = x0 − noise``.

    Args:
        x0: clean samples (B, C, ...).
        noise: standard normal noise, same shape.
        t: times in [0, 1], shape (B,).

    Returns:
        ``(x_t, v)``: the network input and its velocity target, in ``x0``'s dtype.
    """
    if x0.shape != noise.shape:
        raise InputError(f"x0 and noise must have the same shape; got {tuple(x0.shape)} and {tuple(noise.shape)}.")
    if t.ndim != 1 or t.shape[0] != x0.shape[0]:
        raise InputError(f"t must have shape (B,) = ({x0.shape[0]},); got {tuple(t.shape)}.")
    tb = t.to(device=x0.device, dtype=x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    return (1.0 - tb) * x0 + tb * noise, x0 - noise


@torch.no_grad()
def sample_rflow(
    model_fn: ModelFn,
    x_noise: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    callback: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
    after_step: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Euler sampler for rectified flow (Liu et al. 2023; MAISI RFlow): ``x ← x + (t − t_next)·v``.

    Args:
        model_fn: ``(x, t_batch) -> v``, velocity ``v = x0 − noise``.
        x_noise: start sample at ``timesteps[0]`` (normally pure noise at t = 1).
        timesteps: strictly decreasing grid, e.g. :func:`~.schedules.rflow_timesteps`.
        callback: ``callback(step_index, total)`` after each step.
        should_cancel: polled before each step; True raises ``Cancelled``.
        after_step: applied to the state after every step (e.g. DiffEdit's blending of an
            edited row with its source row outside a mask).

    Returns:
        The sample at ``timesteps[-1]`` (t = 0: data), float32 (float64 for float64 input).
    """
    grid = _check_grid(timesteps, "sample_rflow")
    x = x_noise.to(_state_dtype(x_noise))
    total = grid.numel() - 1
    for i in range(total):
        _check_cancel(should_cancel)
        t, t_next = float(grid[i]), float(grid[i + 1])
        v = model_fn(x, _t_batch(t, x))
        x = x + (t - t_next) * v.to(x.dtype)
        if after_step is not None:
            x = after_step(x)
        if callback is not None:
            callback(i + 1, total)
    return x


def inpaint_rflow(
    model_fn: ModelFn,
    x0: torch.Tensor,
    mask: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    callback: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
) -> torch.Tensor:
    """Regenerate the masked part of ``x0`` with the rectified-flow Euler sampler; keep the rest.

    Blended sampling (RePaint / blended diffusion, without resampling): after every step
    the state outside the mask is replaced by the known data noised to the same time,
    ``(1 − t)·x0 + t·noise``, so the network fills the masked region in keeping with its
    surroundings and the prompt, and at ``t = 0`` every cell outside the mask equals
    ``x0`` exactly.

    Args:
        model_fn: ``(x, t_batch) -> v``.
        x0: the known data (B, C, *spatial).
        mask: 1 where to regenerate, 0 where to keep; broadcastable to ``x0``.
        noise: the noise that both the start and the known part are mixed with.
        timesteps: decreasing grid from ``t ≤ 1`` down to 0.
        callback, should_cancel: as in :func:`sample_rflow`.

    Returns:
        The inpainted sample at ``timesteps[-1]``.
    """
    grid = _check_grid(timesteps, "inpaint_rflow")
    dtype = _state_dtype(x0)
    x0, noise = x0.to(dtype), noise.to(dtype)
    m = mask.to(dtype)
    t0 = float(grid[0])
    x = (1.0 - t0) * x0 + t0 * noise
    total = grid.numel() - 1
    for i in range(total):
        _check_cancel(should_cancel)
        t, t_next = float(grid[i]), float(grid[i + 1])
        v = model_fn(x, _t_batch(t, x))
        x = x + (t - t_next) * v.to(dtype)
        x = m * x + (1.0 - m) * ((1.0 - t_next) * x0 + t_next * noise)
        if callback is not None:
            callback(i + 1, total)
    return x


@torch.no_grad()
def invert_rflow(
    model_fn: ModelFn,
    x0: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    callback: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
    return_path: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the rectified-flow ODE backwards (data → noise) with explicit Euler on the same grid.

    Each step goes from ``t_next`` up to ``t`` with the velocity evaluated at the start
    of the step: ``x ← x − (t − t_next)·v(x, t_next)``. It is the exact inverse of
    :func:`sample_rflow` whenever the velocity is constant along trajectories (straight
    flows), and first-order accurate otherwise.

    Args:
        model_fn: ``(x, t_batch) -> v``.
        x0: the sample at ``timesteps[-1]`` (normally data at t = 0).
        timesteps: the decreasing grid the sample will later be regenerated with.
        callback: ``callback(step_index, total)`` after each step.
        should_cancel: polled before each step; True raises ``Cancelled``.
        return_path: also return the states at every grid point, in grid order
            (``path[i]`` is the state at ``timesteps[i]``; ``path[-1]`` is ``x0``): the
            pivots of null-text optimisation.

    Returns:
        The latent noise at ``timesteps[0]``, float32 (float64 for float64 input); with
        ``return_path``, ``(noise, path)``.
    """
    grid = _check_grid(timesteps, "invert_rflow")
    x = x0.to(_state_dtype(x0))
    total = grid.numel() - 1
    path = [x]
    for n, i in enumerate(range(total - 1, -1, -1)):
        _check_cancel(should_cancel)
        t, t_next = float(grid[i]), float(grid[i + 1])
        v = model_fn(x, _t_batch(t_next, x))
        x = x - (t - t_next) * v.to(x.dtype)
        path.append(x)
        if callback is not None:
            callback(n + 1, total)
    return (x, path[::-1]) if return_path else x


def _check_ddim_grid(timesteps: torch.Tensor, schedule: DDPMSchedule, what: str) -> list[int]:
    ks = torch.as_tensor(timesteps).detach().cpu().to(torch.long).reshape(-1).tolist()
    if not ks:
        raise InputError(f"{what} needs at least one timestep (use schedule.ddim_timesteps(n)).")
    if any(a <= b for a, b in zip(ks[:-1], ks[1:])) or ks[-1] < 0 or ks[0] >= schedule.num_train_steps:
        raise InputError(
            f"{what} needs strictly decreasing integer timesteps in [0, {schedule.num_train_steps - 1}]; "
            "use schedule.ddim_timesteps(n)."
        )
    return ks


@torch.no_grad()
def sample_ddim(
    model_fn: ModelFn,
    x_T: torch.Tensor,
    schedule: DDPMSchedule,
    timesteps: torch.Tensor,
    *,
    eta: float = 0.0,
    prediction: DDPMPrediction = "epsilon",
    generator: torch.Generator | None = None,
    callback: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
) -> torch.Tensor:
    """DDIM sampler (Song et al., ICLR 2021); ``eta = 0`` is deterministic, ``eta = 1`` is DDPM-like.

    The last step goes to ``abar = 1`` (the clean sample), as diffusers' ``set_alpha_to_one``.

    Args:
        model_fn: ``(x, t_batch) -> prediction`` with ``t = k / T``.
        x_T: start sample at ``timesteps[0]``.
        schedule: the DDPM schedule the network was trained with.
        timesteps: decreasing integer steps, e.g. ``schedule.ddim_timesteps(50)``.
        eta: stochasticity (0 … 1).
        prediction: what the network predicts: ``"epsilon"``, ``"v"`` or ``"x0"``.
        generator: random generator for ``eta > 0`` (on the generator's device).
        callback: ``callback(step_index, total)`` after each step.
        should_cancel: polled before each step; True raises ``Cancelled``.

    Returns:
        The clean sample, float32 (float64 for float64 input).
    """
    ks = _check_ddim_grid(timesteps, schedule, "sample_ddim")
    if eta < 0:
        raise InputError(f"eta must be ≥ 0; got {eta}.")
    x = x_T.to(_state_dtype(x_T))
    acp = schedule.alphas_cumprod
    total = len(ks)
    for i, k in enumerate(ks):
        _check_cancel(should_cancel)
        kb = torch.full((x.shape[0],), k, dtype=torch.long)
        out = model_fn(x, _t_batch(k / schedule.num_train_steps, x))
        x0, eps = schedule.split_prediction(out, x, kb, prediction)
        a = float(acp[k])
        a_prev = float(acp[ks[i + 1]]) if i + 1 < total else 1.0
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
        x = a_prev**0.5 * x0 + max(1 - a_prev - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            dev = generator.device if generator is not None else x.device
            z = torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)
            x = x + sigma * z
        if callback is not None:
            callback(i + 1, total)
    return x


@torch.no_grad()
def invert_ddim(
    model_fn: ModelFn,
    x0: torch.Tensor,
    schedule: DDPMSchedule,
    timesteps: torch.Tensor,
    *,
    prediction: DDPMPrediction = "epsilon",
    callback: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
) -> torch.Tensor:
    """Deterministic DDIM inversion (Song et al. 2021; as used by null-text inversion, Mokady et al. 2023).

    Walks the grid upwards (clean → ``timesteps[0]``). The step from level ``k_prev`` to
    ``k`` evaluates the network at the current sample with time ``k`` — the usual
    approximation of the implicit step, exact when the predicted noise does not depend
    on the sample.

    Args:
        model_fn: ``(x, t_batch) -> prediction`` with ``t = k / T``.
        x0: the clean sample.
        schedule: the DDPM schedule.
        timesteps: the decreasing grid that :func:`sample_ddim` will use.
        prediction: ``"epsilon"``, ``"v"`` or ``"x0"``.
        callback: ``callback(step_index, total)`` after each step.
        should_cancel: polled before each step; True raises ``Cancelled``.

    Returns:
        The latent ``x_T`` at ``timesteps[0]``, float32 (float64 for float64 input).
    """
    ks = _check_ddim_grid(timesteps, schedule, "invert_ddim")[::-1]
    x = x0.to(_state_dtype(x0))
    acp = schedule.alphas_cumprod
    total = len(ks)
    a_cur = 1.0
    for i, k in enumerate(ks):
        _check_cancel(should_cancel)
        kb = torch.full((x.shape[0],), k, dtype=torch.long)
        out = model_fn(x, _t_batch(k / schedule.num_train_steps, x))
        a = float(acp[k])
        # The noise estimate is what DDIM transports between levels; x0/v outputs are
        # converted with level k's coefficients, where the network was asked to look.
        _, eps = schedule.split_prediction(out, x, kb, prediction)
        x0_cur = (x - (1 - a_cur) ** 0.5 * eps) / a_cur**0.5
        x = a**0.5 * x0_cur + (1 - a) ** 0.5 * eps
        a_cur = a
        if callback is not None:
            callback(i + 1, total)
    return x


def guided(
    model: ConditionalModel,
    cond_context: torch.Tensor,
    null_context: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
    scale: float,
    *,
    away_context: torch.Tensor | None = None,
    away_scale: float = 0.0,
) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans 2022) as a ``model_fn``: ``p = p_null + s·(p_cond − p_null)``.

    Both branches run in ONE doubled batch ``[null; cond]`` (null first, as
    prompt-to-prompt's attention controllers expect). ``scale = 1`` is the plain
    conditional prediction and ``scale = 0`` the unconditional one; those two cases
    skip the unused branch (half the compute).

    With ``away_context`` and ``away_scale = a > 0`` a third branch adds a negative-prompt
    term: ``p = p_null + s·(p_cond − p_null) + a·(p_cond − p_away)``. A counterfactual
    series passes, per member, the prompt of the member before it, which exaggerates each
    step of the series (the lesion load, the diagnosis); the batch becomes
    ``[null; cond; away]``.

    Args:
        model: network ``model(x, t, context)``.
        cond_context: prompt embedding (1 or B, L, D).
        null_context: null/empty-prompt embedding (1 or B, L, D), or a function of the
            time batch returning it (for null-text inversion's per-step embeddings).
        scale: guidance scale s.
        away_context: embedding to guide away from (1 or B, L, D), or None.
        away_scale: its scale a ≥ 0 (0: no third branch).

    Returns:
        ``model_fn(x, t_batch)``.
    """

    def expand(ctx: torch.Tensor, b: int) -> torch.Tensor:
        if ctx.ndim != 3:
            raise InputError(f"context must be (B, L, D); got {tuple(ctx.shape)}.")
        if ctx.shape[0] == b:
            return ctx
        if ctx.shape[0] == 1:
            return ctx.expand(b, -1, -1)
        raise InputError(f"context batch {ctx.shape[0]} matches neither 1 nor the sample batch {b}.")

    if away_scale < 0 or (away_scale > 0 and away_context is None):
        raise InputError(f"away_scale must be ≥ 0 and needs away_context; got {away_scale}.")
    if away_scale > 0:

        def model_fn_away(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            b = x.shape[0]
            cond, away = expand(cond_context, b), expand(away_context, b)
            if away.shape[1:] != cond.shape[1:]:
                raise InputError(f"away and prompt embeddings must have the same (L, D); got "
                                 f"{tuple(away.shape[1:])} and {tuple(cond.shape[1:])}.")
            if scale == 1.0:  # no null branch: [cond; away]
                p_cond, p_away = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, away.to(cond.dtype)])
                                       ).float().chunk(2)
                return p_cond + away_scale * (p_cond - p_away)
            null = expand(null_context(t) if callable(null_context) else null_context, b)
            if null.shape[1:] != cond.shape[1:]:
                raise InputError(f"null and prompt embeddings must have the same (L, D); got "
                                 f"{tuple(null.shape[1:])} and {tuple(cond.shape[1:])}.")
            out = model(torch.cat([x, x, x]), torch.cat([t, t, t]),
                        torch.cat([null.to(cond.dtype), cond, away.to(cond.dtype)]))
            p_null, p_cond, p_away = out.float().chunk(3)
            return p_null + scale * (p_cond - p_null) + away_scale * (p_cond - p_away)

        return model_fn_away

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        cond = expand(cond_context, b)
        if scale == 1.0:
            return model(x, t, cond)
        null = expand(null_context(t) if callable(null_context) else null_context, b)
        if scale == 0.0:
            return model(x, t, null)
        if null.shape[1:] != cond.shape[1:]:
            raise InputError(
                f"null and prompt embeddings must have the same (L, D); got {tuple(null.shape[1:])} "
                f"and {tuple(cond.shape[1:])}. Encode the empty prompt with the same text encoder."
            )
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([null.to(cond.dtype), cond]))
        p_null, p_cond = out.float().chunk(2)
        return p_null + scale * (p_cond - p_null)

    return model_fn
