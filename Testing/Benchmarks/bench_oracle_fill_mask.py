"""Lesion filling without a mask: which oracle segmentation to fill, measured against the exact twins.

``edit_scan`` fills the bundled oracle's lesion segmentation when "Subject has no lesions."
comes without a lesion mask (``pipeline.oracle_lesion_region``: probability ≥
``AUTO_MASK_PROBABILITY``, not grown). This benchmark fills held-out engine subjects
(moderate / high load, on the model grid) with the segmentation at other thresholds and
grown by 1–2 voxels, and prints the mean PSNR in the brain against the exact lesion-free
twin (and what the unedited input scores), the Dice of the removed voxels against the true
lesions and the oracle's lesion ml after the fill. Choose variants on subjects other than
the evaluation's (``counterfactualgen evaluate`` edits seeds from 0; the default here is 200).

    python Testing/Benchmarks/bench_oracle_fill_mask.py --threads 1 --seed 200 --subjects 6 \\
        --variants 0.5:0 0.5:1 0.5:2 0.2:0 0.3:0 0.7:0      # ≈3 min on 2 CPU cores
"""

from __future__ import annotations

import json
from pathlib import Path

from _bench import load, parser


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, subjects=6, seed=200)
    ap.add_argument("--variants", nargs="+", default=["0.5:0", "0.5:1", "0.5:2"], metavar="THRESHOLD:GROW",
                    help="segmentation probability threshold and voxels grown (6-connected)")
    args = ap.parse_args(argv)

    import numpy as np
    from scipy import ndimage as ndi

    from CounterfactualGenLib.evaluation.edits import NONE_PROMPT, _units, held_out_pairs
    from CounterfactualGenLib.evaluation.metrics import dice, lesion_class_of_ml, psnr
    from CounterfactualGenLib.intensity import IntensityNormalizer
    from CounterfactualGenLib.pipeline import _oracle_reading, edit_scan, oracle_lesion_region
    from CounterfactualGenLib.text.prompts import canonical_prompt

    variants = [(float(v.split(":")[0]), int(v.split(":")[1])) for v in args.variants]
    model, encoder, oracle = load(args, oracle=True)
    grid = model.spec.grid
    up = float(model.spec.intensity.get("upper_percentile", 99.5))
    rows = []
    for subj, twin in held_out_pairs(grid, args.subjects, seed=args.seed):
        brain = subj.brain_mask > 0
        u = _units(subj.image.array, brain)
        true = (subj.lesion_mask > 0) & ~(twin.lesion_mask > 0)
        # the oracle's reading of the scan as edit_scan makes it (model units, brain only; on the model grid)
        x = IntensityNormalizer.fit(subj.image.array, brain, upper_percentile=up).forward(subj.image.array)
        prob = _oracle_reading(oracle, np.where(brain, x, -1.0), grid)["lesion_prob"]
        row = {"subject_seed": int(subj.spec.seed), "lesion_class": subj.attributes["lesion_load"],
               "true_ml": round(float(subj.attributes["lesion_ml"]), 2),
               "unedited_psnr_db": round(psnr(u(subj.image.array), u(twin.image.array), brain, data_range=2.0), 3)}
        for t, g in variants:
            region = oracle_lesion_region(prob, brain, threshold=t)
            if g and region.any():
                region = ndi.binary_dilation(region, iterations=g) & brain
            if not region.any():
                row[f"{t}:{g}"] = None
                continue
            r = edit_scan(model, encoder, subj.image, target_prompt=NONE_PROMPT,
                          source_prompt=canonical_prompt(lesion_load=subj.attributes["lesion_load"]), brain_mask=brain,
                          lesion_mask=region, registration="none", oracle=oracle, seed=0)
            after = float(r.report["lesion_ml_after"])
            row[f"{t}:{g}"] = {"psnr_db": round(psnr(u(r.counterfactual.array), u(twin.image.array), brain,
                                                     data_range=2.0), 3),
                               "dice_removed": round(dice(r.change_labels.array == 2, true), 4),
                               "region_ml": round(float(region.sum()) * grid.spacing_mm ** 3 / 1000.0, 3),
                               "oracle_ml_after": round(after, 3), "read_as_none": lesion_class_of_ml(after) == "none"}
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(f"\nmodel {model.id}, oracle {oracle.id}, {len(rows)} subjects from seed {args.seed}; "
          f"unedited PSNR {np.mean([r['unedited_psnr_db'] for r in rows]):.2f} dB")
    print("| threshold : grown voxels | PSNR vs twin dB | Dice removed | filled ml | oracle ml after | read as none |")
    print("|---|---|---|---|---|---|")
    for t, g in variants:
        got = [r[f"{t}:{g}"] for r in rows if r[f"{t}:{g}"]]
        if not got:
            print(f"| {t} : {g} | — | — | — | — | — |")
            continue
        m = {k: float(np.mean([w[k] for w in got])) for k in ("psnr_db", "dice_removed", "region_ml", "oracle_ml_after",
                                                             "read_as_none")}
        print(f"| {t} : {g} | {m['psnr_db']:.2f} | {m['dice_removed']:.3f} | {m['region_ml']:.2f} | "
              f"{m['oracle_ml_after']:.2f} | {100 * m['read_as_none']:.0f} % of {len(got)} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model.id, "oracle": oracle.id, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
