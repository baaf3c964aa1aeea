"""Lesion labels of a prompt edit's change labelmap, measured against the exact twins.

A prompt edit (the inversion path of ``edit_scan``) regenerates the whole brain, so its
change is small but non-zero nearly everywhere. ``pipeline.change_labels`` calls a voxel
"lesion added" / "lesion removed" (labels 1 / 2; the report's ``lesion_ml_added`` /
``lesion_ml_removed``) when it brightens / darkens by a threshold, and, with an oracle, only
where the oracle segments a lesion after / before the edit. This benchmark edits held-out
engine subjects (moderate / high load, on the model grid) twice: lesion addition (the clean
twin → the subject's class) and filling by the text alone (the subject → "no lesions", no
segmentation filled), and prints, for |change| alone at ``LESION_DELTA`` and for the oracle
gate at several thresholds, and for a gate by FLAIR hyperintensity (``--ratios``: ≥ ratio ×
the scan's white-matter median, in or next to white matter; tried for edits without an
oracle and rejected, see ``pipeline.ORACLE_LESION_DELTA``), the labelled ml against the
oracle's own Δml and the true lesion ml, and the Dice of the "removed" voxels against the
true lesions. Choose on subjects other than the evaluation's (``counterfactualgen evaluate``
edits seeds from 0; the default here is 200).

    python Testing/Benchmarks/bench_change_labels.py --threads 1 --seed 200 --subjects 6 \\
        --deltas 0.04 0.08 0.12 --ratios 1.1 1.2 1.3   # ≈2 min on 2 CPU cores
"""

from __future__ import annotations

import json
from pathlib import Path

from _bench import load, parser


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, subjects=6, seed=200)
    ap.add_argument("--deltas", nargs="*", type=float, default=[0.04, 0.08, 0.12],
                    help="oracle-gated |change| thresholds (model units)")
    ap.add_argument("--ratios", nargs="*", type=float, default=[1.1, 1.2, 1.3],
                    help="without an oracle: FLAIR-hyperintensity ratios (× white-matter median) gating |change| ≥ "
                         "--hyper-delta")
    ap.add_argument("--hyper-delta", type=float, default=0.08,
                    help="the |change| threshold of the hyperintensity gate (default 0.08)")
    args = ap.parse_args(argv)

    import numpy as np
    from scipy.ndimage import binary_dilation

    import CounterfactualGenLib.pipeline as P
    from CounterfactualGenLib.evaluation.edits import NONE_PROMPT, held_out_pairs
    from CounterfactualGenLib.evaluation.metrics import dice
    from CounterfactualGenLib.intensity import IntensityNormalizer
    from CounterfactualGenLib.text.prompts import canonical_prompt

    model, encoder, oracle = load(args, oracle=True)
    upper = float(model.spec.intensity.get("upper_percentile", 99.5))

    def hyperintense(img, white_matter, signal_zero, ratio):
        """≥ ratio × the white-matter median signal, with signal_zero the model units of no signal."""
        ref = float(np.median(img[white_matter]))
        return img >= signal_zero + ratio * (ref - signal_zero)

    rules = [("change", None)] + [("oracle", d) for d in args.deltas] + [("hyper", r) for r in args.ratios]
    wm = model.template("white_matter").array > 0.5

    def key_of(kind, v):
        return "change" if kind == "change" else f"{kind}:{v}"

    rows = []
    for subj, twin in held_out_pairs(model.spec.grid, args.subjects, seed=args.seed):
        brain = subj.brain_mask > 0
        true = (subj.lesion_mask > 0) & ~(twin.lesion_mask > 0)
        vox = subj.image.voxel_volume_ml
        cls = canonical_prompt(lesion_load=subj.attributes["lesion_load"])
        row = {"subject_seed": int(subj.spec.seed), "true_ml": round(float(subj.attributes["lesion_ml"]), 2)}
        for task, image, target, source in (("add", twin.image, cls, NONE_PROMPT),
                                            ("fill_text_only", subj.image, NONE_PROMPT, cls)):
            r = P.edit_scan(model, encoder, image, target_prompt=target, source_prompt=source, brain_mask=brain,
                            registration="none", oracle=oracle, auto_lesion_mask=False, seed=0)
            ms = r.model_space  # the subject is on the model grid: model space is the scan's grid
            touched = ms["change"] != 0
            out = {"oracle_delta_ml": round(r.report["lesion_ml_after"] - r.report["lesion_ml_before"], 2)}
            # for the hyperintensity gate: model units of "no signal" (as edit_scan maps) and the white matter
            zero = float(IntensityNormalizer.fit(image.array, brain, upper_percentile=upper).forward(
                np.array(min(0.0, float(image.array.min())))))
            w = wm & ms["brain"]
            near = binary_dilation(w, iterations=1)
            for kind, d in rules:
                gate = {}
                if kind == "oracle":
                    gate = {"oracle_before": ms["lesion_prob_before"], "oracle_after": ms["lesion_prob_after"],
                            "oracle_delta": d}
                if kind == "hyper":  # tried for edits without an oracle, and rejected (see pipeline)
                    hd = args.hyper_delta
                    bright = {k: hyperintense(img, w, zero, d) & near
                              for k, img in (("before", ms["input"]), ("after", ms["input"] + ms["change"]))}
                    lab = np.where(touched, 3.0, 0.0)
                    lab[(ms["change"] >= hd) & bright["after"] & touched] = 1
                    lab[(ms["change"] <= -hd) & bright["before"] & touched] = 2
                elif kind == "change":  # |change| ≥ LESION_DELTA alone: the prompt-edit rule before the gate
                    lab = np.where(touched, 3.0, 0.0)
                    lab[(ms["change"] >= P.LESION_DELTA) & touched] = 1
                    lab[(ms["change"] <= -P.LESION_DELTA) & touched] = 2
                else:  # "oracle": the gate edit_scan uses
                    lab, _ = P.change_labels(ms["change"], touched, lesion_prompt=True, **gate)
                want = 1 if task == "add" else 2
                key = key_of(kind, d)
                out[key] = {"ml": round(float((lab == want).sum()) * vox, 2),
                            **({"dice": round(dice(lab == 2, true), 4)} if task != "add" else {})}
            row[task] = out
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(f"\nmodel {model.id}, oracle {oracle.id}, {len(rows)} subjects from seed {args.seed}; "
          f"true lesion ml {', '.join(str(r['true_ml']) for r in rows)}")
    print("| rule | addition: labelled ml (oracle Δml) | text-only filling: labelled ml | Dice removed vs true |")
    print("|---|---|---|---|")
    for kind, d in rules:
        key = key_of(kind, d)
        name = {"change": f"|change| ≥ {P.LESION_DELTA}", "oracle": f"|change| ≥ {d} and oracle segmentation",
                "hyper": f"|change| ≥ {args.hyper_delta} and ≥ {d}× white-matter median, near white matter"}[kind]
        add = ", ".join(f"{r['add'][key]['ml']:g} ({r['add']['oracle_delta_ml']:+g})" for r in rows)
        rem = ", ".join(f"{r['fill_text_only'][key]['ml']:g}" for r in rows)
        dc = [r["fill_text_only"][key]["dice"] for r in rows]
        print(f"| {name} | {add} | {rem} | {min(dc):.2f}–{max(dc):.2f} (mean {np.mean(dc):.2f}) |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model.id, "oracle": oracle.id, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
