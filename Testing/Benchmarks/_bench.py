"""What the edit benchmarks share: their common options and loading the model, encoder and oracle."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parser(doc: str | None, *, subjects: int | None = None, seed: int | None = None) -> argparse.ArgumentParser:
    """``--model``, ``--threads`` and ``--json``; ``--subjects`` and ``--seed`` (first held-out subject
    seed; ``counterfactualgen evaluate`` edits seeds from 0) when defaults are given."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model id or folder (default: the default model)")
    if subjects is not None:
        ap.add_argument("--subjects", type=int, default=subjects, help="held-out engine subjects")
    if seed is not None:
        ap.add_argument("--seed", type=int, default=seed, help="first held-out subject seed (evaluate uses 0…)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    return ap


def load(args: argparse.Namespace, *, oracle: bool = False) -> tuple[Any, Any, Any]:
    """(model, text encoder, the bundled oracle or None), after setting ``--threads``."""
    import torch

    from CounterfactualGenLib.cli import Events, _load
    from CounterfactualGenLib.evaluation.oracle import default_oracle_path, load_oracle

    if args.threads:
        torch.set_num_threads(args.threads)
    model, encoder = _load(args.model, None, Events(json_mode=False, quiet=True))
    return model, encoder, load_oracle(default_oracle_path()) if oracle else None
