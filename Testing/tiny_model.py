"""Build tiny models for tests (random weights, real architecture and file format)."""

from __future__ import annotations

from pathlib import Path

import torch

from CounterfactualGenLib.geometry import ModelGrid
from CounterfactualGenLib.models import DiffusionModel, ModelSpec, save_model

TINY_DIM = 32
TINY_TOKENS = 16


def tiny_spec(model_id: str = "tiny-wdm-test", shape=(16, 16, 16), spacing_mm: float = 8.0) -> ModelSpec:
    from CounterfactualGenLib.nets.unet import default_denoiser_config

    return ModelSpec(
        id=model_id, family="wdm", grid=ModelGrid(shape, spacing_mm, (0.0, -18.0, 8.0)),
        text_encoder={"id": "tiny-hash", "dim": TINY_DIM, "max_tokens": TINY_TOKENS},
        denoiser=default_denoiser_config("wdm", TINY_DIM, "tiny"),
        schedule={"kind": "rflow", "default_steps": 4, "default_guidance": 2.0, "base_numel": 32**3},
        name="Tiny test model", description="Random weights; for tests only.",
    )


def build_tiny_model(folder: Path, *, seed: int = 0, with_templates: bool = False, **kw) -> Path:
    from CounterfactualGenLib.nets.unet import build_denoiser

    torch.manual_seed(seed)
    spec = tiny_spec(**kw)
    net = build_denoiser(spec.denoiser)
    # MONAI zero-initialises output projections (attention, last conv); perturb every weight
    # so a random tiny model's output depends on its text context, as a trained one does.
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = DiffusionModel(spec, net)
    templates = _phantom_templates(spec.grid) if with_templates else None
    return save_model(model, folder, card="# Tiny test model\nRandom weights.\n", templates=templates)


def _phantom_templates(grid: ModelGrid) -> dict:
    """Template image / brain / white matter on the model grid: the phantom of test_edit."""
    import numpy as np

    from CounterfactualGenLib.volume import Volume

    from test_edit import phantom_on

    img = phantom_on(grid.shape, grid.affine_ras)
    brain = (img > 0).astype(np.float32)
    return {"image": Volume(img, grid.affine_ras), "brain_mask": Volume(brain, grid.affine_ras),
            "white_matter": Volume(brain, grid.affine_ras)}


def tiny_encoder():
    from CounterfactualGenLib.text import load_text_encoder

    return load_text_encoder("tiny-hash", dim=TINY_DIM, max_tokens=TINY_TOKENS)


def build_tiny_oracle(folder: Path) -> Path:
    """A random-weight oracle on a grid other than the tiny model's (so readers must resample)."""
    from CounterfactualGenLib.evaluation.oracle import Oracle, OracleSpec, save_oracle

    torch.manual_seed(3)
    spec = OracleSpec(id="tiny-oracle", grid=ModelGrid((12, 14, 12), 10.0, (0.0, -18.0, 8.0)),
                      architecture={"channels": [4, 8], "head_hidden": 8, "norm_groups": 4,
                                    "volume_head": False})
    oracle = Oracle(spec)
    with torch.no_grad():
        oracle.net.seg.bias.fill_(0.0)  # a random map of p ≈ 0.5, so volumes are far from 0
    return save_oracle(oracle, folder)
