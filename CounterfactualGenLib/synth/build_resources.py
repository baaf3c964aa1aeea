"""Rebuild ``Resources/Templates`` and ``Resources/LesionLibrary`` from their sources.

Run once by a maintainer, not at run time (the engine only reads the results)::

    pip download nilearn --no-deps -d /tmp/nl && unzip -q /tmp/nl/nilearn-*.whl -d /tmp/nl
    python -m CounterfactualGenLib.synth.build_resources \\
        --nilearn-data /tmp/nl/nilearn/datasets/data \\
        --lesion-library /path/to/lesion_library --resources Resources

Templates: the MNI ICBM152 2009a (nonlinear, symmetric) T1, GM and WM maps shipped
in the nilearn wheel (1 mm, uint8). We crop them to the brain's bounding box (+4 mm)
and keep 1 mm so that 1–1.5 mm subjects keep cortical detail; derived maps are
computed here once so the engine needs no segmentation at run time:

* ``brainmask``: the filled ``T1 > 0`` mask (brain + CSF; the T1 is skull-stripped).
* ``ventricles``: the lateral ventricles: the connected component of
  ``csf > 0.5 & depth > 10 mm`` that contains the lateral-ventricle seed points.

Probability maps are stored as uint8 (0–255 ↔ 0–1), labels as uint8 0/1. CSF is not
stored: the engine derives it as ``brainmask − GM − WM`` (clipped), which is how the
ventricle component is found here too. The T1 is not used by the engine; it is kept
as the registration target for real scans.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

_NAME = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
#: Lateral ventricle seed points (MNI mm, left and right body) used to pick the component.
_VENTRICLE_SEEDS_MM = ((-8.0, -10.0, 20.0), (8.0, -10.0, 20.0), (-6.0, 0.0, 20.0), (6.0, 0.0, 20.0))


def build_templates(nilearn_data: Path, out_dir: Path, *, margin_mm: int = 4) -> dict[str, Path]:
    """Write the cropped template maps (uint8 .nii.gz) to ``out_dir``.

    Args:
        nilearn_data: the ``nilearn/datasets/data`` folder of an unpacked nilearn wheel.
        out_dir: destination (``Resources/Templates``).
        margin_mm: margin kept around the brain's bounding box.

    Returns:
        Map name → written path.
    """
    import nibabel as nib
    from scipy import ndimage as ndi

    imgs = {k: nib.load(str(nilearn_data / _NAME.format(k))) for k in ("t1", "gm", "wm")}
    affine = imgs["t1"].affine
    t1 = np.asanyarray(imgs["t1"].dataobj).astype(np.float32)
    gm = np.asanyarray(imgs["gm"].dataobj).astype(np.float32) / 255.0
    wm = np.asanyarray(imgs["wm"].dataobj).astype(np.float32) / 255.0
    mask = ndi.binary_fill_holes(t1 > 0)
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    depth = ndi.distance_transform_edt(mask)
    lab, _ = ndi.label((csf > 0.5) & (depth > 10))
    inv = np.linalg.inv(affine)
    seeds = [tuple(np.rint(inv @ np.r_[p, 1.0])[:3].astype(int)) for p in _VENTRICLE_SEEDS_MM]
    ids = {int(lab[s]) for s in seeds} - {0}
    if not ids:
        raise RuntimeError("No lateral ventricle component found at the seed points.")
    ventricles = np.isin(lab, sorted(ids))

    nz = np.nonzero(mask)
    lo = [max(int(x.min()) - margin_mm, 0) for x in nz]
    hi = [min(int(x.max()) + margin_mm + 1, s) for x, s in zip(nz, mask.shape)]
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    crop_affine = affine.copy()
    crop_affine[:3, 3] = (affine @ np.r_[lo, 1.0])[:3]

    out_dir.mkdir(parents=True, exist_ok=True)
    maps = {
        "t1": np.clip(t1, 0, 255),
        "gm": gm * 255.0,
        "wm": wm * 255.0,
        "brainmask": mask.astype(np.float32),
        "ventricles": ventricles.astype(np.float32),
    }
    written = {}
    for name, arr in maps.items():
        img = nib.Nifti1Image(np.rint(arr[crop]).astype(np.uint8), crop_affine)
        img.header.set_xyzt_units("mm")
        img.set_sform(crop_affine, code=4)  # 4 = MNI152
        img.set_qform(crop_affine, code=4)
        path = out_dir / f"mni_icbm152_2009a_{name}.nii.gz"
        nib.save(img, str(path))
        written[name] = path
    return written


def copy_lesion_library(src: Path, out_dir: Path) -> None:
    """Copy the lesion masks and their volume table unchanged (CC-BY, see ATTRIBUTION.md)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob("*_lesions_mni.nii.gz")) + [src / "lesion_volumes.csv"]:
        shutil.copyfile(f, out_dir / f.name)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nilearn-data", type=Path, required=True)
    p.add_argument("--lesion-library", type=Path, default=None)
    p.add_argument("--resources", type=Path, default=Path("Resources"))
    a = p.parse_args(argv)
    for name, path in build_templates(a.nilearn_data, a.resources / "Templates").items():
        print(f"{name}: {path} ({path.stat().st_size / 1e6:.2f} MB)")
    if a.lesion_library is not None:
        copy_lesion_library(a.lesion_library, a.resources / "LesionLibrary")


if __name__ == "__main__":
    main()
