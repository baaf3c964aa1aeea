#!/usr/bin/env python
"""Compare evaluation oracles on the same ground truth, to choose which one to bundle.

    python Training/compare_oracles.py Resources/Models/oracle-5mm runs/oracle5/oracle \\
        --val-seeds 0 1 2 --out runs/compare_oracles

An oracle is a measuring instrument: choose it on the engine's exact truth only, never on
how it scores a generator. For every oracle this reads

* the held-out validation subjects of the oracle training runs with the given seeds
  (``train_oracle.py`` makes them from seed + 10000: each run's own validation pool, so
  every oracle is also measured on subjects another stage held out), with
  ``train_oracle.validate`` (lesion-class accuracy, lesion ml MAE, Dice, diagnosis);
* the exact engine twin series that ``counterfactualgen evaluate`` reads (seeds 5000 …,
  :func:`CounterfactualGenLib.evaluation.report.twin_series_reference`): how often the
  oracle reads a perfect model's lesion and CN/MCI/AD classes as the prompt's — the
  ceiling of the evaluation's text alignment.

Writes ``comparison.json`` and ``comparison.md`` to ``--out`` (pools are cached there).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from CounterfactualGenLib.errors import InputError  # noqa: E402
from CounterfactualGenLib.evaluation.report import TWIN_SUBJECTS  # noqa: E402

ROWS = (("lesion_class_accuracy", "lesion-class accuracy"), ("lesion_ml_mae", "lesion MAE (ml)"),
        ("dice_mean", "Dice"), ("diagnosis_accuracy", "diagnosis accuracy"))


def _train_oracle_module():
    spec = importlib.util.spec_from_file_location("train_oracle", Path(__file__).with_name("train_oracle.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_oracle", mod)  # the pool's worker processes look its functions up by name
    spec.loader.exec_module(mod)
    return sys.modules["train_oracle"]


def compare(folders: Sequence[Path], *, val_seeds: Sequence[int], val_subjects: int, twins: int,
            twin_seed: int, cache: Path, contrast: str = "FLAIR", workers: int = 1) -> dict[str, Any]:
    """Every oracle in ``folders`` on the same validation pools and exact twins (see the module doc)."""
    from CounterfactualGenLib.evaluation.oracle import load_oracle
    from CounterfactualGenLib.evaluation.report import twin_series_reference

    if len(folders) < 1:
        raise InputError("Name at least one oracle folder.")
    mod = _train_oracle_module()
    oracles = [load_oracle(Path(f)) for f in folders]
    grid = oracles[0].grid
    for f, o in zip(folders, oracles):
        if o.grid.to_dict() != grid.to_dict():
            raise InputError(f"{f} reads another grid ({o.grid.to_dict()}) than {folders[0]} ({grid.to_dict()}); "
                             "only oracles of one grid can be compared.")
    pools = {int(s): mod.validation_pool(grid, contrast, int(s), int(val_subjects), workers, cache) for s in val_seeds}
    results = []
    for f, o in zip(folders, oracles):
        entry: dict[str, Any] = {"oracle": str(f), "id": o.spec.id,
                                 "iterations": o.spec.training.get("iterations"),
                                 "trained_on_seed": (o.spec.training.get("config") or {}).get("seed"),
                                 "validation": {str(s): mod.validate(o, p) for s, p in pools.items()}}
        if twins > 0:
            ref = twin_series_reference(grid, twins, o, seed=twin_seed, contrast=contrast)
            entry["twins"] = {"n_subjects": twins, "first_seed": twin_seed, **ref["alignment"],
                              "lesion_monotone_fraction": ref["lesion_monotone_fraction"]}
        results.append(entry)
    return {"val_seeds": [int(s) for s in val_seeds], "val_subjects": int(val_subjects), "grid": grid.to_dict(),
            "oracles": results}


def comparison_markdown(c: dict[str, Any]) -> str:
    names = [f"`{r['oracle']}`" for r in c["oracles"]]
    lines = ["| measure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for s in c["val_seeds"]:
        for key, label in ROWS:
            vals = [r["validation"][str(s)].get(key) for r in c["oracles"]]
            lines.append(f"| {label}, validation subjects of the seed-{s} run | "
                         + " | ".join("—" if v is None else f"{v}" for v in vals) + " |")
    if all("twins" in r for r in c["oracles"]):
        t0 = c["oracles"][0]["twins"]
        lines.append(f"| exact twins ({t0['n_subjects']} subjects from seed {t0['first_seed']}): lesion / CN-MCI-AD "
                     "read as prompted | " + " | ".join(f"{r['twins']['lesion_accuracy']:.2%} / "
                                                      f"{r['twins']['diagnosis_accuracy']:.2%}"
                                                      for r in c["oracles"]) + " |")
        lines.append("| exact twins, lesion class by prompt class | " + " | ".join(
            ", ".join(f"{k} {v:.1%}" for k, v in r["twins"]["lesion_by_prompt_class"].items())
            for r in c["oracles"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("oracles", nargs="+", help="oracle folders (oracle.json + oracle.safetensors)")
    ap.add_argument("--val-seeds", type=int, nargs="+", default=[0, 1],
                    help="seeds of the oracle training runs whose validation subjects to read (default 0 1)")
    ap.add_argument("--val-subjects", type=int, default=192, help="subjects per validation pool (default 192)")
    ap.add_argument("--twins", type=int, default=TWIN_SUBJECTS,
                    help=f"exact twin subjects, as evaluate reads (default {TWIN_SUBJECTS}; 0 = none)")
    ap.add_argument("--twin-seed", type=int, default=5000, help="first twin subject seed (default 5000, as evaluate)")
    ap.add_argument("--workers", type=int, default=1, help="processes making the pools")
    ap.add_argument("--out", required=True, help="folder for comparison.json / comparison.md and the cached pools")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        c = compare([Path(f) for f in args.oracles], val_seeds=args.val_seeds, val_subjects=args.val_subjects,
                    twins=args.twins, twin_seed=args.twin_seed, cache=out, workers=args.workers)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    (out / "comparison.json").write_text(json.dumps(c, indent=1))
    md = comparison_markdown(c)
    (out / "comparison.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
