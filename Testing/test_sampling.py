"""Schedules and samplers: grid invariants, exact toy flows, MONAI parity, CFG, cancellation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from CounterfactualGenLib.errors import Cancelled, InputError
from CounterfactualGenLib.sampling import (
    DDPMSchedule,
    guided,
    invert_ddim,
    invert_rflow,
    resolution_shift_ratio,
    rflow_timesteps,
    rflow_training_target,
    sample_ddim,
    sample_rflow,
    sample_rflow_train_t,
    shift_time,
)

# ---------------------------------------------------------------- toy models


def gaussian_flow_velocity(s: float):
    """Exact RFlow velocity when data = s · noise (a straight-line flow): v = (s − 1)·x_t / ((1 − t)·s + t)."""

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tb = t.reshape(-1, *([1] * (x.ndim - 1)))
        return (s - 1.0) * x / ((1.0 - tb) * s + tb)

    return model_fn


def gaussian_ddpm_model(schedule: DDPMSchedule, sigma: float, prediction: str):
    """Optimal denoiser for data ~ N(0, sigma²·I), in the requested parameterisation."""

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        k = torch.round(t.cpu().double() * schedule.num_train_steps).long()
        a = schedule.alphas_cumprod[k].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        denom = a * sigma**2 + 1 - a
        x0 = a.sqrt() * sigma**2 * x / denom
        eps = (1 - a).sqrt() * x / denom
        if prediction == "epsilon":
            return eps
        if prediction == "x0":
            return x0
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    return model_fn


@pytest.fixture(scope="module")
def tiny_denoiser():
    from CounterfactualGenLib.nets.unet import build_denoiser, default_denoiser_config

    torch.manual_seed(0)
    net = build_denoiser(default_denoiser_config("latent", 16, "tiny")).eval()
    with torch.no_grad():  # MONAI zero-initialises output convs; make the net non-trivial
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


# ---------------------------------------------------------------- RFlow schedule


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 30, 50, 100, 1000])
@pytest.mark.parametrize("shift", [0.25, 1.0, 2.0, 4.0])
def test_rflow_grid_invariants(n, shift):
    g = rflow_timesteps(n, shift=shift)
    assert g.dtype == torch.float64 and g.device.type == "cpu" and g.shape == (n + 1,)
    assert g[0].item() == 1.0 and g[-1].item() == 0.0
    assert bool((g[:-1] > g[1:]).all())
    steps = g[:-1] - g[1:]
    assert steps.sum().item() == 1.0
    assert sum(steps.tolist()) == 1.0  # also in sequential Python summation


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 400), shift=st.floats(0.1, 20.0))
def test_rflow_grid_steps_sum_exactly_to_one(n, shift):
    g = rflow_timesteps(n, shift=shift)
    assert (g[:-1] - g[1:]).sum().item() == 1.0
    assert torch.allclose(g, shift_time(torch.linspace(1, 0, n + 1, dtype=torch.float64), shift), atol=1e-12)


def test_shift_identity_endpoints_and_monotone_in_r():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.equal(shift_time(t, 1.0), t)
    prev = shift_time(t, 0.5)
    for r in (1.0, 1.5, 2.0, 4.0, 8.0):
        cur = shift_time(t, r)
        assert cur[0] == 0.0 and cur[-1] == 1.0
        assert bool((cur[1:-1] > prev[1:-1]).all())
        prev = cur
    assert resolution_shift_ratio(32**3) == 1.0
    assert resolution_shift_ratio(64**3) == pytest.approx(2.0)
    assert resolution_shift_ratio(16**3) == pytest.approx(0.5)


def test_rflow_grid_rejects_bad_arguments():
    with pytest.raises(InputError):
        rflow_timesteps(0)
    with pytest.raises(InputError):
        rflow_timesteps(10, shift=0.0)


def test_train_t_sampling_is_seeded_and_in_range():
    a = sample_rflow_train_t(64, shift=2.0, generator=torch.Generator().manual_seed(3))
    b = sample_rflow_train_t(64, shift=2.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (64,) and a.dtype == torch.float32
    assert bool(((a >= 0) & (a <= 1)).all())
    u = sample_rflow_train_t(4000, distribution="uniform", generator=torch.Generator().manual_seed(0))
    us = sample_rflow_train_t(4000, distribution="uniform", shift=3.0, generator=torch.Generator().manual_seed(0))
    assert us.mean() > u.mean()  # the shift moves training towards noise


def test_rflow_training_target():
    x0, noise = torch.randn(3, 2, 4, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    x_t, v = rflow_training_target(x0, noise, t)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[2], noise[2])
    assert torch.allclose(v, x0 - noise)
    # one exact Euler step from t to 0 with the true velocity recovers x0
    assert torch.allclose(x_t + t.reshape(-1, 1, 1, 1, 1) * v, x0, atol=1e-12)


# ---------------------------------------------------------------- RFlow sampler


@pytest.mark.parametrize("n", [1, 4, 25])
def test_rflow_straight_flow_is_exact(n):
    s = 0.3
    f = gaussian_flow_velocity(s)
    grid = rflow_timesteps(n, shift=2.0)
    noise = torch.randn(2, 1, 4, 4, 4, dtype=torch.float64)
    x0 = sample_rflow(f, noise, grid)
    assert torch.allclose(x0, s * noise, atol=1e-12)
    assert torch.allclose(invert_rflow(f, x0, grid), noise, atol=1e-12)


def test_rflow_round_trip_with_fixed_velocity_field():
    field = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64)
    grid = rflow_timesteps(7)
    x = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64)
    z = invert_rflow(lambda x, t: field.expand_as(x), x, grid)
    assert torch.allclose(z, x - field, atol=1e-12)  # noise = x0 − v
    assert torch.allclose(sample_rflow(lambda x, t: field.expand_as(x), z, grid), x, atol=1e-12)


def test_rflow_round_trip_error_shrinks_with_steps():
    # Linear but time-dependent field: inversion is first order, so error ~ 1/n.
    def f(x, t):
        return -0.5 * x * t.reshape(-1, 1, 1, 1, 1)

    x = torch.randn(1, 1, 4, 4, 4, dtype=torch.float64)
    errs = []
    for n in (10, 100):
        g = rflow_timesteps(n)
        errs.append((sample_rflow(f, invert_rflow(f, x, g), g) - x).abs().max().item())
    assert errs[1] < errs[0] / 5 and errs[1] < 3e-2


def test_rflow_parity_with_monai_scheduler(tiny_denoiser):
    from monai.networks.schedulers import RFlowScheduler

    net = tiny_denoiser
    ctx = torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(1))
    x = torch.randn(1, 4, 8, 8, 8, generator=torch.Generator().manual_seed(2))
    numel = 8**3
    grid = rflow_timesteps(10, shift=resolution_shift_ratio(numel))
    ours = sample_rflow(lambda y, t: net(y, t, ctx), x, grid)
    for discrete in (True, False):
        sch = RFlowScheduler(1000, use_discrete_timesteps=discrete, use_timestep_transform=True)
        sch.set_timesteps(10, input_img_size_numel=numel)
        # MONAI: timesteps in [0, 1000] descending (float16 or int), Euler x += v·(t − t_next)/1000
        ts = sch.timesteps
        nxt = torch.cat([ts[1:], torch.zeros(1, dtype=ts.dtype)])
        y = x.clone()
        with torch.no_grad():
            for t, tn in zip(ts, nxt):
                v = net.unet(y, timesteps=t.float().reshape(1), context=ctx)
                y, _ = sch.step(v, t, y, tn)
        # MONAI rounds times to float16/ints and truncates t_next to int, so steps don't sum to 1
        assert (y - ours).abs().max().item() <= 1e-2 * ours.abs().max().item(), discrete


def test_sampler_keeps_float32_state_for_bf16_network():
    seen = []

    def f(x, t):
        seen.append(x.dtype)
        return torch.full_like(x, 0.125, dtype=torch.bfloat16)

    out = sample_rflow(f, torch.zeros(1, 1, 2, 2, 2, dtype=torch.bfloat16), rflow_timesteps(3))
    assert out.dtype == torch.float32 and set(seen) == {torch.float32}
    assert torch.allclose(out, torch.full_like(out, 0.125), atol=1e-7)


def test_determinism_given_seed(tiny_denoiser):
    ctx = torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(5))
    f = guided(tiny_denoiser, ctx, torch.zeros(1, 3, 16), scale=2.0)
    grid = rflow_timesteps(3)
    outs = [sample_rflow(f, torch.randn(1, 4, 8, 8, 8, generator=torch.Generator().manual_seed(7)), grid)
            for _ in range(2)]
    assert torch.equal(outs[0], outs[1])


def test_progress_and_cancellation():
    calls = []
    grid = rflow_timesteps(4)
    f = gaussian_flow_velocity(0.5)
    sample_rflow(f, torch.zeros(1, 1, 2, 2, 2), grid, callback=lambda i, n: calls.append((i, n)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    calls.clear()
    invert_rflow(f, torch.zeros(1, 1, 2, 2, 2), grid, callback=lambda i, n: calls.append((i, n)))
    assert calls[-1] == (4, 4)

    def cancel_after(k):
        state = {"n": 0}

        def should_cancel():
            state["n"] += 1
            return state["n"] > k

        return should_cancel

    s = DDPMSchedule()
    ks = s.ddim_timesteps(4)
    eps0 = gaussian_ddpm_model(s, 1.0, "epsilon")
    x = torch.zeros(1, 1, 2, 2, 2)
    with pytest.raises(Cancelled):
        sample_rflow(f, x, grid, should_cancel=cancel_after(2))
    with pytest.raises(Cancelled):
        invert_rflow(f, x, grid, should_cancel=cancel_after(0))
    with pytest.raises(Cancelled):
        sample_ddim(eps0, x, s, ks, should_cancel=cancel_after(1))
    with pytest.raises(Cancelled):
        invert_ddim(eps0, x, s, ks, should_cancel=cancel_after(3))


def test_bad_grid_rejected():
    with pytest.raises(InputError):
        sample_rflow(gaussian_flow_velocity(1.0), torch.zeros(1, 1, 2, 2, 2), torch.tensor([0.0, 1.0]))
    with pytest.raises(InputError):
        sample_ddim(lambda x, t: x, torch.zeros(1, 1, 2, 2, 2), DDPMSchedule(), torch.tensor([0, 10]))


# ---------------------------------------------------------------- DDPM / DDIM


@pytest.mark.parametrize("kind", ["linear", "scaled_linear"])
def test_ddpm_schedule_invariants(kind):
    s = DDPMSchedule(kind=kind, beta_start=1e-4 if kind == "linear" else 0.0015, beta_end=0.02)
    a = s.alphas_cumprod
    assert a.dtype == torch.float64 and a.shape == (1000,)
    assert bool((a[1:] < a[:-1]).all()) and 0 < a[-1] < a[0] < 1
    assert s == DDPMSchedule(kind=kind, beta_start=s.beta_start, beta_end=0.02)  # frozen, comparable
    assert s.ddim_timesteps(10).tolist() == list(range(900, -1, -100))
    with pytest.raises(InputError):
        s.ddim_timesteps(0)


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_ddpm_targets_convert_back(prediction):
    s = DDPMSchedule()
    x0, eps = torch.randn(3, 1, 4, 4, 4, dtype=torch.float64), torch.randn(3, 1, 4, 4, 4, dtype=torch.float64)
    k = torch.tensor([0, 500, 999])
    x_t = s.add_noise(x0, eps, k)
    target = {"epsilon": eps, "x0": x0, "v": s.velocity_target(x0, eps, k)}[prediction]
    x0_hat, eps_hat = s.split_prediction(target, x_t, k, prediction)
    assert torch.allclose(x0_hat, x0, atol=1e-9) and torch.allclose(eps_hat, eps, atol=1e-9)


def test_ddim_constant_eps_round_trip_is_exact():
    s = DDPMSchedule()
    e = torch.randn(1, 1, 4, 4, 4, dtype=torch.float64)
    f = lambda x, t: e.expand_as(x)  # noqa: E731
    ks = s.ddim_timesteps(20)
    x0 = torch.randn(1, 1, 4, 4, 4, dtype=torch.float64)
    assert torch.allclose(sample_ddim(f, invert_ddim(f, x0, s, ks), s, ks), x0, atol=1e-8)


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_ddim_round_trip_close_for_smooth_model(prediction):
    s = DDPMSchedule()
    f = gaussian_ddpm_model(s, 0.5, prediction)
    x0 = 0.5 * torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    errs = []
    for n in (10, 50, 200):
        ks = s.ddim_timesteps(n)
        errs.append((sample_ddim(f, invert_ddim(f, x0, s, ks, prediction=prediction), s, ks,
                                 prediction=prediction) - x0).abs().max().item())
    # DDIM inversion is first order (that is why null-text inversion exists): error ~ 1/n
    assert errs[2] < errs[1] / 3 < errs[0] / 9 and errs[2] < 0.03


def test_ddim_stochastic_is_seeded():
    s = DDPMSchedule()
    f = gaussian_ddpm_model(s, 1.0, "epsilon")
    x = torch.randn(1, 1, 4, 4, 4)
    ks = s.ddim_timesteps(5)
    a = sample_ddim(f, x, s, ks, eta=1.0, generator=torch.Generator().manual_seed(1))
    b = sample_ddim(f, x, s, ks, eta=1.0, generator=torch.Generator().manual_seed(1))
    c = sample_ddim(f, x, s, ks, eta=0.0)
    assert torch.equal(a, b) and not torch.allclose(a, c)


# ---------------------------------------------------------------- classifier-free guidance


class _CountingModel(torch.nn.Module):
    """Prediction depends on x, t and the context, so guidance arithmetic is visible."""

    def __init__(self):
        super().__init__()
        self.batches: list[int] = []

    def forward(self, x, t, context):
        self.batches.append(x.shape[0])
        return x * t.reshape(-1, 1, 1, 1, 1) + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1, 1)


def test_cfg_identities_and_single_doubled_batch():
    m = _CountingModel()
    x, t = torch.randn(2, 1, 2, 2, 2), torch.tensor([0.3, 0.7])
    cond, null = torch.full((1, 3, 4), 2.0), torch.full((1, 3, 4), -1.0)
    p_cond, p_null = m(x, t, cond.expand(2, -1, -1)), m(x, t, null.expand(2, -1, -1))
    m.batches.clear()
    assert torch.allclose(guided(m, cond, null, 1.0)(x, t), p_cond)
    assert torch.allclose(guided(m, cond, null, 0.0)(x, t), p_null)
    assert m.batches == [2, 2]  # the trivial scales skip the unused branch
    m.batches.clear()
    out = guided(m, cond, null, 3.0)(x, t)
    assert m.batches == [4]  # one doubled batch
    assert torch.allclose(out, p_null + 3.0 * (p_cond - p_null), atol=1e-6)
    # per-step null embeddings (null-text inversion) can be a function of t
    out2 = guided(m, cond, lambda tt: null, 3.0)(x, t)
    assert torch.allclose(out, out2)


def test_cfg_with_an_away_prompt_is_one_tripled_batch():
    """away_context adds a·(p_cond − p_away) on top of CFG, in one [null; cond; away] batch."""
    m = _CountingModel()
    x, t = torch.randn(2, 1, 2, 2, 2), torch.tensor([0.3, 0.7])
    cond, null, away = torch.full((1, 3, 4), 2.0), torch.full((1, 3, 4), -1.0), torch.full((1, 3, 4), 0.5)
    p_cond, p_null, p_away = (m(x, t, c.expand(2, -1, -1)) for c in (cond, null, away))
    m.batches.clear()
    out = guided(m, cond, null, 3.0, away_context=away, away_scale=2.0)(x, t)
    assert m.batches == [6]
    assert torch.allclose(out, p_null + 3.0 * (p_cond - p_null) + 2.0 * (p_cond - p_away), atol=1e-6)
    m.batches.clear()
    out = guided(m, cond, null, 1.0, away_context=away, away_scale=2.0)(x, t)  # no null branch at scale 1
    assert m.batches == [4] and torch.allclose(out, p_cond + 2.0 * (p_cond - p_away), atol=1e-6)
    # away_scale 0 is plain CFG; a negative scale or a missing context is refused
    assert torch.allclose(guided(m, cond, null, 3.0, away_context=away, away_scale=0.0)(x, t),
                          guided(m, cond, null, 3.0)(x, t))
    for bad in ({"away_scale": -1.0, "away_context": away}, {"away_scale": 1.0}):
        with pytest.raises(InputError, match="away"):
            guided(m, cond, null, 3.0, **bad)


def test_cfg_with_real_denoiser(tiny_denoiser):
    net = tiny_denoiser
    x, t = torch.randn(2, 4, 8, 8, 8), torch.rand(2)
    cond, null = torch.randn(1, 3, 16), torch.zeros(1, 3, 16)
    with torch.no_grad():
        p_cond, p_null = net(x, t, cond.expand(2, -1, -1)), net(x, t, null.expand(2, -1, -1))
        out = guided(net, cond, null, 2.0)(x, t)
    assert torch.allclose(out, 2 * p_cond - p_null, atol=1e-5)


def test_inpaint_rflow_fills_the_mask_and_keeps_the_rest_exactly():
    from CounterfactualGenLib.sampling.samplers import inpaint_rflow

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 2, 6, 6, 6, generator=g)
    y = torch.randn(1, 2, 6, 6, 6, generator=g)  # what a perfect model would generate everywhere
    noise = torch.randn(1, 2, 6, 6, 6, generator=g)
    mask = torch.zeros(1, 1, 6, 6, 6)
    mask[..., 2:4, 2:5, 1:3] = 1

    def straight_to_y(x, t):  # rectified-flow velocity field whose every trajectory ends at y
        return (y - x) / t.view(-1, 1, 1, 1, 1)

    from CounterfactualGenLib.sampling.schedules import rflow_timesteps

    out = inpaint_rflow(straight_to_y, x0, mask, noise, rflow_timesteps(8))
    keep = mask.expand_as(x0) == 0
    assert torch.equal(out[keep], x0[keep])  # bit-identical outside the mask
    torch.testing.assert_close(out[~keep], y[~keep], atol=1e-5, rtol=0)
    with pytest.raises(Cancelled):
        inpaint_rflow(straight_to_y, x0, mask, noise, rflow_timesteps(8), should_cancel=lambda: True)
