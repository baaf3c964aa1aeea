#!/usr/bin/env python
"""Train a text-conditioned 3D diffusion model (WDM or latent, rectified flow).

Data: the synthetic subject engine (exact ground truth, on the fly) or a dataset
manifest CSV (``image`` path column + tabular columns turned into prompts).

Runs on CPU (tiny tests), one GPU, or many GPUs/nodes with torchrun (DDP):

    python Training/train_diffusion.py --config Training/configs/wdm_cpu_demo.json --out runs/demo
    torchrun --nproc_per_node=8 Training/train_diffusion.py --config Training/configs/wdm_128.json --out runs/wdm128

Every run writes checkpoints (``ckpt/last.safetensors`` + ``ckpt/state.json``, resume
with ``--resume``), a CSV log (and TensorBoard if installed), periodic sample montages,
and finally a model folder in the library's format with a model card. ``--resume --set
iterations=N`` with N the checkpoint's step writes that checkpoint's model without training.
Fine-tuning stages: ``init_from`` (start), ``lesion_weight`` / ``lesion_prior_weight`` /
``lesion_weight_volume_ref_ml`` (loss weights), ``data.lesion_class_draw`` (draw) and
``anchor`` (learn some lesion-load classes, hold the rest to a frozen model): see DEFAULTS.
Imagining Alternatives §2 (BiomedCLIP cross-attention, condition dropout for CFG),
WDM (Haar sub-band diffusion), MAISI (rectified flow), Simple Diffusion (shifted schedule).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import platform
import random
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from CounterfactualGenLib.config import check_keys, load_config  # noqa: E402
from CounterfactualGenLib.errors import InputError, ModelError  # noqa: E402
from CounterfactualGenLib.geometry import ModelGrid  # noqa: E402
from CounterfactualGenLib.synth.resources import ANATOMY_TITLES  # noqa: E402
from CounterfactualGenLib.manifest import Manifest, ManifestRow, prompt_config_from_dict, read_manifest  # noqa: E402
from CounterfactualGenLib.models import DiffusionModel, ModelSpec, save_model  # noqa: E402
from CounterfactualGenLib.volume import umask_mode  # noqa: E402

DEFAULTS: dict[str, Any] = {
    "id": "cfg-wdm-custom",
    "name": "",
    "description": "",
    "family": "wdm",
    "size": "tiny",
    "grid": {"shape": [40, 48, 40], "spacing_mm": 4.0, "center_ras": [0.0, -18.0, 8.0]},
    "contrast": "FLAIR",
    # 48 tokens fit a manifest's four clauses (lesion load, diagnosis, age/sex, EDSS: about 40 MiniLM
    # tokens) and the paraphrases; the bundled configs keep the 24 they were trained with.
    "text_encoder": {"id": "minilm-l6-v2", "max_tokens": 48},
    # data.kind "synthetic" (the engine) or "manifest": data.manifest is a CSV of your scans
    # (CounterfactualGenLib/manifest.py: columns, checks), data.prompts how its tabular columns
    # become prompts (default: the columns it has), data.ignore_columns columns to leave alone.
    # data.lesion_class_draw (synthetic pool only), e.g. {"minimal": 2}: subjects of that
    # lesion-load class are drawn that many times as often; the pool itself stays balanced.
    "data": {"kind": "synthetic", "manifest": None, "paraphrase_prob": 0.3},
    "schedule": {"kind": "rflow", "default_steps": 20, "default_guidance": 2.0, "base_numel": 32768},
    "batch_size": 4,
    "grad_accum": 1,
    "iterations": 1000,
    "lr": 2e-4,
    "weight_decay": 0.0,
    "cond_dropout": 0.1,
    "ema_decay": 0.995,
    "ema_start": 100,
    "seed": 0,
    "num_workers": 0,
    "checkpoint_every": 200,
    "sample_every": 500,
    "log_every": 10,
    "max_minutes": None,
    "weights_dtype": "float16",
    "denoiser": None,  # a full denoiser config; None = the family/size preset (+ denoiser_overrides)
    "denoiser_overrides": None,
    "autoencoder_path": None,
    "threads": None,
    # Lesion-region loss weight: for samples whose prompt names a lesion load (and whose
    # condition is not dropped), the loss near their lesions (mask max-pooled to the
    # diffusion grid, dilated by one cell) counts (1 + lesion_weight) times. Unconditional
    # and diagnosis-only samples keep the plain loss. 0 = off.
    "lesion_weight": 0.0,
    # Lesion-prior weight: for the same samples, the loss wherever the training pool has
    # lesions at all (voxel frequency > 1 %) counts (1 + lesion_prior_weight) times, also
    # for "no lesions" prompts; the weight depends on position and prompt, not on the
    # sample's own lesions, so it leaves the loss's minimiser unchanged. 0 = off.
    "lesion_prior_weight": 0.0,
    # Lesion weight by lesion volume: with a reference volume R (ml), each sample's lesion
    # weight is scaled by clip(sqrt(R / its lesion ml), 1/4, 4), so small lesion sets weigh
    # more and large ones less. The lesion weight tilts what the model learns towards lesions
    # where a sample has them (it weights samples by their own lesions); this moves that tilt
    # from high loads (which the model over-produces) to minimal ones (which it under-produces).
    # None = off (every sample's lesions weigh lesion_weight).
    "lesion_weight_volume_ref_ml": None,
    # Start from another run's checkpoint (net, EMA, optimiser, step): fine-tuning with a
    # changed config, e.g. turning lesion_weight on after plain training.
    "init_from": None,
    # Parameter-name prefixes of the denoiser that train, e.g. ["unet.conv_in", "unet.down_blocks.0"]; no
    # other parameter is optimised (a fine-tune that may change only the outer levels, where a scan's framing
    # enters, and not the text's cross-attention). From a model folder they stay bit for bit; from a run's
    # checkpoint the written EMA still drifts them from that run's EMA towards its raw weights. None = all train.
    "train_only": None,
    # Anchored fine-tuning (synthetic pool only), e.g.
    # {"model": "Resources/Models/cfg-wdm-flair-5mm-cpu", "learn": ["minimal"], "weight": 1.0}:
    # samples whose prompt names a lesion-load class in "learn" (condition kept) learn from
    # the data as usual; every other sample (other classes, diagnosis-only prompts, dropped
    # conditions) is trained to reproduce the frozen anchor model's prediction on the same
    # noisy input and prompt, with loss weight "weight". It changes what the model does for
    # the learnt classes and holds the rest (and the unconditional branch guidance uses) where
    # the anchor had it: fine-tunes on one class otherwise move its neighbours in text space too.
    # With "guidance": g (>= 1; 1 = plain) the learnt samples are fitted through classifier-free guidance at
    # scale g instead: their target is u + (v - u) / g, u the anchor's unconditional prediction,
    # so that the guided prediction u + g·(c - u) (not the conditional c alone) matches the data.
    # Guidance extrapolates away from the unconditional prediction, whose lesion load is the
    # population's mean: it pushes a class below the mean (minimal) further down, to none.
    # Not a general calibration: the guided members then come out about as faint as unguided samples
    # (on the bundled model that helped minimal and emptied moderate and high; Training/EXPERIMENTS.md).
    # With "learn_anatomies": [names from data.anatomies] every sample of those brains learns from the
    # data (every prompt, dropped conditions too: the unconditional branch learns the new brains as
    # well), while the other brains' samples copy the anchor: a model learns further brains and keeps
    # what it does on the ones it knew. "learn" may then be empty; "guidance" is refused with it.
    # With "background_invariance": true (needs data.flat_background_prob > 0; "learn" may then be empty)
    # a draw framed flat (−1 outside the brain) copies the anchor's prediction on the same draw as the
    # data has it (its own outside of the brain: the engine's noise), moved by the exact difference the
    # framing makes (v = x0 − noise, so x0_flat − x0): inside the brain the model learns to predict what
    # the anchor predicts whatever lies outside it, so an edit may show it a flat −1 there
    # (Testing/Benchmarks/README.md, "The model sees the brain only?").
    "anchor": None,
}


# ---------------------------------------------------------------------------------
# distributed helpers
# ---------------------------------------------------------------------------------
def ddp_setup() -> tuple[int, int, torch.device]:
    """Initialise torch.distributed when launched by torchrun (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device(f"cuda:{local}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def is_main(rank: int) -> bool:
    return rank == 0


# ---------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------
def _synthetic_item(args: tuple[int, str, str, tuple, float, tuple, tuple]
                    ) -> tuple[np.ndarray, str, str, np.ndarray, str, np.ndarray]:
    """One synthetic subject in model units + its lesion-load class, diagnosis, exact lesion mask, anatomy and
    brain mask (pool worker)."""
    from CounterfactualGenLib.intensity import IntensityNormalizer
    from CounterfactualGenLib.synth import make_subject, random_spec

    seed, lesion_class, diagnosis, shape, spacing, center, anatomies = args
    spec = random_spec(seed, lesion_class=lesion_class, diagnosis=diagnosis, anatomy=anatomies)
    subj = make_subject(spec, shape=shape, spacing_mm=spacing, center_mm=center)
    norm = IntensityNormalizer.fit(subj.image.array, subj.brain_mask, upper_percentile=99.5)
    img = np.clip(norm.forward(subj.image.array), -1.0, 1.5).astype(np.float16)
    return (img, subj.attributes["lesion_load"], subj.attributes["diagnosis"], subj.lesion_mask.astype(np.uint8),
            spec.anatomy, (subj.brain_mask > 0).astype(np.uint8))


def synthetic_pool(cfg: dict, grid: ModelGrid, seed: int, size: int, cache: Path | None) -> dict[str, np.ndarray]:
    """A pool of synthetic subjects, balanced over lesion-load classes and diagnoses.

    Generating a subject costs ~0.5 s on a CPU core, more than a training step of a
    small model, so subjects are made once (in parallel) and re-used; prompts are
    built per draw (clause choice and paraphrases differ every time).
    """
    anatomies = tuple(cfg["data"].get("anatomies") or DATA_KEYS["anatomies"])
    if cache is not None and cache.exists():
        data = np.load(cache)
        made_from = tuple(data["anatomies"].tolist()) if "anatomies" in data.files else ("icbm152",)
        if ("lesion_masks" in data.files and len(data["lesion"]) >= size
                and ("brain_masks" in data.files or not cfg["data"].get("flat_background_prob"))
                and tuple(data["images"].shape[1:]) == tuple(grid.shape) and made_from == anatomies
                and ("anatomy" in data.files or len(anatomies) == 1)):  # caches before "anatomy": one brain
            pool = {k: data[k][:size] for k in data.files if k != "anatomies"}
            pool.setdefault("anatomy", np.full(len(pool["lesion"]), anatomies[0]))
            return pool
    from concurrent.futures import ProcessPoolExecutor

    lesion_classes = ("none", "minimal", "moderate", "high")
    diagnoses = ("CN", "MCI", "AD")
    rng = random.Random(seed)
    jobs = [(rng.randrange(2**31), lesion_classes[i % 4], diagnoses[(i // 4) % 3], tuple(grid.shape),
             grid.spacing_mm, tuple(grid.center_ras), anatomies) for i in range(size)]
    workers = max(1, int(cfg["data"].get("pool_workers") or os.cpu_count() or 1))
    from tqdm import tqdm

    if workers == 1:  # no process pool to start
        items = [_synthetic_item(j) for j in tqdm(jobs, desc="synthesise", file=sys.stderr, mininterval=5.0)]
    else:
        with ProcessPoolExecutor(workers) as ex:
            items = list(tqdm(ex.map(_synthetic_item, jobs, chunksize=4), total=size, desc="synthesise",
                              file=sys.stderr, mininterval=5.0))
    pool = {"images": np.stack([i[0] for i in items]), "lesion": np.array([i[1] for i in items]),
            "diagnosis": np.array([i[2] for i in items]), "lesion_masks": np.stack([i[3] for i in items]),
            "anatomy": np.array([i[4] for i in items]), "brain_masks": np.stack([i[5] for i in items])}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(".partial-" + cache.name)
        with open(tmp, "wb") as f:
            np.savez(f, **pool, anatomies=np.array(anatomies))
        os.replace(tmp, cache)
    return pool


def pool_prompt(lesion: str, diagnosis: str, rng: random.Random, cfg: dict) -> tuple[str, bool]:
    """The prompt for a pool subject: its lesion load, its diagnosis, or both; sometimes paraphrased.

    Returns the prompt and whether it names the lesion load.
    """
    from CounterfactualGenLib.text.prompts import canonical_prompt, paraphrase

    r = rng.random()
    both = cfg["data"].get("both_clauses_prob", 0.2)
    if r < both:
        prompt = canonical_prompt(lesion_load=lesion) + " " + canonical_prompt(diagnosis=diagnosis)
    elif r < both + (1 - both) / 2:
        prompt = canonical_prompt(lesion_load=lesion)
    else:
        prompt = canonical_prompt(diagnosis=diagnosis)
    if rng.random() < cfg["data"].get("paraphrase_prob", 0.0):
        prompt = paraphrase(prompt, rng)
    return prompt, r < both + (1 - both) / 2


def pool_prompt_set() -> list[str]:
    """Every prompt :func:`pool_prompt` can return (canonical and paraphrased clauses, alone or paired).

    Paraphrasing replaces each canonical sentence by one of its class's templates (the
    canonical wording is one of them), so this product covers every outcome; the test
    suite checks it against many random draws. Training/embed_prompts.py embeds this set.
    """
    from CounterfactualGenLib.text.prompts import (DIAGNOSIS_CLASSES, DIAGNOSIS_PARAPHRASES, LESION_LOAD_CLASSES,
                                                   LESION_PARAPHRASES)

    lesion = [t for c in LESION_LOAD_CLASSES for t in LESION_PARAPHRASES[c]]
    dx = [t for c in DIAGNOSIS_CLASSES for t in DIAGNOSIS_PARAPHRASES[c]]
    return list(dict.fromkeys(lesion + dx + [f"{a} {b}" for a in lesion for b in dx]))


def register_manifest(cfg: dict, grid: ModelGrid, manifest: Manifest, templates: dict, *,
                      cache: Path | None = None, verbose: bool = True) -> dict[int, dict]:
    """Register every scan of a manifest to the template the model ships, before any training.

    Each scan goes through :func:`CounterfactualGenLib.pipeline.to_model_space`, the function
    edits use, so a scan that an edit would refuse (registration correlation below the QC
    threshold, an empty brain) is refused here, all of them in one message with their lines.
    ``templates`` are the model's (:func:`edit_templates`).
    Returns {line: {"scan", "correlation", "transform"}}; ``cache`` (a JSON file in the run folder)
    keeps the results for a resumed run (entries of unchanged files are reused).
    """
    from tqdm import tqdm

    from CounterfactualGenLib.geometry import mask_on_grid
    from CounterfactualGenLib.pipeline import to_model_space
    from CounterfactualGenLib.volume import read_volume

    old = {}
    if cache is not None and cache.exists():
        old = {e["scan"]: e for e in json.loads(cache.read_text()).get("scans", [])}
    tpl_brain = templates["brain_mask"].array > 0.5
    out: dict[int, dict] = {}
    failed: list[str] = []
    for row in tqdm(manifest.rows, desc="register", file=sys.stderr, disable=not verbose, mininterval=2.0):
        scan = row.scan(cfg["contrast"])
        st = scan.stat()
        prev = old.get(str(scan))
        if prev and prev.get("size") == st.st_size and prev.get("mtime") == st.st_mtime:
            out[row.line] = prev
            continue
        try:
            vol = read_volume(scan)
            mask = (mask_on_grid(read_volume(row.brain_mask, validate=False), vol.shape, vol.affine_ras,
                                 name="brain mask")[0] if row.brain_mask else None)
            ms = to_model_space(vol, grid, templates["image"], tpl_brain, brain_mask=mask, contrast=cfg["contrast"])
            if row.lesion_mask:  # every rank reads it: a refusal must stop them all
                lm = mask_on_grid(read_volume(row.lesion_mask, validate=False), vol.shape, vol.affine_ras,
                                  name="lesion mask")[0]
                if verbose:
                    _check_lesion_mask(manifest, row, lm > 0, ms.brain_mask,
                                       abs(np.linalg.det(vol.affine_ras[:3, :3])))
        except InputError as exc:
            failed.append(f"line {row.line} ({scan.name}): {exc}")
            continue
        out[row.line] = {"scan": str(scan), "size": st.st_size, "mtime": st.st_mtime,
                         "correlation": round(float(ms.correlation), 4),
                         "transform": ms.mapping.model_to_source_world.tolist()}
    if failed:
        raise InputError(f"{len(failed)} scan(s) of {manifest.path} cannot be used (an edit would refuse them too; "
                         "fix or remove the rows):\n  " + "\n  ".join(failed[:20])
                         + (f"\n  … and {len(failed) - 20} more" if len(failed) > 20 else ""))
    if verbose:
        c = sorted(e["correlation"] for e in out.values())
        print(f"Registered {len(c)} scans to the model's template: correlation inside its brain min {c[0]:.3f}, "
              f"median {c[len(c) // 2]:.3f} (QC threshold 0.3).", file=sys.stderr)
    return out


def _registration_note(registered: dict[int, dict]) -> str:
    c = sorted(e["correlation"] for e in registered.values())
    return f" Registration to the template: correlation min {c[0]:.3f}, median {c[len(c) // 2]:.3f}."


def manifest_stream(cfg: dict, grid: ModelGrid, seed: int, manifest: Manifest, registered: dict[int, dict],
                    tpl_brain: np.ndarray) -> Iterator[tuple[np.ndarray, ManifestRow, np.ndarray, np.ndarray]]:
    """(image on the model grid, its manifest row, lesion mask and brain mask on the grid), drawn at random from a
    checked manifest (:func:`CounterfactualGenLib.manifest.read_manifest`) whose scans
    :func:`register_manifest` registered (``tpl_brain``: the template's brain, a bool array on the grid).

    Each scan is brought into the model's space once, and cached, by the function edits use
    (:func:`CounterfactualGenLib.pipeline.to_model_space`, with the registration already made): the
    row's brain mask or the template's, intensities normalised. The lesion mask is zeros for a row
    without one.
    """
    from CounterfactualGenLib.geometry import mask_on_grid
    from CounterfactualGenLib.pipeline import MODEL_INPUT_RANGE, to_model_space
    from CounterfactualGenLib.volume import read_volume

    rng = random.Random(seed)
    # Scans in model space, most recently drawn last, up to data.cache_mb per process (each data worker
    # keeps its own): a large cohort at 128³ would otherwise fill the memory.
    cache: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
    budget, held = float(cfg["data"].get("cache_mb", DATA_KEYS["cache_mb"])) * 2**20, 0
    while True:
        row = rng.choice(manifest.rows)
        if row.line in cache:
            cache.move_to_end(row.line)
        else:
            try:
                vol = read_volume(row.scan(cfg["contrast"]))
                mask = (mask_on_grid(read_volume(row.brain_mask, validate=False), vol.shape, vol.affine_ras,
                                     name="brain mask")[0] if row.brain_mask else None)
                ms = to_model_space(vol, grid, None, tpl_brain, brain_mask=mask, contrast=cfg["contrast"],
                                    transform=np.array(registered[row.line]["transform"]))
                lesions = np.zeros(grid.shape, np.uint8)
                if row.lesion_mask:
                    lm = mask_on_grid(read_volume(row.lesion_mask, validate=False), vol.shape, vol.affine_ras,
                                      name="lesion mask")[0]
                    lesions = (ms.mapping.to_model(lm.astype(np.float32), interpolation="linear") > 0.01
                               ).astype(np.uint8)
            except InputError as exc:
                raise InputError(f"{manifest.path}, line {row.line} ({row.scan(cfg['contrast'])}): {exc}") from None
            cache[row.line] = (np.clip(ms.x_model, *MODEL_INPUT_RANGE).astype(np.float32), lesions,  # what an edit reads
                               ms.brain_model.astype(np.uint8))
            held += sum(a.nbytes for a in cache[row.line])
            while held > budget and len(cache) > 1:
                held -= sum(a.nbytes for a in cache.popitem(last=False)[1])
        yield cache[row.line][0], row, cache[row.line][1], cache[row.line][2]


def _check_lesion_mask(manifest: Manifest, row: ManifestRow, lesions: np.ndarray, brain: np.ndarray,
                       voxel_mm3: float) -> None:
    """Warn about a lesion mask that does not fit its row: mostly outside the brain (another subject's,
    or one in template space), or far from the row's lesion volume."""
    n = int(lesions.sum())
    if n and (lesions & brain).sum() < 0.5 * n:
        print(f"Warning: {manifest.path}, line {row.line}: most of the lesion mask lies outside the brain; is it "
              f"this scan's ({row.lesion_mask})?", file=sys.stderr)
    ml = n * voxel_mm3 / 1000.0
    stated = row.lesion_ml
    if stated is not None and abs(ml - stated) > max(1.0, 0.5 * stated):
        print(f"Warning: {manifest.path}, line {row.line}: the lesion mask holds {ml:.1f} ml, the table says "
              f"{stated:g} ml; the prompt follows the table.", file=sys.stderr)


def lesion_class_draw_cdf(lesion: np.ndarray, weights: dict | None) -> np.ndarray | None:
    """Cumulative draw probabilities over pool subjects from per-lesion-class weights.

    ``data.lesion_class_draw`` (e.g. ``{"minimal": 2}``) makes subjects of a class that
    many times as likely to be drawn as the others (classes not named weigh 1); the pool
    itself stays balanced. ``None`` (or no weights): every subject equally likely.
    """
    if not weights:
        return None
    from CounterfactualGenLib.text.prompts import LESION_LOAD_CLASSES

    bad = [k for k in weights if k not in LESION_LOAD_CLASSES]
    if bad:
        raise InputError(f"data.lesion_class_draw: unknown lesion-load class(es) {bad}; use {list(LESION_LOAD_CLASSES)}.")
    vals = {k: float(v) for k, v in weights.items()}
    if any(not np.isfinite(v) or v < 0 for v in vals.values()):
        raise InputError(f"data.lesion_class_draw: weights must be finite and >= 0, got {weights}.")
    p = np.array([vals.get(str(c), 1.0) for c in lesion], np.float64)
    if p.sum() <= 0:
        raise InputError(f"data.lesion_class_draw {weights} leaves no subject of this pool to draw.")
    return np.cumsum(p / p.sum())


class Stream(torch.utils.data.IterableDataset):
    """Endless (image (1, *grid) float32, prompt, names-lesion-load flag, lesion mask (1, *grid) uint8,
    lesion-load class index into LESION_LOAD_CLASSES (-1: the prompt names none), anatomy index into
    ANATOMIES (-1: a manifest's scan), the image as the data has it (1, *grid): before
    data.flat_background_prob framed it, else the image itself)."""

    def __init__(self, cfg: dict, grid: ModelGrid, seed: int, pool: dict[str, np.ndarray] | None = None,
                 manifest: Manifest | None = None, registered: dict[int, dict] | None = None,
                 tpl_brain: np.ndarray | None = None) -> None:
        self.cfg, self.grid, self.seed, self.pool, self.manifest = cfg, grid, seed, pool, manifest
        self.registered, self.tpl_brain = registered, tpl_brain

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        seed = self.seed * 1009 + (info.id if info else 0)
        flat = float(self.cfg["data"].get("flat_background_prob") or 0.0)

        def framed(img: np.ndarray, brain: np.ndarray, rng: random.Random) -> np.ndarray:
            # data.flat_background_prob: this draw's outside of the brain is −1 instead of the scan's own
            # (the engine's noise, a real scan's skull); no draw from rng when it is 0, so runs without it
            # draw as before
            return np.where(brain > 0, img, np.float32(-1.0)) if flat and rng.random() < flat else img

        if self.pool is not None:
            rng = random.Random(seed)
            n = len(self.pool["lesion"])
            cum = lesion_class_draw_cdf(self.pool["lesion"], self.cfg["data"].get("lesion_class_draw"))
            while True:
                i = rng.randrange(n) if cum is None else min(int(np.searchsorted(cum, rng.random(), side="right")), n - 1)
                own = img = self.pool["images"][i].astype(np.float32)
                if flat:  # synthetic_pool makes a cached pool again if it lacks the brain masks
                    img = framed(own, self.pool["brain_masks"][i], rng)
                prompt, names_lesions = pool_prompt(str(self.pool["lesion"][i]), str(self.pool["diagnosis"][i]),
                                                    rng, self.cfg)
                yield (torch.from_numpy(img)[None], prompt, names_lesions,
                       torch.from_numpy(self.pool["lesion_masks"][i])[None], _class_index(str(self.pool["lesion"][i])),
                       _anatomy_index(str(self.pool["anatomy"][i])), torch.from_numpy(own)[None])
        else:
            from CounterfactualGenLib.text.prompts import canonical_prompt, paraphrase

            rng = random.Random(seed + 1)
            both = self.cfg["data"].get("both_clauses_prob", 0.2)
            for own, row, lesions, brain in manifest_stream(self.cfg, self.grid, seed, self.manifest, self.registered,
                                                            self.tpl_brain):
                own = np.ascontiguousarray(own, dtype=np.float32)
                img = framed(own, brain, rng)
                prompt, names = row.prompt, row.lesion_load is not None
                if row.lesion_load is not None and row.diagnosis is not None:
                    # as in the synthetic pool: the whole row's prompt with probability both_clauses_prob,
                    # else one disease clause alone, so that prompts naming one of them mean something
                    r = rng.random()
                    if r >= both:
                        names = r < both + (1 - both) / 2
                        prompt = (canonical_prompt(lesion_load=row.lesion_load) if names
                                  else canonical_prompt(diagnosis=row.diagnosis))
                if rng.random() < self.cfg["data"].get("paraphrase_prob", 0.0):
                    prompt = paraphrase(prompt, rng)
                yield (torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None], prompt, names,
                       torch.from_numpy(lesions)[None], _class_index(row.lesion_load or "") if names else -1, -1,
                       torch.from_numpy(own)[None])


def _anatomy_index(anatomy: str) -> int:
    from CounterfactualGenLib.synth.spec import ANATOMIES

    return list(ANATOMIES).index(anatomy)


def _class_index(lesion_class: str) -> int:
    from CounterfactualGenLib.text.prompts import LESION_LOAD_CLASSES

    return LESION_LOAD_CLASSES.index(lesion_class) if lesion_class in LESION_LOAD_CLASSES else -1


# ---------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------
def lesion_weights(lesions: torch.Tensor, active: torch.Tensor, shape, weight: float,
                   prior: torch.Tensor | None = None, prior_weight: float = 0.0, *,
                   volume_ref_ml: float | None = None, voxel_ml: float = 1.0) -> torch.Tensor | None:
    """Per-cell loss weights (B, 1, *shape): 1 + weight near the lesions of active samples.

    ``lesions`` (B, 1, *grid) is the exact mask on the image grid; it is max-pooled to the
    diffusion grid (wavelet or latent cells) and dilated by one cell, so the weighted
    region is "lesions and their surroundings", not only lesion voxels, which keeps the
    bias towards lesions small. ``None`` when off or when no sample is active.
    ``prior`` (1, 1, *grid) marks where lesions occur at all; with ``prior_weight`` it is
    weighted for every active sample, with or without lesions of its own.
    With ``volume_ref_ml`` = R, each sample's weight is scaled by clip(sqrt(R / v), 1/4, 4),
    v its lesion volume (mask voxels × ``voxel_ml``): small lesion sets weigh more.
    """
    use_prior = prior is not None and prior_weight > 0
    if (weight <= 0 and not use_prior) or not bool(active.any()):
        return None
    size = tuple(int(s) for s in shape)
    m = torch.nn.functional.adaptive_max_pool3d(lesions.float(), size)
    w = weight * torch.nn.functional.max_pool3d(m, 3, stride=1, padding=1)
    if volume_ref_ml is not None:
        ml = lesions.flatten(1).float().sum(1) * float(voxel_ml)
        scale = torch.sqrt(float(volume_ref_ml) / ml.clamp_min(1e-6)).clamp(0.25, 4.0)
        w = w * scale.view(-1, 1, 1, 1, 1)
    if use_prior:
        w = torch.maximum(w, prior_weight * torch.nn.functional.adaptive_max_pool3d(prior.float(), size))
    return 1.0 + w * active.float().view(-1, 1, 1, 1, 1)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error; with weights (broadcast over channels) normalised so that weights of 1 give plain MSE."""
    if weights is None:
        return torch.nn.functional.mse_loss(pred, target)
    return ((pred - target) ** 2 * weights).mean() / weights.mean()


def build_model(cfg: dict, text_dim: int) -> DiffusionModel:
    from CounterfactualGenLib.nets.unet import build_denoiser, default_denoiser_config

    grid = ModelGrid.from_dict(cfg["grid"])
    den_cfg = cfg.get("denoiser") or default_denoiser_config(cfg["family"], text_dim, cfg["size"])
    if cfg.get("denoiser_overrides"):  # e.g. a wider "tiny" preset for a CPU-trained model
        den_cfg = {**den_cfg, **cfg["denoiser_overrides"]}
    ae = None
    ae_cfg = None
    if cfg["family"] == "latent":
        if not cfg.get("autoencoder_path"):
            raise InputError('A latent model needs a trained autoencoder: run Training/train_autoencoder.py and '
                             'set "autoencoder_path" to its output folder.')
        from train_autoencoder import load_autoencoder

        ae = load_autoencoder(Path(cfg["autoencoder_path"])).eval().requires_grad_(False)
        ae_cfg = dict(ae.config)
        f = ae.downsample_factor
        if any(s % f for s in grid.shape):
            raise InputError(f"The grid {grid.shape} must be a multiple of the autoencoder's factor {f}.")
    spec = ModelSpec(id=cfg["id"], family=cfg["family"], grid=grid,
                     text_encoder={"id": cfg["text_encoder"]["id"], "dim": text_dim,
                                   "max_tokens": cfg["text_encoder"].get("max_tokens")},
                     denoiser=den_cfg, schedule=dict(cfg["schedule"]), autoencoder=ae_cfg,
                     contrast=cfg["contrast"], name=cfg.get("name", ""), description=cfg.get("description", ""))
    if float(cfg["data"].get("flat_background_prob") or 0.0) > 0:
        # trained on draws framed flat outside the brain: its edits show it a flat −1 there too
        # (pipeline.to_model_space), not a scan's skull or noise
        spec.intensity = {**spec.intensity, "outside_brain": "flat"}
    return DiffusionModel(spec, build_denoiser(den_cfg), ae)


def load_encoder(cfg: dict):
    from CounterfactualGenLib.text import load_text_encoder

    te = cfg["text_encoder"]
    kwargs = {k: v for k, v in te.items() if k not in ("id",) and v is not None}
    return load_text_encoder(te["id"], **kwargs)


class EMA:
    """Exponential moving average of weights (kept in fp32 on the training device)."""

    def __init__(self, net: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in net.state_dict().items()}

    @torch.no_grad()
    def update(self, net: torch.nn.Module, decay: float | None = None) -> None:
        d = self.decay if decay is None else decay
        for k, v in net.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)


def save_checkpoint(run: Path, net, ema: EMA, opt, step: int, cfg: dict) -> None:
    from safetensors.torch import save_file

    ck = run / "ckpt"
    ck.mkdir(parents=True, exist_ok=True)
    tmp = ck / ".partial.safetensors"
    state = {f"net.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    state.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.shadow.items()})
    # optimiser moments as tensors too (no pickles): exp_avg / exp_avg_sq per parameter index
    for i, p in enumerate(net.parameters()):
        st = opt.state.get(p, {})
        for name in ("exp_avg", "exp_avg_sq"):
            if name in st:
                state[f"opt.{i}.{name}"] = st[name].detach().cpu().contiguous()
    save_file(state, str(tmp))
    os.chmod(tmp, umask_mode())  # safetensors writes 0600
    os.replace(tmp, ck / "last.safetensors")
    opt_steps = {str(i): int(opt.state[p]["step"]) if p in opt.state and "step" in opt.state[p] else 0
                 for i, p in enumerate(net.parameters())}
    (ck / "state.json").write_text(json.dumps({"step": step, "config": cfg, "opt_steps": opt_steps}, indent=1))


def load_checkpoint(run: Path, net, ema: EMA, opt) -> int:
    from safetensors.torch import load_file

    ck = run / "ckpt"
    if not (ck / "last.safetensors").exists():
        return 0
    state = load_file(str(ck / "last.safetensors"))
    meta = json.loads((ck / "state.json").read_text())
    net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
    for k in ema.shadow:
        ema.shadow[k].copy_(state[f"ema.{k}"])
    for i, p in enumerate(net.parameters()):
        if f"opt.{i}.exp_avg" in state:
            opt.state[p] = {"step": torch.tensor(float(meta["opt_steps"].get(str(i), 0))),
                            "exp_avg": state[f"opt.{i}.exp_avg"].to(p.device),
                            "exp_avg_sq": state[f"opt.{i}.exp_avg_sq"].to(p.device)}
    return int(meta["step"])


def load_folder_weights(src: Path, net: torch.nn.Module, what: str):
    """Load an installed model folder's denoiser weights (hash-checked, fp16 → ``net``'s dtypes) into
    ``net``; refused when the architectures differ. Returns the loaded model and its state dict."""
    from CounterfactualGenLib.models import load_model

    m = load_model(src)
    own, theirs = net.state_dict(), m.denoiser.state_dict()
    if set(own) != set(theirs) or any(tuple(own[k].shape) != tuple(theirs[k].shape) for k in own):
        raise InputError(f"{what}: the model in {src} has another architecture than this config's denoiser.")
    net.load_state_dict({k: v.to(own[k].dtype) for k, v in theirs.items()})
    return m, theirs


def init_from_model_folder(src: Path, net, ema: EMA) -> tuple[int, dict]:
    """Start a stage from an installed model folder (e.g. a bundled model): its weights (the EMA
    weights the model ships, hash-checked, fp16 → fp32) become both the network and the EMA; the
    optimiser starts fresh. Returns (the folder's iteration count, the ``init_from`` record)."""
    m, theirs = load_folder_weights(src, net, "init_from")
    for k in ema.shadow:
        ema.shadow[k].copy_(theirs[k].float() if theirs[k].dtype.is_floating_point else theirs[k])
    prev = m.spec.training or {}
    step = int(prev.get("iterations", 0))
    return step, {"run": str(src), "step": step, "config_path": prev.get("config_path"), "model_folder": True,
                  "train_minutes": prev.get("train_minutes_total", prev.get("train_minutes")),
                  **({"init_from": prev["init_from"]} if prev.get("init_from") else {}),
                  **({"averaged_from": prev["averaged_from"]} if prev.get("averaged_from") else {})}


def _stages(t: dict) -> list[dict]:
    """The earlier stages a run started from, first stage first."""
    chain, s = [], t.get("init_from")
    while s:
        chain.insert(0, s)
        s = s.get("init_from")
    return chain


def _stage_row(t: dict) -> str:
    rows = ""
    for s in _stages(t):
        what = f"model folder `{s['run']}`" if s.get("model_folder") else f"run `{s['run']}`"
        rows += (f"| started from | {what} at iteration {s['step']}"
                 + (f" (config `{s['config_path']}`, {s['train_minutes']:.1f} min recorded for it)"
                    if s.get("config_path") and s.get("train_minutes") is not None else "")
                 + (f"; its weights are the mean of {len(s['averaged_from'])} models (`Training/average_models.py`, "
                    "see its card)" if s.get("averaged_from") else "") + " |\n")
    a = t.get("anchor")
    if a:
        rows += (f"| anchored to | model folder `{a['model']}` (`{a.get('id')}`, denoiser SHA-256 "
                 f"{str(a.get('denoiser_sha256'))[:12]}…): {'only ' if a.get('learn') or a.get('learn_anatomies') else ''}"
                 f"{_anchor_learners(a, ANATOMY_TITLES)} learnt from the data{' through guidance ' + str(a['guidance']) if a.get('guidance') else ''}; "
                 f"every other sample copied its prediction (weight {a['weight']})"
                 + ("; a draw framed flat outside the brain copied its prediction on the same draw as the data has it, "
                    "moved by the framing's exact difference (anchor.background_invariance)"
                    if a.get("background_invariance") else "") + " |\n")
    return rows


def _reproduce(t: dict, model_id: str) -> str:
    """The commands that train every stage in order (a stage that started from a model folder
    needs the stage before it installed there)."""
    stages = _stages(t)
    if not stages:
        return f"`python Training/train_diffusion.py --config {t['config_path']} --out {t.get('out') or 'runs/' + model_id}`"
    cmds = []
    for k, s in enumerate(stages):
        out = s["run"] if not s.get("model_folder") else f"runs/{model_id}-stage{k + 1}"
        cmd = f"`python Training/train_diffusion.py --config {s.get('config_path') or '…'} --out {out}`"
        if s.get("averaged_from"):
            cmd = ("the steps in the card of the averaged model (`Training/average_models.py` of "
                   + " and ".join(f"`{a['folder']}`" for a in s["averaged_from"]) + f") making `{out}/model`")
        if s.get("model_folder"):
            cmd += f" and install it to `{s['run']}` (`Training/install_model.py {out}/model`)"
        cmds.append(cmd)
    cmds.append(f"`python Training/train_diffusion.py --config {t['config_path']} --out runs/{model_id}-ft`")
    return ", then ".join(cmds) + " (each stage's `init_from` names the one before)."


def model_card(cfg: dict, spec: ModelSpec, summary: dict) -> str:
    t = summary
    return f"""# {spec.name or spec.id}

**Every volume this model produces is SYNTHETIC.** Not for diagnosis.

{spec.description}

| | |
|---|---|
| id | `{spec.id}` |
| family | {spec.family} ({'Haar-wavelet diffusion' if spec.family == 'wdm' else 'latent diffusion on a KL autoencoder'} with rectified flow) |
| grid | {list(spec.grid.shape)} voxels at {spec.grid.spacing_mm} mm, RAS, MNI ICBM152 2009a world |
| contrast | {spec.contrast} |
| text encoder | `{spec.text_encoder['id']}` (width {spec.text_encoder['dim']}, {spec.text_encoder.get('max_tokens')} tokens) |
| denoiser | MONAI DiffusionModelUNet, channels {spec.denoiser['channels']}, {t['parameters'] / 1e6:.2f} M parameters |
| schedule | rectified flow, {spec.schedule.get('default_steps')} Euler steps by default, guidance {spec.schedule.get('default_guidance')} |
| data | {cfg['data']['kind']} ({'synthetic subject engine: ' + ' and '.join(ANATOMY_TITLES[a] for a in (cfg['data'].get('anatomies') or DATA_KEYS['anatomies'])) + ' anatomy with random deformations, real MS lesion masks (Lesjak et al. 2018, CC-BY), atrophy' if cfg['data']['kind'] == 'synthetic' else (t.get('data') or cfg['data'].get('manifest')) + '; each scan registered affinely to the template this model ships'}{'; in ' + format(float(cfg['data']['flat_background_prob']), '.0%') + ' of draws the outside of the brain set to -1 (data.flat_background_prob), as its edits then show it (spec intensity.outside_brain flat)' if cfg['data'].get('flat_background_prob') else ''}) |
| training | {t['iterations']} iterations × batch {t['batch_size']} × {t['world_size']} process(es), lr {cfg['lr']}, condition dropout {cfg['cond_dropout']}, EMA {cfg['ema_decay']}{'; only the parameters under ' + ', '.join(cfg['train_only']) + ' trained (train_only), the rest kept' if cfg.get('train_only') else ''} |
| hardware | {t['hardware']} |
| training time | {t.get('train_minutes_total', t['train_minutes']):.1f} min{' (this stage)' if t.get('init_from') else ''}{f", of which {t['train_minutes']:.1f} min in the last (resumed) run" if t.get('train_minutes_total', t['train_minutes']) - t['train_minutes'] > 0.05 else ''} |
| final loss (EMA of batch MSE) | {t['final_loss']:.4f}{' (against the anchored targets: not comparable with a plain stage)' if t.get('anchor') else ''} |
{_stage_row(t)}
Reproduce: {_reproduce(t, spec.id)}

## Metrics
{json.dumps(spec.metrics, indent=1) if spec.metrics else 'Not measured yet: run the evaluation script (see README).'}

## Licence
{spec.licence}. {'Training data credits: see NOTICE.' if cfg['data']['kind'] == 'synthetic' else 'Trained on the scans of ' + str(cfg['data'].get('manifest')) + ': their licence, and the consent of the people scanned, govern what you may do with this model and its outputs.'}
"""


def check_anchor(cfg: dict) -> dict | None:
    """The validated ``anchor`` block (None when off); raises InputError before any work."""
    a = cfg.get("anchor")
    if not a:
        return None
    from CounterfactualGenLib.text.prompts import LESION_LOAD_CLASSES

    keys = {"model", "learn", "learn_anatomies", "weight", "guidance", "background_invariance"}
    if not isinstance(a, dict) or set(a) - keys or "model" not in a:
        raise InputError(f'anchor must be {{"model": FOLDER, "learn": [CLASSES], "learn_anatomies": [BRAINS], '
                         f'"weight": W, "guidance": G, "background_invariance": B}} (only "model" always needed); '
                         f'got {a!r}.')
    invariant = a.get("background_invariance", False)
    if not isinstance(invariant, bool):
        raise InputError(f"anchor.background_invariance must be true or false; got {invariant!r}.")
    if invariant and not float(cfg["data"].get("flat_background_prob") or 0.0) > 0:
        raise InputError("anchor.background_invariance needs data.flat_background_prob > 0: it is the flat-framed "
                         "draws that copy the anchor's prediction on the draw as the data has it.")
    if cfg["data"]["kind"] != "synthetic":
        raise InputError("anchor applies to the synthetic pool only (data.kind = synthetic): it needs each "
                         "sample's lesion-load class.")
    if not (Path(a["model"]) / "model.json").exists():
        raise InputError(f"anchor.model: {a['model']} is not a model folder (no model.json).")
    brains = a.get("learn_anatomies") or []
    pool_brains = list(cfg["data"].get("anatomies") or DATA_KEYS["anatomies"])
    if not isinstance(brains, list) or any(b not in pool_brains for b in brains) or len(set(brains)) >= len(pool_brains):
        raise InputError(f"anchor.learn_anatomies must list some, not all, of data.anatomies {pool_brains} (the others "
                         f"hold the anchor); got {brains!r}.")
    learn = a.get("learn") if a.get("learn") is not None else []
    if (not isinstance(learn, list) or (not learn and not brains and not invariant)
            or any(c not in LESION_LOAD_CLASSES for c in learn)):
        raise InputError(f"anchor.learn must list lesion-load classes from {list(LESION_LOAD_CLASSES)} (it may be "
                         f"empty with anchor.learn_anatomies or anchor.background_invariance); got {learn!r}.")
    w = a.get("weight", 1.0)
    if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
        raise InputError(f"anchor.weight must be a positive number; got {w!r}.")
    g = a.get("guidance")
    if g is not None and not (isinstance(g, (int, float)) and math.isfinite(g) and g >= 1):
        raise InputError(f"anchor.guidance must be a number >= 1 (the sampler's guidance scale) or null; got {g!r}.")
    if g is not None and brains:
        raise InputError("anchor.guidance applies to learnt lesion-load classes only; leave it out with "
                         "anchor.learn_anatomies (new brains learn from the data plainly).")
    return {"model": str(a["model"]), "learn": list(learn), "weight": float(w),
            **({"learn_anatomies": list(brains)} if brains else {}),
            **({"guidance": float(g)} if g is not None else {}),
            **({"background_invariance": True} if invariant else {})}


def load_anchor(anchor: dict, net: torch.nn.Module, device) -> tuple[torch.nn.Module, dict]:
    """A frozen copy of ``net`` holding the anchor model's weights, and the record for the card."""
    teacher = copy.deepcopy(net)
    m, _ = load_folder_weights(Path(anchor["model"]), teacher, "anchor.model")
    teacher.to(device).eval().requires_grad_(False)
    sha = next((f.get("sha256") for f in m.spec.files if f.get("role") == "denoiser"), None)
    return teacher, {**anchor, "id": m.spec.id, "denoiser_sha256": sha}


def _anchor_learners(anchor: dict, titles: dict | None = None) -> str:
    """Which samples of an anchored run learn from the data, in words (the card and the console)."""
    brains = [(titles or {}).get(b, b) for b in anchor.get("learn_anatomies") or []]
    return " and ".join(x for x in (
        f"prompts naming {', '.join(anchor['learn'])} lesion load" if anchor.get("learn") else "",
        f"every sample of {', '.join(brains)}" if brains else "") if x) or "no sample"


def learning_masks(names_lesions: torch.Tensor, dropped: torch.Tensor, classes: torch.Tensor, brains: torch.Tensor,
                   learn_classes: torch.Tensor | None, learn_brains: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per sample (B,): whose lesions weigh in the loss, and (anchored runs) who learns from the data.

    Plain runs (``learn_classes`` and ``learn_brains`` None): lesion weights for prompts that name the lesion load and
    were not dropped; no anchor, so the second mask is None. Anchored: a sample learns from the
    data if its prompt names a learnt lesion-load class (condition kept) or it is of a learnt brain
    (any prompt, dropped or not); lesion weights count for learnt samples whose prompt names the load.
    """
    named = names_lesions & ~dropped
    if learn_classes is None:
        return named, None
    by_class = named & torch.isin(classes, learn_classes)
    by_brain = torch.isin(brains, learn_brains)
    return by_class | (named & by_brain), by_class | by_brain


def anchored_targets(v: torch.Tensor, anchor_pred: torch.Tensor, learn: torch.Tensor, weight: float,
                     w: torch.Tensor | None, guidance: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and per-cell weights of an anchored step: samples in ``learn`` (B,) keep the data
    target ``v`` and their lesion weights ``w``; the others take the anchor's prediction, weight ``weight``.

    With ``guidance`` g, ``anchor_pred`` holds the anchor's *unconditional* prediction u for the
    learnt samples, and their target is u + (v − u) / g: the guided prediction u + g·(c − u)
    then fits v."""
    sel = learn.view(-1, *([1] * (v.dim() - 1)))
    a = anchor_pred.float()
    learnt = v if guidance is None else a + (v - a) / float(guidance)
    target = torch.where(sel, learnt, a)
    base = torch.ones((v.shape[0], 1, *v.shape[2:]), device=v.device) if w is None else w
    weights = torch.where(sel, base, torch.full_like(base, float(weight)))
    return target, weights


#: Keys of the config's "grid", "text_encoder" and "schedule" objects.
GRID_KEYS = ("shape", "spacing_mm", "center_ras")
TEXT_ENCODER_KEYS = ("id", "max_tokens", "dim", "path", "seed")
SCHEDULE_KEYS = ("kind", "default_steps", "default_guidance", "default_share", "default_separation",
                 "default_separation_lesion_load", "base_numel")
#: Keys of the config's "data" object.
DATA_KEYS = {"kind": "synthetic", "manifest": None, "prompts": None, "ignore_columns": [], "paraphrase_prob": 0.3,
             "both_clauses_prob": 0.2, "pool_size": 512, "pool_workers": None, "lesion_class_draw": None,
             "cache_mb": 2048, "anatomies": ["icbm152"], "flat_background_prob": 0.0}


def check_config(cfg: dict) -> tuple[dict | None, Manifest | None]:
    """Everything about a config that can be wrong, checked before any work (a pool or a manifest's
    registration can take minutes): unknown keys, the schedule, the data source and, for a manifest,
    the whole table (:func:`~CounterfactualGenLib.manifest.read_manifest`). Returns the checked anchor
    and the manifest (None for the synthetic pool)."""
    check_keys(cfg, DEFAULTS)
    for section, known in (("grid", GRID_KEYS), ("text_encoder", TEXT_ENCODER_KEYS), ("schedule", SCHEDULE_KEYS)):
        if not isinstance(cfg.get(section), dict):
            raise InputError(f"{section} must be a JSON object; got {cfg.get(section)!r}.")
        check_keys(cfg[section], dict.fromkeys(known), section)
    missing = [k for k in ("shape", "spacing_mm") if k not in cfg["grid"]]
    if missing:
        raise InputError(f"grid needs {missing}; e.g. {DEFAULTS['grid']}.")
    from CounterfactualGenLib.synth import CONTRASTS

    if cfg.get("contrast") not in CONTRASTS:
        raise InputError(f"contrast {cfg.get('contrast')!r}: the synthetic engine and the templates make "
                         f"{list(CONTRASTS)}.")
    kind = (cfg.get("schedule") or {}).get("kind")
    if kind != "rflow":
        raise InputError(f"schedule.kind {kind!r}: this script trains rectified-flow models (\"rflow\"), the schedule "
                         "generate and edit sample with; the library's DDPM/DDIM samplers are not used for training.")
    data = cfg.get("data") or {}
    check_keys(data, DATA_KEYS, "data")
    if data.get("kind") not in ("synthetic", "manifest"):
        raise InputError(f"data.kind must be \"synthetic\" or \"manifest\"; got {data.get('kind')!r}.")
    mb = data.get("cache_mb", DATA_KEYS["cache_mb"])
    if not (isinstance(mb, (int, float)) and not isinstance(mb, bool) and math.isfinite(mb) and mb >= 0):
        raise InputError(f"data.cache_mb must be a number of MiB >= 0 (scans kept in memory per data process; 0 "
                         f"keeps only the current one); got {mb!r}.")
    flat = data.get("flat_background_prob", 0.0)
    if not (isinstance(flat, (int, float)) and not isinstance(flat, bool) and 0.0 <= flat <= 1.0):
        raise InputError(f"data.flat_background_prob must be a probability in [0, 1] (the share of draws whose outside "
                         f"of the brain is set to -1); got {flat!r}.")
    ref = cfg.get("lesion_weight_volume_ref_ml")
    if ref is not None and not (isinstance(ref, (int, float)) and math.isfinite(ref) and ref > 0):
        raise InputError(f"lesion_weight_volume_ref_ml must be a positive number of ml (or null); got {ref!r}.")
    if data.get("anatomies") is not None:
        from CounterfactualGenLib.synth import ANATOMIES

        an = data["anatomies"]
        if data["kind"] != "synthetic":
            raise InputError("data.anatomies applies to the synthetic pool only (data.kind = synthetic).")
        if not (isinstance(an, list) and an and all(a in ANATOMIES for a in an)):
            raise InputError(f"data.anatomies must be a list of {list(ANATOMIES)} (each pool subject draws one); "
                             f"got {an!r}.")
    if data.get("lesion_class_draw"):
        if data["kind"] != "synthetic":
            raise InputError("data.lesion_class_draw applies to the synthetic pool only (data.kind = synthetic).")
        from CounterfactualGenLib.text.prompts import LESION_LOAD_CLASSES

        lesion_class_draw_cdf(np.array(LESION_LOAD_CLASSES), data["lesion_class_draw"])
    if float(cfg.get("lesion_prior_weight") or 0.0) > 0 and data["kind"] != "synthetic":
        raise InputError("lesion_prior_weight needs the synthetic pool (where its lesions lie comes from the pool's "
                         "masks); with a manifest, use lesion_weight and the rows' lesion masks.")
    only = cfg.get("train_only")
    if only is not None and not (isinstance(only, list) and only and all(isinstance(x, str) and x for x in only)):
        raise InputError(f"train_only must be a non-empty list of parameter-name prefixes (or null); got {only!r}.")
    anchor = check_anchor(cfg)
    manifest = None
    if data["kind"] == "manifest":
        if not data.get("manifest"):
            raise InputError('data.kind "manifest" needs data.manifest: the path of your manifest CSV.')
        manifest = read_manifest(data["manifest"], prompt_config_from_dict(data.get("prompts")),
                                 ignore_columns=data.get("ignore_columns") or ())
        from CounterfactualGenLib.pipeline import contrast_name_warning

        other = [r for r in manifest.rows if contrast_name_warning(r.scan(cfg["contrast"]).name, cfg["contrast"])]
        if other:
            manifest.warnings.append(f"{len(other)} scan(s) are named for another contrast than the model's "
                                     f"{cfg['contrast']} (e.g. line {other[0].line}: {other[0].scan(cfg['contrast']).name}); "
                                     "a mix-up registers without complaint, so check them.")
    elif data.get("manifest") or data.get("prompts"):
        raise InputError('data.manifest and data.prompts apply to data.kind "manifest"; this config trains on '
                         "the synthetic engine.")
    return anchor, manifest


def check_prompt_lengths(cfg: dict, encoder, manifest: Manifest) -> None:
    """Refuse a manifest whose prompts are longer than ``text_encoder.max_tokens``: the network's
    cross-attention sees only the first L tokens, so the clauses past them (age, sex, EDSS, often
    the diagnosis) would be trained on as if absent, without a word. The message gives the L that
    fits every row's prompt and its paraphrases."""
    from CounterfactualGenLib.text.prompts import paraphrase

    L = encoder.max_tokens
    prompts = sorted({r.prompt for r in manifest.rows if r.prompt})
    counts = {p: encoder.token_count(p) for p in prompts}
    long = [p for p in prompts if counts[p] > L]
    if not long:
        return
    rng = random.Random(0)
    need = max(max(counts.values()),
               max(encoder.token_count(paraphrase(p, rng)) for p in long for _ in range(8)))
    worst = max(long, key=counts.get)
    kept = encoder.token_strings(worst)
    raise InputError(
        f"{len(long)} of the manifest's {len(prompts)} distinct prompts are longer than text_encoder.max_tokens = {L} "
        f"tokens; the model would see only their first {L}, so what follows is lost. The longest ({counts[worst]} "
        f"tokens): {worst!r}, read only up to its token {kept[-1]!r}. Set text_encoder.max_tokens to {need} "
        f"(it fits every row's prompt and their paraphrases; {cfg['text_encoder']['id']} takes up to "
        f"{getattr(encoder, 'model_max_tokens', need)}), e.g. --set 'text_encoder={json.dumps({**cfg['text_encoder'], 'max_tokens': need})}', "
        "or leave clauses out with data.prompts.clauses.")


#: Config keys that fix the network's shape or meaning: a resumed run must keep them.
RESUME_FIXED_KEYS = ("family", "size", "grid", "contrast", "text_encoder", "denoiser", "denoiser_overrides",
                     "autoencoder_path")


class _StopOnSignal:
    """Ctrl-C or SIGTERM (a cluster pre-empting the job) asks the training loop to stop after the
    current step and save a checkpoint; a second Ctrl-C stops at once. With several processes the
    request is shared, so every rank stops at the same step."""

    def __init__(self, rank: int) -> None:
        import signal

        self.flag, self.rank = False, rank
        self.old = {}
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self.old[s] = signal.signal(s, self._on_signal)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def _on_signal(self, signum, frame) -> None:
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True
        if is_main(self.rank):
            print("\nStopping after this step and saving a checkpoint (Ctrl-C again stops at once).", file=sys.stderr)

    def requested(self, world: int) -> bool:
        if world > 1:
            t = torch.tensor([1.0 if self.flag else 0.0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(t)
            return bool(t.item() > 0)
        return self.flag

    def restore(self) -> None:
        import signal

        for s, h in self.old.items():
            signal.signal(s, h)
        self.old = {}


def check_run_folder(out: Path, cfg: dict, resume: bool) -> None:
    """Never train over an earlier run by accident: a folder that holds a checkpoint or a model is
    continued only with ``--resume``, and ``--resume`` needs a checkpoint made with the same network."""
    ck = out / "ckpt" / "last.safetensors"
    if resume:
        if not ck.exists():
            raise InputError(f"--resume: {out} has no checkpoint ({ck}); leave out --resume to start a new run there.")
        before = json.loads((out / "ckpt" / "state.json").read_text()).get("config") or {}
        changed = [k for k in RESUME_FIXED_KEYS if k in before and before.get(k) != cfg.get(k)]
        if changed:
            raise InputError(f"--resume: the checkpoint in {out} was trained with other {changed} "
                             f"({', '.join(f'{k}={before.get(k)!r}' for k in changed)}); a resumed run keeps the "
                             "network, so start a new run (another --out, with init_from to start from these weights).")
    elif ck.exists() or (out / "model" / "model.json").exists():
        raise InputError(f"{out} already holds a training run (a checkpoint or a model); continue it with --resume, "
                         "or choose another --out. Nothing was changed.")


def _print_check(cfg: dict) -> None:
    """What ``--check`` prints: the checked config's data, model and schedule, and the manifest's prompts."""
    _, manifest = check_config(cfg)
    encoder = load_encoder(cfg)
    try:
        build_model(cfg, encoder.dim)  # the network builds: denoiser overrides, autoencoder, grid
    except (ModelError, TypeError, ValueError) as exc:
        raise InputError(f"The model of this config does not build: {exc}") from None
    g = cfg["grid"]
    print(f"Config OK: {cfg['family']} ({cfg['size']}) at {g['shape']} × {g['spacing_mm']} mm, {cfg['contrast']}, "
          f"text encoder {cfg['text_encoder']['id']}, {cfg['iterations']} iterations × batch {cfg['batch_size']}.")
    if manifest is None:
        print(f"Data: the synthetic engine, a pool of {cfg['data'].get('pool_size', 512)} subjects from the "
              f"{' and '.join(cfg['data'].get('anatomies') or DATA_KEYS['anatomies'])} anatomy.")
        return
    print(manifest.summary())
    for w in manifest.warnings:
        print("Warning: " + w)
    check_prompt_lengths(cfg, encoder, manifest)
    grid = ModelGrid.from_dict(cfg["grid"])
    register_manifest(cfg, grid, manifest, edit_templates(cfg, grid))
    for row in manifest.rows[:3]:
        print(f"  line {row.line}: {row.scan(cfg['contrast'])} -> {row.prompt!r}")


def train(cfg: dict, out: Path, *, resume: bool = False, config_path: str = "") -> Path:
    from CounterfactualGenLib.sampling.samplers import rflow_training_target
    from CounterfactualGenLib.sampling.schedules import resolution_shift_ratio, sample_rflow_train_t

    anchor, manifest = check_config(cfg)
    check_run_folder(out, cfg, resume)
    rank, world, device = ddp_setup()
    templates = edit_templates(cfg, ModelGrid.from_dict(cfg["grid"]))  # shipped with the model; manifests register to it
    encoder = load_encoder(cfg)
    registered = None
    if manifest is not None:
        if is_main(rank):
            print(manifest.summary(), file=sys.stderr)
            for w in manifest.warnings:
                print("Warning: " + w, file=sys.stderr)
        check_prompt_lengths(cfg, encoder, manifest)
        # every rank registers (the same result): a refusal stops them all before anything is written
        registered = register_manifest(cfg, ModelGrid.from_dict(cfg["grid"]), manifest, templates,
                                       cache=out / "registration.json", verbose=is_main(rank))
    if cfg.get("threads"):  # CPU: one thread per process avoids OpenMP spin-waits when cores are shared
        torch.set_num_threads(int(cfg["threads"]))
    torch.manual_seed(cfg["seed"] + rank)
    model = build_model(cfg, encoder.dim)
    net = model.denoiser.to(device).train()
    if model.autoencoder is not None:
        model.autoencoder.to(device)
    spec = model.spec
    shift = resolution_shift_ratio(int(np.prod(model.diffusion_shape()[2:])), int(spec.schedule.get("base_numel", 32**3)))
    spec.schedule["shift"] = float(shift)
    if cfg.get("train_only"):
        names = [n for n, _ in net.named_parameters()]
        unknown = [p for p in cfg["train_only"] if not any(n.startswith(p) for n in names)]
        if unknown:
            raise InputError(f"train_only: {unknown} name no parameter of this denoiser (its parameters begin "
                             f"{sorted({'.'.join(n.split('.')[:2]) for n in names})}).")
        for n, p in net.named_parameters():
            p.requires_grad_(any(n.startswith(x) for x in cfg["train_only"]))
    ddp_net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None) \
        if world > 1 else net
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg["lr"],
                            weight_decay=cfg["weight_decay"])
    ema = EMA(net, cfg["ema_decay"])
    out.mkdir(parents=True, exist_ok=True)
    if registered is not None and is_main(rank):
        (out / "registration.json").write_text(json.dumps({"manifest": str(manifest.path),
                                                           "scans": list(registered.values())}, indent=1))
    start = load_checkpoint(out, net, ema, opt) if resume else 0
    init_info, prior_minutes = None, 0.0
    if start and (out / "model" / "model.json").exists():  # resumed: keep what earlier runs of this stage recorded
        before = json.loads((out / "model" / "model.json").read_text()).get("training") or {}
        init_info = before.get("init_from")
        prior_minutes = float(before.get("train_minutes_total", before.get("train_minutes", 0.0)) or 0.0)
    if start and cfg.get("init_from") and init_info is None and (Path(cfg["init_from"]) / "ckpt").exists():
        src = Path(cfg["init_from"])
        prev = json.loads((src / "model" / "model.json").read_text()).get("training") or {} \
            if (src / "model" / "model.json").exists() else {}
        step0 = json.loads((src / "ckpt" / "state.json").read_text())["step"] if (src / "ckpt" / "state.json").exists() else None
        init_info = {"run": str(cfg["init_from"]), "step": step0, "config_path": prev.get("config_path"),
                     "train_minutes": prev.get("train_minutes")}
    if not start and cfg.get("init_from") and not (Path(cfg["init_from"]) / "ckpt").exists() \
            and (Path(cfg["init_from"]) / "model.json").exists():
        start, init_info = init_from_model_folder(Path(cfg["init_from"]), net, ema)
        print(f"Initialised from the weights of model folder {cfg['init_from']} (iteration {start}); "
              "fresh optimiser state.", file=sys.stderr)
    elif not start and cfg.get("init_from"):
        src = Path(cfg["init_from"])
        if not (src / "ckpt" / "last.safetensors").exists():
            raise InputError(f"init_from: {src} has no checkpoint (expected {src / 'ckpt' / 'last.safetensors'}) "
                             "and is not a model folder (no model.json).")
        start = load_checkpoint(src, net, ema, opt)
        prev = {}
        if (src / "model" / "model.json").exists():
            prev = json.loads((src / "model" / "model.json").read_text()).get("training") or {}
        init_info = {"run": str(cfg["init_from"]), "step": start, "config_path": prev.get("config_path"),
                     "train_minutes": prev.get("train_minutes")}
        print(f"Initialised from {src} at step {start}.", file=sys.stderr)
    if world > 1:  # every rank starts from rank 0's weights
        for p in net.state_dict().values():
            dist.broadcast(p, 0)
    teacher, anchor_info, learn_idx, learn_brains = None, None, None, None
    if anchor:
        from CounterfactualGenLib.text.prompts import LESION_LOAD_CLASSES

        teacher, anchor_info = load_anchor(anchor, net, device)
        learn_idx = torch.tensor([LESION_LOAD_CLASSES.index(c) for c in anchor["learn"]], dtype=torch.long)
        learn_brains = torch.tensor([_anatomy_index(b) for b in anchor.get("learn_anatomies", [])], dtype=torch.long)
        if is_main(rank):
            learners = _anchor_learners(anchor)
            held = (f"{learners} learn from the data"
                    f"{' through guidance ' + str(anchor['guidance']) if anchor.get('guidance') else ''}, the rest keep "
                    if learners != "no sample" else "every sample keeps ")
            print(f"Anchored to {anchor['model']}: {held}its predictions (weight {anchor['weight']})"
                  f"{'; a draw framed flat copies its prediction on the draw as the data has it' if anchor.get('background_invariance') else ''}.",
                  file=sys.stderr)

    grid = spec.grid
    pool = None
    if cfg["data"]["kind"] == "synthetic":
        cache = out / f"pool_{cfg['seed']}_{'x'.join(map(str, grid.shape))}.npz"
        size = int(cfg["data"].get("pool_size", 512))
        if is_main(rank):
            pool = synthetic_pool(cfg, grid, cfg["seed"], size, cache)
        if world > 1:  # rank 0 synthesises once; the others read its cache
            dist.barrier()
            if not is_main(rank):
                pool = synthetic_pool(cfg, grid, cfg["seed"], size, cache)
    if pool is not None and cfg["data"].get("lesion_class_draw"):  # this pool has something to draw
        lesion_class_draw_cdf(pool["lesion"], cfg["data"]["lesion_class_draw"])
    loader = torch.utils.data.DataLoader(Stream(cfg, grid, cfg["seed"] * 7919 + rank + 131 * start, pool, manifest,
                                                registered, templates["brain_mask"].array > 0.5),
                                         batch_size=cfg["batch_size"], num_workers=cfg["num_workers"])
    data = iter(loader)
    null_tokens = encoder.null(1).tokens.to(device)
    prior = None
    if float(cfg.get("lesion_prior_weight") or 0.0) > 0 and pool is not None:
        prior = torch.from_numpy((pool["lesion_masks"].mean(axis=0) > 0.01).astype(np.float32))[None, None]
        if is_main(rank):
            print(f"Lesion prior: {int(prior.sum())} voxels where the pool has lesions.", file=sys.stderr)
    use_bf16 = device.type == "cuda"
    # A resumed run draws new noise and times (seeded by its start step), not the first run's again.
    gen = torch.Generator(device="cpu").manual_seed(cfg["seed"] * 31 + rank + 7919 * start)
    # On a GPU the noise is drawn there: a 128³ batch of CPU noise costs more than the step itself.
    gen_noise = (torch.Generator(device=device).manual_seed(cfg["seed"] * 37 + rank + 7919 * start)
                 if device.type == "cuda" else gen)
    if prior is not None:
        prior = prior.to(device)

    log_path = out / "log.csv"
    writer = None
    seconds_before = 0.0  # a resumed run's log counts on from the checkpoint's time
    if is_main(rank):
        new = not log_path.exists() or not resume
        if not new:  # rows logged after the checkpoint belong to steps this run trains again
            with log_path.open(newline="") as f:
                kept = [r for r in csv.reader(f) if r and (not r[0].isdigit() or int(r[0]) <= start)]
            with log_path.open("w", newline="") as f:
                csv.writer(f).writerows(kept)
            try:
                seconds_before = float(kept[-1][3]) if kept[-1][0].isdigit() else 0.0
            except (IndexError, ValueError):
                seconds_before = 0.0
        logf = log_path.open("w" if new else "a", newline="")
        log = csv.writer(logf)
        if new:
            log.writerow(["step", "loss", "lr", "seconds", "samples_per_s"])
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tensorboard"), purge_step=start + 1 if start else None)
        except Exception:  # tensorboard is optional
            writer = None
    t0 = time.perf_counter()
    loss_ema = None
    step = start
    deadline = t0 + 60 * cfg["max_minutes"] if cfg.get("max_minutes") else None
    from tqdm import tqdm

    bar = tqdm(total=cfg["iterations"], initial=start, desc="train", disable=not is_main(rank), file=sys.stderr,
               mininterval=5.0)
    stop = _StopOnSignal(rank)
    try:
        while step < cfg["iterations"]:
            if stop.requested(world):
                bar.close()
                if is_main(rank):
                    save_checkpoint(out, net, ema, opt, step, cfg)
                    logf.close()
                    if writer:
                        writer.close()
                    print(f"Interrupted at step {step}: checkpoint saved in {out / 'ckpt'}. Continue with --resume "
                          f"(add --set iterations={step} to write this checkpoint's model).", file=sys.stderr)
                raise SystemExit(130)
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for _ in range(cfg["grad_accum"]):
                img, prompts, names_lesions, lesions, classes, brains, own = next(data)
                img = img.to(device)
                with torch.no_grad():
                    z0 = model.encode(img)
                    ctx = encoder.encode(list(prompts)).tokens.to(device)
                    drop = torch.rand(len(prompts), generator=gen) < cfg["cond_dropout"]
                    ctx[drop.to(device)] = null_tokens[0]
                noise = torch.randn(z0.shape, generator=gen_noise, device=gen_noise.device).to(device)
                t = sample_rflow_train_t(z0.shape[0], shift=shift, generator=gen).to(device)
                x_t, v = rflow_training_target(z0, noise, t)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                    pred = ddp_net(x_t, t.float(), ctx)
                active, learnt = learning_masks(names_lesions, drop, classes, brains, learn_idx, learn_brains)
                active, learnt = active.to(device), None if learnt is None else learnt.to(device)
                w = lesion_weights(lesions.to(device), active, z0.shape[2:],
                                   float(cfg.get("lesion_weight") or 0.0), prior, float(cfg.get("lesion_prior_weight") or 0.0),
                                   volume_ref_ml=cfg.get("lesion_weight_volume_ref_ml"), voxel_ml=grid.spacing_mm ** 3 / 1000.0)
                if teacher is not None:
                    # one anchor pass: the prompt for anchored samples; with anchor.guidance, the null
                    # prompt for learnt ones (their target is built on the unconditional prediction)
                    tctx = ctx
                    if anchor.get("guidance"):
                        tctx = ctx.clone()
                        tctx[learnt] = null_tokens[0]
                    x_a, shift_a = x_t, None
                    if anchor.get("background_invariance"):
                        # the anchor sees each draw as the data has it (noise or skull outside the brain), and its
                        # prediction moves by the framing's exact difference: v = x0 − noise, so x0_flat − x0_own
                        with torch.no_grad():
                            z_own = model.encode(own.to(device))
                        x_a, _ = rflow_training_target(z_own, noise, t)
                        shift_a = z0 - z_own  # zero for draws not framed
                    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                        anchor_pred = teacher(x_a, t.float(), tctx)
                    if shift_a is not None:
                        anchor_pred = anchor_pred.float() + shift_a
                    v, w = anchored_targets(v, anchor_pred, learnt, anchor["weight"],
                                            None if w is None else w.to(device), anchor.get("guidance"))
                loss = weighted_mse(pred.float(), v, None if w is None else w.to(device))
                loss = loss / cfg["grad_accum"]
                loss.backward()
                total += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            step += 1
            ema.update(net, 0.0 if step < cfg["ema_start"] else None)
            loss_ema = total if loss_ema is None else 0.98 * loss_ema + 0.02 * total
            bar.update(1)
            if is_main(rank) and step % cfg["log_every"] == 0:
                el = time.perf_counter() - t0
                log.writerow([step, f"{total:.5f}", cfg["lr"], f"{seconds_before + el:.1f}",
                              f"{(step - start) * cfg['batch_size'] * cfg['grad_accum'] * world / el:.2f}"])
                logf.flush()
                bar.set_postfix(loss=f"{loss_ema:.4f}")
                if writer:
                    writer.add_scalar("loss", total, step)
            if is_main(rank) and (step % cfg["checkpoint_every"] == 0 or step == cfg["iterations"]):
                save_checkpoint(out, net, ema, opt, step, cfg)
            if is_main(rank) and cfg["sample_every"] and step % cfg["sample_every"] == 0:
                _sample_montage(model, ema, encoder, out / f"samples_{step:06d}.png", device)
            if deadline and time.perf_counter() > deadline:
                if is_main(rank):
                    print(f"Stopping at step {step}: max_minutes reached.", file=sys.stderr)
                    save_checkpoint(out, net, ema, opt, step, cfg)
                break
    finally:
        stop.restore()
    bar.close()
    minutes = (time.perf_counter() - t0) / 60
    folder = out / "model"
    if is_main(rank):
        final = DiffusionModel(spec, copy.deepcopy(net).cpu(),
                               copy.deepcopy(model.autoencoder).cpu() if model.autoencoder is not None else None)
        final.denoiser.load_state_dict({k: v.cpu() for k, v in ema.shadow.items()})
        summary = {"iterations": step, "batch_size": cfg["batch_size"] * cfg["grad_accum"], "world_size": world,
                   "hardware": f"{world}× {torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'CPU'} ({os.cpu_count()} cores), torch {torch.__version__}",
                   "train_minutes": minutes, "train_minutes_total": prior_minutes + minutes,
                   "final_loss": float(loss_ema or 0.0),
                   "parameters": sum(p.numel() for p in net.parameters()), "config_path": config_path,
                   "out": str(out),
                   "data": (manifest.summary() + _registration_note(registered) if manifest is not None else
                            f"the synthetic engine: a pool of {len(pool['lesion'])} subjects from the "
                            f"{' and '.join(cfg['data'].get('anatomies') or DATA_KEYS['anatomies'])} anatomy"),
                   **({"init_from": init_info} if init_info else {}),
                   **({"anchor": anchor_info} if anchor_info else {})}
        spec.training = {**summary, "config": cfg}
        dtype = getattr(torch, cfg["weights_dtype"]) if cfg.get("weights_dtype") else None
        save_model(final, folder, dtype=dtype, card=model_card(cfg, spec, summary), overwrite=True,
                   templates=templates)
        _sample_montage(final, None, encoder, out / "samples_final.png", device)
        logf.close()
        if writer:
            writer.close()
        print(f"Wrote model to {folder} ({minutes:.1f} min).", file=sys.stderr)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return folder


def edit_templates(cfg: dict, grid: ModelGrid) -> dict:
    """Registration target + masks on the model grid, shipped inside the model for editing.

    An undeformed, lesion-free, noise-free CN subject of the engine in the model's contrast (its
    anatomy is the MNI ICBM152 2009a template's). Scans of a manifest are registered to it for
    training too (:func:`manifest_stream`), so every model sees its data as its edits will.
    """
    from CounterfactualGenLib.synth import SubjectSpec, make_subject
    from CounterfactualGenLib.volume import Volume

    spec = SubjectSpec(seed=0, atrophy=0.0, contrast=cfg["contrast"], noise_sigma=0.0, bias_strength=0.0, deform_mm=0.0)
    subj = make_subject(spec, shape=grid.shape, spacing_mm=grid.spacing_mm, center_mm=grid.center_ras)
    aff = subj.image.affine_ras
    return {"image": Volume(subj.image.array, aff),
            "brain_mask": Volume(subj.brain_mask.astype(np.float32), aff),
            "white_matter": Volume(subj.tissue["wm"].astype(np.float32), aff)}


@torch.no_grad()
def _sample_montage(model: DiffusionModel, ema: EMA | None, encoder, path: Path, device) -> None:
    """A lesion-load series from one noise with the EMA weights (a quick look at progress)."""
    from CounterfactualGenLib.overlay import montage_png
    from CounterfactualGenLib.pipeline import generate_series

    prompts = ["Subject has no lesions.", "Subject has high lesion load.", "Subject has mild Alzheimer's dementia (AD)."]
    net = model.denoiser
    backup = None
    if ema is not None:
        backup = {k: v.detach().clone() for k, v in net.state_dict().items()}
        net.load_state_dict({k: v.to(backup[k].dtype) for k, v in ema.shadow.items()})
    try:
        s = generate_series(model, encoder, prompts, seed=0, steps=10, guidance=2.0, device=str(device))
        montage_png(s.volumes, [f"{p}  [SYNTHETIC]" for p in prompts], path)
    finally:
        if backup is not None:
            net.load_state_dict(backup)
        net.train()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="JSON config (see Training/configs/)")
    ap.add_argument("--out", required=True, help="run folder (checkpoints, logs, final model)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/ckpt/last.safetensors")
    ap.add_argument("--check", action="store_true",
                    help="check the config (and a manifest: its columns, every file, every row's prompt, the "
                         "classes), print what would be trained on, and exit without training or writing anything")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override a config value, e.g. --set iterations=10 --set batch_size=2")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(DEFAULTS, args.config, args.set)
        if args.check:
            _print_check(cfg)
            return 0
    except InputError as exc:
        ap.error(str(exc))
    try:
        train(cfg, Path(args.out), resume=args.resume, config_path=args.config)
    except (InputError, ModelError) as exc:  # train checks everything before any work, then reads the scans
        print(f"train_diffusion.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
