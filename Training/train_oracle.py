#!/usr/bin/env python
"""Train the evaluation oracle (lesion segmentation + CN/MCI/AD classification) on synthetic subjects.

The oracle is the "pseudo-oracle" of Monteiro et al. (ICLR 2023): a network that reads
the attributes a counterfactual was asked to change. It learns from the synthetic
engine's exact ground truth (lesion masks, atrophy levels), on the grid of the model it
will judge, in the same intensity units (``IntensityNormalizer``: background −1, brain
p99.5 +1, as ``Training/train_diffusion.py`` feeds the diffusion model).

    nice -n 10 env OMP_NUM_THREADS=1 python Training/train_oracle.py \\
        --config Training/configs/oracle_5mm.json --out runs/oracle_5mm

Writes ``OUT/pool_*.npz`` (the generated subjects, re-used by later runs), ``OUT/log.csv``
and ``OUT/oracle/`` (``oracle.json`` with the measured validation metrics,
``oracle.safetensors``, ``ORACLE_CARD.md``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from CounterfactualGenLib.evaluation.oracle import (  # noqa: E402
    DEFAULT_ARCHITECTURE,
    DIAGNOSIS_CLASSES,
    Oracle,
    OracleSpec,
    apply_calibration,
    fit_calibration,
    save_oracle,
)
from CounterfactualGenLib.config import check_keys, load_config  # noqa: E402
from CounterfactualGenLib.errors import InputError  # noqa: E402
from CounterfactualGenLib.geometry import ModelGrid  # noqa: E402

DEFAULTS: dict[str, Any] = {
    "id": "oracle-flair-5mm",
    "description": "",
    "grid": {"shape": [32, 40, 32], "spacing_mm": 5.0, "center_ras": [0.0, -18.0, 8.0]},
    "contrast": "FLAIR",
    "architecture": dict(DEFAULT_ARCHITECTURE),
    "data": {"train_subjects": 384, "val_subjects": 96, "calibration_subjects": 240, "pool_workers": 1,
             "anatomies": ["icbm152"]},
    "augment": {"flip_lr": True, "shift_voxels": 1, "gain": 0.08, "noise_max": 0.04},
    "batch_size": 4,
    "iterations": 800,
    "lr": 2e-3,
    "weight_decay": 1e-4,
    "loss_weights": {"dice": 1.0, "bce": 1.0, "ce": 1.0, "atrophy": 2.0, "volume": 1.0},
    "seed": 0,
    "threads": 1,
    "log_every": 25,
    "max_minutes": None,
    "weights_dtype": "float16",
    "init_from": None,  # an installed oracle folder to continue from (its weights; fresh optimiser and schedule)
}


# ---------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------
def _oracle_item(args: tuple[int, str, str, tuple, float, tuple, str, tuple]) -> dict[str, Any]:
    """One synthetic subject in model units with its exact lesion mask and atrophy (pool worker)."""
    from CounterfactualGenLib.evaluation.oracle import to_model_units
    from CounterfactualGenLib.synth import make_subject, random_spec

    seed, lesion_class, diagnosis, shape, spacing, center, contrast, anatomies = args
    spec = random_spec(seed, lesion_class=lesion_class, diagnosis=diagnosis, contrast=contrast, anatomy=anatomies)
    subj = make_subject(spec, shape=shape, spacing_mm=spacing, center_mm=center)
    return {"image": to_model_units(subj.image.array, subj.brain_mask).astype(np.float16),
            "lesion": subj.lesion_mask.astype(np.uint8), "lesion_ml": float(subj.attributes["lesion_ml"]),
            "diagnosis": DIAGNOSIS_CLASSES.index(subj.attributes["diagnosis"]),
            "atrophy": float(subj.attributes["atrophy"])}


def synthetic_pool(grid: ModelGrid, contrast: str, seed: int, size: int, workers: int,
                   cache: Path | None, anatomies: Sequence[str] = ("icbm152",)) -> dict[str, np.ndarray]:
    """Subjects balanced over the 4 lesion-load classes × 3 diagnoses, made once in parallel and cached;
    each from one of ``anatomies`` (drawn per subject; the cache's name says which, see :func:`anatomy_tag`)."""
    anatomies = tuple(anatomies)
    if cache is not None and anatomy_tag(anatomies):
        cache = cache.with_name(cache.name.replace(".npz", anatomy_tag(anatomies) + ".npz"))
    if cache is not None and cache.exists():
        data = np.load(cache)
        if len(data["diagnosis"]) >= size and tuple(data["images"].shape[1:]) == tuple(grid.shape):
            return {k: data[k][:size] for k in data.files}
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    lesion_classes = ("none", "minimal", "moderate", "high")
    rng = random.Random(seed)
    jobs = [(rng.randrange(2**31), lesion_classes[i % 4], DIAGNOSIS_CLASSES[(i // 4) % 3], tuple(grid.shape),
             grid.spacing_mm, tuple(grid.center_ras), contrast, anatomies) for i in range(size)]
    if workers <= 1:  # in-process: one core, and works when this file is imported by path (tests)
        items = [_oracle_item(j) for j in tqdm(jobs, desc="synthesise", file=sys.stderr, mininterval=10.0)]
    else:
        with ProcessPoolExecutor(workers) as ex:
            items = list(tqdm(ex.map(_oracle_item, jobs, chunksize=4), total=size, desc="synthesise",
                              file=sys.stderr, mininterval=10.0))
    pool = {"images": np.stack([i["image"] for i in items]), "lesion": np.stack([i["lesion"] for i in items]),
            "lesion_ml": np.array([i["lesion_ml"] for i in items]),
            "diagnosis": np.array([i["diagnosis"] for i in items], np.int64),
            "atrophy": np.array([i["atrophy"] for i in items], np.float32)}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(".partial-" + cache.name)
        with open(tmp, "wb") as f:
            np.savez(f, **pool)
        os.replace(tmp, cache)
    return pool


def anatomy_tag(anatomies: Sequence[str]) -> str:
    """The pool caches' name suffix for ``anatomies`` ("" for ICBM152 alone, the caches made before)."""
    return "" if tuple(anatomies) == ("icbm152",) else "_" + "+".join(anatomies)


def validation_pool(grid: ModelGrid, contrast: str, seed: int, size: int, workers: int,
                    folder: Path, anatomies: Sequence[str] = ("icbm152",)) -> dict[str, np.ndarray]:
    """The held-out subjects of the oracle run with ``seed`` (seeds from seed + 10000), cached in ``folder``.

    Deterministic: a run folder that lost its pool, or another stage's comparison
    (``Training/compare_oracles.py``), remakes exactly the subjects the run held out.
    """
    tag = "x".join(map(str, grid.shape))
    return synthetic_pool(grid, contrast, int(seed) + 10_000, int(size), workers, folder / f"pool_val_{int(seed)}_{tag}.npz",
                          anatomies)


def augment(img: torch.Tensor, seg: torch.Tensor, cfg: dict, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-right flips, ±1-voxel shifts, a gain on (x+1) and Gaussian noise (generated images are not engine-clean)."""
    a = cfg["augment"]
    b = img.shape[0]
    if a.get("flip_lr"):
        flip = torch.rand(b, generator=gen) < 0.5
        img[flip] = img[flip].flip(2)
        seg[flip] = seg[flip].flip(2)
    k = int(a.get("shift_voxels", 0))
    if k:
        for i in range(b):
            s = [int(v) for v in torch.randint(-k, k + 1, (3,), generator=gen)]
            img[i] = torch.roll(img[i], s, dims=(1, 2, 3))
            seg[i] = torch.roll(seg[i], s, dims=(1, 2, 3))
    g = 1.0 + a.get("gain", 0.0) * (2 * torch.rand(b, 1, 1, 1, 1, generator=gen) - 1)
    img = (img + 1.0) * g - 1.0
    sigma = a.get("noise_max", 0.0) * torch.rand(b, 1, 1, 1, 1, generator=gen)
    img = img + sigma * torch.randn(img.shape, generator=gen)
    return img, seg


def soft_dice_loss(logit: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Batch soft Dice loss (Milletari et al. 2016, V-Net), pooled over the batch so lesion-free subjects count."""
    p = torch.sigmoid(logit)
    inter = (p * target).sum()
    return 1.0 - (2 * inter + eps) / (p.sum() + target.sum() + eps)


# ---------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------
def validate(oracle: Oracle, pool: dict[str, np.ndarray]) -> dict[str, Any]:
    """Lesion-ml MAE, Dice (subjects with lesions), lesion-class and diagnosis accuracy on held-out subjects."""
    from CounterfactualGenLib.evaluation.metrics import dice, lesion_class_of_ml

    oracle.net.eval()
    pred = oracle.predict(pool["images"].astype(np.float32), batch_size=8)
    true_ml = pool["lesion_ml"]
    err = np.abs(pred["lesion_ml"] - true_ml)
    dices = [dice(pred["lesion_prob"][i] > 0.5, pool["lesion"][i] > 0) for i in range(len(true_ml)) if true_ml[i] > 0]
    seg_err = np.abs(pred["lesion_ml_seg"] - true_ml)
    head_err = np.abs(pred["lesion_ml_volume_head"] - true_ml) if "lesion_ml_volume_head" in pred else None
    true_dx = [DIAGNOSIS_CLASSES[int(k)] for k in pool["diagnosis"]]
    dx_acc = float(np.mean([a == b for a, b in zip(pred["diagnosis"], true_dx)]))
    cls_true = [lesion_class_of_ml(v) for v in true_ml]
    cls_pred = [lesion_class_of_ml(v) for v in pred["lesion_ml"]]
    confusion = np.zeros((3, 3), int)
    for t, p in zip(true_dx, pred["diagnosis"]):
        confusion[DIAGNOSIS_CLASSES.index(t), DIAGNOSIS_CLASSES.index(p)] += 1
    per_class_mae = {c: round(float(err[[k == c for k in cls_true]].mean()), 3)
                     for c in ("none", "minimal", "moderate", "high") if c in cls_true}
    corr = float(np.corrcoef(pred["lesion_ml"], true_ml)[0, 1]) if true_ml.std() > 0 else float("nan")
    return {"n_subjects": int(len(true_ml)), "lesion_ml_mae": round(float(err.mean()), 3),
            "lesion_ml_mae_by_class": per_class_mae, "lesion_ml_pearson_r": round(corr, 4),
            "lesion_ml_source": oracle.spec.lesion_ml_from + (" (calibrated)" if oracle.spec.lesion_ml_calibration else ""),
            "lesion_ml_raw_mae": round(float(np.abs(pred["lesion_ml_raw"] - true_ml).mean()), 3),
            "lesion_ml_seg_mae": round(float(seg_err.mean()), 3),
            "lesion_ml_volume_head_mae": None if head_err is None else round(float(head_err.mean()), 3),
            "dice_mean": round(float(np.mean(dices)), 4) if dices else None, "dice_n": len(dices),
            "lesion_class_accuracy": round(float(np.mean([a == b for a, b in zip(cls_true, cls_pred)])), 4),
            "diagnosis_accuracy": round(dx_acc, 4), "diagnosis_confusion_rows_true_cols_pred": confusion.tolist(),
            "atrophy_mae": round(float(np.abs(pred["atrophy"] - pool["atrophy"]).mean()), 4)}


def choose_lesion_estimate(oracle: Oracle, pool: dict[str, np.ndarray],
                           calibration_pool: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Choose the lesion-volume estimate (segmentation sum or volume head), calibrate it, validate.

    With a calibration pool (subjects in neither the training nor the validation pool),
    each raw estimate gets an isotonic calibration fitted there, the one with the lower
    calibrated MAE on the calibration pool is kept, and the validation pool measures the
    result. Without one, the raw estimate with the lower validation MAE is kept (no
    calibration).
    """
    oracle.spec.lesion_ml_calibration = None
    if calibration_pool is None:
        oracle.spec.lesion_ml_from = "segmentation"
        metrics = validate(oracle, pool)
        head = metrics.get("lesion_ml_volume_head_mae")
        if head is not None and head < metrics["lesion_ml_seg_mae"]:
            oracle.spec.lesion_ml_from = "volume_head"
            metrics = validate(oracle, pool)
        return metrics
    oracle.net.eval()
    pred = oracle.predict(calibration_pool["images"].astype(np.float32), batch_size=8)
    true = calibration_pool["lesion_ml"]
    best = None
    for source, key in (("segmentation", "lesion_ml_seg"), ("volume_head", "lesion_ml_volume_head")):
        if key not in pred:
            continue
        cal = fit_calibration(pred[key], true)
        mae = float(np.abs(apply_calibration(pred[key], cal) - true).mean())
        if best is None or mae < best[0]:
            best = (mae, source, cal)
    oracle.spec.lesion_ml_from, oracle.spec.lesion_ml_calibration = best[1], best[2]
    metrics = validate(oracle, pool)
    metrics["calibration"] = {"subjects": int(len(true)), "estimate": best[1], "calibration_pool_mae": round(best[0], 3),
                              "knots": len(best[2]["x"])}
    return metrics


def calibration_pool(cfg: dict, grid: ModelGrid, out: Path) -> dict[str, np.ndarray]:
    """Subjects for the lesion-volume calibration: seeds disjoint from training (seed) and validation (seed + 10000)."""
    tag = "x".join(map(str, grid.shape))
    n = int(cfg["data"].get("calibration_subjects") or 240)
    return synthetic_pool(grid, cfg["contrast"], cfg["seed"] + 20_000, n, int(cfg["data"].get("pool_workers") or 1),
                          out / f"pool_cal_{cfg['seed']}_{tag}.npz", cfg["data"].get("anatomies") or ("icbm152",))


def revalidate(folder: Path, run: Path, *, calibration_subjects: int | None = None) -> Path:
    """Re-calibrate and re-validate a trained oracle on its run's pools and re-save it with the chosen estimate.

    ``calibration_subjects`` changes the size of the calibration pool (same seeds: a larger
    pool extends the smaller one) and is recorded in the oracle's training config.
    """
    from CounterfactualGenLib.evaluation.oracle import load_oracle

    oracle = load_oracle(folder)
    cfg = {**DEFAULTS, **oracle.spec.training.get("config", {})}
    cfg["data"] = {**DEFAULTS["data"], **cfg.get("data", {})}
    if calibration_subjects is not None:
        if int(calibration_subjects) < 8:
            raise InputError("--calibration-subjects must be at least 8.")
        cfg["data"]["calibration_subjects"] = int(calibration_subjects)
        if "config" in oracle.spec.training:
            oracle.spec.training["config"] = {**oracle.spec.training["config"], "data": dict(cfg["data"])}
        oracle.spec.training["recalibrated"] = {"calibration_subjects": int(calibration_subjects)}
    # the run's validation pool; remade from its seeds (deterministic) when the run folder no longer has it
    pool = validation_pool(oracle.grid, cfg["contrast"], int(cfg["seed"]), int(cfg["data"]["val_subjects"]),
                           int(cfg["data"].get("pool_workers") or 1), run, cfg["data"].get("anatomies") or ("icbm152",))
    metrics = choose_lesion_estimate(oracle, pool, calibration_pool(cfg, oracle.grid, run))
    oracle.spec.metrics = {"validation": "held-out synthetic subjects", **metrics}
    summary = {"out": str(run), **{k: v for k, v in oracle.spec.training.items() if k != "config"}}
    import torch

    dtype = getattr(torch, cfg["weights_dtype"]) if cfg.get("weights_dtype") else None  # as the run saved it
    out = save_oracle(oracle, folder, dtype=dtype, card=oracle_card(oracle.spec, summary, cfg), overwrite=True)
    print(json.dumps(metrics, indent=1), file=sys.stderr)
    return out


# ---------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------
def _init_line(i: dict | None) -> str:
    """The card row of an oracle that continued from another one (``init_from``), or nothing."""
    if not i:
        return ""
    return (f"| initialised from | oracle `{i.get('id')}` ({i.get('oracle')}): {i.get('iterations')} iterations on "
            f"{i.get('train_subjects')} subjects, {i.get('train_minutes')} min (config {i.get('config_path')}); "
            "fresh optimiser and learning-rate schedule |\n")


def _calibration_line(c: dict | None) -> str:
    if not c:
        return "none"
    return (f"isotonic regression of the true volume on the {c['estimate']} estimate, fitted on {c['subjects']} "
            f"further synthetic subjects (neither training nor validation), {c['knots']} knots")


def _anatomy_words(cfg: dict) -> str:
    """The training anatomies as the card names them ("MNI ICBM152 2009a anatomy", or several brains)."""
    from CounterfactualGenLib.synth.resources import ANATOMY_TITLES

    names = [ANATOMY_TITLES.get(a, a) for a in (cfg.get("data", {}).get("anatomies") or ("icbm152",))]
    if len(names) == 1:
        return f"{names[0]} anatomy"
    return f"anatomy of {len(names)} brains, {', '.join(names[:-1])} and {names[-1]}, each subject drawn from one at random"


def oracle_card(spec: OracleSpec, summary: dict, cfg: dict) -> str:
    m = spec.metrics
    return f"""# Evaluation oracle `{spec.id}`

A small 3D CNN that reads **lesion volume** (segmentation head) and **atrophy class
CN / MCI / AD** (classification head) from a {spec.contrast} image on the
{list(spec.grid.shape)} × {spec.grid.spacing_mm} mm model grid, in model intensity units
(background −1, brain p99.5 +1). It judges generated counterfactuals (`counterfactualgen
evaluate`); it is a measuring instrument for *synthetic* images, not a clinical tool.

| | |
|---|---|
| architecture | U-Net, channels {spec.architecture['channels']}, {summary['parameters']:,} parameters |
| training data | {cfg['data']['train_subjects']} synthetic subjects (engine `counterfactualgen-synth-1`: {_anatomy_words(cfg)}, real MS lesion masks (Lesjak et al. 2018), atrophy), balanced over 4 lesion classes × 3 diagnoses |
| validation data | {m.get('n_subjects')} held-out synthetic subjects (other seeds) |
| training | {summary['iterations']} iterations × batch {cfg['batch_size']}, AdamW lr {cfg['lr']} (cosine), loss Dice + BCE (lesions) + CE (diagnosis) + MSE (atrophy level) + MSE (log(1 + lesion ml)) |
| hardware / time | {summary['hardware']}, {summary['train_minutes']:.1f} min (+ {summary['pool_minutes']:.1f} min making subjects) |
{_init_line(summary.get('init_from'))}
## Validation (held-out synthetic subjects)
| metric | value |
|---|---|
| lesion volume MAE (ml), the estimate used (`{m.get('lesion_ml_source')}`) | {m.get('lesion_ml_mae')} (by true class: {m.get('lesion_ml_mae_by_class')}) |
| lesion volume MAE (ml): sum of segmentation probabilities / volume head | {m.get('lesion_ml_seg_mae')} / {m.get('lesion_ml_volume_head_mae')} |
| lesion volume MAE (ml) before calibration | {m.get('lesion_ml_raw_mae')} |
| calibration | {_calibration_line(m.get('calibration'))} |
| lesion volume Pearson r | {m.get('lesion_ml_pearson_r')} |
| Dice at p > 0.5 (subjects with lesions, n={m.get('dice_n')}) | {m.get('dice_mean')} |
| lesion-class accuracy (none 0 / minimal ≤ 5 / moderate ≤ 15 / high > 15 ml) | {m.get('lesion_class_accuracy')} |
| diagnosis accuracy (CN/MCI/AD; chance 0.33) | {m.get('diagnosis_accuracy')} |
| confusion (rows true CN/MCI/AD, cols predicted) | {m.get('diagnosis_confusion_rows_true_cols_pred')} |
| atrophy-level MAE | {m.get('atrophy_mae')} |

Caveats: trained on engine images only. Generated images differ (smoother, other
artefacts); flips, shifts, gain and noise augmentation narrow but do not close that gap.
MCI vs its neighbours is the hardest call (atrophy levels 0.35–0.65 vs CN ≤ 0.15 and AD ≥ 0.85,
a ventricle change of about one 5 mm voxel).

Reproduce: `nice -n 10 env OMP_NUM_THREADS=1 python Training/train_oracle.py --config {summary['config_path']} --out {summary.get('out') or 'runs/' + spec.id}`{_recalibrated_line(summary)}
"""


def _recalibrated_line(summary: dict) -> str:
    """The re-calibration step of the card's Reproduce line, for an oracle re-calibrated after training."""
    r = summary.get("recalibrated")
    if not r:
        return ""
    out = summary.get("out") or "RUN"
    return (f", then `python Training/train_oracle.py --revalidate --out {out} --calibration-subjects "
            f"{r['calibration_subjects']}` (re-calibrated on a larger pool after training)")


def train(cfg: dict, out: Path, *, config_path: str = "") -> Path:
    torch.set_num_threads(int(cfg.get("threads") or 1))
    torch.manual_seed(cfg["seed"])
    grid = ModelGrid.from_dict(cfg["grid"])
    out.mkdir(parents=True, exist_ok=True)
    shape_tag = "x".join(map(str, grid.shape))
    t_pool = time.perf_counter()
    workers = int(cfg["data"].get("pool_workers") or 1)
    anatomies = tuple(cfg["data"].get("anatomies") or ("icbm152",))
    train_pool = synthetic_pool(grid, cfg["contrast"], cfg["seed"], int(cfg["data"]["train_subjects"]), workers,
                                out / f"pool_train_{cfg['seed']}_{shape_tag}.npz", anatomies)
    val_pool = validation_pool(grid, cfg["contrast"], cfg["seed"], int(cfg["data"]["val_subjects"]), workers, out,
                               anatomies)
    pool_minutes = (time.perf_counter() - t_pool) / 60
    print(f"Pools: {len(train_pool['diagnosis'])} train, {len(val_pool['diagnosis'])} validation subjects "
          f"({pool_minutes:.1f} min).", file=sys.stderr)

    spec = OracleSpec(id=cfg["id"], grid=grid, architecture={**DEFAULT_ARCHITECTURE, **cfg["architecture"]},
                      contrast=cfg["contrast"], description=cfg.get("description", ""))
    oracle = Oracle(spec)
    init_info = None
    if cfg.get("init_from"):  # continue from an installed oracle: its weights, a fresh optimiser and schedule
        from CounterfactualGenLib.evaluation.oracle import load_oracle

        prev = load_oracle(Path(cfg["init_from"]))
        if prev.grid.to_dict() != grid.to_dict() or prev.spec.architecture != spec.architecture:
            raise InputError(f"init_from {cfg['init_from']}: its grid or architecture differs from this config's.")
        oracle.net.load_state_dict({k: v.float() for k, v in prev.net.state_dict().items()}, strict=True)
        t_prev = prev.spec.training or {}
        init_info = {"oracle": str(cfg["init_from"]), "id": prev.id, "iterations": t_prev.get("iterations"),
                     "train_minutes": t_prev.get("train_minutes_total", t_prev.get("train_minutes")),
                     "train_subjects": t_prev.get("train_subjects"), "config_path": t_prev.get("config_path")}
        print(f"Initialised from oracle {cfg['init_from']} ({init_info['iterations']} iterations).", file=sys.stderr)
    net = oracle.net.train()
    n_params = oracle.parameter_count()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    iters = int(cfg["iterations"])
    t_start = time.perf_counter()
    budget_s = 60 * cfg["max_minutes"] if cfg.get("max_minutes") else None

    def progress(s: int) -> float:  # cosine over whichever budget ends first: iterations or max_minutes
        p = min(s, iters) / iters
        if budget_s:
            p = max(p, min(1.0, (time.perf_counter() - t_start) / budget_s))
        return p

    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * max(0.5 * (1 + math.cos(math.pi * progress(s))), 0.01))
    w = cfg["loss_weights"]
    gen = torch.Generator().manual_seed(cfg["seed"] * 31 + 7)
    images = torch.from_numpy(train_pool["images"].astype(np.float32))
    lesions = torch.from_numpy(train_pool["lesion"].astype(np.float32))
    log_ml = torch.from_numpy(np.log1p(train_pool["lesion_ml"]).astype(np.float32))
    dx = torch.from_numpy(train_pool["diagnosis"])
    atro = torch.from_numpy(train_pool["atrophy"])
    n = len(dx)
    logf = (out / "log.csv").open("w", newline="")
    log = csv.writer(logf)
    log.writerow(["step", "loss", "dice", "bce", "ce", "atrophy", "lr", "seconds"])
    t0 = time.perf_counter()
    deadline = t0 + 60 * cfg["max_minutes"] if cfg.get("max_minutes") else None
    run = None
    step = 0
    perm = torch.randperm(n, generator=gen)
    cursor = 0
    while step < iters:
        if cursor + cfg["batch_size"] > n:
            perm, cursor = torch.randperm(n, generator=gen), 0
        idx = perm[cursor:cursor + cfg["batch_size"]]
        cursor += cfg["batch_size"]
        x, y = augment(images[idx].clone()[:, None], lesions[idx].clone()[:, None], cfg, gen)
        o = net(x)
        l_dice = soft_dice_loss(o["lesion_logit"], y)
        l_bce = F.binary_cross_entropy_with_logits(o["lesion_logit"], y)
        l_ce = F.cross_entropy(o["diagnosis_logits"], dx[idx])
        l_at = F.mse_loss(o["atrophy"], atro[idx])
        loss = w["dice"] * l_dice + w["bce"] * l_bce + w["ce"] * l_ce + w["atrophy"] * l_at
        if "lesion_log_ml" in o:  # flips/shifts keep the volume, gain/noise do not change the truth
            loss = loss + w.get("volume", 1.0) * F.mse_loss(o["lesion_log_ml"], log_ml[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        parts = [float(v.detach()) for v in (loss, l_dice, l_bce, l_ce, l_at)]
        run = parts if run is None else [0.95 * a + 0.05 * b for a, b in zip(run, parts)]
        if step % cfg["log_every"] == 0 or step == iters:
            el = time.perf_counter() - t0
            log.writerow([step] + [f"{v:.4f}" for v in run] + [f"{sched.get_last_lr()[0]:.2e}", f"{el:.1f}"])
            logf.flush()
            print(f"step {step}/{iters} loss {run[0]:.4f} (dice {run[1]:.3f} bce {run[2]:.4f} ce {run[3]:.3f} "
                  f"atrophy {run[4]:.4f}) {el / step:.2f} s/step", file=sys.stderr, flush=True)
        if deadline and time.perf_counter() > deadline:
            print(f"Stopping at step {step}: max_minutes reached.", file=sys.stderr)
            break
    logf.close()
    minutes = (time.perf_counter() - t0) / 60
    oracle.net.eval()
    metrics = choose_lesion_estimate(oracle, val_pool, calibration_pool(cfg, grid, out))
    summary = {"iterations": step, "batch_size": cfg["batch_size"], "parameters": n_params,
               "train_minutes": round(minutes, 2), "pool_minutes": round(pool_minutes, 2),
               "final_loss": round(run[0], 4) if run else None, "config_path": config_path, "out": str(out),
               **({"init_from": init_info, "train_minutes_total": round(minutes + float(init_info["train_minutes"] or 0), 2)}
                  if init_info else {}),
               "train_subjects": int(n), "val_subjects": int(len(val_pool["diagnosis"])),
               "hardware": f"{platform.processor() or platform.machine() or 'CPU'}, "
                           f"{torch.get_num_threads()} thread(s), torch {torch.__version__}",
               "data": "synthetic engine counterfactualgen-synth-1, random_spec, balanced classes, anatomy "
                       + " and ".join(cfg["data"].get("anatomies") or ["icbm152"])}
    spec.training = {**summary, "config": cfg}
    spec.metrics = {"validation": "held-out synthetic subjects", **metrics}
    dtype = getattr(torch, cfg["weights_dtype"]) if cfg.get("weights_dtype") else None
    folder = save_oracle(oracle, out / "oracle", dtype=dtype, card=oracle_card(spec, summary, cfg), overwrite=True)
    print(json.dumps(metrics, indent=1), file=sys.stderr)
    print(f"Wrote oracle to {folder} ({minutes:.1f} min training).", file=sys.stderr)
    return folder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="JSON config (see Training/configs/oracle_5mm.json)")
    ap.add_argument("--out", required=True, help="run folder (subject pools, log, final oracle)")
    ap.add_argument("--revalidate", action="store_true",
                    help="no training: re-calibrate and re-validate OUT/oracle on OUT's pools, choose the lesion "
                         "estimate, re-save")
    ap.add_argument("--calibration-subjects", type=int, default=None, metavar="N",
                    help="with --revalidate: calibrate on N subjects (the run's calibration seeds; default the "
                         "oracle's config)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override a config value, e.g. --set iterations=10")
    args = ap.parse_args(argv)
    if args.revalidate:
        revalidate(Path(args.out) / "oracle", Path(args.out), calibration_subjects=args.calibration_subjects)
        return 0
    if args.calibration_subjects is not None:
        ap.error("--calibration-subjects goes with --revalidate (in training, set data.calibration_subjects)")
    if not args.config:
        ap.error("--config is required (except with --revalidate)")
    try:
        cfg = load_config(DEFAULTS, args.config, args.set, merge_sections=True)
    except InputError as exc:
        ap.error(str(exc))
    try:
        for section in ("data", "augment", "loss_weights"):
            check_keys(cfg[section], DEFAULTS[section], section)
        from CounterfactualGenLib.synth import ANATOMIES

        an = cfg["data"].get("anatomies")
        if not (isinstance(an, list) and an and all(a in ANATOMIES for a in an)):
            raise InputError(f"data.anatomies must be a list of {list(ANATOMIES)}; got {an!r}.")
    except InputError as exc:
        ap.error(str(exc))
    if (Path(args.out) / "oracle" / "oracle.json").exists():
        ap.error(f"{args.out} already holds a trained oracle; choose another --out (nothing was changed). "
                 "To continue from it, set init_from to its oracle folder.")
    train(cfg, Path(args.out), config_path=args.config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
