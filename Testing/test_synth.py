"""Tests of the synthetic subject engine (CPU, seconds): determinism, exact twins, ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from CounterfactualGenLib.errors import InputError
from CounterfactualGenLib.synth import (
    ANATOMIES,
    DEFAULT_CENTER_MM,
    LESION_CLASSES,
    LibraryLesion,
    ProceduralLesion,
    SubjectSpec,
    atrophy_series,
    diagnosis_class,
    lesion_class,
    lesion_load_series,
    library_ids,
    make_subject,
    make_twin,
    output_grid,
    random_spec,
)

SMALL = {"shape": (32, 32, 32), "spacing_mm": 6.0}
MEDIUM = {"shape": (64, 64, 64), "spacing_mm": 3.0}


@pytest.fixture(scope="module")
def series():
    """Lesion-load twins of one subject on the 64³ / 3 mm grid."""
    return lesion_load_series(SubjectSpec(seed=11), LESION_CLASSES, **MEDIUM)


@pytest.fixture(scope="module")
def atrophy_twins():
    return atrophy_series(SubjectSpec(seed=12, target_lesion_ml=4.0), ("CN", "MCI", "AD"), **MEDIUM)


def test_same_spec_gives_identical_subject():
    spec = SubjectSpec(seed=3, target_lesion_ml=8.0, atrophy=0.3)
    a, b = make_subject(spec, **SMALL), make_subject(spec, **SMALL)
    assert np.array_equal(a.image.array, b.image.array)
    assert np.array_equal(a.lesion_mask, b.lesion_mask)
    assert np.array_equal(a.brain_mask, b.brain_mask)
    for k in a.tissue:
        assert np.array_equal(a.tissue[k], b.tissue[k])
    assert a.attributes == b.attributes


def test_different_seeds_give_different_anatomy():
    a, b = make_subject(SubjectSpec(seed=1), **SMALL), make_subject(SubjectSpec(seed=2), **SMALL)
    assert np.mean(np.abs(a.tissue["gm"] - b.tissue["gm"])) > 0.02
    assert a.attributes["ventricle_ml"] != b.attributes["ventricle_ml"]


def test_lesion_twins_are_bit_identical_outside_the_lesion_change(series):
    healthy = series[0]
    for twin in series[1:]:
        changed = twin.image.array != healthy.image.array
        assert changed.any()
        # Every changed voxel is a lesion voxel of the twin (the healthy twin has none).
        assert not np.any(changed & (twin.lesion_mask == 0))
        assert np.array_equal(twin.brain_mask, healthy.brain_mask)
        for k in healthy.tissue:
            assert np.array_equal(twin.tissue[k], healthy.tissue[k])


def test_lesion_ml_is_exact(series):
    for s in series:
        voxel_ml = float(np.prod(s.image.spacing_mm)) / 1000.0
        assert s.attributes["lesion_voxels"] == int(s.lesion_mask.sum())
        assert s.attributes["lesion_ml"] == pytest.approx(int(s.lesion_mask.sum()) * voxel_ml, rel=1e-12)
        assert s.lesion_mask.dtype == np.uint8 and set(np.unique(s.lesion_mask)) <= {0, 1}


def test_lesion_load_series_is_monotone_nested_and_in_class(series):
    mls = [s.attributes["lesion_ml"] for s in series]
    assert mls[0] == 0.0
    assert all(x < y for x, y in zip(mls, mls[1:]))
    assert [s.attributes["lesion_load"] for s in series] == list(LESION_CLASSES)
    assert [lesion_class(m) for m in mls] == list(LESION_CLASSES)
    for small, big in zip(series, series[1:]):
        assert not np.any((small.lesion_mask == 1) & (big.lesion_mask == 0))  # nested


def test_lesions_lie_in_white_matter(series):
    for s in series[1:]:
        assert np.all(s.tissue["wm"][s.lesion_mask > 0] >= 0.5)
        assert np.all(s.brain_mask[s.lesion_mask > 0] == 1)


def test_flair_lesion_to_nawm_ratio():
    s = make_subject(SubjectSpec(seed=11, target_lesion_ml=20.0, bias_strength=0.0), **MEDIUM)
    les = s.lesion_mask > 0
    nawm = (s.tissue["wm"] > 0.9) & ~les
    ratio = s.image.array[les].mean() / s.image.array[nawm].mean()
    assert 1.15 < ratio < 1.5
    # FLAIR: CSF dark, WM below GM.
    img = s.image.array
    assert img[s.tissue["csf"] > 0.9].mean() < img[nawm].mean() < img[s.tissue["gm"] > 0.8].mean()


def test_t1_contrast_and_dark_lesions():
    s = make_subject(SubjectSpec(seed=11, target_lesion_ml=20.0, bias_strength=0.0, contrast="T1"), **MEDIUM)
    img, les = s.image.array, s.lesion_mask > 0
    nawm = (s.tissue["wm"] > 0.9) & ~les
    assert img[s.tissue["csf"] > 0.9].mean() < img[s.tissue["gm"] > 0.8].mean() < img[nawm].mean()
    assert img[les].mean() < img[nawm].mean()


def test_atrophy_raises_ventricles_and_keeps_the_person(atrophy_twins):
    vent = [s.attributes["ventricle_ml"] for s in atrophy_twins]
    assert vent[0] < vent[1] < vent[2]
    gm = [s.attributes["gm_ml"] for s in atrophy_twins]
    assert gm[0] > gm[1] > gm[2]
    assert [s.attributes["diagnosis"] for s in atrophy_twins] == ["CN", "MCI", "AD"]
    cn, ad = atrophy_twins[0], atrophy_twins[2]
    # Bias and noise are shared: voxels whose tissue and lesion status did not change
    # (e.g. all of the background and deep white matter far from the ventricles) match.
    same = np.ones(cn.lesion_mask.shape, bool)
    for k in ("gm", "wm", "csf"):
        same &= cn.tissue[k] == ad.tissue[k]
    same &= cn.lesion_mask == ad.lesion_mask
    assert same.mean() > 0.5
    assert np.array_equal(cn.image.array[same], ad.image.array[same])


def test_geometry_is_a_real_ras_grid_with_the_requested_spacing():
    s = make_subject(SubjectSpec(seed=0), shape=(40, 36, 24), spacing_mm=(4.0, 5.0, 7.5))
    a = s.image.affine_ras
    assert s.image.array.shape == (40, 36, 24) and s.image.array.dtype == np.float32
    assert s.image.spacing_mm == pytest.approx((4.0, 5.0, 7.5))
    assert not np.allclose(a, np.eye(4))
    assert np.allclose(a[:3, :3], np.diag([4.0, 5.0, 7.5]))  # RAS: +i → R, +j → A, +k → S
    centre = a @ np.r_[(np.array(s.image.array.shape) - 1) / 2.0, 1.0]
    assert np.allclose(centre[:3], DEFAULT_CENTER_MM)
    assert np.allclose(output_grid((40, 36, 24), (4.0, 5.0, 7.5)), a)
    assert s.image.is_synthetic


def test_same_subject_at_two_resolutions_has_similar_volumes():
    spec = SubjectSpec(seed=21)
    lo, hi = make_subject(spec, **SMALL), make_subject(spec, **MEDIUM)
    for k in ("gm_ml", "wm_ml", "ventricle_ml"):
        assert lo.attributes[k] == pytest.approx(hi.attributes[k], rel=0.05)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"shape": (64, 64)},
        {"shape": (64, 64, 64, 1)},
        {"shape": (4, 64, 64)},
        {"spacing_mm": -1.0},
        {"spacing_mm": 0.0},
        {"spacing_mm": (1.0, 1.0)},
        {"center_mm": (0.0, float("nan"), 0.0)},
    ],
)
def test_bad_grid_arguments_raise_input_error(kwargs):
    with pytest.raises(InputError):
        make_subject(SubjectSpec(seed=0), **{**SMALL, **kwargs})


@pytest.mark.parametrize(
    "bad",
    [
        lambda: make_twin(SubjectSpec(seed=0), **SMALL, lesion_class="huge"),
        lambda: make_twin(SubjectSpec(seed=0), **SMALL, diagnosis="FTD"),
        lambda: make_twin(SubjectSpec(seed=0), **SMALL, colour="blue"),
        lambda: lesion_load_series(SubjectSpec(seed=0), ("none", "extreme"), **SMALL),
        lambda: atrophy_series(SubjectSpec(seed=0), ("CN", "old"), **SMALL),
        lambda: random_spec(0, lesion_class="lots"),
        lambda: SubjectSpec(seed=0, contrast="PD"),
        lambda: SubjectSpec(seed=0, anatomy="bert"),
        lambda: random_spec(0, anatomy=()),
        lambda: random_spec(0, anatomy=("icbm152", "mni305")),
        lambda: SubjectSpec(seed=0, atrophy=2.0),
        lambda: SubjectSpec(seed=-1),
        lambda: SubjectSpec(seed=0, target_lesion_ml=-3.0),
        lambda: LibraryLesion("patient05", subset_fraction=0.0),
        lambda: ProceduralLesion("cortical"),
        lambda: make_subject(SubjectSpec(seed=0, library_lesions=(LibraryLesion("patient99"),)), **SMALL),
        lambda: make_subject("not a spec", **SMALL),
        lambda: SubjectSpec.from_json('{"seed": 1, "colour": 2}'),
    ],
)
def test_bad_specs_raise_input_error(bad):
    with pytest.raises(InputError):
        bad()


def test_lesion_class_thresholds():
    assert [lesion_class(v) for v in (0.0, 0.01, 5.0, 5.01, 15.0, 15.01, 80.0)] == [
        "none", "minimal", "minimal", "moderate", "moderate", "high", "high"
    ]
    assert [diagnosis_class(a) for a in (0.0, 0.5, 1.0)] == ["CN", "MCI", "AD"]


def test_spec_json_round_trip():
    spec = SubjectSpec(
        seed=9,
        library_lesions=(LibraryLesion("patient05", 0.5, 3),),
        procedural_lesions=(ProceduralLesion("periventricular", 4.0, seed=2),),
        atrophy=0.5,
        contrast="T1",
    )
    text = spec.to_json()
    assert json.loads(text)["library_lesions"][0]["library_id"] == "patient05"
    assert SubjectSpec.from_json(text) == spec
    assert hash(SubjectSpec.from_json(text)) == hash(spec)


def test_explicit_library_and_procedural_lesions():
    assert len(library_ids()) == 27
    whole = make_subject(SubjectSpec(seed=4, library_lesions=(LibraryLesion("patient05"),)), **MEDIUM)
    # patient05 has 29.9 ml of lesions at 1 mm; most of it lands in the subject's WM.
    assert 12.0 < whole.attributes["lesion_ml"] < 40.0
    half = make_subject(SubjectSpec(seed=4, library_lesions=(LibraryLesion("patient05", 0.5, 1),)), **MEDIUM)
    assert 0 < half.attributes["lesion_ml"] < whole.attributes["lesion_ml"] + 5.0
    blob = make_subject(SubjectSpec(seed=4, procedural_lesions=(ProceduralLesion("periventricular", 5.0),)), **MEDIUM)
    assert blob.attributes["lesion_ml"] > 0.1
    assert all(src.startswith("procedural") for src in blob.lesion_sources)


def test_random_spec_hits_the_requested_classes():
    for cls in LESION_CLASSES:
        spec = random_spec(np.random.default_rng(5), lesion_class=cls, diagnosis="MCI")
        assert lesion_class(spec.target_lesion_ml) == cls
        assert diagnosis_class(spec.atrophy) == "MCI"
    s = make_subject(random_spec(8, lesion_class="moderate"), **MEDIUM)
    assert s.attributes["lesion_load"] == "moderate"


def test_resources_are_small_and_attributed():
    root = Path(__file__).resolve().parents[1] / "Resources"
    size = sum(f.stat().st_size for d in ("Templates", "LesionLibrary") for f in (root / d).iterdir())
    assert size < 16e6
    notice = (root / "Templates" / "NOTICE-templates.md").read_text(encoding="utf-8")
    assert "McConnell" in notice and "Colin27" in notice and "Holmes" in notice and "Lesjak" in notice
    assert "Lesjak" in (root / "LesionLibrary" / "ATTRIBUTION.md").read_text(encoding="utf-8")


# GM, WM and lateral-ventricle volume ranges (ml) of each individual anatomy's subjects (build_resources
# printed Colin27 801 / 697 / 26.2 ml, clinical04 694 / 808 / 9.0 ml, clinical12 692 / 781 / 13.3 ml)
INDIVIDUALS = {"colin27": ((750, 1000), (600, 850), (15, 40)),
               "clinical04": ((600, 850), (700, 950), (4, 15)),
               "clinical12": ((600, 850), (700, 950), (8, 20))}


@pytest.mark.parametrize("anatomy", sorted(INDIVIDUALS))
def test_individual_anatomy_is_its_own_brain_with_exact_twins(anatomy):
    """Subjects of one person's brain (Colin27, two MS patients): plausible tissue volumes, their own
    folds (not the average's), lesions in their white matter, exact twins, atrophy that grows their
    ventricles."""
    spec = random_spec(5, lesion_class="moderate", diagnosis="CN").replace(atrophy=0.0)
    icbm, colin = make_subject(spec, **MEDIUM), make_subject(spec.replace(anatomy=anatomy), **MEDIUM)
    a = colin.attributes
    assert a["anatomy"] == anatomy and icbm.attributes["anatomy"] == "icbm152"
    (gm_lo, gm_hi), (wm_lo, wm_hi), (v_lo, v_hi) = INDIVIDUALS[anatomy]
    assert gm_lo < a["gm_ml"] < gm_hi and wm_lo < a["wm_ml"] < wm_hi and v_lo < a["ventricle_ml"] < v_hi, a
    assert a["lesion_load"] == "moderate"
    # same deformation, pose and noise draws, another brain: the GM maps differ where folds are
    assert np.mean(np.abs(icbm.tissue["gm"] - colin.tissue["gm"])) > 0.05
    assert colin.tissue["wm"][colin.lesion_mask > 0].min() >= 0.5
    healthy = make_twin(colin.spec, **MEDIUM, lesion_class="none")
    assert ((colin.image.array != healthy.image.array) <= (colin.lesion_mask > 0)).all()
    ad = make_twin(colin.spec, **MEDIUM, diagnosis="AD")
    assert ad.attributes["ventricle_ml"] > 1.5 * a["ventricle_ml"] and ad.attributes["anatomy"] == anatomy


def test_every_anatomy_has_maps_and_a_title():
    from CounterfactualGenLib.synth.resources import ANATOMY_FILES, ANATOMY_TITLES

    assert set(ANATOMIES) == set(ANATOMY_FILES) == set(ANATOMY_TITLES)


def test_random_spec_draws_an_anatomy_last():
    one = random_spec(3, lesion_class="high")
    both = [random_spec(s, lesion_class="high", anatomy=("icbm152", "colin27")) for s in range(3, 23)]
    assert one == both[0].replace(anatomy="icbm152")  # the other fields do not depend on the choice
    assert {s.anatomy for s in both} == {"icbm152", "colin27"}


def test_segment_tissues_recovers_partial_volume():
    """The Colin27 builder's segmentation on a phantom with known fractions: three slabs (CSF, GM, WM)
    with one-voxel borders of known mixture, noise, and priors that are smoothed and partly wrong."""
    from CounterfactualGenLib.synth.build_resources import segment_tissues

    truth = np.zeros((3, 40, 12, 12))
    truth[0, :12], truth[1, 13:25], truth[2, 26:] = 1, 1, 1
    truth[0, 12], truth[1, 12] = 0.3, 0.7
    truth[1, 25], truth[2, 25] = 0.6, 0.4
    means = np.array([30.0, 80.0, 120.0])
    t1 = np.tensordot(means, truth, 1) + np.random.default_rng(0).normal(0, 2.0, truth.shape[1:])
    priors = np.roll(truth, 2, axis=1)  # misplaced by 2 voxels: the data must win
    frac = segment_tissues(t1, np.ones(t1.shape, bool), priors, prior_sigma_mm=1.0)
    assert np.allclose(frac.sum(0), 1.0)
    err = np.abs(frac - truth).mean(axis=(2, 3))
    assert err.max() < 0.1, err.max(axis=0)
    assert abs(frac[1, 12].mean() - 0.7) < 0.1 and abs(frac[2, 25].mean() - 0.4) < 0.1


def test_flair_lesions_finds_white_matter_hyperintensities_not_bright_cortex():
    """The clinical builder's lesion finder on a phantom FLAIR: white matter (100) holding a 1.5×
    lesion deep inside and a 1.5× speck too small to be one, and grey matter at 1.25× (bright cortex,
    as on patient 04's scanner) at the edge. The lesion is found whole; cortex and speck are not."""
    from CounterfactualGenLib.synth.build_resources import flair_lesions

    shape = (48, 48, 48)
    mask = np.zeros(shape, bool)
    mask[2:-2, 2:-2, 2:-2] = True
    gm = np.zeros(shape, bool)
    gm[2:7] = True
    gm &= mask
    wm = mask & (gm == 0)
    flair = 100.0 * wm + 125.0 * gm
    lesion = np.zeros(shape, bool)
    lesion[22:28, 22:28, 22:28] = True
    flair[lesion] = 150.0
    flair[36, 36, 36] = 150.0  # one voxel: below the size of a core
    flair += np.random.default_rng(0).normal(0, 2.0, shape)
    found = flair_lesions(flair.astype(np.float32), gm.astype(np.float32), wm.astype(np.float32), mask,
                          wm.astype(np.float32))
    assert not found[gm > 0].any() and not found[34:39, 34:39, 34:39].any()
    # found inside the lesion; only its outer voxel layer, blurred by the 1-voxel smoothing, may be missed
    assert not (found & ~lesion).any() and found[23:27, 23:27, 23:27].all()


def test_bias_corrected_flattens_a_smooth_field():
    """N4 on a uniform phantom under a ±30 % smooth multiplicative field: the spread inside the mask
    falls well below the field's."""
    from CounterfactualGenLib.synth.build_resources import bias_corrected

    x = np.linspace(-1.0, 1.0, 40)
    field = 1.0 + 0.3 * x[:, None, None] * np.ones((40, 40, 40))
    mask = np.zeros(field.shape, bool)
    mask[4:-4, 4:-4, 4:-4] = True
    img = (100.0 * field + np.random.default_rng(1).normal(0, 1.0, field.shape)).astype(np.float32)
    out = bias_corrected(img, mask, shrink=2)
    cv = lambda a: a[mask].std() / a[mask].mean()  # noqa: E731
    assert cv(img) > 0.1 and cv(out) < 0.4 * cv(img), (cv(img), cv(out))
    # the same maps on any machine: the result does not depend on ITK's thread count, which is restored
    import SimpleITK as sitk

    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    try:
        # (unpinned, N4 on this phantom differs by up to 0.004 between 1 and 4 threads)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
        one = bias_corrected(img, mask, shrink=2)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(4)
        assert np.array_equal(bias_corrected(img, mask, shrink=2), one) and np.array_equal(one, out)
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 4
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)
