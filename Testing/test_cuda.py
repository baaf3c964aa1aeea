"""CUDA paths: CPU/GPU parity of generation (fp32 and bf16 autocast), the oracle, and training.

Skipped where no GPU is present (CI). On a GPU machine run ``python -m pytest Testing/test_cuda.py -s``;
the bundled model needs its text encoder there: MiniLM's weights, or the embedding table
``Training/embed_prompts.py`` writes (``CFG_PROMPT_TABLE=.gpu/prompts.safetensors``).
``CFG_TEST_DEVICE=cpu`` runs the same comparisons CPU against CPU, to check the tests themselves.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEVICE = os.environ.get("CFG_TEST_DEVICE") or ("cuda:0" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="needs a CUDA GPU (or CFG_TEST_DEVICE)")
PROMPTS = ["Subject has no lesions.", "Subject has high lesion load."]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


@pytest.fixture(scope="module")
def bundled():
    from CounterfactualGenLib.models import load_model, resolve_model
    from CounterfactualGenLib.text.encoders import load_text_encoder

    model = load_model(resolve_model("cfg-wdm-flair-5mm-cpu"))
    te = model.spec.text_encoder
    try:
        encoder = load_text_encoder(te["id"], path=os.environ.get("CFG_PROMPT_TABLE"), max_tokens=te["max_tokens"])
    except Exception as e:  # MiniLM not installed and no table given
        pytest.skip(f"the bundled model's text encoder is not available here: {e}")
    return model, encoder


def _series(bundled, device: str, precision: str) -> np.ndarray:
    from CounterfactualGenLib.pipeline import generate_series

    model, encoder = bundled
    s = generate_series(model, encoder, PROMPTS, seed=3, steps=6, device=device, precision=precision)
    assert s.device.startswith(device.split(":")[0])
    return np.stack([v.array for v in s.volumes]).astype(np.float64)


def test_bf16_conv3d_parity_check_passes_on_this_gpu():
    """The guard against PyTorch 2.9.0's bf16 conv3d bug lets bf16 through on a sound build."""
    from CounterfactualGenLib.pipeline import bf16_conv3d_ok

    if not DEVICE.startswith("cuda"):
        assert bf16_conv3d_ok(torch.device(DEVICE)) is False  # never bf16 on CPU
        return
    assert bf16_conv3d_ok(torch.device(DEVICE)) is True, torch.__version__


def test_generation_on_gpu_matches_cpu(bundled):
    """The same seed gives the same series on the GPU as on the CPU: the noise is drawn on the CPU.

    fp32 differs only by TF32 convolutions and summation order; bf16 autocast by its 8-bit mantissa.
    """
    ref = _series(bundled, "cpu", "fp32")
    fp32 = _series(bundled, DEVICE, "fp32")
    bf16 = _series(bundled, DEVICE, "auto")
    r32, r16 = _rel(fp32, ref), _rel(bf16, ref)
    print(f"\nseries vs CPU fp32, relative L2: {DEVICE} fp32 {r32:.2e}, auto (bf16 on a GPU) {r16:.2e}")
    assert r32 < 2e-2 and r16 < 8e-2
    # the two members still differ the way they do on the CPU (the edit survives the precision)
    d_ref, d16 = ref[1] - ref[0], bf16[1] - bf16[0]
    corr = float(np.corrcoef(d_ref.ravel(), d16.ravel())[0, 1])
    print(f"high-minus-none difference map, correlation with CPU fp32: {corr:.3f}")
    assert corr > 0.9


def test_oracle_on_gpu_matches_cpu():
    from CounterfactualGenLib.evaluation.oracle import load_oracle, resolve_oracle, to_model_units
    from CounterfactualGenLib.synth import make_subject, random_spec

    oracle = load_oracle(resolve_oracle(None))
    g = oracle.grid
    subj = make_subject(random_spec(5, lesion_class="high", diagnosis="AD"), shape=tuple(g.shape),
                        spacing_mm=g.spacing_mm, center_mm=tuple(g.center_ras))
    x = to_model_units(subj.image.array, subj.brain_mask)
    a, b = oracle.predict(x, device="cpu"), oracle.predict(x, device=DEVICE)
    print(f"\noracle lesion ml: cpu {a['lesion_ml'][0]:.3f}, {DEVICE} {b['lesion_ml'][0]:.3f}; diagnosis {a['diagnosis']} / {b['diagnosis']}")
    assert a["diagnosis"] == b["diagnosis"]
    assert math.isclose(float(a["lesion_ml"][0]), float(b["lesion_ml"][0]), rel_tol=2e-2, abs_tol=0.05)


def test_training_runs_on_the_gpu(tmp_path):
    """train_diffusion on the device (under bf16 autocast on a GPU): finite loss, a loadable model
    whose weights are finite, and a record of the hardware that trained it."""
    import csv
    import sys

    sys.path.insert(0, str(ROOT / "Training"))
    try:
        import train_diffusion as td
    finally:
        sys.path.pop(0)
    from CounterfactualGenLib.models import load_model

    cfg = dict(td.DEFAULTS)
    cfg.update({"id": "cuda-train-test", "grid": {"shape": [16, 16, 16], "spacing_mm": 10.0, "center_ras": [0.0, -18.0, 8.0]},
                "text_encoder": {"id": "tiny-hash", "dim": 32, "max_tokens": 16},
                "data": {"kind": "synthetic", "pool_size": 4, "pool_workers": 1, "paraphrase_prob": 0.5},
                "batch_size": 2, "iterations": 3, "checkpoint_every": 3, "sample_every": 0, "log_every": 1,
                "ema_start": 0, "lesion_weight": 4.0, "lesion_prior_weight": 2.0})
    folder = td.train(cfg, tmp_path / "run")
    m = load_model(folder)
    assert m.spec.training["iterations"] == 3
    want = "CPU" if not DEVICE.startswith("cuda") else torch.cuda.get_device_name(torch.device(DEVICE))
    assert want in m.spec.training["hardware"], m.spec.training["hardware"]
    assert all(torch.isfinite(v.float()).all() for v in m.denoiser.state_dict().values() if v.is_floating_point())
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    assert len(rows) == 3 and all(math.isfinite(float(r["loss"])) for r in rows)
