"""Editing a scan: composition (null edit), keep region, native geometry, CLI contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import file_sha256, oblique_affine
from tiny_model import build_tiny_model, build_tiny_oracle, tiny_encoder
from CounterfactualGenLib.cli import main
from CounterfactualGenLib.errors import InputError
from CounterfactualGenLib.models import load_model
from CounterfactualGenLib.pipeline import edit_scan
from CounterfactualGenLib.volume import Volume, read_volume, write_volume

HIGH = "Subject has high lesion load."
NONE = "Subject has no lesions."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("edit") / "tiny", with_templates=True)


def phantom_on(shape, affine, seed=0) -> np.ndarray:
    """A smooth head-like phantom defined in world mm (so any grid samples the same object)."""
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float64)
    p = idx @ affine[:3, :3].T + affine[:3, 3] - np.array([0.0, -18.0, 8.0])
    r = np.linalg.norm(p / [55, 65, 50], axis=-1)
    img = 400 * (r < 1) * (1 + 0.3 * np.sin(p[..., 0] / 9) * np.cos(p[..., 1] / 11))
    img += 200 * (np.linalg.norm((p - [20, 10, 5]) / [12, 14, 10], axis=-1) < 1)
    return img.astype(np.float32)


def test_null_edit_changes_nothing(tiny):
    m = load_model(tiny)
    g = m.spec.grid
    scan = Volume(phantom_on(g.shape, g.affine_ras), g.affine_ras)
    r = edit_scan(m, tiny_encoder(), scan, target_prompt=HIGH, source_prompt=HIGH, registration="none", steps=4)
    assert r.report["reconstruction_psnr_db"] > 10
    np.testing.assert_array_equal(r.counterfactual.array, scan.array)
    assert r.report["changed_ml"] == 0.0 and not r.change_labels.array.any()
    assert r.report["changed_median_pct"] is None and r.report["changed_p90_pct"] is None


def test_edit_changes_only_the_brain_and_keeps_the_rest_bit_identical(tiny):
    m = load_model(tiny)
    g = m.spec.grid
    scan = Volume(phantom_on(g.shape, g.affine_ras), g.affine_ras)
    brain = scan.array > 0
    r = edit_scan(m, tiny_encoder(), scan, target_prompt=HIGH, source_prompt=NONE, brain_mask=brain,
                  registration="none", steps=4)
    changed = r.counterfactual.array != scan.array
    assert changed.any(), "a random tiny model with different prompts must change something"
    assert not changed[~brain].any()  # keep region (outside brain): bit-identical
    np.testing.assert_array_equal(r.difference.array != 0, changed)
    assert set(np.unique(r.change_labels.array)) <= {0, 1, 2, 3}
    assert r.report["unchanged_fraction_in_brain"] < 1.0
    # how much the changed voxels changed, in % of the brain's intensity range, from the written difference
    # (scan units; the brain's intensity range is background 0 … its 99.5th percentile)
    span = np.percentile(scan.array[brain], 99.5)
    d = np.abs(r.difference.array[changed]) / span * 100
    assert r.report["changed_median_pct"] == pytest.approx(np.median(d), rel=0.05, abs=0.05)
    assert r.report["changed_median_pct"] <= r.report["changed_p90_pct"]


def test_separation_guides_the_target_away_from_the_source_and_leaves_the_reconstruction(tiny):
    """``separation`` adds a·(v_target − v_source) to the target row only: the reconstruction (source row)
    stays what it was, the change grows with a; out of range is refused."""
    m = load_model(tiny)
    g = m.spec.grid
    scan = Volume(phantom_on(g.shape, g.affine_ras), g.affine_ras)
    kw = dict(target_prompt=HIGH, source_prompt=NONE, brain_mask=scan.array > 0, registration="none", steps=4,
              edit_region="brain")
    runs = {a: edit_scan(m, tiny_encoder(), scan, separation=a, **kw).model_space for a in (0.0, 3.0)}
    np.testing.assert_allclose(runs[3.0]["reconstruction"], runs[0.0]["reconstruction"], atol=1e-4)
    assert np.abs(runs[3.0]["counterfactual"] - runs[0.0]["counterfactual"]).max() > 1e-3
    d = {a: float(np.abs(r["counterfactual"] - r["reconstruction"]).mean()) for a, r in runs.items()}
    assert d[3.0] > 1.2 * d[0.0]
    # at guidance 1 the batch is [cond; away] and prompt-to-prompt still injects into the target row
    one = edit_scan(m, tiny_encoder(), scan, separation=3.0, guidance=1.0, **kw).model_space
    assert np.isfinite(one["counterfactual"]).all()
    with pytest.raises(InputError, match="separation"):
        edit_scan(m, tiny_encoder(), scan, separation=-1.0, **kw)


def test_change_direction_follows_the_prompts_scales_and_the_contrast():
    from CounterfactualGenLib.pipeline import change_direction

    cn, ad = "Subject is cognitively normal (CN).", "Subject has mild Alzheimer's dementia (AD)."
    moderate = "Subject has moderate lesion load."
    assert change_direction(NONE, HIGH, "FLAIR")[0] == 1
    assert change_direction(moderate, NONE, "flair")[0] == -1
    assert change_direction(moderate, HIGH, "FLAIR") == (1, "lesion load moderate → high on FLAIR brightens")
    assert change_direction(NONE, HIGH, "T1")[0] == -1  # lesions are hypointense on T1
    assert change_direction(cn, ad, "FLAIR")[0] == -1 and change_direction(ad, cn, "T1")[0] == 1
    assert change_direction(cn, ad, "FLAIR", scales=("lesion_load",)) == (0, "no direction rule for diagnosis edits")
    # nothing to rule on: same class, moves both ways, an unnamed source class, an unknown contrast
    assert change_direction(HIGH, "Patient with high lesion load.", "FLAIR")[0] == 0
    assert change_direction(f"{NONE} {cn}", f"{HIGH} {ad}", "FLAIR") == (0, "the prompts' changes move intensities both ways")
    assert change_direction(f"{NONE} {ad}", f"{HIGH} {ad}", "FLAIR")[0] == 1  # the diagnosis does not move
    assert change_direction("", HIGH, "FLAIR") == (0, "the source prompt names no lesion load")
    assert change_direction(NONE, HIGH, "T2")[0] == 0
    assert change_direction(NONE, "Subject is 60 years old.", "FLAIR")[0] == 0


def test_a_lesion_load_edit_keeps_only_the_change_in_its_direction(tiny):
    """direction="auto" (the default): adding lesions to a FLAIR scan only brightens it and filling only
    darkens it: the kept change is "any"'s change of that sign, the rest is zero, and the report says how
    much was removed. A diagnosis edit towards AD keeps only the darkening (atrophy replaces tissue by CSF)."""
    m = load_model(tiny)
    g = m.spec.grid
    scan = Volume(phantom_on(g.shape, g.affine_ras), g.affine_ras)
    kw = dict(brain_mask=scan.array > 0, registration="none", steps=4)
    for source, target, sign in ((NONE, HIGH, 1), (HIGH, NONE, -1)):
        both = edit_scan(m, tiny_encoder(), scan, source_prompt=source, target_prompt=target, direction="any", **kw)
        one = edit_scan(m, tiny_encoder(), scan, source_prompt=source, target_prompt=target, **kw)
        full, kept = both.model_space["change"], one.model_space["change"]
        assert (sign * full < 0).any() and (sign * full > 0).any()  # the tiny model's change holds both signs
        np.testing.assert_array_equal(kept, np.where(sign * full > 0, full, 0.0))
        assert (sign * one.difference.array >= 0).all() and (one.difference.array != 0).any()
        changed = one.counterfactual.array != scan.array
        assert (sign * (one.counterfactual.array - scan.array)[changed] > 0).all()
        rep = one.report["direction"]
        assert rep["kept"] == ("brightening" if sign > 0 else "darkening")
        assert rep["removed_ml_model_grid"] == pytest.approx((sign * full < 0).sum() * g.spacing_mm ** 3 / 1000.0,
                                                             abs=1e-3)
        energy = float((full ** 2).sum())
        assert rep["removed_energy_fraction"] == pytest.approx(float((full[sign * full < 0] ** 2).sum()) / energy,
                                                               abs=1e-4)
        assert "direction" not in both.report
    cn, ad = "Subject is cognitively normal (CN).", "Subject has mild Alzheimer's dementia (AD)."
    dx_any = edit_scan(m, tiny_encoder(), scan, source_prompt=cn, target_prompt=ad, direction="any", **kw)
    assert "direction" not in dx_any.report
    assert (dx_any.difference.array > 0).any() and (dx_any.difference.array < 0).any()
    dx = edit_scan(m, tiny_encoder(), scan, source_prompt=cn, target_prompt=ad, **kw)
    assert dx.report["direction"]["kept"] == "darkening" and (dx.difference.array <= 0).all()
    assert dx.report["direction"]["rule"] == "diagnosis CN → AD on FLAIR darkens"
    both_scales = edit_scan(m, tiny_encoder(), scan, source_prompt=f"{NONE} {cn}", target_prompt=f"{HIGH} {ad}", **kw)
    assert both_scales.report["direction"] == {"kept": "both", "rule": "the prompts' changes move intensities both ways"}
    for bad in ("up", "all"):
        with pytest.raises(InputError, match="direction"):
            edit_scan(m, tiny_encoder(), scan, source_prompt=NONE, target_prompt=HIGH, direction=bad, **kw)


def test_an_edit_defaults_to_the_strength_of_its_prompts_scale(tiny):
    """strength=None: 0.6 for a lesion-load target, 0.8 for a diagnosis target (0.6 down the scale, towards CN),
    0.6 for a target on both scales or none; the report records the strength used and a given strength wins; out
    of range is refused."""
    from CounterfactualGenLib.evaluation.report import strength_text
    from CounterfactualGenLib.pipeline import DEFAULT_EDIT_STRENGTH, EDIT_STRENGTHS, edit_strength

    cn, ad, mci = ("Subject is cognitively normal (CN).", "Subject has mild Alzheimer's dementia (AD).",
                   "Subject has mild cognitive impairment (MCI).")
    assert edit_strength(HIGH) == EDIT_STRENGTHS["lesion_load"] == 0.6
    assert edit_strength(ad) == edit_strength(mci) == EDIT_STRENGTHS["diagnosis"] == 0.8
    assert edit_strength(ad, cn) == edit_strength(mci, cn) == edit_strength(cn, cn) == edit_strength(cn, HIGH) == 0.8
    assert edit_strength(cn, ad) == edit_strength(mci, ad) == edit_strength(cn, mci) == \
        EDIT_STRENGTHS["diagnosis_down"] == 0.6
    assert edit_strength(f"{HIGH} {ad}") == edit_strength("Subject is 60 years old.") == DEFAULT_EDIT_STRENGTH
    # a report written before the strength towards CN existed still reads as it did
    assert strength_text({"lesion_load": 0.6, "diagnosis": 0.8}) == \
        "strength 0.6 for lesion-load edits and 0.8 for diagnosis edits"
    m = load_model(tiny)
    g = m.spec.grid
    scan = Volume(phantom_on(g.shape, g.affine_ras), g.affine_ras)
    kw = dict(brain_mask=scan.array > 0, registration="none", steps=5)
    dx = edit_scan(m, tiny_encoder(), scan, source_prompt=cn, target_prompt=ad, **kw)
    lesion = edit_scan(m, tiny_encoder(), scan, source_prompt=NONE, target_prompt=HIGH, **kw)
    down = edit_scan(m, tiny_encoder(), scan, source_prompt=ad, target_prompt=cn, **kw)
    assert dx.report["strength"] == 0.8 and lesion.report["strength"] == 0.6 and down.report["strength"] == 0.6
    same = edit_scan(m, tiny_encoder(), scan, source_prompt=cn, target_prompt=ad, strength=0.8, **kw)
    np.testing.assert_array_equal(same.counterfactual.array, dx.counterfactual.array)
    given = edit_scan(m, tiny_encoder(), scan, source_prompt=cn, target_prompt=ad, strength=0.6, **kw)
    assert given.report["strength"] == 0.6
    assert np.abs(given.model_space["reconstruction"] - dx.model_space["reconstruction"]).max() > 1e-3
    for bad in (0.0, 1.5):
        with pytest.raises(InputError, match="strength"):
            edit_scan(m, tiny_encoder(), scan, source_prompt=cn, target_prompt=ad, strength=bad, **kw)


def test_oblique_anisotropic_lps_input_comes_back_in_its_own_geometry(tiny, tmp_path):
    rng = np.random.default_rng(7)
    shape = (120, 110, 24)
    aff = oblique_affine(rng, (1.2, 1.2, 5.0))
    aff[:3, 3] = -aff[:3, :3] @ ((np.asarray(shape) - 1) / 2) + [0.0, -18.0, 8.0]
    scan = Volume(np.rint(phantom_on(shape, aff)), aff)
    path = write_volume(scan, tmp_path / "scan.nrrd", dtype=np.uint16)  # NRRD stores LPS
    before = file_sha256(path)
    code = main(["edit", "--model", str(tiny), "--input", str(path), "--to", HIGH, "--from", NONE, "--steps", "3",
                 "--registration", "none", "--out", str(tmp_path / "o"), "--format", "nrrd"])
    assert code == 0
    assert file_sha256(path) == before  # the input is never modified
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    cf = read_volume(s["counterfactual"])
    assert cf.shape == shape and cf.source_dtype == "uint16" and cf.is_synthetic
    np.testing.assert_allclose(cf.affine_ras, scan.affine_ras, atol=1e-5)
    for key in ("difference", "change_labels"):
        v = read_volume(s[key], validate=False)
        assert v.shape == shape and v.is_synthetic
        np.testing.assert_allclose(v.affine_ras, scan.affine_ras, atol=1e-5)
    assert read_volume(s["change_labels"], validate=False).source_dtype == "uint8"
    assert cf.metadata["CounterfactualGen.SourceSHA256"] == before
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert set(rep) >= {"changed_ml", "lesion_ml_added", "lesion_ml_removed", "reconstruction_psnr_db", "timings_s"}
    from PIL import Image

    with Image.open(s["preview"]) as im:  # the quick look: scan, counterfactual, change overlay
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (600, 3 * 218)


def test_edit_preview_follows_the_change_at_the_voxels_aspect(tmp_path):
    """preview.png cuts through the slices with the most change (not the middle), draws the change labels in their
    colours only on the overlay row, shows the patient's right on the left, and keeps an anisotropic scan's
    physical proportions."""
    from PIL import Image

    from CounterfactualGenLib.overlay import CHANGE_COLOURS, edit_preview_png

    shape, spacing = (40, 40, 10), (1.0, 1.0, 4.0)  # a 40 mm cube in voxels of 1 × 1 × 4 mm
    aff = np.diag(spacing + (1.0,))
    rng = np.random.default_rng(0)
    scan = Volume(100.0 + rng.random(shape, dtype=np.float32) * 50, aff)
    labels = np.zeros(shape, np.uint8)
    labels[30:34, 5:9, 1:3] = 1  # added, far from the middle on every axis
    labels[10:12, 25:27, 7] = 2  # removed, a smaller count, on none of the chosen slices
    path = edit_preview_png(scan, scan, Volume(labels, aff), tmp_path / "p.png", labels=["a", "b", "c"], cell_px=200)
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    row_h = 200 + 18

    def coloured(colour, y0, y1, x0, x1):
        want = np.asarray(colour)
        sub = img[y0:y1, x0:x1]
        # blended at alpha 0.5 over grey: the colour's dominant channel leads the others by a wide margin
        lead = int(np.argmax(want))
        others = [c for c in range(3) if c != lead]
        return int(((sub[..., lead] - np.max(sub[..., others], axis=-1)) > 50).sum())

    for view in range(3):  # the added lesion is in every view of the overlay row, and in no other row
        x0, x1 = view * 200 + 12, (view + 1) * 200  # leave out the yellow orientation letter
        assert coloured(CHANGE_COLOURS[1], 2 * row_h + 18, 3 * row_h, x0, x1) > 0, view
        assert coloured(CHANGE_COLOURS[1], 0, 2 * row_h, x0, x1) == 0, view
    assert coloured(CHANGE_COLOURS[2], 0, 3 * row_h, 0, 600) == 0  # the removed voxels lie off the chosen slices
    # radiological convention, as in Slicer: the patient's right (i = 30..33 of 40, RAS) on the image's left
    assert coloured(CHANGE_COLOURS[1], 2 * row_h + 18, 3 * row_h, 12, 100) > 0
    assert coloured(CHANGE_COLOURS[1], 2 * row_h + 18, 3 * row_h, 100, 200) == 0
    # the coronal view of a 40 mm cube is square on the screen, not squashed to 40 × 10 pixels
    grey = (r > 0) & (r == g) & (g == b)  # the image, not the yellow orientation letter
    cor = grey[18:row_h, 200:400]
    rows, cols = np.flatnonzero(cor.any(axis=1)), np.flatnonzero(cor.any(axis=0))
    assert abs((rows[-1] - rows[0]) - (cols[-1] - cols[0])) <= 4 and rows[-1] - rows[0] > 150
    with pytest.raises(ValueError, match="one grid"):
        edit_preview_png(scan, Volume(np.zeros((40, 40, 9), np.float32), aff), Volume(labels, aff),
                         tmp_path / "q.png", labels=["a", "b", "c"])


def test_edit_preview_other_change_opacity_grows_with_its_size(tmp_path):
    """A faint change over much of the brain must not hide a strong one: "other" changes (label 3)
    are drawn at an opacity that grows with |counterfactual − scan|, full at OTHER_CHANGE_FULL of the
    window, and the slices go through the strong change, not the larger faint one."""
    from PIL import Image

    from CounterfactualGenLib.overlay import OTHER_CHANGE_FULL, edit_preview_png

    shape, aff = (40, 40, 10), np.eye(4)
    rng = np.random.default_rng(1)
    scan = 100.0 + rng.random(shape, dtype=np.float32) * 50  # window ≈ 100 … 150
    cf = scan.copy()
    labels = np.zeros(shape, np.uint8)
    cf[4:14, 4:14, 6] += 2 * OTHER_CHANGE_FULL * 50  # strong: beyond full opacity, one slice
    cf[2:38, 2:38, 1:4] += 0.1 * OTHER_CHANGE_FULL * 50  # faint and larger: 3 slices of most of the field
    labels[cf != scan] = 3
    path = edit_preview_png(Volume(scan, aff), Volume(cf, aff), Volume(labels, aff), tmp_path / "p.png",
                            labels=["a", "b", "c"], cell_px=200)
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    row_h = 200 + 18
    axial = img[2 * row_h + 18:3 * row_h, 12:200]  # the overlay row's axial view, without the orientation letter
    lead = axial[..., 0] - axial[..., 2]  # yellow over grey: red leads blue by ~ opacity × 240
    assert (lead > 100).sum() > 1000  # the strong change's slice, at full overlay opacity (0.5 × 240)
    sagittal = img[2 * row_h + 18:3 * row_h, 412:600]
    lead_s = sagittal[..., 0] - sagittal[..., 2]
    faint = (lead_s > 3) & (lead_s < 30)  # the faint change, drawn at about a tenth of the opacity
    assert faint.sum() > 100 and (lead_s > 100).sum() > 0


@pytest.mark.parametrize("name, warned", [
    ("longitudinal_patient04_study1_T1W.nii.gz", "T1"), ("sub-01_T2w.nii.gz", "T2"), ("MPRAGE.nrrd", "T1"),
    ("longitudinal_patient04_study1_FLAIR.nii.gz", None), ("T1_FLAIR.nii.gz", None), ("scan.nii.gz", None),
    ("patient_t1ce.nii", "T1"), ("patient FLAIR", None), ("tumor_adc.nii.gz", "diffusion")])
def test_contrast_name_warning(name, warned):
    from CounterfactualGenLib.pipeline import contrast_name_warning

    w = contrast_name_warning(name, "FLAIR", "m")
    assert (w is None) == (warned is None)
    if warned:
        assert f"suggests a {warned} scan" in w and "trained on FLAIR" in w
    assert contrast_name_warning("a_T1W.nii.gz", "T1") is None  # a T1 model takes T1 scans


def test_edit_warns_when_the_scan_is_named_for_another_contrast(tiny):
    m = load_model(tiny)
    g = m.spec.grid
    scan = Volume(phantom_on(g.shape, g.affine_ras), g.affine_ras)
    kw = dict(target_prompt=HIGH, source_prompt=NONE, registration="none", steps=2)
    r = edit_scan(m, tiny_encoder(), scan, scan_name="p04_T1W.nii.gz", **kw)
    assert any("suggests a T1 scan" in w for w in r.report["warnings"])
    r = edit_scan(m, tiny_encoder(), scan, scan_name="p04_FLAIR.nii.gz", **kw)
    assert not any("suggests" in w for w in r.report["warnings"])


def test_registration_to_template_path(tiny, tmp_path):
    """A shifted, rotated copy of the template registers and edits without error."""
    m = load_model(tiny)
    t = m.template("image")
    c, s = np.cos(0.1), np.sin(0.1)
    move = np.array([[c, -s, 0, 5.0], [s, c, 0, -3.0], [0, 0, 1, 4.0], [0, 0, 0, 1]])
    shape = (48, 48, 40)
    aff = move @ np.diag([3.0, 3.0, 3.5, 1.0])
    aff[:3, 3] += move[:3, :3] @ (-np.diag([3.0, 3.0, 3.5]) @ ((np.asarray(shape) - 1) / 2)) + [0.0, -18.0, 8.0]
    scan = Volume(phantom_on(shape, np.linalg.inv(move) @ aff), aff)  # the object moved by `move`
    r = edit_scan(m, tiny_encoder(), scan, target_prompt=HIGH, source_prompt=NONE, steps=3)
    assert r.report["registration_score"] > 0.5  # an 8 mm template: partial-volume edges cap the correlation
    assert r.counterfactual.shape == shape

    from CounterfactualGenLib.geometry import register_affine

    reg = register_affine(scan, t, template_mask=m.template("brain_mask").array > 0.5)
    probe = np.array([[0, -18, 8, 1], [40, -18, 8, 1], [0, 22, 8, 1], [0, -18, 48, 1.0]]).T
    err = np.linalg.norm((reg.model_to_source_world @ probe - move @ probe)[:3], axis=0).max()
    assert err < 4.0, err  # mm, against 8 mm template voxels


def test_failed_registration_is_refused(tiny):
    m = load_model(tiny)
    rng = np.random.default_rng(0)
    scan = Volume(rng.random((30, 30, 30)).astype(np.float32), np.diag([4.0, 4.0, 4.0, 1.0]))
    with pytest.raises(InputError, match="Registration"):
        edit_scan(m, tiny_encoder(), scan, target_prompt=HIGH, steps=2)


def test_mask_on_another_grid_is_refused(tiny):
    m = load_model(tiny)
    g = m.spec.grid
    scan = Volume(phantom_on(g.shape, g.affine_ras), g.affine_ras)
    with pytest.raises(InputError, match="same grid"):
        edit_scan(m, tiny_encoder(), scan, target_prompt=HIGH, brain_mask=np.ones((3, 3, 3)), registration="none")


def test_cli_edit_bad_input_writes_nothing(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"\x1f\x8b not a nifti")
    assert main(["edit", "--model", str(tiny), "--input", str(bad), "--to", HIGH, "--out", str(tmp_path / "o")]) == 3
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_masks_stored_on_another_grid_are_matched_in_world_coordinates(tiny, tmp_path, capsys):
    """A lesion mask written flipped left-right (same place in the world, mirrored array) or at another
    voxel size fills the same voxels as one on the scan's grid; a mask of another place is refused."""
    g = load_model(tiny).spec.grid
    scan = Volume(phantom_on(g.shape, g.affine_ras), g.affine_ras)
    write_volume(scan, tmp_path / "scan.nii.gz")
    lesions = np.zeros(g.shape, np.uint8)
    lesions[3:6, 7:10, 6:8] = 1  # off the midline: a flip would move it
    write_volume(Volume(lesions, g.affine_ras), tmp_path / "aligned.nii.gz")
    flip = g.affine_ras.copy()
    flip[:3, 0] = -flip[:3, 0]
    flip[:3, 3] = g.affine_ras[:3, :3] @ [g.shape[0] - 1, 0, 0] + g.affine_ras[:3, 3]
    write_volume(Volume(lesions[::-1].copy(), flip), tmp_path / "flipped.nii.gz")
    fine = g.affine_ras.copy()  # 2× finer in every axis, same extent
    fine[:3, :3] /= 2.0
    fine[:3, 3] = g.affine_ras[:3, 3] - (g.affine_ras[:3, :3] @ np.ones(3)) / 4.0
    write_volume(Volume(np.repeat(np.repeat(np.repeat(lesions, 2, 0), 2, 1), 2, 2), fine), tmp_path / "fine.nii.gz")
    far = g.affine_ras.copy()
    far[:3, 3] += 1000.0
    write_volume(Volume(lesions, far), tmp_path / "far.nii.gz")

    def edit(mask: str) -> int:
        return main(["edit", "--model", str(tiny), "--input", str(tmp_path / "scan.nii.gz"), "--to", NONE,
                     "--from", HIGH, "--lesion-mask", str(tmp_path / f"{mask}.nii.gz"), "--steps", "2",
                     "--registration", "none", "--oracle", "none", "--out", str(tmp_path / mask)])

    for mask in ("aligned", "flipped", "fine"):
        assert edit(mask) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert err.count("resampled onto the scan's grid") == 2
    ref = read_volume(tmp_path / "aligned" / "counterfactual_SYNTHETIC.nii.gz").array
    assert (ref != scan.array).any()
    for mask in ("flipped", "fine"):
        np.testing.assert_array_equal(read_volume(tmp_path / mask / "counterfactual_SYNTHETIC.nii.gz").array, ref)
    assert edit("far") == 3
    assert "does not overlap the scan" in capsys.readouterr().err
    assert not (tmp_path / "far").exists()


def test_batch_over_a_folder(tiny, tmp_path):
    g = load_model(tiny).spec.grid
    d = tmp_path / "in"
    for i in range(2):
        write_volume(Volume(phantom_on(g.shape, g.affine_ras) + i, g.affine_ras), d / f"s{i}.nii.gz")
    (d / "notes.txt").write_text("ignored")
    code = main(["batch", "--model", str(tiny), "--input", str(d), "--to", HIGH, "--from", NONE, "--steps", "2",
                 "--registration", "none", "--out", str(tmp_path / "o")])
    assert code == 0
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["done"] == 2 and not s["failed"]
    assert (tmp_path / "o" / "s0" / "counterfactual_SYNTHETIC.nii.gz").exists()


def test_batch_manifest_fills_each_scan_with_its_own_lesion_mask(tiny, tmp_path):
    """A manifest's lesion_mask column gives each scan its own mask (paths relative to the manifest); a row whose
    mask is missing fails alone and the others are done."""
    g = load_model(tiny).spec.grid
    d = tmp_path / "data"
    masks = []
    for i, where in enumerate(((slice(3, 6), slice(7, 10), slice(6, 8)), (slice(9, 12), slice(4, 7), slice(5, 7)))):
        write_volume(Volume(phantom_on(g.shape, g.affine_ras) + i, g.affine_ras), d / f"s{i}.nii.gz")
        m = np.zeros(g.shape, np.uint8)
        m[where] = 1
        write_volume(Volume(m, g.affine_ras), d / "masks" / f"s{i}_lesions.nii.gz")
        masks.append(m > 0)
    write_volume(Volume(phantom_on(g.shape, g.affine_ras), g.affine_ras), d / "s2.nii.gz")
    (d / "manifest.csv").write_text("image,lesion_mask\ns0.nii.gz,masks/s0_lesions.nii.gz\n"
                                    "s1.nii.gz,masks/s1_lesions.nii.gz\ns2.nii.gz,masks/missing.nii.gz\n")
    code = main(["batch", "--model", str(tiny), "--input", str(d / "manifest.csv"), "--to", NONE, "--from", HIGH,
                 "--steps", "2", "--registration", "none", "--oracle", "none", "--out", str(tmp_path / "o")])
    assert code == 3  # one of three failed
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["done"] == 2 and [f["input"].endswith("s2.nii.gz") for f in s["failed"]] == [True]
    for i in range(2):
        scan = read_volume(d / f"s{i}.nii.gz").array
        cf = read_volume(tmp_path / "o" / f"s{i}" / "counterfactual_SYNTHETIC.nii.gz").array
        changed = cf != scan
        assert changed.any() and not changed[~masks[i]].any()
        assert json.loads((tmp_path / "o" / f"s{i}" / "report.json").read_text())["method"] == "inpainting"


# ---------------------------------------------------------------------------------
# the oracle in an edit: lesion ml before/after, source prompt from its reading
# ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_oracle(tmp_path_factory):
    """A random-weight oracle on a grid other than the tiny model's (so the edit must resample)."""
    return build_tiny_oracle(tmp_path_factory.mktemp("oracle") / "oracle")


def test_edit_reports_the_oracle_lesion_volume_before_and_after(tiny, tiny_oracle):
    from CounterfactualGenLib.evaluation.oracle import load_oracle

    m, oracle = load_model(tiny), load_oracle(tiny_oracle)
    g = m.spec.grid
    scan = Volume(phantom_on(g.shape, g.affine_ras), g.affine_ras)
    r = edit_scan(m, tiny_encoder(), scan, target_prompt=HIGH, source_prompt=NONE, registration="none", steps=3,
                  oracle=oracle, brain_mask=scan.array > 0)
    rep = r.report
    ms = r.model_space
    want = oracle.read(np.stack([np.where(ms["brain"], ms["input"], -1.0),
                                 np.where(ms["brain"], ms["input"] + ms["change"], -1.0)]).clip(-1, 1.5), g)
    assert rep["oracle"] == "tiny-oracle"
    assert rep["lesion_ml_before"] == pytest.approx(want["lesion_ml"][0], abs=1e-3)
    assert rep["lesion_ml_after"] == pytest.approx(want["lesion_ml"][1], abs=1e-3)
    assert rep["lesion_ml_before"] > 0 and rep["diagnosis_before"] in ("CN", "MCI", "AD")
    assert rep["lesion_ml_before"] != rep["lesion_ml_after"]  # the change reached the oracle's input
    assert rep["source_prompt_origin"] == "given" and "oracle" in rep["timings_s"]


def test_missing_source_prompt_comes_from_the_oracle_reading(tiny, tiny_oracle):
    from CounterfactualGenLib.evaluation.metrics import lesion_class_of_ml
    from CounterfactualGenLib.evaluation.oracle import load_oracle
    from CounterfactualGenLib.text.prompts import canonical_prompt

    m, oracle = load_model(tiny), load_oracle(tiny_oracle)
    g = m.spec.grid
    scan = Volume(phantom_on(g.shape, g.affine_ras), g.affine_ras)
    r = edit_scan(m, tiny_encoder(), scan, target_prompt=NONE, registration="none", steps=2, oracle=oracle,
                  brain_mask=scan.array > 0)
    want = canonical_prompt(lesion_load=lesion_class_of_ml(r.report["lesion_ml_before"]))
    assert r.report["prompts"]["from"] == want
    assert r.report["source_prompt_origin"] == "oracle reading of the scan"
    # without an oracle: the opposite end of the target's scale, and no volumes
    r2 = edit_scan(m, tiny_encoder(), scan, target_prompt=NONE, registration="none", steps=2,
                   brain_mask=scan.array > 0)
    assert r2.report["prompts"]["from"] == canonical_prompt(lesion_load="moderate")
    assert r2.report["lesion_ml_before"] is None and r2.report["oracle"] is None


def test_cli_edit_with_oracle_folder_and_none(tiny, tiny_oracle, tmp_path):
    g = load_model(tiny).spec.grid
    path = write_volume(Volume(phantom_on(g.shape, g.affine_ras), g.affine_ras), tmp_path / "s.nii.gz")
    base = ["edit", "--model", str(tiny), "--input", str(path), "--to", HIGH, "--from", NONE, "--steps", "2",
            "--registration", "none"]
    assert main(base + ["--oracle", str(tiny_oracle), "--out", str(tmp_path / "a")]) == 0
    rep = json.loads((tmp_path / "a" / "report.json").read_text())
    assert rep["oracle"] == "tiny-oracle" and rep["lesion_ml_before"] is not None
    assert rep["direction"]["kept"] == "brightening"  # --direction auto, the default
    assert rep["strength"] == 0.6  # a lesion-load edit's default strength
    assert main(base + ["--oracle", "none", "--direction", "any", "--strength", "0.7", "--out", str(tmp_path / "b")]) == 0
    rep = json.loads((tmp_path / "b" / "report.json").read_text())
    assert rep["lesion_ml_before"] is None and "direction" not in rep and rep["strength"] == 0.7
    assert main(base + ["--oracle", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c")]) == 4
    assert not (tmp_path / "c").exists()


def test_lesion_filling_by_the_text_alone_warns(tiny, tmp_path, capsys):
    """Filling without a lesion mask and without the oracle (the inversion path, which does not localise lesions)
    says so: a warning on stderr, a "warning" event in --progress-json, and the report's warnings; with a mask, none."""
    from CounterfactualGenLib.pipeline import TEXT_ONLY_FILL_WARNING

    g = load_model(tiny).spec.grid
    scan = Volume(phantom_on(g.shape, g.affine_ras), g.affine_ras)
    path = write_volume(scan, tmp_path / "s.nii.gz")
    base = ["edit", "--model", str(tiny), "--input", str(path), "--to", NONE, "--from", HIGH, "--steps", "2",
            "--registration", "none", "--oracle", "none"]
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "a")]) == 0
    assert "warning: " + TEXT_ONLY_FILL_WARNING in capsys.readouterr().err
    assert json.loads((tmp_path / "a" / "report.json").read_text())["warnings"] == [TEXT_ONLY_FILL_WARNING]
    assert main(base + ["--out", str(tmp_path / "b"), "--progress-json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert {"event": "log", "level": "warning", "message": TEXT_ONLY_FILL_WARNING} in events
    lesions = np.zeros(g.shape, np.uint8)
    lesions[10:13, 10:13, 10:13] = 1
    mask = write_volume(Volume(lesions, g.affine_ras), tmp_path / "lesions.nii.gz")
    bright = write_volume(Volume(np.where(lesions > 0, 1.4 * scan.array, scan.array), g.affine_ras),
                          tmp_path / "bright.nii.gz")  # FLAIR lesions are bright (else the mask is warned about)
    with_mask = [*base[:4], str(bright), *base[5:]]
    assert main(with_mask + ["--lesion-mask", str(mask), "--out", str(tmp_path / "c")]) == 0
    assert "warning:" not in capsys.readouterr().err
    assert json.loads((tmp_path / "c" / "report.json").read_text())["warnings"] == []


def test_same_class_prompts_warn(tiny, tmp_path, capsys):
    """An edit whose source already names the target's class changes little or nothing: it says so (stderr and
    the report), and the hint depends on whether the source was given; different classes do not warn; a target
    on no known scale warns that nothing can check it."""
    from CounterfactualGenLib.pipeline import same_class_warning
    from CounterfactualGenLib.text.prompts import unrecognised_prompt_warning

    w = same_class_warning(HIGH, "The subject has a high lesion load", "oracle reading of the scan")
    assert w is not None and "lesion load 'high'" in w and "give --from" in w
    w = same_class_warning("Subject is cognitively normal (CN).", "Cognitively normal subject.", "given")
    assert w is not None and "diagnosis 'CN'" in w and "--from" not in w
    assert same_class_warning("a brain", "A  brain", "given") is not None  # no known scale: compared as text
    assert same_class_warning("a brain", "another brain", "given") is None
    assert same_class_warning(NONE, HIGH, "given") is None
    # the target names both scales: the source must match both to warn
    assert same_class_warning(HIGH, HIGH + " Subject has mild Alzheimer's dementia (AD).", "given") is None

    g = load_model(tiny).spec.grid
    scan = Volume(phantom_on(g.shape, g.affine_ras), g.affine_ras)
    path = write_volume(scan, tmp_path / "s.nii.gz")
    base = ["edit", "--model", str(tiny), "--input", str(path), "--to", HIGH, "--steps", "2",
            "--registration", "none", "--oracle", "none"]
    capsys.readouterr()
    assert main(base + ["--from", HIGH, "--out", str(tmp_path / "a")]) == 0
    warning = same_class_warning(HIGH, HIGH, "given")
    assert "warning: " + warning in capsys.readouterr().err
    assert json.loads((tmp_path / "a" / "report.json").read_text())["warnings"] == [warning]
    assert main(base + ["--from", NONE, "--out", str(tmp_path / "b")]) == 0
    assert "warning:" not in capsys.readouterr().err
    assert json.loads((tmp_path / "b" / "report.json").read_text())["warnings"] == []
    # a target on no known scale: the edit runs (under the null source prompt) and says nothing can check it
    odd = [a if a != HIGH else "purple elephant" for a in base]
    assert main(odd + ["--out", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "report.json").read_text())["warnings"] == [
        unrecognised_prompt_warning("purple elephant")]


def test_null_text_optimisation_reconstructs_the_scan_better(tiny):
    """PRISM null-text optimisation: the guided source branch retraces the inversion closer than plain guidance."""
    m = load_model(tiny)
    g = m.spec.grid
    scan = Volume(phantom_on(g.shape, g.affine_ras), g.affine_ras)
    kw = dict(target_prompt=HIGH, source_prompt=NONE, registration="none", steps=6, strength=0.8, guidance=4.0)
    plain = edit_scan(m, tiny_encoder(), scan, **kw)
    r = edit_scan(m, tiny_encoder(), scan, null_text_iterations=10, **kw)
    nt = r.report["null_text"]
    assert plain.report["null_text"] is None
    assert nt["reconstruction_psnr_db_without"] == pytest.approx(plain.report["reconstruction_psnr_db"], abs=1e-3)
    assert r.report["reconstruction_psnr_db"] > nt["reconstruction_psnr_db_without"] + 1.0
    assert nt["last_step_mse_after"] < nt["last_step_mse_before"]
    assert "null_text" in r.report["timings_s"]
    # the network's weights are untouched and get no gradients
    assert all(p.grad is None for p in m.denoiser.parameters())


class _SegmentationOracle:
    """An oracle stand-in whose lesion segmentation is a fixed mask on the model grid."""

    id = "segmentation-oracle"

    def __init__(self, grid, mask):
        self.grid, self.mask = grid, np.asarray(mask, bool)

    def read(self, images, grid=None):
        n = len(images)
        ml = float(self.mask.sum()) * self.grid.spacing_mm ** 3 / 1000.0
        return {"lesion_ml": np.full(n, ml), "diagnosis": ["CN"] * n, "diagnosis_probs": np.tile([1.0, 0.0, 0.0], (n, 1)),
                "lesion_prob": np.repeat(self.mask[None].astype(np.float32), n, axis=0)}


class _DiagnosisOracle(_SegmentationOracle):
    """A segmentation oracle stand-in that reads every image as one diagnosis."""

    def __init__(self, grid, mask, diagnosis):
        super().__init__(grid, mask)
        self.diagnosis = diagnosis

    def read(self, images, grid=None):
        out = super().read(images, grid)
        probs = [1.0 if d == self.diagnosis else 0.0 for d in ("CN", "MCI", "AD")]
        return {**out, "diagnosis": [self.diagnosis] * len(images), "diagnosis_probs": np.tile(probs, (len(images), 1))}


def test_the_default_strength_follows_the_oracles_reading_as_the_source(tiny):
    """Without a source prompt the oracle's reading is the source, and it sets the way along the diagnosis scale:
    a scan read as AD edited to CN inverts at the strength towards CN (0.6), one read as CN edited to AD at 0.8."""
    m = load_model(tiny)
    g, scan, seg = _scan_on_grid_with_segmentation(m)
    kw = dict(brain_mask=scan.array > 0, registration="none", steps=3)
    down = edit_scan(m, tiny_encoder(), scan, target_prompt="Subject is cognitively normal (CN).",
                     oracle=_DiagnosisOracle(g, seg, "AD"), **kw)
    up = edit_scan(m, tiny_encoder(), scan, target_prompt="Subject has mild Alzheimer's dementia (AD).",
                   oracle=_DiagnosisOracle(g, seg, "CN"), **kw)
    assert down.report["source_prompt_origin"] == up.report["source_prompt_origin"] == "oracle reading of the scan"
    assert "(AD)" in down.report["prompts"]["from"] and "(CN)" in up.report["prompts"]["from"]
    assert down.report["strength"] == 0.6 and up.report["strength"] == 0.8


def _scan_on_grid_with_segmentation(model):
    """The model grid, a phantom scan on it and a small lesion segmentation for _SegmentationOracle."""
    g = model.spec.grid
    seg = np.zeros(g.shape, bool)
    seg[6:9, 7:10, 6:8] = True
    return g, Volume(phantom_on(g.shape, g.affine_ras), g.affine_ras), seg


def test_lesion_filling_without_a_mask_fills_the_oracle_segmentation(tiny):
    m = load_model(tiny)
    g, scan, seg = _scan_on_grid_with_segmentation(m)
    kw = dict(target_prompt=NONE, source_prompt=HIGH, brain_mask=scan.array > 0, registration="none", steps=4)
    r = edit_scan(m, tiny_encoder(), scan, oracle=_SegmentationOracle(g, seg), **kw)
    assert r.report["method"] == "inpainting" and r.report["lesion_mask"] == "oracle"
    changed = r.counterfactual.array != scan.array
    assert changed.any() and not changed[~seg].any()  # the scan is on the model grid: only the segmentation
    # the same fill as with that mask given (a given mask then writes it seamlessly into its voxels)
    given = edit_scan(m, tiny_encoder(), scan, lesion_mask=seg, **kw)
    assert given.report["lesion_mask"] == "given"
    np.testing.assert_array_equal(r.model_space["counterfactual"], given.model_space["counterfactual"])
    assert not (given.counterfactual.array != scan.array)[~seg].any()
    # by the text alone (no segmentation asked for, or no oracle): the inversion path
    for extra in ({"oracle": _SegmentationOracle(g, seg), "auto_lesion_mask": False}, {}):
        t = edit_scan(m, tiny_encoder(), scan, **extra, **kw)
        assert t.report["method"] == "inversion" and t.report["lesion_mask"] is None
    # nothing segmented: nothing to fill, the scan comes back unchanged
    e = edit_scan(m, tiny_encoder(), scan, oracle=_SegmentationOracle(g, np.zeros(g.shape)), **kw)
    assert e.report["method"] == "inpainting" and e.report["changed_ml"] == 0.0
    np.testing.assert_array_equal(e.counterfactual.array, scan.array)
    # other targets never fill
    assert "lesion_mask" not in edit_scan(m, tiny_encoder(), scan, oracle=_SegmentationOracle(g, seg),
                                          **{**kw, "target_prompt": HIGH, "source_prompt": NONE}).report


def test_oracle_fill_of_a_scan_finer_than_the_model_warns_that_small_lesions_stay(tiny):
    from CounterfactualGenLib.pipeline import FINE_ORACLE_FILL_WARNING

    m = load_model(tiny)
    g, coarse, seg = _scan_on_grid_with_segmentation(m)
    # the same phantom at half the model's voxel size (an eighth of its volume) over the same field of view
    fine_affine = g.affine_ras.copy()
    fine_affine[:3, :3] /= 2.0
    fine_affine[:3, 3] -= fine_affine[:3, :3] @ np.full(3, 0.5)  # voxel corners aligned with the model grid's
    fine = Volume(phantom_on(tuple(2 * v for v in g.shape), fine_affine), fine_affine)
    kw = dict(target_prompt=NONE, source_prompt=HIGH, registration="none", steps=2)
    prefix = FINE_ORACLE_FILL_WARNING.split("(")[0]
    r = edit_scan(m, tiny_encoder(), fine, brain_mask=fine.array > 0, oracle=_SegmentationOracle(g, seg), **kw)
    assert r.report["lesion_mask"] == "oracle"
    assert [w for w in r.report["warnings"] if w.startswith(prefix)], r.report["warnings"]
    assert f"model {g.spacing_mm:g} mm" in " ".join(r.report["warnings"])
    # not on the model's own grid, and not with a lesion mask
    on_grid = edit_scan(m, tiny_encoder(), coarse, brain_mask=coarse.array > 0, oracle=_SegmentationOracle(g, seg), **kw)
    masked = edit_scan(m, tiny_encoder(), fine, brain_mask=fine.array > 0, lesion_mask=fine.array > 450,
                       oracle=_SegmentationOracle(g, seg), **kw)
    for other in (on_grid, masked):
        assert not [w for w in other.report["warnings"] if w.startswith(prefix)]


def test_null_text_iterations_are_checked(tiny):
    m = load_model(tiny)
    g = m.spec.grid
    scan = Volume(phantom_on(g.shape, g.affine_ras), g.affine_ras)
    with pytest.raises(InputError, match="null-text"):
        edit_scan(m, tiny_encoder(), scan, target_prompt=HIGH, registration="none", null_text_iterations=-1)


def test_lesion_filling_with_a_mask_inpaints_only_the_masked_lesions(tiny):
    m = load_model(tiny)
    g = m.spec.grid
    scan = Volume(phantom_on(g.shape, g.affine_ras), g.affine_ras)
    lesions = np.zeros(g.shape, bool)
    lesions[6:9, 7:10, 6:8] = True
    r = edit_scan(m, tiny_encoder(), scan, target_prompt=NONE, source_prompt=HIGH, lesion_mask=lesions,
                  brain_mask=scan.array > 0, registration="none", steps=4)
    assert r.report["method"] == "inpainting" and r.report["reconstruction_psnr_db"] is None
    changed = r.counterfactual.array != scan.array
    assert changed.any()
    from scipy.ndimage import binary_dilation

    assert not changed[~binary_dilation(lesions, iterations=1)].any()  # the mask (+ linear interpolation onto the grid)
    # other targets with a lesion mask keep the inversion path
    r2 = edit_scan(m, tiny_encoder(), scan, target_prompt=HIGH, source_prompt=NONE, lesion_mask=lesions,
                   registration="none", steps=4)
    assert r2.report["method"] == "inversion"
    with pytest.raises(InputError, match="nothing to fill"):
        edit_scan(m, tiny_encoder(), scan, target_prompt=NONE, lesion_mask=np.zeros(g.shape, bool),
                  registration="none", steps=4)


def test_lesion_filling_of_a_finer_scan_with_a_mask_writes_only_the_masked_voxels(tiny):
    """On a scan 3× finer than the model grid the fill goes into the masked voxels and nowhere else
    (adding the model grid's change, spread by interpolation, touched their neighbours too), and meets
    the scan around them without a seam (the harmonic correction)."""
    from CounterfactualGenLib.pipeline import seamless_fill_change

    m = load_model(tiny)
    g = m.spec.grid
    aff = g.affine_ras.copy()
    aff[:3, :3] /= 3.0  # 3× finer, same field of view
    aff[:3, 3] = g.affine_ras[:3, 3] - (g.affine_ras[:3, :3] @ np.ones(3)) / 3.0
    shape = tuple(3 * s for s in g.shape)
    scan = Volume(phantom_on(shape, aff), aff)
    lesions = np.zeros(shape, bool)
    lesions[20:24, 22:26, 19:22] = True
    r = edit_scan(m, tiny_encoder(), scan, target_prompt=NONE, source_prompt=HIGH, lesion_mask=lesions,
                  brain_mask=scan.array > 0, registration="none", steps=4)
    changed = r.counterfactual.array != scan.array
    assert changed.any() and not changed[~lesions].any()
    # seamless: where the fill and the scan differ by a constant around the mask, the correction removes it
    scan_units = np.full(shape, 0.3)
    fill = np.full(shape, -0.2)
    np.testing.assert_allclose(seamless_fill_change(scan_units, fill, lesions, (1.0, 1.0, 1.0)), 0.0, atol=1e-5)


def test_change_labels_need_the_oracle_segmentation_when_an_oracle_is_given():
    from CounterfactualGenLib.pipeline import LESION_DELTA, NO_ORACLE_RULE, ORACLE_LESION_DELTA, change_labels

    change = np.zeros((4, 4, 4), np.float32)
    change[0] = 0.3     # bright, inside the oracle's segmentation after the edit → added
    change[1] = 0.3     # bright, outside any segmentation → other change
    change[2] = -0.3    # dark where the oracle segmented a lesion before → removed
    change[3, :2] = 0.06  # small brightening inside the after-segmentation: added with an oracle only
    touched = change != 0
    before = np.zeros_like(change)
    before[2] = 0.9
    after = np.zeros_like(change)
    after[0] = after[3] = 0.8
    assert LESION_DELTA > 0.06 > ORACLE_LESION_DELTA
    lab, rule = change_labels(change, touched, lesion_prompt=True, oracle_before=before, oracle_after=after)
    assert (lab[0] == 1).all() and (lab[1] == 3).all() and (lab[2] == 2).all()
    assert (lab[3, :2] == 1).all() and (lab[3, 2:] == 0).all() and "oracle" in rule
    # inside a filled region (inpainting): darkening alone, at the larger threshold; filling adds no lesion,
    # so what it brightens (a generous mask's rim of CSF) is "other change"
    lab, rule = change_labels(change, touched, lesion_prompt=True, inpainting=True)
    assert (lab[0] == 3).all() and (lab[1] == 3).all() and (lab[2] == 2).all() and (lab[3, :2] == 3).all()
    assert "filled region" in rule
    # a prompt edit without an oracle: no lesion labels at all
    lab, rule = change_labels(change, touched, lesion_prompt=True)
    assert set(np.unique(lab[touched])) == {3.0} and (lab[~touched] == 0).all() and rule == NO_ORACLE_RULE
    # not a lesion-load edit: every change is "other"
    lab, _ = change_labels(change, touched, lesion_prompt=False, oracle_before=before, oracle_after=after)
    assert set(np.unique(lab[touched])) == {3.0}


def test_prompt_edit_labels_lesions_only_where_the_oracle_segments_them(tiny):
    m = load_model(tiny)
    g, scan, seg = _scan_on_grid_with_segmentation(m)
    kw = dict(target_prompt=HIGH, source_prompt=NONE, brain_mask=scan.array > 0, registration="none", steps=4,
              guidance=4.0)
    r = edit_scan(m, tiny_encoder(), scan, oracle=_SegmentationOracle(g, seg), **kw)
    lab = r.change_labels.array  # the scan is on the model grid
    assert r.report["method"] == "inversion" and "oracle" in r.report["change_labels_rule"]
    assert not np.isin(lab[~seg], (1, 2)).any()
    plain = edit_scan(m, tiny_encoder(), scan, **kw)
    np.testing.assert_array_equal(plain.counterfactual.array, r.counterfactual.array)  # only the labels differ
    # without an oracle a prompt edit labels no lesions and reports no lesion ml
    assert plain.report["lesion_ml_added"] is None and plain.report["lesion_ml_removed"] is None
    assert not np.isin(plain.change_labels.array, (1, 2)).any() and (plain.change_labels.array == 3).any()
    assert r.report["lesion_ml_added"] is not None


def test_prompt_edit_region_confines_a_lesion_edit_to_where_the_prompts_disagree(tiny):
    """DiffEdit (edit_region="prompt"): the change lies inside the region the prompts disagree on, and
    inside less than the whole brain (edit_region="brain"; the default's white matter is this model's
    whole brain); a bad region name or threshold is refused."""
    from scipy.ndimage import binary_dilation

    from CounterfactualGenLib.pipeline import EDIT_REGION_DRAWS, EDIT_REGION_T
    from CounterfactualGenLib.sampling.editing import region_from_change_map

    m = load_model(tiny)
    g = m.spec.grid
    scan = Volume(phantom_on(g.shape, g.affine_ras), g.affine_ras)
    brain = scan.array > 0
    kw = dict(target_prompt=HIGH, source_prompt=NONE, brain_mask=brain, registration="none", steps=4)
    whole = edit_scan(m, tiny_encoder(), scan, edit_region="brain", **kw)
    assert whole.report["edit_region"] == {"kind": "brain"}
    default = edit_scan(m, tiny_encoder(), scan, **kw)  # this model's white-matter template is its brain mask
    assert default.report["edit_region"]["kind"] == "white matter"
    np.testing.assert_array_equal(whole.counterfactual.array, default.counterfactual.array)
    local = edit_scan(m, tiny_encoder(), scan, edit_region="prompt", edit_region_threshold=0.6, **kw)
    rep = local.report["edit_region"]
    assert rep["kind"] == "prompt" and 0.0 < rep["ml_model_grid"] < brain.sum() * g.spacing_mm ** 3 / 1000.0
    assert f"{EDIT_REGION_DRAWS} noisings at t = {EDIT_REGION_T}" in rep["rule"]
    changed = local.counterfactual.array != scan.array
    assert changed.any() and changed.sum() < (whole.counterfactual.array != scan.array).sum()
    # every changed voxel lies in the region's 2-voxel wavelet blocks: at most one voxel away, diagonals too
    region = local.model_space["edit_region"]
    assert rep["ml_model_grid"] == pytest.approx(region.sum() * g.spacing_mm ** 3 / 1000.0, abs=1e-3)
    assert not changed[~binary_dilation(region, structure=np.ones((3, 3, 3), bool))].any()
    assert changed[~region].sum() < changed[region].sum()
    assert not changed[~brain].any()
    # the region itself: a map that is high in one corner selects that corner only
    cmap = np.zeros(g.shape, np.float32)
    cmap[:4, :4, :4] = 1.0
    region = region_from_change_map(cmap, np.ones(g.shape, bool), 0.5, smooth_voxels=0)
    assert region.sum() == 64 and region[:4, :4, :4].all()
    assert not region_from_change_map(np.zeros(g.shape, np.float32), np.ones(g.shape, bool), 0.5).any()
    with pytest.raises(InputError, match="edit region"):
        edit_scan(m, tiny_encoder(), scan, edit_region="lesions", **kw)
    with pytest.raises(InputError, match="threshold"):
        edit_scan(m, tiny_encoder(), scan, edit_region="prompt", edit_region_threshold=1.5, **kw)


def test_a_lesion_load_edit_acts_in_the_white_matter_by_default(tiny, tmp_path):
    """edit_region="auto" (the default): a lesion-load prompt edit changes only the template's white matter
    and the margin around it (here less than the brain); "brain" changes outside it too; a diagnosis
    prompt acts on the whole brain; a model that ships no white-matter template edits the whole brain."""
    from scipy.ndimage import binary_erosion

    from CounterfactualGenLib.models import save_model
    from CounterfactualGenLib.pipeline import LESION_EDIT_WM_MARGIN_MM, white_matter_region

    m = load_model(tiny)
    g = m.spec.grid
    brain = m.template("brain_mask").array > 0.5
    inner = binary_erosion(brain, iterations=3)
    assert 0 < inner.sum() < brain.sum() // 2
    folder = save_model(m, tmp_path / "wm", templates={
        "image": m.template("image"), "brain_mask": m.template("brain_mask"),
        "white_matter": Volume(inner.astype(np.float32), g.affine_ras)})
    m = load_model(folder)
    scan = Volume(phantom_on(g.shape, g.affine_ras), g.affine_ras)
    kw = dict(source_prompt=NONE, brain_mask=brain, registration="none", steps=4)
    region = white_matter_region(inner, brain, g.spacing_mm)
    assert LESION_EDIT_WM_MARGIN_MM < g.spacing_mm and (region == inner).all()  # 5 mm < one 8 mm voxel
    r = edit_scan(m, tiny_encoder(), scan, target_prompt=HIGH, **kw)
    rep = r.report["edit_region"]
    assert rep["kind"] == "white matter" and "5 mm around it" in rep["rule"]
    assert rep["ml_model_grid"] == pytest.approx(region.sum() * g.spacing_mm ** 3 / 1000.0, abs=1e-3)
    changed = r.counterfactual.array != scan.array
    assert changed[region].any() and not changed[~region].any()
    whole = edit_scan(m, tiny_encoder(), scan, target_prompt=HIGH, edit_region="brain", **kw)
    assert whole.report["edit_region"] == {"kind": "brain"}
    assert (whole.counterfactual.array != scan.array)[brain & ~region].any()
    dx = edit_scan(m, tiny_encoder(), scan, target_prompt="Subject has mild Alzheimer's dementia (AD).",
                   **{**kw, "source_prompt": "Subject is cognitively normal (CN)."})
    assert dx.report["edit_region"] == {"kind": "brain"} and (dx.counterfactual.array != scan.array)[~region].any()
    outer = brain & ~region  # a brain mask that misses the template's white matter: whole brain, with a warning
    r = edit_scan(m, tiny_encoder(), scan, target_prompt=HIGH, **{**kw, "brain_mask": outer})
    assert r.report["edit_region"] == {"kind": "brain"}
    assert any("does not overlap the scan's brain mask" in w for w in r.report["warnings"])
    bare = load_model(build_tiny_model(tmp_path / "bare"))  # no templates
    events = []
    r = edit_scan(bare, tiny_encoder(), scan, target_prompt=HIGH, on_event=events.append, **kw)
    assert r.report["edit_region"] == {"kind": "brain"}
    assert any("ships no white-matter template" in e.get("message", "") for e in events)


def test_white_matter_region_grows_by_the_margin_in_mm_inside_the_brain():
    from CounterfactualGenLib.pipeline import white_matter_region

    wm = np.zeros((9, 9, 9), np.float32)
    wm[4, 4, 4] = 0.9
    brain = np.ones(wm.shape, bool)
    assert white_matter_region(wm, brain, 5.0, margin_mm=5.0).sum() == 7  # the voxel and its 6 faces
    assert white_matter_region(wm, brain, 5.0, margin_mm=7.2).sum() == 19  # and its 12 edges (7.07 mm)
    assert white_matter_region(wm, brain, 5.0, margin_mm=0.0).sum() == 1
    assert white_matter_region(wm, brain, 5.0, probability=0.95).sum() == 0  # below the probability: none
    brain[:, :, 5:] = False
    assert white_matter_region(wm, brain, 5.0, margin_mm=5.0).sum() == 6  # never outside the brain


def test_prompt_change_map_lights_up_where_the_two_rows_predict_differently():
    import torch

    from CounterfactualGenLib.sampling.editing import prompt_change_map

    where = torch.zeros(1, 1, 8, 8, 8)
    where[..., 2:4, 2:4, 2:4] = 1.0

    def model_fn(x, t):  # row 1 (the target) predicts +1 more clean signal inside `where`
        assert x.shape[0] == 2 and torch.allclose(t, torch.full((2,), 0.5))
        v = -x.clone()
        v[1:] += where[0] / 0.5
        return v

    cmap = prompt_change_map(model_fn, torch.randn(1, 1, 8, 8, 8), lambda z: z, t=0.5, draws=3, seed=1)
    assert cmap.shape == (8, 8, 8)
    np.testing.assert_allclose(cmap[2:4, 2:4, 2:4], 1.0, atol=1e-5)
    assert cmap.sum() == pytest.approx(8.0, abs=1e-4)
    for bad in ({"t": 0.0}, {"t": 1.0}, {"draws": 0}):
        with pytest.raises(InputError):
            prompt_change_map(model_fn, torch.zeros(1, 1, 8, 8, 8), lambda z: z, **bad)


# ---------------------------------------------------------------------------------
# what the user had is never lost: inputs, earlier results, same-named scans of a batch
# ---------------------------------------------------------------------------------
def _scan_file(tiny, path):
    g = load_model(tiny).spec.grid
    write_volume(Volume(phantom_on(g.shape, g.affine_ras), g.affine_ras), path)
    return path


def test_cli_never_overwrites_the_input_or_earlier_results(tiny, tmp_path, capsys):
    """An input named like an output, in --out (chained edits), is never replaced, not even with
    --overwrite; a non-empty --out is refused before the model loads unless --overwrite; an --out that
    cannot be written is a one-line error, not a traceback."""
    work = tmp_path / "work"
    inp = _scan_file(tiny, work / "counterfactual_SYNTHETIC.nii.gz")
    before = file_sha256(inp)
    args = ["edit", "--model", str(tiny), "--input", str(inp), "--to", HIGH, "--from", NONE, "--steps", "2",
            "--registration", "none", "--oracle", "none", "--out", str(work)]
    assert main(args) == 3
    assert "holds an input of this run" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 3
    assert "is an input of this run; it is never overwritten" in capsys.readouterr().err
    assert file_sha256(inp) == before and sorted(p.name for p in work.iterdir()) == ["counterfactual_SYNTHETIC.nii.gz"]
    # earlier results: refused before the model loads (a missing model would be exit 4)
    out = tmp_path / "o"
    ok = ["edit", "--model", str(tiny), "--input", str(inp), "--to", HIGH, "--from", NONE, "--steps", "2",
          "--registration", "none", "--oracle", "none", "--out", str(out)]
    assert main(ok) == 0
    first = file_sha256(out / "counterfactual_SYNTHETIC.nii.gz")
    capsys.readouterr()
    assert main([*ok[:2], str(tmp_path / "no_model"), *ok[3:]]) == 3
    assert "already holds" in capsys.readouterr().err and file_sha256(out / "counterfactual_SYNTHETIC.nii.gz") == first
    (out / "mine.txt").write_text("keep me")
    assert main([*ok, "--overwrite", "--seed", "3"]) == 0
    assert (out / "mine.txt").read_text() == "keep me" and file_sha256(out / "counterfactual_SYNTHETIC.nii.gz") != first
    # an --out below a file cannot be made
    (tmp_path / "afile").write_text("x")
    assert main([*ok[:-1], str(tmp_path / "afile" / "sub")]) == 3
    err = capsys.readouterr().err
    assert "Cannot write to --out" in err and "Traceback" not in err


def test_batch_gives_same_named_scans_their_own_folders(tiny, tmp_path):
    """BIDS-like inputs (sub-01/FLAIR.nii.gz, sub-02/FLAIR.nii.gz) and a.nii beside a.nii.gz each get an
    output folder; none replaces another."""
    from CounterfactualGenLib.cli import batch_folder_names

    d = tmp_path / "bids"
    for sub in ("sub-01", "sub-02"):
        _scan_file(tiny, d / sub / "anat" / "FLAIR.nii.gz")
    (d / "manifest.csv").write_text("image\nsub-01/anat/FLAIR.nii.gz\nsub-02/anat/FLAIR.nii.gz\n")
    code = main(["batch", "--model", str(tiny), "--input", str(d / "manifest.csv"), "--to", HIGH, "--from", NONE,
                 "--steps", "2", "--registration", "none", "--oracle", "none", "--out", str(tmp_path / "o")])
    assert code == 0
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    outs = [o["counterfactual"] for o in s["outputs"]]
    assert len(set(outs)) == 2 and all(Path(o).exists() for o in outs)
    assert sorted(p.name for p in (tmp_path / "o").iterdir() if p.is_dir()) == ["sub-01_anat_FLAIR", "sub-02_anat_FLAIR"]
    assert batch_folder_names([Path("x/a.nii"), Path("x/a.nii.gz"), Path("x/b.nrrd")]) == ["a_nii", "a_nii_gz", "b"]


def test_lesion_masks_that_cannot_be_lesions_are_refused_or_warned_about(tiny, tmp_path, capsys):
    """A 'lesion mask' covering most of the brain (the scan itself, a brain mask) is refused; one whose
    voxels are no brighter than the brain (another scan's, a template's) is filled with a warning;
    filling never labels a voxel 'lesion added'."""
    g = load_model(tiny).spec.grid
    img = phantom_on(g.shape, g.affine_ras)
    scan = _scan_file(tiny, tmp_path / "scan.nii.gz")
    write_volume(Volume(img, g.affine_ras), tmp_path / "itself.nii.gz")
    dark = np.zeros(g.shape, np.uint8)
    dark[(img > 0) & (img < np.percentile(img[img > 0], 30))] = 1
    dark[: g.shape[0] // 2] = 0
    write_volume(Volume(dark, g.affine_ras), tmp_path / "dark.nii.gz")

    def fill(mask: str) -> int:
        return main(["edit", "--model", str(tiny), "--input", str(scan), "--to", NONE, "--from", HIGH,
                     "--lesion-mask", str(tmp_path / f"{mask}.nii.gz"), "--steps", "2", "--registration", "none",
                     "--oracle", "none", "--out", str(tmp_path / mask)])

    assert fill("itself") == 3
    assert "covers" in capsys.readouterr().err and not (tmp_path / "itself").exists()
    assert fill("dark") == 0
    report = json.loads((tmp_path / "dark" / "report.json").read_text())
    assert any("hardly brighter than the rest of the brain" in w for w in report["warnings"])
    labels = read_volume(tmp_path / "dark" / "change_labels.nii.gz").array
    assert not (labels == 1).any() and report["lesion_ml_added"] == 0.0


def test_a_model_trained_indifferent_to_the_outside_of_the_brain_sees_a_flat_minus_one_there(tiny, tmp_path):
    """spec intensity.outside_brain: "scan" (default) shows the model a scan's own voxels outside the brain mask
    (here a bright skull-like shell), "flat" sets them to −1, the same inside; the edit then differs, and either way
    leaves the outside of the scan bit-identical. An unknown value is refused when the model loads."""
    import shutil

    from CounterfactualGenLib.errors import ModelError
    from CounterfactualGenLib.pipeline import to_model_space

    m = load_model(tiny)
    g = m.spec.grid
    img = phantom_on(g.shape, g.affine_ras)
    brain = img > 0
    from scipy import ndimage

    shell = ndimage.binary_dilation(brain, iterations=2) & ~brain
    img[shell] = 900.0  # brighter than the brain: a skull's marrow, a scalp
    scan = Volume(img, g.affine_ras)
    own = to_model_space(scan, g, None, None, brain_mask=brain, registration="none")
    flat = to_model_space(scan, g, None, None, brain_mask=brain, registration="none", outside_brain="flat")
    assert own.x_model[shell].min() > 1.0 and (flat.x_model[~flat.brain_model] == -1.0).all()
    np.testing.assert_array_equal(flat.x_model[flat.brain_model], own.x_model[own.brain_model])
    with pytest.raises(InputError, match="outside_brain"):
        to_model_space(scan, g, None, None, brain_mask=brain, registration="none", outside_brain="noise")

    folder = tmp_path / "flat"
    shutil.copytree(tiny, folder)
    spec = json.loads((folder / "model.json").read_text())
    spec["intensity"] = {**spec.get("intensity", {}), "outside_brain": "flat"}
    (folder / "model.json").write_text(json.dumps(spec))
    kw = dict(target_prompt=HIGH, source_prompt=NONE, brain_mask=brain, registration="none", steps=4, seed=3)
    r_scan = edit_scan(m, tiny_encoder(), scan, **kw)
    r_flat = edit_scan(load_model(folder), tiny_encoder(), scan, **kw)
    assert not np.array_equal(r_scan.counterfactual.array, r_flat.counterfactual.array)
    for r in (r_scan, r_flat):
        np.testing.assert_array_equal(r.counterfactual.array[~brain], img[~brain])
    spec["intensity"]["outside_brain"] = "noise"
    (folder / "model.json").write_text(json.dumps(spec))
    with pytest.raises(ModelError, match="outside_brain"):
        load_model(folder)
