"""Where a lesion-load prompt edit may act: white matter, the whole brain or the prompts' disagreement.

A prompt edit of a real scan (``edit_scan``'s inversion path) regenerates the whole brain,
so lesion addition and filling by the text alone rewrite healthy tissue too: against the
exact twin they scored below doing nothing. By default (``edit_region="auto"``) a lesion-load
edit keeps its change in the template's white matter and 5 mm around it, where MS lesions lie
(``pipeline.white_matter_region``; the benchmark also prints how much of the subjects' true lesion
volume that region holds); ``"brain"`` lets it act on the whole brain. With ``edit_region="prompt"`` the edit acts
only where the source and target prompts' clean predictions differ by at least a threshold
of their largest difference (DiffEdit, Couairon et al. 2023; ``pipeline.EDIT_REGION_*``): after
every sampler step the target row is reset to the source row outside that region, so the
edit is made inside it in keeping with its surroundings, and nothing outside changes. This
benchmark runs
``evaluation.edits.evaluate_edits`` (held-out engine subjects against their exact twins) for
the white-matter region, the whole brain and each threshold and prints, for lesion addition and filling by the
text alone: PSNR / MAE in the brain against the twin (and for the unedited input), the
oracle's lesion ml error against the twin, effectiveness (oracle class after = target) and
the Dice of the true lesions with the labelled voxels. Choose on subjects other than the
evaluation's (``counterfactualgen evaluate`` edits seeds from 0; the default here is 200).
``--strengths`` and ``--separations`` run each region at other inversion strengths and with the
target guided away from the source prompt (``edit_scan(separation=…)``); ``--directions`` with the
change kept whole (``any``) or only in the prompts' direction (``auto``, the default;
``pipeline.change_direction``; the benchmark also prints how much of the exact twins' own difference has
that direction). ``--word-weights`` and ``--attention-keeps`` run prompt-to-prompt's two knobs (``edit_scan``'s
``edit_word_weight``: the attention weight of the target's edited words, PRISM uses about 2; ``attention_keep``:
the fraction of steps whose cross-attention is copied from the source for shared words). ``--tasks`` picks the edits (``evaluate_edits(tasks=…)``): ``atrophy`` is CN → AD, ``mci``
CN → MCI (read as AD: the edit went too far), ``cn`` AD → CN.

    python Testing/Benchmarks/bench_edit_region.py --threads 2 --seed 200 --subjects 12 \\
        --thresholds 0.5   # ≈9 min on 2 CPU cores
"""

from __future__ import annotations

import json
from pathlib import Path

from _bench import load, parser

from CounterfactualGenLib.evaluation.edits import DEFAULT_EDIT_TASKS, DIAGNOSIS_EDITS, EDIT_TASKS, evaluate_edits


def white_matter_coverage(model, seed: int, n: int) -> dict:
    """How much of the true lesion volume of the ``n`` held-out subjects the edits are measured on
    (``evaluation.edits.held_out_pairs`` from ``seed``) lies in the edit's white-matter region, on the model grid."""
    import numpy as np

    from CounterfactualGenLib.evaluation.edits import held_out_pairs
    from CounterfactualGenLib.pipeline import LESION_EDIT_WM_PROBABILITY, white_matter_region

    g = model.spec.grid
    white = model.template("white_matter").array
    brain = model.template("brain_mask").array > 0.5
    region = white_matter_region(white, brain, g.spacing_mm)
    inside = inside_wm = total = 0.0
    for subj, _ in held_out_pairs(g, n, seed=seed):
        lesions = np.asarray(subj.lesion_mask, dtype=np.float64)
        total += lesions.sum()
        inside += lesions[region].sum()
        inside_wm += lesions[white >= LESION_EDIT_WM_PROBABILITY].sum()
    ml = g.spacing_mm ** 3 / 1000.0
    return {"region_ml": round(float(region.sum()) * ml, 1), "brain_ml": round(float(brain.sum()) * ml, 1),
            "lesion_fraction": inside / max(total, 1e-9), "lesion_fraction_wm_only": inside_wm / max(total, 1e-9)}


def twin_directions(model, seed: int, n: int) -> dict:
    """For the ``n`` held-out subjects from ``seed``: the share of the exact twins' squared difference (in the
    brain, the edit benchmark's units) that brightens for lesion addition and darkens from the CN to the AD
    twin: the directions ``pipeline.change_direction`` keeps. Returns (min, max) over the subjects."""
    import numpy as np

    from CounterfactualGenLib.evaluation.edits import _units, atrophy_pair, held_out_pairs

    def share(diff: np.ndarray, sign: int) -> float:
        e = float((diff ** 2).sum())
        return float((diff[sign * diff > 0] ** 2).sum()) / e if e else 1.0

    add, ad = [], []
    for subj, twin in held_out_pairs(model.spec.grid, n, seed=seed):
        brain = subj.brain_mask > 0
        u = _units(subj.image.array, brain)
        add.append(share((u(subj.image.array) - u(twin.image.array))[brain], 1))
        cn, adt = atrophy_pair(subj, model.spec.grid)
        b = cn.brain_mask > 0
        u = _units(cn.image.array, b)
        ad.append(share((u(adt.image.array) - u(cn.image.array))[b], -1))
    return {"add_brightening": (min(add), max(add)), "ad_darkening": (min(ad), max(ad))}


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, subjects=6, seed=200)
    ap.add_argument("--thresholds", nargs="*", type=float, default=[0.5],
                    help="edit-region thresholds (fraction of the largest prompt disagreement in the brain)")
    ap.add_argument("--strengths", nargs="*", type=float, default=[None],
                    help="inversion strengths to run each region with (edit's --strength; default: each edit's "
                         "own, 0.6 for lesion load, 0.8 for diagnosis towards AD, 0.6 towards CN)")
    ap.add_argument("--separations", nargs="*", type=float, default=[0.0],
                    help="scales guiding a prompt edit's target away from its source prompt (default 0)")
    ap.add_argument("--directions", nargs="*", default=["auto"], choices=["auto", "any"],
                    help="change directions to run (edit_scan(direction=…); default auto)")
    ap.add_argument("--word-weights", nargs="*", type=float, default=[1.0],
                    help="attention weights of the target's edited words (edit's --edit-word-weight; default 1)")
    ap.add_argument("--attention-keeps", nargs="*", type=float, default=[0.8],
                    help="fractions of steps with the source's cross-attention copied (edit's --attention-keep; "
                         "default 0.8)")
    ap.add_argument("--regions", nargs="*", default=["auto", "brain"], choices=["auto", "brain"],
                    help="edit regions to run besides the prompt thresholds (default: auto brain)")
    ap.add_argument("--tasks", nargs="*", default=list(DEFAULT_EDIT_TASKS), choices=list(EDIT_TASKS),
                    help="edits to run per subject (default: the card's; fill is filling the oracle's segmentation, "
                         "fill_text_only by the text alone, atrophy is CN → AD, mci CN → MCI, cn AD → CN)")
    args = ap.parse_args(argv)

    from CounterfactualGenLib.pipeline import LESION_EDIT_WM_MARGIN_MM, LESION_EDIT_WM_PROBABILITY, edit_scan

    model, encoder, oracle = load(args, oracle=True)

    def editor(region: str, threshold: float | None, strength: float | None, separation: float = 0.0,
               direction: str = "auto", word_weight: float = 1.0, keep: float = 0.8):
        def edit(scan, *, target, source, brain_mask, lesion_mask=None, auto_lesion_mask=True):
            return edit_scan(model, encoder, scan, target_prompt=target, source_prompt=source, brain_mask=brain_mask,
                             lesion_mask=lesion_mask, registration="none", oracle=oracle,
                             auto_lesion_mask=auto_lesion_mask, edit_region=region, edit_region_threshold=threshold,
                             strength=strength, separation=separation, direction=direction, seed=0,
                             edit_word_weight=word_weight, attention_keep=keep)
        return edit

    p2p = [(w, k) for w in args.word_weights for k in args.attention_keeps]
    settings = [(s, r, None, a, d, w, k) for s in args.strengths for r in args.regions for a in args.separations
                for d in args.directions for w, k in p2p] + \
        [(s, "prompt", t, a, d, w, k) for s in args.strengths for t in args.thresholds for a in args.separations
         for d in args.directions for w, k in p2p]
    results = {}
    for strength, region, thr, sep, direction, weight, keep in settings:
        name = ({"auto": "white matter (auto)"}.get(region, region) if thr is None else f"prompt:{thr:g}") + \
            ("" if strength is None else f" strength {strength:g}") + (f" separation {sep:g}" if sep else "") + \
            (f" direction {direction}" if len(args.directions) > 1 or direction != "auto" else "") + \
            (f" word weight {weight:g}" if weight != 1.0 else "") + (f" attention keep {keep:g}" if keep != 0.8 else "")
        r = evaluate_edits(editor(region, thr, strength, sep, direction, weight, keep), grid=model.spec.grid, n_subjects=args.subjects,
                           seed=args.seed, composition_sizes=(), tasks=args.tasks)
        r.pop("_examples", None)
        results[name] = {"summary": r["summary"], "changed_ml": {
            t: [row[t].get("changed_ml") for row in r["per_subject"] if t in row] for t in ("fill_text_only",)}}

    coverage = white_matter_coverage(model, args.seed, args.subjects)
    truth = twin_directions(model, args.seed, args.subjects)
    print(f"The exact twins' own difference, share of its energy in the rule's direction (min … max over subjects): "
          f"lesion addition brightening {truth['add_brightening'][0]:.3f} … {truth['add_brightening'][1]:.3f}, "
          f"CN → AD darkening {truth['ad_darkening'][0]:.3f} … {truth['ad_darkening'][1]:.3f}")
    results["twin_directions"] = truth
    print(f"White-matter region (white matter ≥ {LESION_EDIT_WM_PROBABILITY:g} and {LESION_EDIT_WM_MARGIN_MM:g} mm "
          f"around it): {coverage['region_ml']} ml of the template brain mask's {coverage['brain_ml']} ml; it holds "
          f"{coverage['lesion_fraction']:.1%} of these subjects' true lesion volume (the white matter alone "
          f"{coverage['lesion_fraction_wm_only']:.1%})")
    results["white_matter_coverage"] = coverage
    print(f"{args.subjects} held-out subjects from seed {args.seed}; PSNR / MAE in the brain vs the exact twin "
          "(unedited input in brackets); ml error: the oracle's reading vs the twin's truth")
    print("| region | task | PSNR dB (unedited) | MAE (unedited) | oracle ml error | effectiveness | Dice |")
    print("|---|---|---|---|---|---|---|")
    for name, res in results.items():
        if "summary" not in res:
            continue
        s = res["summary"]
        for task, dice_key in (("fill", "dice_removed_vs_true"), ("fill_text_only", "dice_removed_vs_true"),
                               ("fill_with_mask", "dice_removed_vs_true"), ("add", "dice_added_vs_true")):
            if task not in s:
                continue
            t = s[task]
            print(f"| {name} | {task} | {t['psnr_db']} ({t['baseline_psnr_db']}) | {t['mae']} ({t['baseline_mae']}) | "
                  f"{t['oracle_ml_error_vs_twin']} | {t['effectiveness']} | {t[dice_key]} |")
        for task, (src_dx, tgt_dx) in DIAGNOSIS_EDITS.items():  # whole brain; effectiveness = read as the target
            if s.get(task):
                t = s[task]
                read = ", ".join(f"{d} {n}" for d, n in t["read_as"].items())
                print(f"| {name} | {src_dx} → {tgt_dx} | {t['psnr_db']} ({t['baseline_psnr_db']}) | {t['mae']} "
                      f"({t['baseline_mae']}) | | {t['effectiveness']} (read as {read}) | |")
        if s.get("reversibility_l1") is not None:
            print(f"| {name} | reversibility L1 | {s['reversibility_l1']} | | | | |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
