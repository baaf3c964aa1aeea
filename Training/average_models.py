#!/usr/bin/env python
"""Average the weights of models fine-tuned from one another (a "model soup").

    python Training/average_models.py MODEL_A MODEL_B [--weights 0.5 0.5] --out runs/soup/model

Wortsman et al. (ICML 2022, "Model soups") showed that the element-wise mean of the weights
of models fine-tuned from one shared start often beats each of them; two diffusion stages
trained from one another (``init_from``) share such a start. Every floating weight of the
new denoiser (and autoencoder, if any) is ``Σ wᵢ · weightᵢ`` computed in float32, stored in
the first model's dtype. The new model keeps the first model's spec (id, grid, sampler
defaults and their notes, templates) and records where its weights came from in
``training.averaged_from`` and in its card.

The models must be interchangeable: same family, grid, contrast, text encoder and network
layout (names and shapes of all weights); otherwise nothing is written. Choose the weights on
probe seeds (``counterfactualgen evaluate --seed 200 …``), never on the evaluation seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from CounterfactualGenLib.errors import CounterfactualGenError, InputError, ModelError  # noqa: E402

#: Spec fields that must agree for two models' weights to be averaged.
MUST_AGREE = ("family", "contrast", "grid", "text_encoder", "denoiser", "autoencoder", "wavelet", "intensity")
#: Schedule fields the networks were trained with (the sampler defaults may differ; the first model's are kept).
SCHEDULE_MUST_AGREE = ("kind", "shift", "base_numel")


def _source_record(folder: Path, spec: Any, weight: float) -> dict[str, Any]:
    t = spec.training or {}
    den = [f["sha256"] for f in spec.files if f.get("role") == "denoiser"]
    return {"folder": str(folder), "weight": weight, "iterations": t.get("iterations"),
            "config_path": t.get("config_path"), "train_minutes": t.get("train_minutes_total", t.get("train_minutes")),
            "denoiser_sha256": den[0] if len(den) == 1 else den,
            **({"init_from": t["init_from"]} if t.get("init_from") else {}),
            **({"averaged_from": t["averaged_from"]} if t.get("averaged_from") else {})}


def _stored_dtype(folder: Path, spec: Any):
    """The floating dtype the model's denoiser weights are stored in (fp16 for the bundled models)."""
    from safetensors import safe_open

    name = next(f["name"] for f in spec.files if f.get("role") == "denoiser")
    with safe_open(str(folder / name), framework="pt") as f:
        for k in f.keys():
            t = f.get_slice(k)
            dt = t.get_dtype()
            if dt in ("F16", "BF16", "F32", "F64"):
                import torch

                return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}[dt]
    return None


def average_states(states: Sequence[dict], weights: Sequence[float]) -> dict:
    """``Σ wᵢ · stateᵢ`` for floating tensors (float32 sum, first state's dtype); other tensors must be equal."""
    import torch

    first = states[0]
    out = {}
    for k, v in first.items():
        if v.is_floating_point():
            acc = torch.zeros(v.shape, dtype=torch.float32)
            for s, w in zip(states, weights):
                acc += float(w) * s[k].float()
            out[k] = acc.to(v.dtype)
        else:
            if any(not torch.equal(s[k], v) for s in states[1:]):
                raise ModelError(f"The integer tensor {k!r} differs between the models; they cannot be averaged.")
            out[k] = v.clone()
    return out


def _reproduce_line(card: str) -> str:
    for ln in card.splitlines():
        if ln.startswith("Reproduce: "):
            return ln[len("Reproduce: "):].rstrip(".")
    return "see its card"


def _card(cards: list[str], sources: list[dict[str, Any]], out_cmd: str) -> str:
    """The first model's card up to its metrics, with a row for the averaging and how to reproduce every source."""
    head = cards[0].split("\n## Metrics")[0].rstrip("\n")
    row = ("| weights | element-wise mean of " + " and ".join(
        f"{s['weight']:g} × `{s['folder']}` ({s['iterations']} iterations, config `{s['config_path']}`, "
        f"denoiser SHA-256 {str(s['denoiser_sha256'])[:12]}…)" for s in sources)
        + " (model soup, Wortsman et al. 2022; `Training/average_models.py`); the training rows above describe "
        "the first |")
    lines = [ln for ln in head.split("\n") if not ln.startswith("Reproduce: ")]
    rows = [i for i, ln in enumerate(lines) if ln.startswith("| ")]
    if rows:
        lines.insert(rows[-1] + 1, row)
    else:  # a card without a table
        lines += ["", "| | |", "|---|---|", row]
    text = "\n".join(lines).rstrip("\n") + "\n\nReproduce: train each source, then average them.\n"
    for k, (s, c) in enumerate(zip(sources, cards), 1):
        text += f"{k}. `{s['folder']}`: {_reproduce_line(c)}.\n"
    text += (f"{len(sources) + 1}. `{out_cmd}`.\n\nA source inside `Resources/Models` is the model that was bundled "
             "there before these weights (`git log -- Resources/Models`); its denoiser SHA-256 above identifies it.\n")
    return text + ("\n## Metrics\nNot measured yet: run the evaluation script (see README).\n\n"
                   "## Licence\nApache-2.0. Training data credits: see NOTICE.\n")


def average_models(folders: Sequence[Path], out: Path, *, weights: Sequence[float] | None = None,
                   overwrite: bool = False, command: str = "") -> Path:
    """Write the weighted average of the models in ``folders`` to ``out`` (see the module doc)."""
    from CounterfactualGenLib.models import load_model, save_model

    folders = [Path(f) for f in folders]
    if len(folders) < 2:
        raise InputError("Name at least two model folders to average.")
    w = [1.0 / len(folders)] * len(folders) if weights is None else [float(x) for x in weights]
    if len(w) != len(folders):
        raise InputError(f"Give one weight per model: {len(folders)} models, {len(w)} weights.")
    if any(x < 0 for x in w) or abs(sum(w) - 1.0) > 1e-6:
        raise InputError(f"The weights must be ≥ 0 and sum to 1; got {w}.")
    if Path(out).exists() and not overwrite:
        raise InputError(f"{out} already exists; pass --overwrite to replace it.")
    models = [load_model(f) for f in folders]  # each verifies sizes, hashes, strict load
    a = models[0].spec.to_dict()
    for f, m in zip(folders[1:], models[1:]):
        b = m.spec.to_dict()
        bad = [k for k in MUST_AGREE if a.get(k) != b.get(k)]
        bad += [f"schedule.{k}" for k in SCHEDULE_MUST_AGREE if a["schedule"].get(k) != b["schedule"].get(k)]
        if bad:
            raise ModelError(f"{f} differs from {folders[0]} in {', '.join(bad)}; only models of one layout "
                             "(fine-tuned from one another) can be averaged.")
    for part in ("denoiser", "autoencoder"):
        nets = [getattr(m, part) for m in models]
        if nets[0] is None:
            continue
        states = [n.state_dict() for n in nets]
        keys = set(states[0])
        for f, s in zip(folders[1:], states[1:]):
            if set(s) != keys or any(tuple(s[k].shape) != tuple(states[0][k].shape) for k in keys):
                raise ModelError(f"The {part} of {f} has another layout than that of {folders[0]}.")
        nets[0].load_state_dict(average_states(states, w))
    base = models[0]
    dtype = _stored_dtype(folders[0], base.spec)
    sources = [_source_record(f, m.spec, x) for f, m, x in zip(folders, models, w)]
    base.spec.training = {**(base.spec.training or {}), "averaged_from": sources,
                          "iterations": max(int((m.spec.training or {}).get("iterations") or 0) for m in models)}
    base.spec.metrics = {}
    cards = [(f / "MODEL_CARD.md").read_text() if (f / "MODEL_CARD.md").exists() else f"# {m.id}\n"
             for f, m in zip(folders, models)]
    card = _card(cards, sources, command or f"python Training/average_models.py {' '.join(map(str, folders))} "
                 f"--weights {' '.join(f'{x:g}' for x in w)} --out {out}")
    # a model loaded from the registry's folder is re-saved with its own templates
    return save_model(base, out, dtype=dtype, card=card, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path, help="model folders fine-tuned from one another")
    ap.add_argument("--weights", nargs="+", type=float, default=None, help="one weight per model, summing to 1 "
                    "(default: equal)")
    ap.add_argument("--out", type=Path, required=True, help="the new model folder")
    ap.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = ap.parse_args(argv)
    try:
        dest = average_models(args.folders, args.out, weights=args.weights, overwrite=args.overwrite,
                              command="python Training/average_models.py " + " ".join(sys.argv[1:] if argv is None else argv))
    except CounterfactualGenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"model": str(dest)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
