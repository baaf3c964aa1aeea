"""Lesion filling of a scan finer than the model grid, against the exact lesion-free twin.

A clinical FLAIR is finer than the 5 mm demo model (the sample: 0.7 × 0.7 × 3 mm). This makes
held-out engine subjects at ``--spacing`` (default 1 × 1 × 3 mm; ``5 5 5`` is the model grid)
over the model's field of view, fills their lesions with ``edit_scan`` (registration none; the
true lesion mask, then the oracle's segmentation) and scores against the exact twin at the same
resolution: PSNR in the brain, the mean absolute error on the true lesion voxels (what is left of
the lesions; model units) and on the other brain voxels (collateral change), for

* ``written``: what ``edit_scan`` writes. With the mask: the model's fill in the masked voxels,
  corrected by the harmonic interpolant of its mismatch with the scan around them
  (``pipeline.seamless_fill_change``). With the oracle's 5 mm segmentation: the model-grid change,
  interpolated to the scan's grid and added (the segmentation does not say which fine voxels are
  lesion);
* ``spread``: that second rule for the mask too (the rule before December 2026), rebuilt here from
  the same edit's model-grid change;
* ``laplace``: the classical baseline without the model: the masked voxels by harmonic
  interpolation of the scan around them (``geometry.harmonic_interpolate``);
* ``alternative``, two rules rebuilt from the same edit and rejected: with the mask, the fill alone
  written into the masked voxels (no seam correction); with the oracle's segmentation, the
  seamless rule written into the segmentation's footprint on the scan's grid (its linear
  interpolation ≥ 0.5).

Subjects from ``--seed 200`` chose the rule; ``--seed 0`` (the evaluation's held-out subjects)
gives the figures in ``pipeline.seamless_fill_change`` and the Benchmarks README.

    python Testing/Benchmarks/bench_fine_filling.py --subjects 6 --seed 0   # ≈3 min on 2 CPU cores
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from _bench import load, parser

KINDS = ("unedited", "written", "spread", "laplace", "alternative")


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, subjects=6, seed=0)
    ap.add_argument("--spacing", type=float, nargs=3, default=[1.0, 1.0, 3.0], help="subject voxel size, mm")
    args = ap.parse_args(argv)

    from CounterfactualGenLib.evaluation.edits import NONE_PROMPT, _units
    from CounterfactualGenLib.evaluation.metrics import psnr
    from CounterfactualGenLib.geometry import ModelSpaceMapping, harmonic_interpolate
    from CounterfactualGenLib.intensity import IntensityNormalizer
    from CounterfactualGenLib.pipeline import CHANGE_EPS, edit_scan, seamless_fill_change
    from CounterfactualGenLib.synth import make_subject, make_twin, random_spec
    from CounterfactualGenLib.text.prompts import canonical_prompt

    model, encoder, oracle = load(args, oracle=True)
    g = model.spec.grid
    spacing = np.asarray(args.spacing, float)
    shape = tuple(int(v) for v in np.round(np.asarray(g.shape) * g.spacing_mm / spacing))
    geo = {"shape": shape, "spacing_mm": tuple(spacing), "center_mm": tuple(g.center_ras)}
    rng = np.random.default_rng(9_000_000 + int(args.seed))  # held_out_pairs' subjects, at this resolution
    rows = []
    for k in range(args.subjects):
        spec = random_spec(rng, lesion_class=("moderate", "high")[k % 2], contrast="FLAIR")
        subj, twin = make_subject(spec, **geo), make_twin(spec, lesion_class="none", **geo)
        brain = subj.brain_mask > 0
        u = _units(subj.image.array, brain)
        tw = u(twin.image.array)
        true = (subj.lesion_mask > 0) & ~(twin.lesion_mask > 0)
        scan = subj.image.array
        lo, hi = float(scan.min()), float(scan.max())
        norm = IntensityNormalizer.fit(scan, brain, upper_percentile=float(model.spec.intensity.get("upper_percentile",
                                                                                                    99.5)))
        mapping = ModelSpaceMapping(g, subj.image.shape, subj.image.affine_ras, np.eye(4))
        mask = (subj.lesion_mask > 0) & brain

        def scores(cf: np.ndarray) -> dict:
            err = np.abs(u(cf) - tw)
            return {"psnr_db": round(psnr(u(cf), tw, brain, data_range=2.0), 2),
                    "mae_lesion": round(float(err[true].mean()), 4), "mae_healthy": round(float(err[brain & ~true].mean()), 5)}

        laplace = np.clip(harmonic_interpolate(scan, mask, subj.image.spacing_mm), lo, hi).astype(np.float32)
        for source in ("given", "oracle"):
            r = edit_scan(model, encoder, subj.image, target_prompt=NONE_PROMPT,
                          source_prompt=canonical_prompt(lesion_load=subj.attributes["lesion_load"]), brain_mask=brain,
                          lesion_mask=subj.lesion_mask if source == "given" else None, registration="none",
                          oracle=oracle, seed=args.seed)
            change = mapping.to_source(r.model_space["change"], interpolation="linear", default=0.0)
            change[(np.abs(change) < CHANGE_EPS) | ~brain] = 0.0
            spread = np.clip(scan + norm.inverse_delta(change), lo, hi)
            fill = mapping.to_source(r.model_space["counterfactual"], interpolation="linear")
            s_units = norm.forward(scan)
            if source == "given":  # the fill alone in the mask
                alternative = np.where(mask, norm.inverse(fill), scan)
            else:  # seamless into the segmentation's footprint
                foot = (mapping.to_source(r.model_space["fill_region"].astype(np.float32), interpolation="linear")
                        >= 0.5) & brain
                alternative = scan + norm.inverse_delta(seamless_fill_change(s_units, fill, foot, subj.image.spacing_mm))
            alternative = np.clip(alternative, lo, hi)
            row = {"subject_seed": int(spec.seed), "lesion_class": subj.attributes["lesion_load"],
                   "true_ml": round(float(subj.attributes["lesion_ml"]), 1), "mask": source,
                   "unedited": scores(scan), "written": scores(r.counterfactual.array), "spread": scores(spread),
                   "laplace": scores(laplace) if source == "given" else None, "alternative": scores(alternative),
                   "oracle_ml_after": r.report.get("lesion_ml_after")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nmodel {model.id}; subjects at {' × '.join(f'{v:g}' for v in spacing)} mm, grid {shape}, seeds from {args.seed}")
    print("| mask | measure | " + " | ".join(KINDS) + " |")
    print("|---|---|" + "---|" * len(KINDS))
    for source in ("given", "oracle"):
        rs = [w for w in rows if w["mask"] == source]
        for key, fmt in (("psnr_db", ".2f"), ("mae_lesion", ".3f"), ("mae_healthy", ".5f")):
            cells = [format(float(np.mean([w[kind][key] for w in rs])), fmt) if rs and rs[0][kind] else "–"
                     for kind in KINDS]
            print(f"| {source} | {key} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model.id, "spacing_mm": list(spacing), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
