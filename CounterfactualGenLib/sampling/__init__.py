"""Noise schedules and sampler loops (rectified flow, DDPM/DDIM, CFG, inversion).

Schedules know nothing about networks; samplers take ``model_fn(x, t_batch)`` with
``t`` in [0, 1] (1 = pure noise). Cross-attention control lives in ``nets.attention``.
"""

from __future__ import annotations

from .samplers import (
    ConditionalModel,
    ModelFn,
    guided,
    invert_ddim,
    invert_rflow,
    rflow_training_target,
    sample_ddim,
    sample_rflow,
)
from .schedules import (
    DDPMPrediction,
    DDPMSchedule,
    resolution_shift_ratio,
    rflow_timesteps,
    sample_rflow_train_t,
    shift_time,
)

__all__ = [
    "ConditionalModel",
    "DDPMPrediction",
    "DDPMSchedule",
    "ModelFn",
    "guided",
    "invert_ddim",
    "invert_rflow",
    "resolution_shift_ratio",
    "rflow_timesteps",
    "rflow_training_target",
    "sample_ddim",
    "sample_rflow",
    "sample_rflow_train_t",
    "shift_time",
]
