"""How well the template's brain mask, carried back onto a scan with skull, fits that scan's brain.

An edit without a brain mask registers the scan affinely to the model's template and carries the
template's brain mask back (``pipeline.to_model_space``); an edit's change stops at that mask. An
affine map cannot follow one head's outline, so the mask can reach past the brain into the skull,
where an edit then writes a little change. This benchmark measures the carried mask against a
reference brain mask of the same scan (default: Colin27 with skull, ``ch2.nii.gz``, against its
brain-extracted ``ch2bet.nii.gz``, both from Debian's ``mricron-data``): Dice, the mask's volume
outside the reference and outside the reference grown by 2 and 4 mm (CSF around the brain belongs
in the mask, so only the last two are overshoot), and the reference brain it misses.

It also runs a candidate refinement by the scan's own intensities (``refine``: the carried mask's
voxels above its Otsu threshold, opened by 2 mm, the components that reach the mask's interior
(10 mm in), grown by ``--grow`` mm; the interior kept whole), so that its effect is on record.

    python Testing/Benchmarks/bench_brain_mask.py --threads 2            # ≈20 s
    python Testing/Benchmarks/bench_brain_mask.py --scan S.nii.gz --reference S_brain.nii.gz
    python Testing/Benchmarks/bench_brain_mask.py --scan Resources/SampleData/longitudinal_patient04_study1_FLAIR.nii.gz \
        --reference none                                                   # volumes only
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from _bench import load, parser

MRICRON = Path("/usr/share/mricron/templates")


def ball(spacing_mm, r_mm: float) -> np.ndarray:
    """A ball of radius ``r_mm`` on a grid of the given voxel spacing."""
    rad = [int(np.ceil(r_mm / s)) for s in spacing_mm]
    axes = np.meshgrid(*[np.arange(-k, k + 1) * s for k, s in zip(rad, spacing_mm)], indexing="ij")
    return sum(a ** 2 for a in axes) <= r_mm ** 2 + 1e-6


def otsu(values: np.ndarray) -> float:
    import SimpleITK as sitk

    f = sitk.OtsuThresholdImageFilter()
    f.Execute(sitk.GetImageFromArray(values.astype(np.float32).reshape(-1, 1, 1)))
    return float(f.GetThreshold())


def refine(x: np.ndarray, mask: np.ndarray, spacing_mm, *, grow_mm: float, core_mm: float = 10.0,
           open_mm: float = 2.0) -> np.ndarray:
    """The candidate: ``mask`` kept whole ``core_mm`` in from its edge, elsewhere only within ``grow_mm`` of
    bright tissue (above the mask's Otsu threshold, opened by ``open_mm``) connected to that interior."""
    from scipy import ndimage as ndi

    tissue = mask & (x >= otsu(x[mask]))
    core = ndi.binary_erosion(mask, ball(spacing_mm, core_mm))
    opened = ndi.binary_opening(tissue, ball(spacing_mm, open_mm))
    labels, _ = ndi.label(opened)
    keep = np.unique(labels[core & opened])
    connected = np.isin(labels, keep[keep > 0])
    return mask & (core | ndi.binary_dilation(connected, ball(spacing_mm, grow_mm)))


def fit(mask: np.ndarray, ref: np.ndarray | None, spacing_mm, voxel_ml: float) -> dict:
    from scipy import ndimage as ndi

    if ref is None:  # no reference: the mask's volume only
        return {k: None for k in ("reference_ml", "dice", "outside_ml", "outside_2mm_ml", "outside_4mm_ml",
                                  "missed_ml")} | {"mask_ml": round(float(mask.sum()) * voxel_ml, 1)}
    row = {"mask_ml": round(float(mask.sum()) * voxel_ml, 1), "reference_ml": round(float(ref.sum()) * voxel_ml, 1),
           "dice": round(2.0 * float((mask & ref).sum()) / float(mask.sum() + ref.sum()), 3),
           "outside_ml": round(float((mask & ~ref).sum()) * voxel_ml, 1)}
    for mm in (2, 4):
        grown = ndi.binary_dilation(ref, ball(spacing_mm, mm))
        row[f"outside_{mm}mm_ml"] = round(float((mask & ~grown).sum()) * voxel_ml, 1)
    row["missed_ml"] = round(float((ref & ~mask).sum()) * voxel_ml, 1)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--scan", default=str(MRICRON / "ch2.nii.gz"), help="a scan with skull")
    ap.add_argument("--reference", default=str(MRICRON / "ch2bet.nii.gz"),
                    help="its brain mask or brain-extracted image (> 0 = brain), on the scan's grid; 'none': "
                         "only the masks' volumes (a scan without a reference)")
    ap.add_argument("--grow", nargs="*", type=float, default=[3.0, 5.0], help="the candidate's growth, mm")
    args = ap.parse_args(argv)
    for p in (args.scan, None if args.reference == "none" else args.reference):
        if p is not None and not Path(p).exists():
            raise SystemExit(f"{p} not found (Debian: apt install mricron-data; or give --scan and --reference)")

    from CounterfactualGenLib.pipeline import to_model_space
    from CounterfactualGenLib.volume import read_volume

    model, _, _ = load(args)
    scan = read_volume(args.scan)
    ref = None if args.reference == "none" else read_volume(args.reference, validate=False).array > 0
    if ref is not None and ref.shape != scan.shape:
        raise SystemExit(f"the reference's grid {ref.shape} is not the scan's {scan.shape}")
    ms = to_model_space(scan, model.spec.grid, model.template("image"), model.template("brain_mask").array > 0.5,
                        contrast=model.spec.contrast)
    x = scan.array.astype(np.float32)
    rows = {"carried (edit's default)": fit(ms.brain_mask, ref, scan.spacing_mm, scan.voxel_volume_ml)}
    for g in args.grow:
        rows[f"refined, grow {g:g} mm"] = fit(refine(x, ms.brain_mask, scan.spacing_mm, grow_mm=g), ref,
                                             scan.spacing_mm, scan.voxel_volume_ml)
    print(f"{Path(args.scan).name} against {Path(args.reference).name}; registration correlation "
          f"{ms.correlation:.3f}")
    print("| mask | ml | Dice | outside the reference, ml | beyond 2 mm | beyond 4 mm | reference missed, ml |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['mask_ml']} | {r['dice']} | {r['outside_ml']} | {r['outside_2mm_ml']} | "
              f"{r['outside_4mm_ml']} | {r['missed_ml']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
