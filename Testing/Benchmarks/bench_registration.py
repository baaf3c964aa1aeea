"""Affine registration of real scans to the model template: time and accuracy at the scan's own
resolution against the default (the scan first brought to half the template's spacing).

For each scan (default: the bundled 320×320×48 sample FLAIR) and each setting of
``register_affine(moving_spacing_mm=…)`` (0 = the scan's own resolution; default = half the
template's finest spacing) this prints:

* seconds per registration (best of ``--repeats``);
* the registration-QC correlation (always measured on the scan at its own resolution);
* how far the result lies from the own-resolution result, over the template's brain voxels
  (mean / max mm);
* seed spread: how far the results for sampling seeds 1 and 2 lie from seed 0's (mean mm) —
  the registration's own noise, to judge the difference above against;
* known moves: the scan's content moved by a known rigid transform M (10 mm and 10°, and 5 mm
  and −6° about other axes; resampled linearly on its own grid), registered again; the error is
  how far the new result lies from M ∘ (the unmoved result) over the brain voxels (mean / max
  mm). A registration that is right recovers M exactly, whatever its own bias.

    python Testing/Benchmarks/bench_registration.py --threads 2     # ≈40 s on 2 CPU cores
    python Testing/Benchmarks/bench_registration.py --threads 2 --engine   # + two synthetic FLAIRs, 1 mm and 0.9×0.9×3 mm
    python Testing/Benchmarks/bench_registration.py --inputs ../shared/data/clinical_flair/*FLAIR.nii.gz
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from _bench import ROOT, parser


def rigid(angle_deg: float, axis: int, shift_mm) -> np.ndarray:
    a = np.radians(angle_deg)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    m = np.eye(4)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    m[:3, 3] = shift_mm
    return m


def moved_scan(scan, m: np.ndarray):
    """The scan's content moved by the RAS transform ``m`` on its own grid (linear interpolation):
    ``moved(x) = scan(m⁻¹ x)``. Moving the header instead would not test anything (the
    registration works in physical space and follows a header move exactly)."""
    import SimpleITK as sitk

    from CounterfactualGenLib.geometry import _to_sitk
    from CounterfactualGenLib.volume import Volume

    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    inv = flip @ np.linalg.inv(m) @ flip  # output point → input point, in LPS
    t = sitk.AffineTransform(3)
    t.SetMatrix(inv[:3, :3].ravel().tolist())
    t.SetTranslation(inv[:3, 3].tolist())
    img = _to_sitk(scan)
    out = sitk.Resample(img, img, t, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return Volume(sitk.GetArrayFromImage(out).transpose(2, 1, 0), scan.affine_ras)


MOVES = {"10 mm, 10°": rigid(10.0, 2, [10.0, 0.0, 0.0]), "5 mm, −6°": rigid(-6.0, 0, [0.0, 5.0, -5.0])}


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--inputs", nargs="+",
                    default=[str(ROOT / "Resources" / "SampleData" / "longitudinal_patient04_study1_FLAIR.nii.gz")])
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per setting (best is printed)")
    ap.add_argument("--engine", action="store_true",
                    help="also two synthetic engine FLAIRs (moderate lesion load, brain only): 1 mm isotropic "
                         "160×192×160 and 0.9×0.9×3 mm 208×256×52 (seeds 9100, 9101)")
    args = ap.parse_args(argv)

    import torch

    from CounterfactualGenLib.geometry import register_affine
    from CounterfactualGenLib.models import load_model, resolve_model
    from CounterfactualGenLib.volume import read_volume

    if args.threads:
        torch.set_num_threads(args.threads)
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    model = load_model(resolve_model(args.model))
    template = model.template("image")
    tmask = model.template("brain_mask").array > 0.5
    pts = np.c_[np.argwhere(tmask), np.ones(int(tmask.sum()))] @ template.affine_ras.T  # brain voxels, template world

    def dist(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
        d = np.linalg.norm((pts @ a.T - pts @ b.T)[:, :3], axis=1)
        return round(float(d.mean()), 3), round(float(d.max()), 3)

    scans = [(Path(p).name, lambda p=p: read_volume(p, name="input scan")) for p in args.inputs]
    if args.engine:
        from CounterfactualGenLib.synth import make_subject, random_spec

        for seed, shape, spacing in ((9100, (160, 192, 160), 1.0), (9101, (208, 256, 52), (0.9, 0.9, 3.0))):
            scans.append((f"engine FLAIR seed {seed}", lambda seed=seed, shape=shape, spacing=spacing: make_subject(
                random_spec(seed, lesion_class="moderate"), shape=shape, spacing_mm=spacing, center_mm=(0, -18, 8)).image))
    settings = {"own resolution": 0.0, "default": None}
    rows = []
    for label, load_scan in scans:
        scan = load_scan()
        own = None
        for name, ms in settings.items():
            def reg(vol, seed=0):
                return register_affine(vol, template, template_mask=tmask, seed=seed, moving_spacing_mm=ms)
            times = []
            for _ in range(max(1, args.repeats)):
                t0 = time.perf_counter()
                r = reg(scan)
                times.append(time.perf_counter() - t0)
            own = r.model_to_source_world if own is None else own
            spread = [dist(reg(scan, seed=k).model_to_source_world, r.model_to_source_world)[0] for k in (1, 2)]
            moves = {}
            for mname, m in MOVES.items():
                moved = reg(moved_scan(scan, m))
                moves[mname] = dist(moved.model_to_source_world, m @ r.model_to_source_world)
            rows.append({"scan": label, "shape": list(scan.shape),
                         "spacing_mm": [round(v, 3) for v in scan.spacing_mm], "setting": name,
                         "seconds_best": round(min(times), 3), "correlation": round(r.correlation, 4),
                         "vs_own_resolution_mm": dist(r.model_to_source_world, own),
                         "seed_spread_mm": spread, "known_move_error_mm": moves})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\ntemplate {template.shape} at {template.spacing_mm} mm ({model.id}); distances over its "
          f"{int(tmask.sum())} brain voxels")
    print("| scan | setting | s | QC correlation | vs own resolution mm (mean / max) | seed spread mm | "
          + " | ".join(f"known move {k}: error mm (mean / max)" for k in MOVES) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(MOVES))
    for r in rows:
        mv = " | ".join(f"{a} / {b}" for a, b in r["known_move_error_mm"].values())
        print(f"| {r['scan']} | {r['setting']} | {r['seconds_best']} | {r['correlation']} | "
              f"{r['vs_own_resolution_mm'][0]} / {r['vs_own_resolution_mm'][1]} | "
              f"{', '.join(str(v) for v in r['seed_spread_mm'])} | {mv} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
