"""Lesion filling with the true lesion mask against the exact lesion-free twin, by number of fill samples.

For held-out engine subjects (moderate / high lesion load), fills the lesions with
``edit_scan(..., lesion_mask=..., fill_samples=K)`` and prints PSNR in the brain against
the exact twin (and what the unedited input scores), the Dice of the removed voxels
and the oracle's lesion ml after filling.

    python Testing/Benchmarks/bench_lesion_filling.py --subjects 2 --samples 1 2 4 8   # ≈1 min on 2 CPU cores
"""

from __future__ import annotations

import json
from pathlib import Path

from _bench import load, parser


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, subjects=2, seed=0)
    ap.add_argument("--samples", type=int, nargs="+", default=[1, 2, 4, 8])
    args = ap.parse_args(argv)

    from CounterfactualGenLib.evaluation.edits import NONE_PROMPT, _units, held_out_pairs
    from CounterfactualGenLib.evaluation.metrics import dice, psnr
    from CounterfactualGenLib.pipeline import edit_scan
    from CounterfactualGenLib.text.prompts import canonical_prompt

    model, encoder, oracle = load(args, oracle=True)
    rows = []
    for subj, twin in held_out_pairs(model.spec.grid, args.subjects, seed=args.seed):
        brain = subj.brain_mask > 0
        u = _units(subj.image.array, brain)  # model units (range 2), as evaluate uses
        base = psnr(u(subj.image.array), u(twin.image.array), brain, data_range=2.0)
        true = (subj.lesion_mask > 0) & ~(twin.lesion_mask > 0)
        for k in args.samples:
            r = edit_scan(model, encoder, subj.image, target_prompt=NONE_PROMPT,
                          source_prompt=canonical_prompt(lesion_load=subj.attributes["lesion_load"]),
                          brain_mask=brain, lesion_mask=subj.lesion_mask, fill_samples=k, registration="none",
                          oracle=oracle, seed=args.seed)
            rows.append({"subject_seed": int(subj.spec.seed), "lesion_class": subj.attributes["lesion_load"],
                         "true_ml": round(float(subj.attributes["lesion_ml"]), 2), "fill_samples": k,
                         "psnr_db": round(psnr(u(r.counterfactual.array), u(twin.image.array), brain, data_range=2.0), 3),
                         "unedited_psnr_db": round(base, 3),
                         "dice_removed": round(dice(r.change_labels.array == 2, true), 4),
                         "oracle_ml_after": r.report.get("lesion_ml_after"),
                         "seconds": round(sum(r.report["timings_s"].values()), 2)})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nmodel {model.id}")
    print("| subject | class (true ml) | fill samples | PSNR vs twin dB | unedited dB | Dice removed | oracle ml after | s |")
    print("|---|---|---|---|---|---|---|---|")
    for w in rows:
        print(f"| {w['subject_seed']} | {w['lesion_class']} ({w['true_ml']}) | {w['fill_samples']} | {w['psnr_db']} | "
              f"{w['unedited_psnr_db']} | {w['dice_removed']} | {w['oracle_ml_after']} | {w['seconds']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model.id, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
