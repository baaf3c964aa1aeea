#!/usr/bin/env python
"""Benchmark of ``generate_series`` (a 3-prompt counterfactual series) against MONAI's own RFlow loop.

For every (family, grid) it measures, each in a fresh subprocess:

* our product path, :func:`CounterfactualGenLib.pipeline.generate_series`: time per stage
  (``timings_s``: encode_text / sample / decode), wall time of the call, peak memory
  (CPU: ``ru_maxrss`` of the subprocess; GPU: ``torch.cuda.max_memory_allocated``);
* the reference: the *same* MONAI ``DiffusionModelUNet`` object (``Denoiser.unet``),
  the same steps, initial noise, text context and doubled classifier-free-guidance
  batch, driven by ``monai.networks.schedulers.RFlowScheduler`` in the explicit loop of
  ``monai.inferers.DiffusionInferer.sample``. (``DiffusionInferer.sample(cfg=...)`` fills
  the unconditional context with a constant, ``cfg_fill_value``; our models need the
  empty prompt's embedding as null context, so the loop is written out, line for line
  as MONAI's.) Its decode is timed separately, as ours.

It also counts FLOPs per denoiser call (``torch.utils.flop_counter`` via
:func:`~CounterfactualGenLib.nets.unet.count_flops`, on the real input shape with the
doubled batch 2×3) and relates the achieved FLOP/s to a peak MEASURED in the same run
by a large matmul (fp32 on CPU; fp32, TF32 and bf16 on GPU) — not a spec-sheet number.

Weights are random (speed does not depend on them); the text encoder is ``tiny-hash``
(offline, ~ms), so the cost of a real text encoder is not part of these numbers.

Usage (from the repository root)::

    python Testing/Benchmarks/bench_generate.py --grids 64 --size tiny
    python Testing/Benchmarks/bench_generate.py --grids 64 128 --size small --steps 5 --json /tmp/bench.json
    python Testing/Benchmarks/bench_generate.py --device cuda --steps 30 --grids 64 128 --size base

This is a script, not a test: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROMPTS = (
    "Healthy brain of a 45-year-old.",
    "Brain with a few small periventricular white matter lesions.",
    "Brain with a high lesion load and confluent periventricular lesions.",
)
TEXT_DIM = 64
TEXT_TOKENS = 16
GUIDANCE = 2.0
SEED = 0
BASE_NUMEL = 32**3  # MAISI's reference volume for the resolution shift


# ---------------------------------------------------------------------------------
# environment and measured peak
# ---------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_avg() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def measure_matmul_peak(device: str, *, seconds: float = 2.0) -> dict[str, float]:
    """Best GFLOP/s of a large square matmul (fp32 on CPU; fp32, TF32 and bf16 on GPU)."""
    import torch

    out: dict[str, float] = {}
    if device == "cpu":
        n = 2048
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)  # warm-up
        best, t_end = math.inf, time.perf_counter() + seconds
        while time.perf_counter() < t_end or best == math.inf:
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
        out["fp32"] = 2 * n**3 / best / 1e9
        return out
    dev = torch.device(device)
    n = 8192
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for name, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                                  ("bf16", torch.bfloat16, False)):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            a = torch.randn(n, n, device=dev, dtype=dtype)
            b = torch.randn(n, n, device=dev, dtype=dtype)
            for _ in range(3):
                torch.mm(a, b)
            torch.cuda.synchronize(dev)
            reps = 20
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                torch.mm(a, b)
            stop.record()
            torch.cuda.synchronize(dev)
            out[name] = 2 * n**3 * reps / (start.elapsed_time(stop) / 1e3) / 1e9
            del a, b
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    return out


# ---------------------------------------------------------------------------------
# the model under test (built identically in every subprocess)
# ---------------------------------------------------------------------------------
def build_model(family: str, grid: int, size: str):
    """A DiffusionModel with random weights, and its tiny-hash text encoder."""
    import torch

    from CounterfactualGenLib.geometry import ModelGrid
    from CounterfactualGenLib.models import DiffusionModel, ModelSpec
    from CounterfactualGenLib.nets.autoencoder import build_autoencoder, default_autoencoder_config
    from CounterfactualGenLib.nets.unet import build_denoiser, default_denoiser_config
    from CounterfactualGenLib.text import load_text_encoder

    spec = ModelSpec(
        id=f"bench-{family}-{size}-{grid}", family=family,
        grid=ModelGrid((grid, grid, grid), 192.0 / grid, (0.0, -18.0, 8.0)),
        text_encoder={"id": "tiny-hash", "dim": TEXT_DIM, "max_tokens": TEXT_TOKENS},
        denoiser=default_denoiser_config(family, TEXT_DIM, size),
        autoencoder=default_autoencoder_config(size) if family == "latent" else None,
        schedule={"kind": "rflow", "default_steps": 30, "default_guidance": GUIDANCE, "base_numel": BASE_NUMEL},
        name="benchmark model", description="Random weights; for timing only.",
    )
    torch.manual_seed(SEED)
    den = build_denoiser(spec.denoiser)
    ae = build_autoencoder(spec.autoencoder) if spec.autoencoder else None
    # MONAI zero-initialises output projections (last conv, attention proj_out, the
    # second conv of each ResNet block); fill those so the velocity is not identically 0
    # and the ours-vs-MONAI comparison means something.
    with torch.no_grad():
        for p in den.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0.0, 0.02)
    model = DiffusionModel(spec, den, ae)
    enc = load_text_encoder("tiny-hash", dim=TEXT_DIM, max_tokens=TEXT_TOKENS)
    return model, enc


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _warm_up(model, device: "Any") -> None:
    """One small untimed denoiser call (library start-up, not shape-specific kernels)."""
    import torch

    den = model.denoiser.to(device)
    m = den.spatial_multiple
    c = den.config
    x = torch.zeros(1, c["in_channels"], m, m, m, device=device)
    with torch.inference_mode():
        den(x, torch.ones(1, device=device), torch.zeros(1, TEXT_TOKENS, c["cross_attention_dim"], device=device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sync(device: "Any") -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _shift_of_grid(grid: "Any", steps: int) -> float:
    """Resolution-shift ratio r implied by a grid: invert t' = r·t / (1 + (r−1)·t) at the 1st interior point."""
    if steps < 2:
        return 1.0
    t = 1.0 - 1.0 / steps
    tp = float(grid[1])
    return tp * (1.0 - t) / (t * (1.0 - tp))


def _compute_dtype(device: "Any", precision: str) -> str:
    """What the convolutions run in: the pipeline's autocast rule, and cuDNN's TF32 switch for fp32."""
    import torch

    from CounterfactualGenLib.pipeline import bf16_conv3d_ok

    if device.type != "cuda":
        return "fp32"
    if precision in ("auto", "bf16") and bf16_conv3d_ok(device):
        return "bf16"
    return "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"


def child_ours(cfg: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch

    from CounterfactualGenLib.nets.unet import count_flops
    from CounterfactualGenLib.pipeline import OUTPUT_SCALE, _timesteps, generate_series, select_device

    dev = select_device(cfg["device"])
    model, enc = build_model(cfg["family"], cfg["grid"], cfg["size"])
    n = len(PROMPTS)
    shape = model.diffusion_shape(2 * n)  # doubled batch: classifier-free guidance
    den_cfg = model.denoiser.config
    x = torch.zeros(shape)
    flops = count_flops(model.denoiser, (x, torch.ones(2 * n), torch.zeros(2 * n, TEXT_TOKENS, den_cfg["cross_attention_dim"])))
    dec_flops = None
    if model.autoencoder is not None:
        class _Decode(torch.nn.Module):
            def __init__(self, ae):
                super().__init__()
                self.ae = ae

            def forward(self, z):
                return self.ae.decode(z)

        try:
            dec_flops = count_flops(_Decode(model.autoencoder), (torch.zeros(model.diffusion_shape(n)),))
        except Exception:  # counting is informative only
            dec_flops = None
    grid = _timesteps(model, cfg["steps"])
    _warm_up(model, dev)
    rss_before = _peak_rss_mb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    def on_event(ev: dict) -> None:
        # generate_series times stages on the host; make the sample stage include the GPU work.
        if dev.type == "cuda" and ev.get("stage") == "sample" and ev.get("step") == ev.get("total"):
            torch.cuda.synchronize(dev)

    t0 = time.perf_counter()
    series = generate_series(model, enc, list(PROMPTS), seed=SEED, steps=cfg["steps"], guidance=GUIDANCE,
                             device=str(dev), precision=cfg["precision"], on_event=on_event)
    total = time.perf_counter() - t0
    peak_mb = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else _peak_rss_mb()
    vols = np.stack([v.array / (OUTPUT_SCALE / 2.0) - 1.0 for v in series.volumes]).astype(np.float32)
    np.save(cfg["out_npy"], vols)
    params_den = sum(p.numel() for p in model.denoiser.parameters())
    params_ae = sum(p.numel() for p in model.autoencoder.parameters()) if model.autoencoder is not None else 0
    return {
        "timings_s": series.timings_s, "total_s": total, "peak_mb": peak_mb,
        "peak_kind": "cuda.max_memory_allocated" if dev.type == "cuda" else "ru_maxrss (whole process)",
        "rss_before_sampling_mb": rss_before, "flops_per_call": flops, "decode_flops": dec_flops,
        "calls": cfg["steps"], "batch_per_call": 2 * n, "diffusion_shape": list(shape),
        "params_denoiser": params_den, "params_autoencoder": params_ae,
        "shift_ratio": _shift_of_grid(grid, cfg["steps"]), "grid_t": [float(g) for g in grid],
        "device": series.device, "threads": torch.get_num_threads(), "compute_dtype": _compute_dtype(dev, cfg["precision"]),
    }


def child_monai(cfg: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch
    from monai.networks.schedulers import RFlowScheduler

    from CounterfactualGenLib.pipeline import _autocast, select_device

    dev = select_device(cfg["device"])
    model, enc = build_model(cfg["family"], cfg["grid"], cfg["size"])
    model.to(dev)
    n, steps = len(PROMPTS), cfg["steps"]
    unet = model.denoiser.unet  # the MONAI DiffusionModelUNet inside our Denoiser
    T = float(model.denoiser.config["timestep_scale"])
    cond = enc.encode(list(PROMPTS)).tokens.to(dev)
    null = enc.null(1).tokens.to(dev)
    context = torch.cat([null.expand(n, -1, -1), cond])  # [null; cond], the doubled CFG batch
    gen = torch.Generator(device="cpu").manual_seed(SEED)
    noise = torch.randn(model.diffusion_shape(1), generator=gen, dtype=torch.float32)
    image = noise.expand(n, *noise.shape[1:]).contiguous().to(dev)

    spatial_numel = int(np.prod(model.diffusion_shape(1)[2:]))
    # Give MONAI the shift our pipeline uses (so the loops are comparable), or MONAI's own
    # convention (D·H·W of the diffused volume).
    numel = cfg["monai_numel"] if cfg["monai_numel"] is not None else spatial_numel
    sched = RFlowScheduler(num_train_timesteps=int(T), use_discrete_timesteps=False, sample_method="uniform",
                           use_timestep_transform=True, base_img_size_numel=BASE_NUMEL, spatial_dim=3)
    _warm_up(model, dev)
    rss_before = _peak_rss_mb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    t0 = time.perf_counter()
    with torch.inference_mode():
        sched.set_timesteps(num_inference_steps=steps, device=dev, input_img_size_numel=numel)
        all_next = torch.cat((sched.timesteps[1:], torch.tensor([0], dtype=sched.timesteps.dtype, device=dev)))
        for t, next_t in zip(sched.timesteps, all_next):  # DiffusionInferer.sample's loop, cfg branch
            with _autocast(dev, cfg["precision"]):
                out = unet(torch.cat([image] * 2, dim=0), timesteps=torch.Tensor((t,)).to(dev), context=context)
            out_uncond, out_cond = out.float().chunk(2)
            v = out_uncond + GUIDANCE * (out_cond - out_uncond)
            image, _ = sched.step(v, t, image, next_t)
        _sync(dev)
    sample_s = time.perf_counter() - t0
    peak_mb = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else _peak_rss_mb()
    t0 = time.perf_counter()
    with torch.inference_mode():
        img = model.decode(image).float().cpu().numpy()
    decode_s = time.perf_counter() - t0
    np.save(cfg["out_npy"], img[:, 0].astype(np.float32))
    grid_t = [float(v) / T for v in sched.timesteps.float().cpu()] + [0.0]
    return {
        "sample_s": sample_s, "decode_s": decode_s, "peak_mb": peak_mb, "rss_before_sampling_mb": rss_before,
        "input_img_size_numel": numel, "spatial_numel": spatial_numel,
        "shift_ratio": (numel / BASE_NUMEL) ** (1.0 / 3.0), "grid_t": grid_t,
        "loop": "explicit DiffusionInferer.sample loop (cfg branch) with RFlowScheduler",
    }


def run_child(role: str, cfg: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as fh:
        result_path = fh.name
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", role, "--_config",
           json.dumps({**cfg, "result": result_path})]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    try:
        proc = subprocess.run(cmd, env=env, timeout=timeout_s, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    try:
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
        return json.loads(Path(result_path).read_text())
    finally:
        Path(result_path).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------
# parent: loop over configs, compare, print
# ---------------------------------------------------------------------------------
def _fmt(v: Any, spec: str = ".2f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return format(v, spec)


def run_config(args: argparse.Namespace, family: str, grid: int, work: Path, peak: dict[str, float]) -> dict[str, Any]:
    import numpy as np

    base = {"family": family, "grid": grid, "size": args.size, "steps": args.steps, "device": args.device,
            "precision": args.precision, "threads": args.threads}
    row: dict[str, Any] = {**base, "load_avg_before": load_avg()}
    ours_npy, ref_npy = work / f"ours-{family}-{grid}.npy", work / f"monai-{family}-{grid}.npy"
    best_ours = best_ref = None
    for rep in range(args.repeats):
        ours = run_child("ours", {**base, "out_npy": str(ours_npy)}, args.timeout)
        if "error" in ours:
            row["error"] = "ours: " + ours["error"]
            return row
        if best_ours is None or ours["timings_s"]["sample"] < best_ours["timings_s"]["sample"]:
            best_ours = ours
        if args.skip_monai:
            continue
        numel = None if args.monai_shift == "spatial" else ours["shift_ratio"] ** 3 * BASE_NUMEL
        ref = run_child("monai", {**base, "out_npy": str(ref_npy), "monai_numel": numel}, args.timeout)
        if "error" in ref:
            row["monai_error"] = ref["error"]
            break
        if best_ref is None or ref["sample_s"] < best_ref["sample_s"]:
            best_ref = ref
    row["load_avg_after"] = load_avg()
    row["ours"] = best_ours
    o = best_ours
    sample_s = o["timings_s"]["sample"]
    achieved = o["flops_per_call"] * o["calls"] / sample_s / 1e9
    peak_key = o["compute_dtype"]
    row.update({
        "params_m": (o["params_denoiser"] / 1e6, o["params_autoencoder"] / 1e6),
        "gflop_per_call": o["flops_per_call"] / 1e9, "sample_s": sample_s, "decode_s": o["timings_s"]["decode"],
        "encode_text_s": o["timings_s"].get("encode_text"), "total_s": o["total_s"], "peak_mb": o["peak_mb"],
        "achieved_gflops": achieved, "peak_key": peak_key, "peak_gflops": peak.get(peak_key),
        "pct_of_peak": 100.0 * achieved / peak[peak_key] if peak.get(peak_key) else None,
    })
    if best_ref is not None:
        a, b = np.load(ours_npy), np.load(ref_npy)
        diff = float(np.abs(a - b).max())
        row.update({
            "monai": best_ref, "monai_sample_s": best_ref["sample_s"], "ours_over_monai": sample_s / best_ref["sample_s"],
            "max_abs_diff": diff, "rel_diff": diff / max(float(np.abs(b).max()), 1e-12),
            "grid_max_abs_diff": float(np.abs(np.asarray(o["grid_t"]) - np.asarray(best_ref["grid_t"])).max()),
        })
    for p in (ours_npy, ref_npy):
        p.unlink(missing_ok=True)
    return row


COLUMNS = ["device", "family", "grid", "size", "params M", "steps", "GFLOP/call", "sample s", "decode s", "total s",
           "peak MB", "achieved GFLOP/s", "% of measured peak", "MONAI s", "ours/MONAI", "max|Δ| (rel)", "load1"]


def table_row(r: dict[str, Any]) -> list[str]:
    head = [r["device"], r["family"], f"{r['grid']}³", r["size"]]
    if "error" in r:
        return head + ["–", str(r["steps"])] + [r["error"]] + ["–"] * (len(COLUMNS) - 7)
    den_m, ae_m = r["params_m"]
    params = f"{den_m:.2f}" + (f"+{ae_m:.2f}" if ae_m else "")
    monai_s = _fmt(r.get("monai_sample_s")) if "monai_error" not in r else "err"
    rel = f"{r['max_abs_diff']:.2g} ({r['rel_diff']:.1g})" if "max_abs_diff" in r else "–"
    return head + [params, str(r["steps"]), _fmt(r["gflop_per_call"], ".1f"), _fmt(r["sample_s"]), _fmt(r["decode_s"]),
                   _fmt(r["total_s"]), _fmt(r["peak_mb"], ".0f"), _fmt(r["achieved_gflops"], ".1f"),
                   _fmt(r["pct_of_peak"], ".1f"), monai_s, _fmt(r.get("ours_over_monai")), rel,
                   _fmt((r["load_avg_before"] or [None])[0], ".1f")]


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(table_row(r)) + " |" for r in rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--size", choices=["tiny", "small", "base"], default="small", help="denoiser/autoencoder preset")
    p.add_argument("--grids", type=int, nargs="+", default=[64, 128], help="image grid side lengths (voxels)")
    p.add_argument("--families", nargs="+", choices=["wdm", "latent"], default=["wdm", "latent"])
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default 10 on CPU, 30 on GPU)")
    p.add_argument("--precision", choices=["fp32", "auto", "bf16"], default="fp32",
                   help="our pipeline's precision; the MONAI loop runs under the same autocast (GPU only)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=1, help="runs per config (alternating ours/MONAI); best time kept")
    p.add_argument("--monai-shift", choices=["pipeline", "spatial"], default="pipeline",
                   help="resolution shift given to RFlowScheduler: the one our pipeline's grid implies (default, "
                        "loops comparable) or MONAI's convention D·H·W of the diffused volume")
    p.add_argument("--skip-monai", action="store_true", help="only time our pipeline")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per subprocess")
    p.add_argument("--json", type=Path, default=None, help="write raw results here")
    p.add_argument("--_child", choices=["ours", "monai"], help=argparse.SUPPRESS)
    p.add_argument("--_config", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 10 if args.device == "cpu" else 30
    return args


def child_main(args: argparse.Namespace) -> int:
    import torch

    cfg = json.loads(args._config)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    result = child_ours(cfg) if args._child == "ours" else child_monai(cfg)
    Path(cfg["result"]).write_text(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._child:
        return child_main(args)

    import monai
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available here; run with --device cpu.", file=sys.stderr)
        return 2
    cmdline = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__), *(argv or sys.argv[1:])])
    info = {
        "command": cmdline, "torch": torch.__version__, "monai": monai.__version__, "python": platform.python_version(),
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "load_avg_start": load_avg(), "steps": args.steps, "guidance": GUIDANCE, "prompts": list(PROMPTS),
        "precision": args.precision,
    }
    print(f"$ {cmdline}")
    print(f"torch {info['torch']}, MONAI {info['monai']}, Python {info['python']}; CPU: {info['cpu']} "
          f"({info['cpu_count']} logical cores), torch threads {info['torch_threads']}"
          + (f"; GPU: {info['gpu']}" if info["gpu"] else ""))
    print(f"load average (1/5/15 min) at start: {info['load_avg_start']}")
    print(f"{len(PROMPTS)} prompts from one noise, guidance {GUIDANCE} (doubled batch {2 * len(PROMPTS)}), "
          f"{args.steps} steps, precision {args.precision}, RANDOM weights, text encoder tiny-hash "
          f"(dim {TEXT_DIM}, {TEXT_TOKENS} tokens; a real encoder's cost is not included).", flush=True)

    peak = measure_matmul_peak(args.device if args.device == "cpu" else "cuda:0")
    info["measured_peak_gflops_start"] = peak
    print("measured matmul peak (GFLOP/s, this run): " + ", ".join(f"{k} {v:.0f}" for k, v in peak.items()), flush=True)

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cfg-bench-") as tmp:
        for family in args.families:
            for grid in args.grids:
                t0 = time.perf_counter()
                r = run_config(args, family, grid, Path(tmp), peak)
                r["bench_wall_s"] = time.perf_counter() - t0
                rows.append(r)
                print(f"  done {family} {grid}³ in {r['bench_wall_s']:.0f} s"
                      + (f" — {r['error']}" if "error" in r else ""), flush=True)

    peak_end = measure_matmul_peak(args.device if args.device == "cpu" else "cuda:0")
    info["measured_peak_gflops_end"] = peak_end
    info["load_avg_end"] = load_avg()
    print()
    print(markdown(rows))
    print()
    key = rows[0].get("peak_key", "fp32") if rows else "fp32"
    print("Notes:")
    print(f"- steps = {args.steps} network calls per series, each on a batch of {2 * len(PROMPTS)} "
          "(3 prompts × [null; cond]); GFLOP/call counted by torch.utils.flop_counter on that shape.")
    print(f"- % of measured peak: achieved = GFLOP/call × calls / sample s, against a {key} matmul peak MEASURED in "
          f"this run ({peak.get(key, float('nan')):.0f} GFLOP/s at start, {peak_end.get(key, float('nan')):.0f} "
          "at end), not a spec-sheet number.")
    print("- sample/decode s: generate_series' own stage timings; total s: wall time of the generate_series call "
          "(includes tiny-hash text encoding, ~ms). Decode = inverse Haar DWT (wdm) or the VAE decoder (latent).")
    if args.device == "cpu":
        print("- peak MB: ru_maxrss of a fresh subprocess per config (whole process: Python, torch, weights, "
              "activations), read right after generate_series; before sampling (after build + warm-up) it was: "
              + ", ".join(f"{r['family']} {r['grid']}³ {r['ours']['rss_before_sampling_mb']:.0f} MB"
                          for r in rows if r.get("ours")) + ".")
    else:
        print("- peak MB: torch.cuda.max_memory_allocated during generate_series (excludes the CUDA context).")
    if not args.skip_monai:
        print("- MONAI s: same DiffusionModelUNet object, same noise/context/steps/CFG batch, RFlowScheduler "
              "(float16 timesteps) in DiffusionInferer.sample's loop written out (its cfg= option uses a constant "
              "fill value, not a null-prompt embedding); its own subprocess; sampling only. ours/MONAI = sample s ratio.")
        print(f"- max|Δ| (rel): largest voxel difference of the decoded series, model units ([-1, 1] nominal), and "
              f"that over max|MONAI output|; RFlowScheduler shift given: {args.monai_shift}.")
        for r in rows:
            if "monai" in r and r["monai"]:
                spatial_r = (r["monai"]["spatial_numel"] / BASE_NUMEL) ** (1 / 3)
                print(f"  {r['family']} {r['grid']}³: shift ours r={r['ours']['shift_ratio']:.3f}, "
                      f"MONAI r={r['monai']['shift_ratio']:.3f} (MONAI convention D·H·W would give {spatial_r:.3f}); "
                      f"max |t_ours − t_MONAI| on the grid = {r['grid_max_abs_diff']:.2g}")
            if "monai_error" in r:
                print(f"  {r['family']} {r['grid']}³: MONAI reference failed: {r['monai_error']}")
    print(f"- load average at end: {info['load_avg_end']} (shared machine: timings are noisy).")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"info": info, "results": rows}, indent=2, default=str))
        print(f"raw results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
