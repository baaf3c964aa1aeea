"""Diagnosis edits of real scans: how much of the brain they change, and how much that change looks like atrophy.

No real scan has a counterfactual twin, so an edit of one cannot be scored against the truth. What can
be measured is its shape. The engine's atrophy (``synth``: ventricles that grow, a cortex that thins)
makes a CN → AD difference with a typical layout in the template's frame: darker at the ventricles'
rims and along the cortex, nothing in deep white matter. This benchmark averages that exact difference
over engine subjects on the model grid (the "atrophy map") and, for each real scan and edit setting,
runs the edit (affine registration, the oracle's reading as the source prompt) and reports:

* ``brain changed``: the fraction of the brain whose voxels the edit changed (on the scan's grid);
* ``median %``: the median change of those voxels, in % of the scan's brain intensity range;
* ``atrophy r``: the correlation, in the model grid's brain, between the edit's change (model space,
  after the direction rule) and the atrophy map; 1 would be exactly the engine's mean atrophy;
* the edit's reconstruction PSNR (how near the scan lies to the model) and the oracle's readings: its
  diagnosis, and its lesion ml before → after (a diagnosis edit should leave the lesion load as it was;
  an edit that darkens the tissue around untouched white matter can make that white matter read as lesion).

For scale it reports the same correlation for the engine subjects' own exact CN → AD differences
(what a perfect edit of an engine subject would score) and for edits of those subjects' CN twins with
each setting (registration none, as ``counterfactualgen evaluate`` runs them).

    python Testing/Benchmarks/bench_real_diagnosis.py --threads 2 --subjects 12 --seed 428   # ≈1 min
    python Testing/Benchmarks/bench_real_diagnosis.py --threads 2 --strengths 0.6 0.8 --directions auto any
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from _bench import ROOT, load, parser


def correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of ``a`` and ``b`` inside ``mask`` (0 where either is constant: an edit that changed nothing)."""
    x, y = a[mask].astype(np.float64), b[mask].astype(np.float64)
    return float(np.corrcoef(x, y)[0, 1]) if x.std() > 0 and y.std() > 0 else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, subjects=12, seed=428)
    ap.add_argument("--scans", nargs="*", default=None,
                    help="real scans to edit (default: the FLAIRs in ../shared/data/clinical_flair)")
    ap.add_argument("--target", default="AD", choices=["MCI", "AD"], help="diagnosis to edit to (default AD)")
    ap.add_argument("--strengths", nargs="*", type=float, default=[None],
                    help="inversion strengths (default: the edit's own)")
    ap.add_argument("--directions", nargs="*", default=["auto"], choices=["auto", "any"],
                    help="change directions (default auto)")
    ap.add_argument("--word-weights", nargs="*", type=float, default=[1.0],
                    help="attention weights of the target's edited words (default 1)")
    args = ap.parse_args(argv)

    from CounterfactualGenLib.evaluation.edits import _units, diagnosis_twin, held_out_pairs
    from CounterfactualGenLib.pipeline import edit_scan
    from CounterfactualGenLib.text.prompts import canonical_prompt
    from CounterfactualGenLib.volume import read_volume

    model, encoder, oracle = load(args, oracle=True)
    grid = model.spec.grid
    target = canonical_prompt(diagnosis=args.target)
    source = canonical_prompt(diagnosis="CN")

    # the atrophy map: the mean exact CN → target difference of engine subjects, model units, on the model grid
    diffs, befores = [], []
    for subj, _ in held_out_pairs(grid, args.subjects, seed=args.seed):
        cn, tgt = diagnosis_twin(subj, grid, "CN"), diagnosis_twin(subj, grid, args.target)
        brain = cn.brain_mask > 0
        u = _units(cn.image.array, brain)
        diffs.append(np.where(brain, u(tgt.image.array) - u(cn.image.array), 0.0))
        befores.append((cn, brain))
    atrophy = np.mean(diffs, axis=0)
    tbrain = model.template("brain_mask").array > 0.5
    truth_r = [correlation(d, atrophy, tbrain) for d in diffs]

    settings = [(s, d, w) for s in args.strengths for d in args.directions for w in args.word_weights]
    scans = args.scans
    if scans is None:
        scans = sorted(str(p) for p in (ROOT.parent / "shared" / "data" / "clinical_flair").glob("*FLAIR*.nii*"))
    rows = []
    for strength, direction, weight in settings:
        name = ("default strength" if strength is None else f"strength {strength:g}") + f", direction {direction}" + \
            ("" if weight == 1.0 else f", word weight {weight:g}")
        kw = {"strength": strength, "direction": direction, "edit_word_weight": weight, "oracle": oracle, "seed": 0}
        engine_r = []
        for cn, brain in befores:
            res = edit_scan(model, encoder, cn.image, target_prompt=target, source_prompt=source, brain_mask=brain,
                            registration="none", **kw)
            engine_r.append(correlation(res.model_space["change"], atrophy, tbrain))
        for path in scans:
            scan = read_volume(path)
            res = edit_scan(model, encoder, scan, target_prompt=target, scan_name=Path(path).name, **kw)
            r = res.report
            rows.append({"setting": name, "scan": Path(path).name,
                         "changed_fraction": round(1.0 - float(r["unchanged_fraction_in_brain"]), 3),
                         "changed_median_pct": r["changed_median_pct"],
                         "atrophy_r": round(correlation(res.model_space["change"], atrophy, tbrain), 3),
                         "reconstruction_psnr_db": r["reconstruction_psnr_db"],
                         "diagnosis": f"{r.get('diagnosis_before')} → {r.get('diagnosis_after')}",
                         "lesion_ml": f"{r.get('lesion_ml_before')} → {r.get('lesion_ml_after')}",
                         "engine_edit_atrophy_r": round(float(np.mean(engine_r)), 3)})

    print(f"Atrophy map: the mean exact CN → {args.target} difference of {args.subjects} engine subjects from seed "
          f"{args.seed}; the subjects' own differences correlate with it at r = {np.mean(truth_r):.3f} "
          f"({min(truth_r):.3f} … {max(truth_r):.3f}).")
    print("| setting | scan | brain changed | median change % | atrophy r | engine edits' atrophy r | "
          "reconstruction dB | oracle diagnosis | oracle lesion ml |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['scan']} | {r['changed_fraction']:.1%} | {r['changed_median_pct']} | "
              f"{r['atrophy_r']} | {r['engine_edit_atrophy_r']} | {r['reconstruction_psnr_db']} | {r['diagnosis']} | {r['lesion_ml']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"truth_atrophy_r": truth_r, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
