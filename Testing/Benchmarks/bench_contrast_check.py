"""Can a scan's intensities tell a T1-weighted scan from a FLAIR before a FLAIR model edits it?

Registration does not: a T1 registers to the FLAIR template as well as a FLAIR does. This
benchmark measures the candidate rule a contrast check would use: in model space, after the
edit's own registration and intensity normalisation, the median of the template's deep white
matter minus the median of the rest of the brain (without its darkest 40 %, the CSF). On FLAIR
white matter is darker than grey matter (< 0), on T1 brighter (> 0). It prints the statistic for
each scan given (by default the clinical scans in ``../shared/data/clinical_flair``, FLAIR and
T1W) and for engine subjects of both contrasts on the model grid (deformed anatomy, no
registration). Where FLAIR and T1 overlap no threshold separates them, and the edit relies on
the scan's name instead (``pipeline.contrast_name_warning``).

    python Testing/Benchmarks/bench_contrast_check.py --threads 2 --subjects 48   # ≈1 min
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from _bench import ROOT, load, parser

CSF_PERCENTILE = 40.0


def white_minus_grey(x: np.ndarray, brain: np.ndarray, white: np.ndarray) -> float:
    """Median of the deep white matter (template WM > 0.9) minus that of the rest of the brain (WM < 0.1),
    the darkest ``CSF_PERCENTILE`` % of the latter left out; model units."""
    rest = x[(white < 0.1) & brain]
    grey = float(np.median(rest[rest > np.percentile(rest, CSF_PERCENTILE)]))
    return float(np.median(x[(white > 0.9) & brain])) - grey


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, subjects=48, seed=5000)
    ap.add_argument("--scans", nargs="*", default=None,
                    help="scans to read (default: every NIfTI in ../shared/data/clinical_flair)")
    args = ap.parse_args(argv)

    from CounterfactualGenLib.geometry import ModelSpaceMapping, register_affine
    from CounterfactualGenLib.intensity import IntensityNormalizer
    from CounterfactualGenLib.synth import make_subject, random_spec
    from CounterfactualGenLib.volume import read_volume

    model, _, _ = load(args)
    grid = model.spec.grid
    template = model.template("image")
    tmask = model.template("brain_mask").array > 0.5
    white = model.template("white_matter").array
    scans = args.scans
    if scans is None:
        scans = sorted(str(p) for p in (ROOT.parent / "shared" / "data" / "clinical_flair").glob("*.nii*"))
    rows = []
    for path in scans:
        scan = read_volume(path)
        reg = register_affine(scan, template, template_mask=tmask)
        mapping = ModelSpaceMapping(grid, scan.shape, scan.affine_ras, reg.model_to_source_world)
        brain = mapping.to_source(tmask.astype(np.float32), interpolation="nearest") > 0.5
        norm = IntensityNormalizer.fit(scan.array, brain)
        x = norm.forward(mapping.to_model(scan, default=norm.low))
        rows.append({"scan": Path(path).name, "registration_correlation": round(float(reg.correlation), 3),
                     "white_minus_grey": round(white_minus_grey(x, tmask, white), 3)})
    engine = {}
    for contrast in ("FLAIR", "T1"):
        vals = []
        for k in range(args.subjects):
            spec = random_spec(args.seed + k, contrast=contrast, lesion_class=("none", "minimal", "moderate", "high")[k % 4])
            subj = make_subject(spec, shape=grid.shape, spacing_mm=grid.spacing_mm, center_mm=grid.center_ras)
            norm = IntensityNormalizer.fit(subj.image.array, subj.brain_mask > 0)
            vals.append(white_minus_grey(norm.forward(subj.image.array), tmask, white))
        engine[contrast] = {"min": round(min(vals), 3), "max": round(max(vals), 3), "n": len(vals)}

    print("| scan | registration correlation | white − grey (model units) |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['scan']} | {r['registration_correlation']} | {r['white_minus_grey']} |")
    for contrast, e in engine.items():
        print(f"| engine {contrast}, {e['n']} subjects from seed {args.seed} | | {e['min']} … {e['max']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"scans": rows, "engine": engine}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
