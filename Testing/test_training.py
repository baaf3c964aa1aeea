"""Training script: single process with resume, and torchrun DDP with 2 CPU (gloo) processes."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "id": "tiny-train-test",
    "family": "wdm",
    "size": "tiny",
    "grid": {"shape": [16, 16, 16], "spacing_mm": 10.0, "center_ras": [0.0, -18.0, 8.0]},
    "text_encoder": {"id": "tiny-hash", "dim": 32, "max_tokens": 16},
    "data": {"kind": "synthetic", "pool_size": 4, "pool_workers": 1, "paraphrase_prob": 0.5},
    "schedule": {"kind": "rflow", "default_steps": 3, "default_guidance": 2.0, "base_numel": 32768},
    "batch_size": 2,
    "iterations": 2,
    "checkpoint_every": 1,
    "sample_every": 0,
    "log_every": 1,
    "ema_start": 0,
    "weights_dtype": None,
}


def _run(args, cwd, env_extra=None, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.update(env_extra or {})
    p = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


def test_train_writes_a_loadable_model_and_resumes(tmp_path, config):
    out = tmp_path / "run"
    script = str(ROOT / "Training" / "train_diffusion.py")
    _run([sys.executable, script, "--config", str(config), "--out", str(out)], tmp_path)
    from CounterfactualGenLib.models import load_model

    m = load_model(out / "model")
    assert m.spec.training["iterations"] == 2 and m.spec.template.get("image")
    assert (out / "model" / "MODEL_CARD.md").read_text().startswith("# ")
    assert m.template("brain_mask").array.max() == 1.0
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert [r["step"] for r in rows] == ["1", "2"]
    # resume: continue to 4 iterations from the checkpoint at 2
    _run([sys.executable, script, "--config", str(config), "--out", str(out), "--resume", "--set", "iterations=4"],
         tmp_path)
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    seconds = [float(r["seconds"]) for r in rows]
    assert seconds == sorted(seconds) and seconds[2] >= seconds[1] > 0  # the resumed run's time counts on
    assert load_model(out / "model").spec.training["iterations"] == 4
    # resuming at the checkpoint's own step writes its model without training (how a stopped run is exported)
    (out / "model" / "model.json").unlink()
    _run([sys.executable, script, "--config", str(config), "--out", str(out), "--resume", "--set", "iterations=4"],
         tmp_path)
    assert [r["step"] for r in csv.DictReader((out / "log.csv").open())] == ["1", "2", "3", "4"]
    assert load_model(out / "model").spec.training["iterations"] == 4


def test_torchrun_ddp_two_cpu_processes(tmp_path, config):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    out = tmp_path / "ddp"
    p = _run([torchrun, "--standalone", "--nproc_per_node=2", str(ROOT / "Training" / "train_diffusion.py"),
              "--config", str(config), "--out", str(out)], tmp_path)
    from CounterfactualGenLib.models import load_model

    m = load_model(out / "model")
    assert m.spec.training["world_size"] == 2
    assert "Wrote model" in p.stderr


def test_latent_family_autoencoder_then_diffusion(tmp_path, config):
    ae_cfg = tmp_path / "ae.json"
    ae_cfg.write_text(json.dumps({"size": "tiny", "grid": TINY["grid"], "data": TINY["data"], "iterations": 2,
                                  "batch_size": 2, "log_every": 1}))
    _run([sys.executable, str(ROOT / "Training" / "train_autoencoder.py"), "--config", str(ae_cfg),
          "--out", str(tmp_path / "ae")], tmp_path)
    assert (tmp_path / "ae" / "autoencoder" / "autoencoder.safetensors").exists()
    again = subprocess.run([sys.executable, str(ROOT / "Training" / "train_autoencoder.py"), "--config", str(ae_cfg),
                            "--out", str(tmp_path / "ae")], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    assert again.returncode == 2 and "already holds a trained autoencoder" in again.stderr
    _run([sys.executable, str(ROOT / "Training" / "train_diffusion.py"), "--config", str(config),
          "--out", str(tmp_path / "ldm"), "--set", 'family="latent"',
          "--set", f'autoencoder_path="{tmp_path / "ae" / "autoencoder"}"'], tmp_path)
    from CounterfactualGenLib.models import load_model

    m = load_model(tmp_path / "ldm" / "model")
    assert m.spec.family == "latent" and m.autoencoder is not None
    assert m.diffusion_shape(1) == (1, 4, 4, 4, 4)
    assert any(f["role"] == "autoencoder" for f in m.spec.files)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "Training" / "configs").glob("wdm_*.json")))
def test_shipped_diffusion_configs_build(name):
    """Every shipped diffusion config is valid: known keys only, and its model builds."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_diffusion_cfg", ROOT / "Training" / "train_diffusion.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = json.loads((ROOT / "Training" / "configs" / name).read_text())
    assert set(cfg) <= set(mod.DEFAULTS), set(cfg) - set(mod.DEFAULTS)
    cwd = os.getcwd()
    try:  # paths in configs (anchor models) are relative to the repository root
        os.chdir(ROOT)
        mod.check_config({**mod.DEFAULTS, **cfg})  # every nested key, the schedule, the data source
    finally:
        os.chdir(cwd)
    model = mod.build_model({**mod.DEFAULTS, **cfg}, 384)  # MiniLM width
    assert model.spec.grid.shape == tuple(cfg["grid"]["shape"])
    assert model.diffusion_shape(1)[2:] == tuple(s // 2 for s in cfg["grid"]["shape"])
    # what it trains must fit the extension's model budget: 60 MiB of fp16 weights
    assert model.parameter_count() * 2 <= 60 * 2**20


def _train_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_diffusion_mod", ROOT / "Training" / "train_diffusion.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_lesion_weights_mark_lesion_neighbourhoods_of_active_samples_only():
    import torch

    td = _train_module()
    lesions = torch.zeros(3, 1, 16, 16, 16, dtype=torch.uint8)
    lesions[0, 0, 4:6, 4:6, 4:6] = 1
    lesions[1, 0, 8, 8, 8] = 1
    active = torch.tensor([True, False, True])
    w = td.lesion_weights(lesions, active, (8, 8, 8), 4.0)
    assert w.shape == (3, 1, 8, 8, 8)
    assert w[0, 0, 2, 2, 2] == 5.0 and w[0, 0, 1, 1, 1] == 5.0  # the lesion cell and its one-cell neighbourhood
    assert w[0, 0, 6, 6, 6] == 1.0
    assert torch.all(w[1] == 1.0)  # prompt without a lesion clause (or condition dropped): plain loss
    assert torch.all(w[2] == 1.0)  # no lesions
    assert td.lesion_weights(lesions, active, (8, 8, 8), 0.0) is None
    assert td.lesion_weights(lesions, torch.zeros(3, dtype=torch.bool), (8, 8, 8), 4.0) is None
    prior = torch.zeros(1, 1, 16, 16, 16)
    prior[..., 12:14, 12:14, 12:14] = 1
    wp = td.lesion_weights(lesions, active, (8, 8, 8), 4.0, prior, 2.0)
    assert wp[2, 0, 6, 6, 6] == 3.0 and wp[2, 0, 0, 0, 0] == 1.0  # the prior region, also without own lesions
    assert wp[0, 0, 2, 2, 2] == 5.0 and torch.all(wp[1] == 1.0)  # max(lesion, prior); inactive stays plain
    assert td.lesion_weights(lesions, active, (8, 8, 8), 0.0, prior, 2.0) is not None
    pred, target = torch.randn(3, 2, 8, 8, 8), torch.randn(3, 2, 8, 8, 8)
    torch.testing.assert_close(td.weighted_mse(pred, target, torch.ones(3, 1, 8, 8, 8)),
                               torch.nn.functional.mse_loss(pred, target))


def test_fine_tuning_from_another_run_with_lesion_weighting(tmp_path, config):
    script = str(ROOT / "Training" / "train_diffusion.py")
    _run([sys.executable, script, "--config", str(config), "--out", str(tmp_path / "a")], tmp_path)
    _run([sys.executable, script, "--config", str(config), "--out", str(tmp_path / "b"), "--set", "lesion_weight=4",
          "--set", f'init_from="{tmp_path / "a"}"', "--set", "iterations=4"], tmp_path)
    from CounterfactualGenLib.models import load_model

    t = load_model(tmp_path / "b" / "model").spec.training
    assert t["iterations"] == 4 and t["init_from"]["step"] == 2 and t["config"]["lesion_weight"] == 4
    assert [r["step"] for r in csv.DictReader((tmp_path / "b" / "log.csv").open())] == ["3", "4"]
    card = (tmp_path / "b" / "model" / "MODEL_CARD.md").read_text()
    assert "started from" in card and "at iteration 2" in card
    p = subprocess.run([sys.executable, script, "--config", str(config), "--out", str(tmp_path / "c"),
                        "--set", f'init_from="{tmp_path / "nowhere"}"'], cwd=tmp_path, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"), timeout=600)
    assert p.returncode != 0 and "has no checkpoint" in p.stderr
    # a stage may also start from an installed model folder (weights only, fresh optimiser): the chain is kept
    _run([sys.executable, script, "--config", str(config), "--out", str(tmp_path / "d"),
          "--set", f'init_from="{tmp_path / "b" / "model"}"', "--set", "iterations=6"], tmp_path)
    t = load_model(tmp_path / "d" / "model").spec.training
    assert t["iterations"] == 6 and t["init_from"]["model_folder"] and t["init_from"]["step"] == 4
    assert t["init_from"]["init_from"]["step"] == 2  # the stage before that one
    assert [r["step"] for r in csv.DictReader((tmp_path / "d" / "log.csv").open())] == ["5", "6"]
    card = (tmp_path / "d" / "model" / "MODEL_CARD.md").read_text()
    assert "model folder" in card and "at iteration 4" in card and "at iteration 2" in card
    reproduce = next(ln for ln in card.splitlines() if ln.startswith("Reproduce: "))
    assert reproduce.count("train_diffusion.py") == 3  # every stage, the model-folder one included
    assert f"install it to `{tmp_path / 'b' / 'model'}`" in reproduce
    # a stage may start from an averaged model (Training/average_models.py): its card says so
    _run([sys.executable, str(ROOT / "Training" / "average_models.py"), str(tmp_path / "b" / "model"),
          str(tmp_path / "d" / "model"), "--out", str(tmp_path / "soup")], tmp_path)
    _run([sys.executable, script, "--config", str(config), "--out", str(tmp_path / "e"),
          "--set", f'init_from="{tmp_path / "soup"}"', "--set", "iterations=8"], tmp_path)
    t = load_model(tmp_path / "e" / "model").spec.training
    assert [a["weight"] for a in t["init_from"]["averaged_from"]] == [0.5, 0.5]
    card = (tmp_path / "e" / "model" / "MODEL_CARD.md").read_text()
    assert "its weights are the mean of 2 models" in card and "average_models.py" in card


def test_average_models_writes_the_weighted_mean_and_refuses_other_layouts(tmp_path):
    sys.path.insert(0, str(ROOT / "Training"))
    sys.path.insert(0, str(ROOT / "Testing"))
    import average_models
    import torch
    from tiny_model import build_tiny_model

    from CounterfactualGenLib.errors import InputError, ModelError
    from CounterfactualGenLib.models import load_model

    a = build_tiny_model(tmp_path / "a", seed=0)
    b = build_tiny_model(tmp_path / "b", seed=1)
    out = average_models.average_models([a, b], tmp_path / "soup", weights=[0.25, 0.75])
    m, ma, mb = load_model(out), load_model(a), load_model(b)
    sa, sb, sm = ma.denoiser.state_dict(), mb.denoiser.state_dict(), m.denoiser.state_dict()
    k = next(k for k in sa if sa[k].is_floating_point() and not torch.equal(sa[k], sb[k]))
    assert torch.allclose(sm[k], 0.25 * sa[k] + 0.75 * sb[k], atol=1e-6)
    assert not torch.equal(sm[k], sa[k]) and not torch.equal(sm[k], sb[k])
    src = m.spec.training["averaged_from"]
    assert [s["weight"] for s in src] == [0.25, 0.75] and src[0]["folder"] == str(a)
    card = (out / "MODEL_CARD.md").read_text()
    assert "| weights | element-wise mean of 0.25" in card and "average_models.py" in card
    # the inputs are untouched
    assert torch.equal(load_model(a).denoiser.state_dict()[k], sa[k])
    # bad weights and other layouts are refused, and nothing is written
    with pytest.raises(InputError, match="already exists"):
        average_models.average_models([a, b], out)
    with pytest.raises(InputError, match="sum to 1"):
        average_models.average_models([a, b], tmp_path / "bad1", weights=[0.5, 0.6])
    other = build_tiny_model(tmp_path / "c", seed=2, shape=(16, 16, 24))
    with pytest.raises(ModelError, match="grid"):
        average_models.average_models([a, other], tmp_path / "bad2")
    assert not (tmp_path / "bad1").exists() and not (tmp_path / "bad2").exists()
    assert average_models.main([str(a), str(other), "--out", str(tmp_path / "bad3")]) == 2


def test_pool_prompt_set_holds_every_training_prompt():
    import random

    mod = _train_module()
    prompts = set(mod.pool_prompt_set())
    rng = random.Random(0)
    cfg = {"data": {"paraphrase_prob": 0.5, "both_clauses_prob": 0.3}}
    drawn = {mod.pool_prompt(rng.choice(["none", "minimal", "moderate", "high"]), rng.choice(["CN", "MCI", "AD"]),
                             rng, cfg)[0] for _ in range(5000)}
    assert drawn <= prompts and len(drawn) > 0.8 * len(prompts)


def test_training_from_an_embedding_table_gives_the_same_model(tmp_path, config):
    """Training with a precomputed table (a GPU machine without the encoder) = training with the encoder."""
    import torch

    table = tmp_path / "prompts.safetensors"
    _run([sys.executable, str(ROOT / "Training" / "embed_prompts.py"), "--config", str(config), "--out", str(table)],
         tmp_path)
    te = json.dumps({**TINY["text_encoder"], "path": str(table)})
    script = str(ROOT / "Training" / "train_diffusion.py")
    _run([sys.executable, script, "--config", str(config), "--out", str(tmp_path / "enc")], tmp_path)
    _run([sys.executable, script, "--config", str(config), "--out", str(tmp_path / "tab"), "--set", f"text_encoder={te}"],
         tmp_path)
    from CounterfactualGenLib.models import load_model

    a, b = load_model(tmp_path / "enc" / "model"), load_model(tmp_path / "tab" / "model")
    assert a.spec.text_encoder == b.spec.text_encoder and "path" not in b.spec.text_encoder
    for (k, v), (k2, w) in zip(a.denoiser.state_dict().items(), b.denoiser.state_dict().items()):
        assert k == k2 and torch.equal(v, w), k
    # an existing table is never overwritten
    p = subprocess.run([sys.executable, str(ROOT / "Training" / "embed_prompts.py"), "--config", str(config),
                        "--out", str(table)], cwd=tmp_path, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode != 0 and "exists" in p.stderr


def test_canonical_only_table_replays_the_canonical_prompts_and_refuses_others(tmp_path, config):
    """embed_prompts.py --canonical-only (for editing on a GPU machine): the canonical prompts and --prompt, nothing else."""
    import torch
    from safetensors import safe_open

    from CounterfactualGenLib.errors import InputError
    from CounterfactualGenLib.text import load_text_encoder
    from CounterfactualGenLib.text.prompts import DIAGNOSIS_PROMPTS, LESION_PROMPTS

    table = tmp_path / "canonical.safetensors"
    _run([sys.executable, str(ROOT / "Training" / "embed_prompts.py"), "--config", str(config), "--canonical-only",
          "--prompt", "Subject has many lesions.", "--out", str(table)], tmp_path)
    with safe_open(str(table), framework="pt") as f:
        prompts = json.loads(f.metadata()["table"])["prompts"]
    want = ["", *LESION_PROMPTS.values(), *DIAGNOSIS_PROMPTS.values(), "Subject has many lesions."]
    assert sorted(prompts) == sorted(want)
    te = TINY["text_encoder"]
    real = load_text_encoder(te["id"], **{k: v for k, v in te.items() if k != "id"})
    replay = load_text_encoder(te["id"], path=str(table), **{k: v for k, v in te.items() if k != "id"})
    p = [LESION_PROMPTS["high"], "Subject has many lesions."]
    assert torch.equal(real.encode(p).tokens, replay.encode(p).tokens)
    with pytest.raises(InputError, match="not in the precomputed"):
        replay.encode(["Subject has a high number of MS lesions."])


def test_gpu_lease_script_end_to_end_on_cpu(tmp_path):
    """Training/gpu_lease.sh as a bare GPU machine runs it (no runs/, no SimpleITK), on a tiny grid:
    model parts, logs and the evaluation come back."""
    import tarfile

    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    table = tmp_path / "prompts.safetensors"
    _run([sys.executable, str(ROOT / "Training" / "embed_prompts.py"), "--config",
          str(ROOT / "Training" / "configs" / "wdm_128.json"), "--out", str(table)], tmp_path)
    out, run = tmp_path / "out", tmp_path / "runs" / "wdm128"  # runs/ does not exist yet, as on a bare machine
    blocked = tmp_path / "no_sitk"  # as on the GPU machine: SimpleITK is not installed there
    blocked.mkdir()
    (blocked / "SimpleITK.py").write_text("raise ImportError('SimpleITK is not installed here')\n")
    env = {"OUT": str(out), "RUN": str(run), "TABLE": str(table), "DEVICE": "cpu", "MINUTES": "5", "EVAL_SEEDS": "1",
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
           "PYTHONPATH": f"{blocked}{os.pathsep}{ROOT}"}
    data = {"kind": "synthetic", "pool_size": 4, "pool_workers": 1, "paraphrase_prob": 0.25, "both_clauses_prob": 0.2}
    grid = {"shape": [16, 16, 16], "spacing_mm": 10.0, "center_ras": [0.0, -18.0, 8.0]}
    p = _run(["bash", str(ROOT / "Training" / "gpu_lease.sh"), "--set", 'size="tiny"', "--set", f"grid={json.dumps(grid)}",
              "--set", f"data={json.dumps(data)}", "--set", "iterations=2", "--set", "sample_every=0",
              "--set", "checkpoint_every=1", "--set", "num_workers=0", "--set", "ema_start=0"], ROOT, env)
    assert "train rc=0" in p.stdout and "evaluate rc=0" in p.stdout, p.stdout[-2000:]
    parts = sorted(out.glob("model.tar.part-*"))
    assert parts and all(f.stat().st_size <= 15 * 2**20 for f in parts)
    whole = tmp_path / "model.tar"
    whole.write_bytes(b"".join(f.read_bytes() for f in parts))
    with tarfile.open(whole) as tf:
        tf.extractall(tmp_path / "back", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    from CounterfactualGenLib.models import load_model

    m = load_model(tmp_path / "back" / "model")
    assert m.spec.text_encoder["id"] == "minilm-l6-v2" and m.spec.training["iterations"] == 2
    with tarfile.open(out / "run.tar") as tf:
        names = tf.getnames()
    assert any(n.endswith("eval/report.json") for n in names) and any(n.endswith("log.csv") for n in names)


def test_gpu_lease_sweep_trains_side_by_side_from_one_pool(tmp_path):
    """Training/gpu_lease_sweep.sh (the 5 mm GPU configs, on a tiny grid on CPU): the first run
    builds the pool and the others link it; every model comes back in parts of ≤ 15 MiB; a
    failing run is counted in the exit status and does not cost the others theirs."""
    import tarfile

    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    table = tmp_path / "prompts.safetensors"
    _run([sys.executable, str(ROOT / "Training" / "embed_prompts.py"), "--config",
          str(ROOT / "Training" / "configs" / "wdm_5mm_gpu.json"), "--out", str(table)], tmp_path)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({**json.loads((ROOT / "Training" / "configs" / "wdm_5mm_gpu.json").read_text()),
                                  "init_from": str(tmp_path / "no_such_run")}))
    out, runs = tmp_path / "out", tmp_path / "runs" / "sweep"
    env = dict(os.environ, OUT=str(out), RUNS=str(runs), TABLE=str(table), MINUTES="0.01", OMP_NUM_THREADS="1",
               PROBE_SEEDS="1", DEVICE="cpu",
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""), PYTHONPATH=str(ROOT))
    data = {"kind": "synthetic", "pool_size": 4, "pool_workers": 1, "paraphrase_prob": 0.25, "both_clauses_prob": 0.2}
    grid = {"shape": [16, 16, 16], "spacing_mm": 10.0, "center_ras": [0.0, -18.0, 8.0]}
    p = subprocess.run(["bash", str(ROOT / "Training" / "gpu_lease_sweep.sh"),
                        str(ROOT / "Training" / "configs" / "wdm_5mm_gpu.json"),
                        str(ROOT / "Training" / "configs" / "wdm_5mm_gpu_ft.json"), str(broken),
                        "--", "--set", f"grid={json.dumps(grid)}", "--set", f"data={json.dumps(data)}",
                        "--set", "batch_size=2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 1, p.stdout[-3000:]
    assert "== wdm_5mm_gpu: rc=0" in p.stdout and "== wdm_5mm_gpu_ft: rc=0" in p.stdout and "== broken: rc=2" in p.stdout  # a clean one-line error
    pools = [next((runs / n).glob("pool_*.npz")) for n in ("wdm_5mm_gpu", "wdm_5mm_gpu_ft")]
    assert pools[0].stat().st_ino == pools[1].stat().st_ino  # one pool, linked
    parts = sorted(out.glob("runs.tar.part-*"))
    assert parts and all(f.stat().st_size <= 15 * 2**20 for f in parts)
    whole = tmp_path / "runs.tar"
    whole.write_bytes(b"".join(f.read_bytes() for f in parts))
    with tarfile.open(whole) as tf:
        names = tf.getnames()
        tf.extractall(tmp_path / "back", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    assert not any("pool_" in n or "/ckpt" in n for n in names)
    from CounterfactualGenLib.models import load_model

    fresh = load_model(tmp_path / "back" / "sweep" / "wdm_5mm_gpu" / "model")
    tuned = load_model(tmp_path / "back" / "sweep" / "wdm_5mm_gpu_ft" / "model")
    assert fresh.spec.training["iterations"] >= 1 and fresh.spec.text_encoder["id"] == "minilm-l6-v2"
    # the fine-tuning run starts from the bundled model's weights and counts on from its iterations
    bundled = load_model(ROOT / "Resources" / "Models" / "cfg-wdm-flair-5mm-cpu")
    assert tuned.spec.training["iterations"] > bundled.spec.training["iterations"]
    assert tuned.spec.training["init_from"]["model_folder"] is True
    # each trained model was read on the probe seeds there; the failed run has no probe
    assert "== probe wdm_5mm_gpu: rc=0" in p.stdout and "== probe wdm_5mm_gpu_ft: rc=0" in p.stdout
    assert "== probe broken" not in p.stdout
    for run in ("wdm_5mm_gpu", "wdm_5mm_gpu_ft"):
        rep = json.loads((tmp_path / "back" / "sweep" / run / "probe" / "report.json").read_text())
        assert rep["settings"]["first_seed"] == 200 and rep["settings"]["seeds"] == 1 and rep["settings"]["separation"] == 1.5


def test_lesion_weight_scaled_by_lesion_volume():
    """lesion_weight_volume_ref_ml: a sample's lesion weight scales with sqrt(R / its lesion ml), within [1/4, 4]."""
    import torch

    td = _train_module()
    lesions = torch.zeros(3, 1, 16, 16, 16, dtype=torch.uint8)
    lesions[0, 0, 4:6, 4:6, 4:6] = 1  # 8 voxels = 1 ml at 0.125 ml per voxel
    lesions[1, 0, 0:10, 0:8, 0:4] = 1  # 320 voxels = 40 ml
    lesions[2, 0, 8, 8, 8] = 1  # 1 voxel = 0.125 ml: the scale is capped at 4
    active = torch.tensor([True, True, True])
    w = td.lesion_weights(lesions, active, (8, 8, 8), 4.0, volume_ref_ml=4.0, voxel_ml=0.125)
    assert w[0, 0, 2, 2, 2] == pytest.approx(1 + 4.0 * 2.0)  # sqrt(4 / 1)
    assert w[1, 0, 0, 0, 0] == pytest.approx(1 + 4.0 * np.sqrt(4 / 40))
    assert w[2, 0, 4, 4, 4] == pytest.approx(1 + 4.0 * 4.0)
    assert torch.all(w[0, 0, 6:, 6:, 6:] == 1.0)  # away from the lesions: plain loss, whatever the scale
    unscaled = td.lesion_weights(lesions, active, (8, 8, 8), 4.0)
    assert unscaled[0, 0, 2, 2, 2] == 5.0 and unscaled[1, 0, 0, 0, 0] == 5.0


def test_lesion_weight_volume_reference_is_checked_before_any_work(tmp_path, config):
    cfg = json.loads(config.read_text())
    for bad in (0, -1.0, "5"):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps({**cfg, "lesion_weight_volume_ref_ml": bad}))
        p = subprocess.run([sys.executable, str(ROOT / "Training" / "train_diffusion.py"), "--config", str(path),
                            "--out", str(tmp_path / "run")], cwd=tmp_path, capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert p.returncode != 0 and "lesion_weight_volume_ref_ml" in p.stderr, p.stderr[-500:]
        assert not (tmp_path / "run").exists()


def test_lesion_class_draw_weights_the_draw_and_refuses_bad_weights():
    """data.lesion_class_draw: a class weighted 2 is drawn about twice as often; the pool stays as it is."""
    from CounterfactualGenLib.errors import InputError

    td = _train_module()
    lesion = np.array(["none", "minimal", "moderate", "high"] * 50)
    assert td.lesion_class_draw_cdf(lesion, None) is None and td.lesion_class_draw_cdf(lesion, {}) is None
    cum = td.lesion_class_draw_cdf(lesion, {"minimal": 2.0})
    rng = np.random.default_rng(0)
    idx = np.minimum(np.searchsorted(cum, rng.random(20000), side="right"), len(lesion) - 1)
    share = np.mean(lesion[idx] == "minimal")
    assert abs(share - 0.4) < 0.02, share  # 2 / (1 + 2 + 1 + 1)
    assert abs(np.mean(lesion[idx] == "none") - 0.2) < 0.02
    for bad in ({"tiny": 2.0}, {"minimal": -1.0}, {"minimal": float("nan")},
                {"none": 0, "minimal": 0, "moderate": 0, "high": 0}):
        with pytest.raises(InputError, match="lesion_class_draw"):
            td.lesion_class_draw_cdf(lesion, bad)


def test_lesion_class_draw_is_checked_before_training(tmp_path, config):
    cfg = json.loads(config.read_text())
    cfg["data"]["lesion_class_draw"] = {"severe": 3.0}
    config.write_text(json.dumps(cfg))
    p = subprocess.run([sys.executable, str(ROOT / "Training" / "train_diffusion.py"), "--config", str(config),
                        "--out", str(tmp_path / "run")], cwd=tmp_path, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"), timeout=600)
    assert p.returncode != 0 and "lesion_class_draw" in p.stderr and "severe" in p.stderr
    assert not (tmp_path / "run").exists()  # refused before any work: no pool, no log, no model
    manifest_cfg = {**cfg, "data": {"kind": "manifest", "manifest": str(tmp_path / "m.csv"), "lesion_class_draw": {"minimal": 2}}}
    config.write_text(json.dumps(manifest_cfg))
    p = subprocess.run([sys.executable, str(ROOT / "Training" / "train_diffusion.py"), "--config", str(config),
                        "--out", str(tmp_path / "run")], cwd=tmp_path, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"), timeout=600)
    assert p.returncode != 0 and "synthetic pool only" in p.stderr and not (tmp_path / "run").exists()
    cfg["data"]["lesion_class_draw"] = {"minimal": 2.0}  # a valid weight trains
    config.write_text(json.dumps(cfg))
    _run([sys.executable, str(ROOT / "Training" / "train_diffusion.py"), "--config", str(config),
          "--out", str(tmp_path / "run2")], tmp_path)
    assert (tmp_path / "run2" / "model" / "model.json").exists()


def test_anchored_targets_keep_the_data_for_learnt_samples_only():
    import torch

    td = _train_module()
    v, anchor_pred = torch.randn(3, 2, 4, 4, 4), torch.randn(3, 2, 4, 4, 4)
    w = torch.full((3, 1, 4, 4, 4), 5.0)
    learn = torch.tensor([True, False, True])
    target, weights = td.anchored_targets(v, anchor_pred, learn, 0.5, w)
    assert torch.equal(target[0], v[0]) and torch.equal(target[2], v[2]) and torch.equal(target[1], anchor_pred[1])
    assert torch.all(weights[0] == 5.0) and torch.all(weights[1] == 0.5)
    _, plain = td.anchored_targets(v, anchor_pred, learn, 2.0, None)
    assert torch.all(plain[0] == 1.0) and torch.all(plain[1] == 2.0)
    # through guidance g: anchor_pred is the unconditional u for learnt samples; guiding the target gives v back
    g = 4.0
    target, _ = td.anchored_targets(v, anchor_pred, learn, 1.0, w, g)
    torch.testing.assert_close(anchor_pred[0] + g * (target[0] - anchor_pred[0]), v[0])
    assert torch.equal(target[1], anchor_pred[1])


def test_anchored_fine_tune_holds_the_anchor_and_learns_only_the_named_classes(tmp_path, config):
    """anchor: with no learnt class drawn, every sample copies the anchor, so the loss is 0 and the weights do not
    move at all (EMA off: its rounding would move them); with the learnt class drawn they do. Bad anchor blocks are refused before any work."""
    from safetensors.numpy import load_file

    script = str(ROOT / "Training" / "train_diffusion.py")
    _run([sys.executable, script, "--config", str(config), "--out", str(tmp_path / "a")], tmp_path)
    src = tmp_path / "a" / "model"
    base = json.loads(config.read_text())
    anchor = {"model": str(src), "learn": ["minimal"], "weight": 1.0}
    held = {**base, "init_from": str(src), "iterations": 4, "anchor": anchor, "ema_decay": 0.0,
            "data": {**base["data"], "lesion_class_draw": {"minimal": 0.0}}}
    (tmp_path / "held.json").write_text(json.dumps(held))
    _run([sys.executable, script, "--config", str(tmp_path / "held.json"), "--out", str(tmp_path / "held")], tmp_path)
    before, after = load_file(str(src / "denoiser.safetensors")), load_file(str(tmp_path / "held" / "model" / "denoiser.safetensors"))
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert all(float(r["loss"]) < 1e-8 for r in csv.DictReader((tmp_path / "held" / "log.csv").open()))
    t = json.loads((tmp_path / "held" / "model" / "model.json").read_text())["training"]
    assert t["anchor"]["learn"] == ["minimal"] and t["anchor"]["id"] == base["id"]
    assert t["anchor"]["denoiser_sha256"] == json.loads((src / "model.json").read_text())["files"][0]["sha256"]
    held_card = (tmp_path / "held" / "model" / "MODEL_CARD.md").read_text()
    assert "| anchored to | model folder" in held_card and "against the anchored targets" in held_card
    learns = {**held, "data": {**base["data"], "lesion_class_draw": {"none": 0.0, "moderate": 0.0, "high": 0.0}}}
    (tmp_path / "learns.json").write_text(json.dumps(learns))
    _run([sys.executable, script, "--config", str(tmp_path / "learns.json"), "--out", str(tmp_path / "learns")], tmp_path)
    moved = load_file(str(tmp_path / "learns" / "model" / "denoiser.safetensors"))
    assert any(not np.array_equal(before[k], moved[k]) for k in before)
    (tmp_path / "guided.json").write_text(json.dumps({**learns, "anchor": {**anchor, "guidance": 4.0}}))
    _run([sys.executable, script, "--config", str(tmp_path / "guided.json"), "--out", str(tmp_path / "guided")], tmp_path)
    t = json.loads((tmp_path / "guided" / "model" / "model.json").read_text())["training"]
    assert t["anchor"]["guidance"] == 4.0
    assert "through guidance 4.0" in (tmp_path / "guided" / "model" / "MODEL_CARD.md").read_text()
    for bad, words in (({**anchor, "learn": ["severe"]}, "anchor.learn"), ({**anchor, "weight": 0}, "anchor.weight"),
                       ({**anchor, "model": str(tmp_path / "nowhere")}, "not a model folder"),
                       ({**anchor, "guidance": 0.5}, "anchor.guidance"),
                       ({**anchor, "extra": 1}, "anchor must be")):
        (tmp_path / "bad.json").write_text(json.dumps({**base, "anchor": bad}))
        p = subprocess.run([sys.executable, script, "--config", str(tmp_path / "bad.json"), "--out", str(tmp_path / "bad")],
                           cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=600)
        assert p.returncode != 0 and words in p.stderr, p.stderr[-500:]
        assert not (tmp_path / "bad").exists()


def test_series_misses_counts_faint_and_strong_members_from_a_report(tmp_path, capsys):
    """Training/series_misses.py reads an evaluate report's per-seed table."""
    sys.path.insert(0, str(ROOT / "Training"))
    try:
        import series_misses
    finally:
        sys.path.remove(str(ROOT / "Training"))
    prompts = ["Subject has no lesions.", "Subject has minimal lesion load.", "Subject has moderate lesion load.",
               "Subject has high lesion load."]
    seeds = [([0.0, 2.0, 9.0, 40.0], ["none", "minimal", "moderate", "high"]),
             ([0.0, 0.2, 3.0, 30.0], ["none", "none", "minimal", "high"]),  # a faint seed: minimal and moderate
             ([1.0, 3.0, 20.0, 50.0], ["minimal", "minimal", "high", "high"])]  # none and moderate too strong
    report = {"results": {"per_seed": [{"seed": k, "lesion": {"prompts": prompts, "oracle_lesion_ml": ml,
                                                               "oracle_lesion_class": cls}}
                                       for k, (ml, cls) in enumerate(seeds)]}}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    assert series_misses.main([str(path)]) == 0
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "member" not in line}
    assert rows["none"][1:3] == ["0", "1"] and rows["minimal"][1:3] == ["1", "0"]
    assert rows["moderate"][:3] == ["9.00", "1", "1"] and rows["high"][1:3] == ["0", "0"]
    assert rows["moderate"][3] == "0.20 / 2.50"  # the minimal member where moderate was faint vs elsewhere


def _train_proc(config, out, *extra):
    return subprocess.run([sys.executable, str(ROOT / "Training" / "train_diffusion.py"), "--config", str(config),
                           "--out", str(out), *extra], cwd=out.parent, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))


def test_a_run_folder_is_never_trained_over(tmp_path, config):
    """Training into a folder that holds a run needs --resume; --resume needs a checkpoint of the same network."""
    out = tmp_path / "run"
    assert _train_proc(config, out).returncode == 0
    before = {p: p.read_bytes() for p in (out / "ckpt" / "last.safetensors", out / "log.csv", out / "model" / "model.json")}
    p = _train_proc(config, out)
    assert p.returncode == 2 and "already holds a training run" in p.stderr and "--resume" in p.stderr
    assert {q: q.read_bytes() for q in before} == before  # nothing was changed
    p = _train_proc(config, tmp_path / "empty", "--resume")
    assert p.returncode == 2 and "has no checkpoint" in p.stderr
    p = _train_proc(config, out, "--resume", "--set", 'grid={"shape": [16, 16, 24], "spacing_mm": 10.0, '
                                                     '"center_ras": [0.0, -18.0, 8.0]}')
    assert p.returncode == 2 and "other ['grid']" in p.stderr


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_ctrl_c_saves_a_checkpoint_and_resume_continues_the_log(tmp_path, config):
    import signal
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "Training" / "train_diffusion.py"), "--config", str(config),
                             "--out", str(out), "--set", "iterations=100000", "--set", "checkpoint_every=100000"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    log = out / "log.csv"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 4):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    saved = json.loads((out / "ckpt" / "state.json").read_text())["step"]
    assert saved >= 3 and f"Interrupted at step {saved}" in err and "--resume" in err
    assert not (out / "model").exists()  # the model is written when training ends, not on an interrupt
    _run([sys.executable, str(ROOT / "Training" / "train_diffusion.py"), "--config", str(config), "--out", str(out),
          "--resume", "--set", f"iterations={saved + 2}"], tmp_path)
    steps = [int(r["step"]) for r in csv.DictReader(log.open())]
    assert steps == list(range(1, saved + 3))  # no step twice, none missing
    assert (out / "model" / "model.json").exists()


def test_pool_from_both_anatomies_is_cached_per_anatomy_list(tmp_path):
    """data.anatomies: the pool's subjects are drawn from ICBM152 and Colin27; a cache made from
    other anatomies is not reused; bad names and manifests are refused."""
    td = _train_module()
    from CounterfactualGenLib.errors import InputError
    from CounterfactualGenLib.geometry import ModelGrid

    grid = ModelGrid.from_dict(TINY["grid"])
    cache = tmp_path / "pool.npz"
    cfg = {**TINY, "data": {**TINY["data"], "anatomies": ["icbm152", "colin27"]}}
    td.check_config({**td.DEFAULTS, **cfg})
    both = td.synthetic_pool(cfg, grid, 0, 6, cache)
    assert set(np.load(cache)["anatomies"].tolist()) == {"icbm152", "colin27"} and "anatomies" not in both
    icbm = td.synthetic_pool(TINY, grid, 0, 6, cache)  # other anatomies: made again, not read
    assert tuple(np.load(cache)["anatomies"].tolist()) == ("icbm152",)
    assert not np.array_equal(both["images"], icbm["images"])
    again = td.synthetic_pool(TINY, grid, 0, 6, cache)
    assert np.array_equal(again["images"], icbm["images"])
    for bad, words in (({"anatomies": ["mni305"]}, "data.anatomies must be"),
                       ({"anatomies": []}, "data.anatomies must be"),
                       ({"kind": "manifest", "manifest": "x.csv", "anatomies": ["colin27"]}, "synthetic pool only")):
        with pytest.raises(InputError, match=words):
            td.check_config({**td.DEFAULTS, **TINY, "data": {**TINY["data"], **bad}})


def test_learning_masks_anchor_by_lesion_class_and_by_brain():
    """Which samples learn from the data in an anchored run: a learnt class needs a kept prompt naming it,
    a learnt brain learns with any prompt (dropped too); lesion weights only where the prompt names the load."""
    import torch

    td = _train_module()
    names = torch.tensor([True, True, False, True, False, True])
    dropped = torch.tensor([False, False, False, True, True, False])
    classes = torch.tensor([1, 2, -1, 1, -1, 1])  # minimal, moderate, -, minimal, -, minimal
    brains = torch.tensor([0, 0, 1, 1, 1, 1])  # icbm152 ×2, colin27 ×4
    weighted, learnt = td.learning_masks(names, dropped, classes, brains, None, None)
    assert weighted.tolist() == [True, True, False, False, False, True] and learnt is None
    weighted, learnt = td.learning_masks(names, dropped, classes, brains, torch.tensor([1]), torch.tensor([], dtype=torch.long))
    assert learnt.tolist() == [True, False, False, False, False, True] and weighted.tolist() == learnt.tolist()
    weighted, learnt = td.learning_masks(names, dropped, classes, brains, torch.tensor([], dtype=torch.long),
                                         torch.tensor([1]))
    assert learnt.tolist() == [False, False, True, True, True, True]
    assert weighted.tolist() == [False, False, False, False, False, True]


def test_anchored_by_brain_run_records_it_and_pool_keeps_each_subjects_brain(tmp_path, config):
    """anchor.learn_anatomies: the pool records each subject's brain, the run trains and its card says which brains
    learnt; a brain outside data.anatomies, all of them, or guidance with it are refused before any work."""
    from safetensors.numpy import load_file

    script = str(ROOT / "Training" / "train_diffusion.py")
    _run([sys.executable, script, "--config", str(config), "--out", str(tmp_path / "a")], tmp_path)
    src = tmp_path / "a" / "model"
    base = json.loads(config.read_text())
    data = {**base["data"], "anatomies": ["icbm152", "colin27"], "pool_size": 8}
    anchor = {"model": str(src), "learn": [], "learn_anatomies": ["colin27"], "weight": 1.0}
    run = {**base, "data": data, "init_from": str(src), "iterations": 3, "anchor": anchor, "ema_decay": 0.0}
    (tmp_path / "brains.json").write_text(json.dumps(run))
    p = _run([sys.executable, script, "--config", str(tmp_path / "brains.json"), "--out", str(tmp_path / "b")], tmp_path)
    assert "every sample of colin27 learn from the data" in p.stderr
    pool = np.load(next((tmp_path / "b").glob("pool_*.npz")))
    assert set(pool["anatomy"].tolist()) == {"icbm152", "colin27"} and len(pool["anatomy"]) == 8
    t = json.loads((tmp_path / "b" / "model" / "model.json").read_text())["training"]
    assert t["anchor"]["learn_anatomies"] == ["colin27"] and t["anchor"]["learn"] == []
    assert "only every sample of Colin27 learnt from the data" in (tmp_path / "b" / "model" / "MODEL_CARD.md").read_text()
    before, after = load_file(str(src / "denoiser.safetensors")), load_file(str(tmp_path / "b" / "model" / "denoiser.safetensors"))
    assert any(not np.array_equal(before[k], after[k]) for k in before)  # the Colin27 subjects moved it
    for bad, words in (({**anchor, "learn_anatomies": ["clinical12"]}, "anchor.learn_anatomies"),
                       ({**anchor, "learn_anatomies": ["icbm152", "colin27"]}, "anchor.learn_anatomies"),
                       ({**anchor, "guidance": 4.0}, "anchor.guidance applies"),
                       ({**anchor, "learn_anatomies": []}, "anchor.learn")):
        (tmp_path / "bad.json").write_text(json.dumps({**run, "anchor": bad}))
        p = subprocess.run([sys.executable, script, "--config", str(tmp_path / "bad.json"), "--out", str(tmp_path / "bad")],
                           cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=600)
        assert p.returncode != 0 and words in p.stderr, p.stderr[-500:]
        assert not (tmp_path / "bad").exists()


def test_background_invariant_anchor_copies_the_anchor_on_the_draw_as_the_data_has_it(tmp_path, config):
    """anchor.background_invariance: a draw not framed copies the anchor exactly (loss 0, weights unmoved with EMA
    off, as with any anchored sample), so the anchor's input for it is the student's own; flat-framed draws move
    the weights (their target is the anchor's prediction on the unframed draw, moved by the framing). The card
    and the record say so; it is refused without data.flat_background_prob, or if not a bool."""
    from safetensors.numpy import load_file

    script = str(ROOT / "Training" / "train_diffusion.py")
    _run([sys.executable, script, "--config", str(config), "--out", str(tmp_path / "a")], tmp_path)
    src = tmp_path / "a" / "model"
    base = json.loads(config.read_text())
    anchor = {"model": str(src), "learn": [], "background_invariance": True}
    run = {**base, "init_from": str(src), "iterations": 3, "anchor": anchor, "ema_decay": 0.0,
           "data": {**base["data"], "flat_background_prob": 1e-12}}  # no draw framed
    (tmp_path / "held.json").write_text(json.dumps(run))
    p = _run([sys.executable, script, "--config", str(tmp_path / "held.json"), "--out", str(tmp_path / "held")], tmp_path)
    assert "every sample keeps its predictions (weight 1.0); a draw framed flat copies its prediction" in p.stderr
    before = load_file(str(src / "denoiser.safetensors"))
    held = load_file(str(tmp_path / "held" / "model" / "denoiser.safetensors"))
    assert all(np.array_equal(before[k], held[k]) for k in before)
    assert all(float(r["loss"]) < 1e-8 for r in csv.DictReader((tmp_path / "held" / "log.csv").open()))
    framed = {**run, "data": {**base["data"], "flat_background_prob": 1.0}}
    (tmp_path / "framed.json").write_text(json.dumps(framed))
    _run([sys.executable, script, "--config", str(tmp_path / "framed.json"), "--out", str(tmp_path / "framed")], tmp_path)
    moved = load_file(str(tmp_path / "framed" / "model" / "denoiser.safetensors"))
    assert any(not np.array_equal(before[k], moved[k]) for k in before)
    t = json.loads((tmp_path / "framed" / "model" / "model.json").read_text())["training"]
    assert t["anchor"]["background_invariance"] is True and t["anchor"]["learn"] == []
    card = (tmp_path / "framed" / "model" / "MODEL_CARD.md").read_text()
    assert "no sample learnt from the data" in card and "anchor.background_invariance" in card
    assert "intensity.outside_brain flat" in card  # its edits show it −1 outside the brain, as it learnt
    assert json.loads((tmp_path / "framed" / "model" / "model.json").read_text())["intensity"]["outside_brain"] == "flat"
    assert "outside_brain" not in json.loads((src / "model.json").read_text())["intensity"]
    for bad, data, words in ((anchor, base["data"], "needs data.flat_background_prob"),
                             ({**anchor, "background_invariance": "yes"}, framed["data"], "must be true or false"),
                             ({**anchor, "background_invariance": False}, framed["data"], "anchor.learn")):
        (tmp_path / "bad.json").write_text(json.dumps({**base, "data": data, "anchor": bad}))
        p = subprocess.run([sys.executable, script, "--config", str(tmp_path / "bad.json"), "--out", str(tmp_path / "bad")],
                           cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=600)
        assert p.returncode != 0 and words in p.stderr, p.stderr[-500:]
        assert not (tmp_path / "bad").exists()


def test_train_only_keeps_every_other_parameter(tmp_path, config):
    """train_only: the parameters under the named prefixes move, every other one keeps init_from's value bit for
    bit (EMA off); the card says so; a prefix naming no parameter, or a bad value, is refused before any work."""
    from safetensors.numpy import load_file

    script = str(ROOT / "Training" / "train_diffusion.py")
    _run([sys.executable, script, "--config", str(config), "--out", str(tmp_path / "a")], tmp_path)
    src = tmp_path / "a" / "model"
    base = json.loads(config.read_text())
    only = ["unet.conv_in", "unet.down_blocks.0"]
    run = {**base, "init_from": str(src), "iterations": 3, "ema_decay": 0.0, "train_only": only}
    (tmp_path / "only.json").write_text(json.dumps(run))
    _run([sys.executable, script, "--config", str(tmp_path / "only.json"), "--out", str(tmp_path / "b")], tmp_path)
    before = load_file(str(src / "denoiser.safetensors"))
    after = load_file(str(tmp_path / "b" / "model" / "denoiser.safetensors"))
    trained = {k for k in before if any(k.startswith(p) for p in only)}
    assert trained and len(trained) < len(before)
    assert all(np.array_equal(before[k], after[k]) for k in before if k not in trained)
    assert any(not np.array_equal(before[k], after[k]) for k in trained)
    assert "only the parameters under unet.conv_in, unet.down_blocks.0 trained" in (tmp_path / "b" / "model" / "MODEL_CARD.md").read_text()
    for bad, words in ((["unet.nowhere"], "name no parameter"), ([], "train_only must be"), ("unet", "train_only must be")):
        (tmp_path / "bad.json").write_text(json.dumps({**run, "train_only": bad}))
        p = subprocess.run([sys.executable, script, "--config", str(tmp_path / "bad.json"), "--out", str(tmp_path / "bad")],
                           cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=600)
        assert p.returncode != 0 and words in p.stderr, p.stderr[-500:]
        assert not (tmp_path / "bad").exists()


def test_flat_background_draws_set_the_outside_of_the_brain_to_minus_one(tmp_path):
    """data.flat_background_prob: the pool keeps each subject's brain mask, and that share of the draws has
    −1 outside the brain and the subject's own voxels inside; 0 draws the pool's images as they are; a cache
    made without brain masks is made again; a value outside [0, 1] is refused."""
    td = _train_module()
    from CounterfactualGenLib.errors import InputError
    from CounterfactualGenLib.geometry import ModelGrid

    grid = ModelGrid.from_dict(TINY["grid"])
    cache = tmp_path / "pool.npz"
    pool = td.synthetic_pool(TINY, grid, 0, 4, cache)
    brains = pool["brain_masks"] > 0
    assert brains.shape == pool["images"].shape and brains.any() and (~brains).any()
    old = {k: v for k, v in np.load(cache).items() if k != "brain_masks"}
    np.savez(cache, **old)  # a cache from before brain masks were kept
    assert "brain_masks" in td.synthetic_pool({**TINY, "data": {**TINY["data"], "flat_background_prob": 0.5}},
                                              grid, 0, 4, cache)

    def draws(prob, n):
        cfg = {**TINY, "data": {**TINY["data"], "flat_background_prob": prob}}
        td.check_config({**td.DEFAULTS, **cfg})
        it = iter(td.Stream(cfg, grid, 3, pool))
        out = []
        for _ in range(n):
            item = next(it)
            img = item[0][0].numpy()
            j = next(k for k in range(4) if np.array_equal(img[brains[k]], pool["images"][k][brains[k]].astype(np.float32)))
            flat = bool((img[~brains[j]] == -1.0).all())
            assert flat or np.array_equal(img, pool["images"][j].astype(np.float32))
            assert np.array_equal(item[6][0].numpy(), pool["images"][j].astype(np.float32))  # the draw as the data has it
            out.append(flat)
        return out

    assert all(draws(1.0, 8)) and not any(draws(0.0, 8))
    assert 0.3 < np.mean(draws(0.5, 80)) < 0.7
    for bad in (1.5, -0.1, "half", True):
        with pytest.raises(InputError, match="flat_background_prob"):
            td.check_config({**td.DEFAULTS, **TINY, "data": {**TINY["data"], "flat_background_prob": bad}})
