"""Pipelines: generate counterfactual series from text (and, later, edit real scans).

The pipeline owns device, dtype, guidance and progress; networks (``nets/``) know
nothing about noise and samplers (``sampling/``) know nothing about networks.

Progress is reported through a callback receiving plain dicts, the same objects the
CLI prints with ``--progress-json``::

    {"event": "progress", "stage": "sample", "step": 3, "total": 30, "eta_s": 12.5}
    {"event": "log", "level": "info", "message": "..."}

Cancellation: pass ``should_cancel`` (polled between sampler steps); a cancelled run
raises :class:`~CounterfactualGenLib.errors.Cancelled`.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .errors import InputError
from .models import DiffusionModel, check_text_encoder
from .volume import Volume

__all__ = ["Reporter", "select_device", "list_devices", "generate_series", "GeneratedSeries", "OUTPUT_SCALE"]

#: Generated images are written with background 0 and the brain's 99.5th percentile at this value.
OUTPUT_SCALE = 1000.0

EventCallback = Callable[[dict], None]


class Reporter:
    """Turns stage/step counts into progress events with an ETA; also times stages."""

    def __init__(self, callback: EventCallback | None = None) -> None:
        self.callback = callback
        self.timings_s: dict[str, float] = {}
        self._stage_start: dict[str, float] = {}

    def log(self, message: str, level: str = "info") -> None:
        if self.callback:
            self.callback({"event": "log", "level": level, "message": message})

    def start(self, stage: str, total: int = 1) -> None:
        self._stage_start[stage] = time.perf_counter()
        if self.callback:
            self.callback({"event": "progress", "stage": stage, "step": 0, "total": int(total), "eta_s": None})

    def step(self, stage: str, step: int, total: int) -> None:
        t0 = self._stage_start.setdefault(stage, time.perf_counter())
        elapsed = time.perf_counter() - t0
        eta = elapsed / step * (total - step) if step > 0 else None
        if self.callback:
            self.callback({"event": "progress", "stage": stage, "step": int(step), "total": int(total),
                           "eta_s": None if eta is None else round(eta, 2)})

    def end(self, stage: str) -> float:
        dt = time.perf_counter() - self._stage_start.pop(stage, time.perf_counter())
        self.timings_s[stage] = round(self.timings_s.get(stage, 0.0) + dt, 4)
        return dt


def list_devices() -> list[dict[str, Any]]:
    """CPU plus every CUDA device by name and memory."""
    import torch

    out: list[dict[str, Any]] = [{"id": "cpu", "name": "CPU"}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append({"id": f"cuda:{i}", "name": p.name, "memory_gb": round(p.total_memory / 2**30, 1)})
    return out


def select_device(name: str = "auto") -> "torch.device":  # noqa: F821
    """``auto`` → CUDA when present, else CPU; or an explicit ``cpu`` / ``cuda:N``."""
    import torch

    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"Unknown device '{name}'. Use auto, cpu or cuda:N.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"Device '{name}' was asked for but CUDA is not available here. Use --device cpu.")
        if (dev.index or 0) >= torch.cuda.device_count():
            raise InputError(f"Device '{name}' does not exist; this machine has {torch.cuda.device_count()} GPU(s).")
    elif dev.type != "cpu":
        raise InputError(f"Unsupported device '{name}'. Use auto, cpu or cuda:N.")
    return dev


_BF16_OK: dict[str, bool] = {}


def bf16_conv3d_ok(device: "torch.device") -> bool:  # noqa: F821
    """Parity check of bf16 vs fp32 conv3d on this device (PyTorch 2.9.0 + some cuDNN got it wrong).

    bf16 autocast is used on a GPU only when this passes; never on CPU.
    """
    import torch

    if device.type != "cuda":
        return False
    key = str(device)
    if key not in _BF16_OK:
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(2, 32, 16, 16, 16, generator=g).to(device)
        w = torch.randn(32, 32, 3, 3, 3, generator=g).to(device) / 16
        ref = torch.nn.functional.conv3d(x, w, padding=1)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = torch.nn.functional.conv3d(x, w, padding=1).float()
        rel = float((out - ref).norm() / ref.norm())
        _BF16_OK[key] = rel < 2e-2
    return _BF16_OK[key]


def _autocast(device: "torch.device", precision: str):  # noqa: F821
    import torch

    if precision == "fp32" or device.type != "cuda":
        return nullcontext()
    if precision in ("auto", "bf16") and bf16_conv3d_ok(device):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@dataclass
class GeneratedSeries:
    """Result of :func:`generate_series`: one volume per prompt, all from one noise."""

    prompts: list[str]
    volumes: list[Volume]
    seed: int
    steps: int
    guidance: float
    timings_s: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"


def model_to_output_intensity(x: np.ndarray) -> np.ndarray:
    """Model units (−1 = background, +1 = brain p99.5) → written units (0 … OUTPUT_SCALE)."""
    return ((x + 1.0) * (OUTPUT_SCALE / 2.0)).astype(np.float32)


def _timesteps(model: DiffusionModel, steps: int):
    from .sampling.schedules import resolution_shift_ratio, rflow_timesteps

    sched = model.spec.schedule
    shift = sched.get("shift")
    if shift is None:
        shift = resolution_shift_ratio(int(np.prod(model.diffusion_shape()[1:])), int(sched.get("base_numel", 32**3)))
    return rflow_timesteps(steps, shift=float(shift))


def generate_series(
    model: DiffusionModel,
    text_encoder: Any,
    prompts: Sequence[str],
    *,
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    device: str = "auto",
    precision: str = "auto",
    on_event: EventCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> GeneratedSeries:
    """A counterfactual series: every prompt starts from the same seeded noise.

    Imagining Alternatives (Mohamed et al. 2025): one initial noise, several prompts →
    the same synthetic subject in different disease states. The noise is drawn on the
    CPU from ``seed`` so a series is reproducible for a given seed and device.

    Args:
        model: a loaded model.
        text_encoder: the model's text encoder (checked against the spec).
        prompts: one or more sentences.
        seed: random seed of the shared noise.
        steps: sampler steps (default: the model's).
        guidance: classifier-free guidance scale s (v = v_null + s·(v_cond − v_null)); 1 = none.
        device: ``auto``, ``cpu`` or ``cuda:N``.
        precision: ``auto`` (bf16 on GPU if the parity check passes), ``fp32`` or ``bf16``.
        on_event: progress/log callback.
        should_cancel: polled between steps.

    Returns:
        A :class:`GeneratedSeries` with one Volume per prompt in the model's real
        geometry (the model grid in template/MNI world coordinates).
    """
    import torch

    from .sampling.samplers import guided, sample_rflow

    prompts = [str(p).strip() for p in prompts]
    if not prompts or any(not p for p in prompts):
        raise InputError("Give at least one non-empty prompt.")
    if model.spec.schedule.get("kind") != "rflow":
        raise InputError("This version samples rectified-flow models only; the model uses "
                         f"'{model.spec.schedule.get('kind')}'.")
    check_text_encoder(model.spec, text_encoder)
    steps = int(model.spec.schedule.get("default_steps", 30) if steps is None else steps)
    guidance = float(model.spec.schedule.get("default_guidance", 1.0) if guidance is None else guidance)
    if steps < 1 or steps > 1000:
        raise InputError(f"steps must be between 1 and 1000; got {steps}.")
    if not (0.0 <= guidance <= 20.0):
        raise InputError(f"guidance must be between 0 and 20; got {guidance}.")

    rep = Reporter(on_event)
    dev = select_device(device)
    model.to(dev)
    n = len(prompts)

    rep.start("encode_text")
    emb = text_encoder.encode(prompts)
    cond = emb.tokens.to(dev)
    null = text_encoder.null(1).tokens.to(dev)
    rep.end("encode_text")

    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    noise = torch.randn(model.diffusion_shape(1), generator=gen, dtype=torch.float32)
    x = noise.expand(n, *noise.shape[1:]).contiguous().to(dev)  # one noise shared by the series

    ts = _timesteps(model, steps)
    fn = guided(model.denoiser, cond, null, guidance)

    def model_fn(xx, tt):
        with _autocast(dev, precision):
            return fn(xx, tt).float()

    rep.start("sample", steps)
    with torch.inference_mode():
        z0 = sample_rflow(model_fn, x, ts, callback=lambda i, tot: rep.step("sample", i, tot),
                          should_cancel=should_cancel)
    rep.end("sample")

    rep.start("decode")
    with torch.inference_mode():
        img = model.decode(z0).float().cpu().numpy()
    rep.end("decode")

    affine = model.spec.grid.affine_ras
    vols = [Volume(model_to_output_intensity(img[i, 0]), affine) for i in range(n)]
    return GeneratedSeries(prompts, vols, int(seed), steps, guidance, dict(rep.timings_s), str(dev))
