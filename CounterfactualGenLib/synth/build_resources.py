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

Colin27 (``--colin27``: the brain-extracted ``ch2bet.nii.gz`` of Debian's ``mricron-data``,
``/usr/share/mricron/templates``; one person scanned 27 times, Holmes et al. 1998): the
individual anatomy beside the population average, with its own gyri, sulci and
ventricles. It is registered affinely to the ICBM152 T1 by the registration edits use
(``geometry.register_affine``: SimpleITK, Mattes mutual information), so it shares the template's MNI frame (the lesion library and the
engine's grid centre) while keeping its own shape, and resampled onto the same cropped
1 mm grid. Its GM / WM / CSF maps are the posteriors of a three-class Gaussian mixture
of its T1 intensities with the ICBM152 tissue maps (smoothed, 10 % uniform) as spatial
priors (EM, :func:`segment_tissues`); the ventricles are found as for ICBM152::

    apt-get download mricron-data && dpkg-deb -x mricron-data_*.deb /tmp/mricron
    python -m CounterfactualGenLib.synth.build_resources --resources Resources \
        --colin27 /tmp/mricron/usr/share/mricron/templates/ch2bet.nii.gz

Clinical brains (``--clinical FLAIR T1W NAME``, e.g. the two MS patients' first-study scans
in the project's shared data, Lesjak et al. 2016, CC-BY): the anatomy of a real patient
scanned in routine care (with skull, 0.7×0.7×3 mm, inhomogeneous). The FLAIR is registered
to the ICBM152 T1 (``register_affine``; a T1 with skull registers worse, its scalp fat
being brighter than the brain), and the T1 of the same session is carried through the same
transform (both share the scanner frame; the build prints how far registering one to the other
would move the T1: 0.8 and 2.3 mm on average for the two patients, under the 3 mm slices).
Inside ICBM152's brain mask (within both fields of view), each is bias-corrected (N4,
SimpleITK), the T1 segmented as Colin27 is, and the
patient's own lesions, which the engine must not render as unlabelled tissue, found on the
FLAIR (:func:`flair_lesions`) and filled as white matter::

    python -m CounterfactualGenLib.synth.build_resources --resources Resources \
        --clinical D/longitudinal_patient04_study1_FLAIR.nii.gz D/longitudinal_patient04_study1_T1W.nii.gz clinical04 \
        --clinical D/longitudinal_patient12_study1_FLAIR.nii.gz D/longitudinal_patient12_study1_T1W.nii.gz clinical12
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
    ventricles = lateral_ventricles(mask, gm, wm, affine)

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
    return _write_maps({k: v[crop] for k, v in maps.items()}, crop_affine, out_dir, "mni_icbm152_2009a")


def _write_maps(maps: dict[str, np.ndarray], affine: np.ndarray, out_dir: Path, prefix: str) -> dict[str, Path]:
    """``out_dir/{prefix}_{name}.nii.gz`` for each map, as uint8 (0–255) in MNI space (codes 4)."""
    import nibabel as nib

    written = {}
    for name, arr in maps.items():
        img = nib.Nifti1Image(np.rint(arr).astype(np.uint8), affine)
        img.header.set_xyzt_units("mm")
        img.set_sform(affine, code=4)  # 4 = MNI152
        img.set_qform(affine, code=4)
        path = out_dir / f"{prefix}_{name}.nii.gz"
        nib.save(img, str(path))
        written[name] = path
    return written


def lateral_ventricles(mask: np.ndarray, gm: np.ndarray, wm: np.ndarray, affine: np.ndarray,
                       within: np.ndarray | None = None) -> np.ndarray:
    """The lateral ventricles: the components of ``csf > 0.5 & depth > 10 mm`` (CSF = mask − GM − WM;
    only ``within`` that region, if given) that hold the lateral-ventricle seed points."""
    from scipy import ndimage as ndi

    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    depth = ndi.distance_transform_edt(mask)
    lab, _ = ndi.label((csf > 0.5) & (depth > 10) & (True if within is None else within))
    inv = np.linalg.inv(affine)
    seeds = [tuple(np.rint(inv @ np.r_[p, 1.0])[:3].astype(int)) for p in _VENTRICLE_SEEDS_MM]
    ids = {int(lab[s]) for s in seeds} - {0}
    if not ids:
        raise RuntimeError("No lateral ventricle component found at the seed points.")
    return np.isin(lab, sorted(ids))


def segment_tissues(t1: np.ndarray, mask: np.ndarray, priors: np.ndarray, *, iterations: int = 30,
                    prior_sigma_mm: float = 2.0, uniform: float = 0.1) -> np.ndarray:
    """CSF / GM / WM posteriors of a T1 inside ``mask``: a Gaussian mixture of the intensities,
    each voxel's class weights taken from spatial ``priors`` (K, X, Y, Z; another brain's tissue maps
    in the same frame, here ICBM152's), smoothed by ``prior_sigma_mm`` and mixed with ``uniform`` so
    that an individual's folds, which the average's maps do not have, can still be found. EM
    updates the class means and variances. The classes must be ordered by mean intensity (for a
    T1: CSF, GM, WM). Returns partial-volume fractions (K, X, Y, Z) summing to 1 in the mask: a voxel
    whose intensity lies between the means of its most probable class and a neighbouring class is
    the linear mixture of the two (a 1 mm voxel across a border holds both tissues)."""
    from scipy import ndimage as ndi

    k = priors.shape[0]
    inside = mask > 0
    x = t1[inside].astype(np.float64)
    pri = np.stack([ndi.gaussian_filter(p.astype(np.float64), prior_sigma_mm)[inside] for p in priors])
    pri = (1.0 - uniform) * pri / np.maximum(pri.sum(0, keepdims=True), 1e-12) + uniform / k
    post = pri.copy()
    for _ in range(iterations):
        w = post.sum(1)
        mu = (post * x).sum(1) / w
        var = np.maximum((post * (x - mu[:, None]) ** 2).sum(1) / w, 1e-6)
        logp = np.log(pri) - 0.5 * np.log(2 * np.pi * var)[:, None] - 0.5 * (x - mu[:, None]) ** 2 / var[:, None]
        logp -= logp.max(0, keepdims=True)
        post = np.exp(logp)
        post /= post.sum(0, keepdims=True)
    order = np.argsort(mu)
    if not np.array_equal(order, np.arange(k)):
        raise RuntimeError(f"The tissue classes came out in another intensity order (means {mu.round(1)}).")
    frac = np.zeros_like(post)
    best = post.argmax(0)
    for c in range(k):
        sel = best == c
        xc = x[sel]
        f = np.zeros((k, xc.size))
        f[c] = 1.0
        if c > 0:  # darker neighbour: mix below the class mean
            t = np.clip((xc - mu[c - 1]) / (mu[c] - mu[c - 1]), 0.0, 1.0)
            lo = xc < mu[c]
            f[c, lo], f[c - 1, lo] = t[lo], 1.0 - t[lo]
        if c < k - 1:  # brighter neighbour: mix above it
            t = np.clip((xc - mu[c]) / (mu[c + 1] - mu[c]), 0.0, 1.0)
            hi = xc > mu[c]
            f[c, hi], f[c + 1, hi] = 1.0 - t[hi], t[hi]
        frac[:, sel] = f
    out = np.zeros((k, *t1.shape), np.float32)
    out[:, inside] = frac
    return out


def build_colin27(ch2bet: Path, out_dir: Path) -> dict[str, Path]:
    """Write Colin27's maps (``colin27_{gm,wm,brainmask,ventricles}.nii.gz``) on the grid of the
    ICBM152 maps already in ``out_dir`` (see the module docstring). Returns map name → path."""
    from scipy import ndimage as ndi

    from ..geometry import register_affine, resample_index_space
    from ..volume import read_volume

    icbm = _icbm_maps(out_dir)
    affine, brain_i = icbm["t1"].affine_ras, icbm["brainmask"].array > 0
    colin = read_volume(ch2bet, validate=False)
    # the project's registration, as edits register scans (Mattes MI, rigid then affine, deterministic)
    reg = register_affine(colin, icbm["t1"], template_mask=brain_i)
    out_to_in = np.linalg.inv(colin.affine_ras) @ reg.model_to_source_world @ affine
    t1 = resample_index_space(colin.array, icbm["t1"].shape, out_to_in, interpolation="linear").astype(np.float32)
    mask = t1 > 0.5 * float(np.percentile(t1[t1 > 0], 5))
    lab, n = ndi.label(mask)
    if n > 1:
        mask = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    mask = ndi.binary_fill_holes(mask)
    csf, gm, wm = _segment_with_icbm_priors(t1, mask, icbm)
    written, ventricles = _write_individual(gm, wm, mask, icbm, out_dir, "colin27")
    print(f"Colin27 registered to ICBM152: T1 correlation in the brain {reg.correlation:.3f}; GM {gm.sum() / 1000:.0f} ml, "
          f"WM {wm.sum() / 1000:.0f} ml, CSF {csf.sum() / 1000:.0f} ml, lateral ventricles {ventricles.sum() / 1000:.1f} ml "
          f"(ICBM152 {icbm['gm'].array.sum() / 255e3:.0f} / {icbm['wm'].array.sum() / 255e3:.0f} ml GM / WM, "
          f"lateral ventricles {(icbm['ventricles'].array > 0).sum() / 1000:.1f} ml)")
    return written


def _icbm_maps(out_dir: Path) -> dict:
    """The ICBM152 maps in ``out_dir`` (Volumes by name) that the individual brains are built against."""
    from ..volume import read_volume

    return {n: read_volume(out_dir / f"mni_icbm152_2009a_{n}.nii.gz", validate=False)
            for n in ("t1", "gm", "wm", "brainmask", "ventricles")}


def _segment_with_icbm_priors(t1: np.ndarray, mask: np.ndarray, icbm: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSF / GM / WM fractions of a T1 on ICBM152's grid (:func:`segment_tissues`, ICBM152's maps as priors)."""
    gm_i, wm_i = icbm["gm"].array / 255.0, icbm["wm"].array / 255.0
    csf_i = np.clip((icbm["brainmask"].array > 0) - gm_i - wm_i, 0.0, 1.0)
    return segment_tissues(t1, mask, np.stack([csf_i, gm_i, wm_i]))


def _write_individual(gm: np.ndarray, wm: np.ndarray, mask: np.ndarray, icbm: dict, out_dir: Path,
                      prefix: str) -> tuple[dict[str, Path], np.ndarray]:
    """Write an individual brain's maps; returns the paths and its lateral ventricles. An individual's CSF
    spaces join up more than the average's, so only the seeded components within 8 mm of ICBM152's
    ventricles (the same place after the affine registration) are kept."""
    from scipy import ndimage as ndi

    affine = icbm["t1"].affine_ras
    near = ndi.distance_transform_edt(~(icbm["ventricles"].array > 0)) <= 8.0
    ventricles = lateral_ventricles(mask.astype(np.float32), gm, wm, affine, within=near)
    written = _write_maps({"gm": gm * 255.0, "wm": wm * 255.0, "brainmask": mask.astype(np.float32),
                           "ventricles": ventricles.astype(np.float32)}, affine, out_dir, prefix)
    return written, ventricles


def bias_corrected(arr: np.ndarray, mask: np.ndarray, *, shrink: int = 3, iterations: int = 50) -> np.ndarray:
    """``arr`` divided by its N4 bias field estimated inside ``mask`` (SimpleITK; on a grid
    ``shrink`` times coarser, the field being smooth; single-threaded, so bit-reproducible)."""
    import SimpleITK as sitk

    # N4's multithreaded sums depend on the core count: one thread, the same maps on any machine
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        img = sitk.GetImageFromArray(arr.astype(np.float32))
        msk = sitk.GetImageFromArray(mask.astype(np.uint8))
        n4 = sitk.N4BiasFieldCorrectionImageFilter()
        n4.SetMaximumNumberOfIterations([iterations] * 3)
        n4.Execute(sitk.Shrink(img, [shrink] * 3), sitk.Shrink(msk, [shrink] * 3))
        field = sitk.Exp(n4.GetLogBiasFieldAsImage(img))
        return sitk.GetArrayFromImage(img / field).astype(np.float32)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def flair_lesions(flair: np.ndarray, gm: np.ndarray, wm: np.ndarray, mask: np.ndarray, wm_prior: np.ndarray, *,
                  core: float = 1.3, grow: float = 1.2, min_voxels: int = 20) -> np.ndarray:
    """White-matter hyperintensities of a bias-corrected FLAIR (1 mm grid), as a 0/1 mask.

    Cores: the FLAIR smoothed by 1 voxel above ``core`` × the median of normal white matter
    (``wm`` ≥ 0.95) and 1.12 × the median of grey matter (so bright cortex is not taken: on some
    scanners GM is 1.2 × WM), in the deep white matter (``wm_prior`` ≥ 0.5, over 8 mm inside the
    mask), of at least ``min_voxels``. Each core is grown through the connected voxels above
    ``grow`` × white matter (and 1.05 × grey matter) within ``wm_prior`` ≥ 0.2, 5 mm inside the mask.
    Deep and periventricular lesions are found; small juxtacortical ones may be missed."""
    from scipy import ndimage as ndi

    wm_med = float(np.median(flair[(wm >= 0.95) & mask]))
    gm_med = float(np.median(flair[(gm >= 0.95) & mask]))
    smooth = ndi.gaussian_filter(flair, 1.0)
    depth = ndi.distance_transform_edt(mask)
    cores = (smooth > max(core * wm_med, 1.12 * gm_med)) & (wm_prior >= 0.5) & (depth > 8) & mask
    lab, _ = ndi.label(cores)
    sizes = np.bincount(lab.ravel())
    big = np.nonzero(sizes >= min_voxels)[0]
    cores = np.isin(lab, big[big > 0])
    region = (smooth > max(grow * wm_med, 1.05 * gm_med)) & (wm_prior >= 0.2) & (depth > 5) & mask
    return ndi.binary_propagation(cores, mask=region | cores)


def build_clinical(flair_path: Path, t1_path: Path, out_dir: Path, name: str) -> dict[str, Path]:
    """Write a patient's maps (``{name}_{gm,wm,brainmask,ventricles}.nii.gz``) on the grid of the
    ICBM152 maps already in ``out_dir`` from a FLAIR and a T1 of one session (see the module
    docstring). Returns map name → path."""
    from ..geometry import register_affine, resample_index_space
    from ..volume import read_volume

    icbm = _icbm_maps(out_dir)
    affine, brain_i, shape = icbm["t1"].affine_ras, icbm["brainmask"].array > 0, icbm["t1"].shape
    flair = read_volume(flair_path, validate=False)
    t1w = read_volume(t1_path, validate=False)
    reg = register_affine(flair, icbm["t1"], template_mask=brain_i)
    # how far the patient moved between the two series, as a registration of one to the other sees it (printed)
    t1_to_flair = register_affine(t1w, flair, moving_spacing_mm=0).model_to_source_world
    head = np.stack(np.meshgrid(*[np.linspace(0.25 * n, 0.75 * n, 8) for n in flair.shape], indexing="ij"), -1)
    head = (flair.affine_ras @ np.c_[head.reshape(-1, 3), np.ones(head.size // 3)].T).T
    moved_mm = np.linalg.norm((head @ t1_to_flair.T - head)[:, :3], axis=1)
    moved, mask = {}, brain_i.copy()
    for key, vol in (("flair", flair), ("t1", t1w)):
        out_to_in = np.linalg.inv(vol.affine_ras) @ reg.model_to_source_world @ affine
        moved[key] = resample_index_space(vol.array.astype(np.float32), shape, out_to_in, interpolation="linear")
        fov = resample_index_space(np.ones(vol.shape, np.float32), shape, out_to_in, interpolation="linear")
        mask &= fov > 0.99
    t1 = bias_corrected(moved["t1"], mask)
    fl = bias_corrected(moved["flair"], mask)
    csf, gm, wm = _segment_with_icbm_priors(t1, mask, icbm)
    lesions = flair_lesions(fl, gm, wm, mask, icbm["wm"].array / 255.0)
    gm[lesions], csf[lesions], wm[lesions] = 0.0, 0.0, 1.0  # the patient's lesions become white matter
    written, ventricles = _write_individual(gm, wm, mask, icbm, out_dir, name)
    print(f"{name}: FLAIR registered to ICBM152 (correlation {reg.correlation:.3f}); the T1 kept in the scanner frame "
          f"(registering it to the FLAIR would move the central head by {moved_mm.mean():.1f} mm on average, "
          f"{moved_mm.max():.1f} mm at most); ICBM152's brain inside both "
          f"fields of view {mask.sum() / brain_i.sum():.1%}; own lesions filled as white matter "
          f"{lesions.sum() / 1000:.1f} ml; GM {gm.sum() / 1000:.0f} ml, WM {wm.sum() / 1000:.0f} ml, "
          f"CSF {csf.sum() / 1000:.0f} ml, lateral ventricles {ventricles.sum() / 1000:.1f} ml")
    return written


def copy_lesion_library(src: Path, out_dir: Path) -> None:
    """Copy the lesion masks and their volume table unchanged (CC-BY, see ATTRIBUTION.md)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob("*_lesions_mni.nii.gz")) + [src / "lesion_volumes.csv"]:
        shutil.copyfile(f, out_dir / f.name)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nilearn-data", type=Path, default=None, help="rebuild the ICBM152 maps from a nilearn wheel")
    p.add_argument("--lesion-library", type=Path, default=None)
    p.add_argument("--colin27", type=Path, default=None, help="mricron-data's ch2bet.nii.gz (after the ICBM152 maps)")
    p.add_argument("--clinical", nargs=3, action="append", default=[], metavar=("FLAIR", "T1W", "NAME"),
                   help="a patient's FLAIR and T1 of one session, and the anatomy's name (after the ICBM152 maps)")
    p.add_argument("--resources", type=Path, default=Path("Resources"))
    a = p.parse_args(argv)
    if a.nilearn_data is not None:
        for name, path in build_templates(a.nilearn_data, a.resources / "Templates").items():
            print(f"{name}: {path} ({path.stat().st_size / 1e6:.2f} MB)")
    if a.colin27 is not None:
        for name, path in build_colin27(a.colin27, a.resources / "Templates").items():
            print(f"{name}: {path} ({path.stat().st_size / 1e6:.2f} MB)")
    for flair, t1w, name in a.clinical:
        for key, path in build_clinical(Path(flair), Path(t1w), a.resources / "Templates", name).items():
            print(f"{key}: {path} ({path.stat().st_size / 1e6:.2f} MB)")
    if a.lesion_library is not None:
        copy_lesion_library(a.lesion_library, a.resources / "LesionLibrary")


if __name__ == "__main__":
    main()
