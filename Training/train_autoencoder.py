#!/usr/bin/env python
"""Train the 3D KL autoencoder of the latent family (MONAI AutoencoderKL; MAISI-style 4×).

    python Training/train_autoencoder.py --config my_ae.json --out runs/ae   # keys and defaults: DEFAULTS below
    torchrun --nproc_per_node=4 Training/train_autoencoder.py --config ... --out ...

Loss: L1 reconstruction + β·KL (Rombach et al. 2022; MAISI trains its VAE the same way
plus perceptual/adversarial terms, left out here). The result is an ``autoencoder``
folder (``autoencoder.json`` + ``autoencoder.safetensors``, SHA-256 recorded) whose
latent scale is measured on training data; ``train_diffusion.py`` takes it with
``"autoencoder_path"`` for ``"family": "latent"``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from CounterfactualGenLib.config import check_keys, load_config  # noqa: E402
from CounterfactualGenLib.errors import InputError, ModelError  # noqa: E402
from CounterfactualGenLib.geometry import ModelGrid  # noqa: E402
from CounterfactualGenLib.volume import sha256_file, umask_mode  # noqa: E402

import train_diffusion as td  # noqa: E402  (shared data pool, DDP setup)

DEFAULTS = {
    "size": "tiny",
    "autoencoder": None,
    "grid": td.DEFAULTS["grid"],
    "data": {"kind": "synthetic", "pool_size": 64},
    "batch_size": 2,
    "iterations": 500,
    "lr": 1e-4,
    "kl_weight": 1e-6,
    "seed": 0,
    "log_every": 10,
    "max_minutes": None,
    "contrast": "FLAIR",
}


def save_autoencoder(ae, folder: Path, summary: dict) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".partial-autoencoder.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in ae.state_dict().items()}, str(tmp))
    os.chmod(tmp, umask_mode())  # safetensors writes 0600
    os.replace(tmp, folder / "autoencoder.safetensors")
    spec = {"config": ae.config, "sha256": sha256_file(folder / "autoencoder.safetensors"), "training": summary}
    (folder / "autoencoder.json").write_text(json.dumps(spec, indent=2))
    return folder


def load_autoencoder(folder: Path):
    """Load a trained autoencoder folder (hash-verified safetensors)."""
    from safetensors.torch import load_file

    from CounterfactualGenLib.nets.autoencoder import build_autoencoder

    spec = json.loads((folder / "autoencoder.json").read_text())
    path = folder / "autoencoder.safetensors"
    if sha256_file(path) != spec["sha256"]:
        raise ModelError(f"{path} fails its SHA-256 check.")
    ae = build_autoencoder(spec["config"])
    ae.load_state_dict(load_file(str(path)), strict=True)
    return ae


def train(cfg: dict, out: Path) -> Path:
    from CounterfactualGenLib.nets.autoencoder import build_autoencoder, default_autoencoder_config

    if (cfg.get("data") or {}).get("kind", "synthetic") != "synthetic":
        raise InputError("train_autoencoder.py trains on the synthetic engine only (data.kind \"synthetic\"); "
                         "a manifest of your scans is read by train_diffusion.py.")
    rank, world, device = td.ddp_setup()
    torch.manual_seed(cfg["seed"] + rank)
    grid = ModelGrid.from_dict(cfg["grid"])
    ae = build_autoencoder(cfg["autoencoder"] or default_autoencoder_config(cfg["size"])).to(device).train()
    net = torch.nn.parallel.DistributedDataParallel(ae) if world > 1 else ae
    opt = torch.optim.AdamW(ae.parameters(), lr=cfg["lr"])
    out.mkdir(parents=True, exist_ok=True)
    cache = out / f"pool_{cfg['seed']}_{'x'.join(map(str, grid.shape))}.npz"
    size = int(cfg["data"].get("pool_size", 64))
    pool = td.synthetic_pool(cfg, grid, cfg["seed"], size, cache) if td.is_main(rank) else None
    if world > 1:
        dist.barrier()
        pool = pool if pool is not None else td.synthetic_pool(cfg, grid, cfg["seed"], size, cache)
    images = torch.from_numpy(pool["images"].astype(np.float32))[:, None]
    gen = torch.Generator().manual_seed(cfg["seed"] * 97 + rank)
    logf = (out / "log.csv").open("w", newline="") if td.is_main(rank) else None
    log = csv.writer(logf) if logf else None
    if log:
        log.writerow(["step", "l1", "kl", "seconds"])
    t0 = time.perf_counter()
    deadline = t0 + 60 * cfg["max_minutes"] if cfg.get("max_minutes") else None
    step = 0
    for step in range(1, cfg["iterations"] + 1):
        idx = torch.randint(len(images), (cfg["batch_size"],), generator=gen)
        x = images[idx].to(device)
        recon, mu, logvar = net(x)
        l1 = torch.nn.functional.l1_loss(recon, x)
        kl = ae.kl_loss(mu, logvar)
        loss = l1 + cfg["kl_weight"] * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log and step % cfg["log_every"] == 0:
            log.writerow([step, f"{float(l1):.5f}", f"{float(kl):.2f}", f"{time.perf_counter() - t0:.1f}"])
            logf.flush()
        if deadline and time.perf_counter() > deadline:
            break
    folder = out / "autoencoder"
    if td.is_main(rank):
        ae.eval()
        with torch.no_grad():
            ae.estimate_latent_scale(images[i:i + 2].to(device) for i in range(0, min(len(images), 16), 2))
            recon = ae.decode(ae.encode_latent(images[:4].to(device)))
            l1_eval = float(torch.nn.functional.l1_loss(recon, images[:4].to(device)))
        save_autoencoder(ae.cpu(), folder, {"iterations": step, "world_size": world, "l1_train_eval": l1_eval,
                                            "minutes": (time.perf_counter() - t0) / 60, "grid": grid.to_dict()})
        logf.close()
        print(f"Wrote autoencoder to {folder} (L1 {l1_eval:.4f}, latent scale {ae.latent_scale:.3f}).",
              file=sys.stderr)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return folder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(DEFAULTS, args.config, args.set)
    except InputError as exc:
        ap.error(str(exc))
    try:
        check_keys(cfg["data"] or {}, td.DATA_KEYS, "data")  # the diffusion configs' data keys (a shared block)
    except InputError as exc:
        ap.error(str(exc))
    if (Path(args.out) / "autoencoder" / "autoencoder.json").exists():
        ap.error(f"{args.out} already holds a trained autoencoder; choose another --out (nothing was changed).")
    train(cfg, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
