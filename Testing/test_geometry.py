"""Model-space mapping: resample → back within stated tolerances on any geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import oblique_affine
from CounterfactualGenLib.errors import InputError
from CounterfactualGenLib.geometry import (ModelGrid, ModelSpaceMapping, estimate_brain_mask, harmonic_interpolate,
                                          register_affine)
from CounterfactualGenLib.intensity import IntensityNormalizer
from CounterfactualGenLib.volume import Volume, read_volume

WAVELENGTH_MM = 60.0


def tol(spacing_mm: float) -> float:
    """Linear-interpolation error bound for :func:`field`: h²/8·Σ|k|² over its terms (+ float slack)."""
    k = 2 * np.pi / WAVELENGTH_MM
    return spacing_mm**2 / 8 * k**2 * (1 + 1 + (1 + 0.49)) * 1.5 + 1e-3


def field(points_ras: np.ndarray) -> np.ndarray:
    """A smooth analytic intensity field over RAS mm (points: (..., 3))."""
    k = 2 * np.pi / WAVELENGTH_MM
    x, y, z = points_ras[..., 0], points_ras[..., 1], points_ras[..., 2]
    return np.sin(k * x + 0.3) + np.cos(k * y - 0.2) + np.sin(k * z + 0.7 * k * x)


def sample_on(shape, affine) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float64)
    return field(idx @ affine[:3, :3].T + affine[:3, 3]).astype(np.float32)


def centred_oblique(seed: int, spacing, shape) -> np.ndarray:
    a = oblique_affine(np.random.default_rng(seed), spacing)
    a[:3, 3] = -a[:3, :3] @ ((np.asarray(shape) - 1) / 2)  # scan centred at the origin
    return a


def interior(mask: np.ndarray, margin: int) -> np.ndarray:
    from scipy.ndimage import binary_erosion

    return binary_erosion(mask, iterations=margin)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    inplane=st.floats(0.6, 1.5),
    slice_mm=st.floats(1.0, 3.0),
    grid_mm=st.sampled_from([1.5, 2.0, 3.0]),
)
def test_resample_to_model_and_back_on_oblique_anisotropic_grids(seed, inplane, slice_mm, grid_mm):
    shape = (int(100 / inplane), int(100 / inplane), int(70 / slice_mm))
    scan = Volume(np.zeros(shape, np.float32), centred_oblique(seed, (inplane, inplane, slice_mm), shape))
    scan = scan.with_array(sample_on(scan.shape, scan.affine_ras))
    m = ModelSpaceMapping.fit(scan, ModelGrid((40, 40, 40), grid_mm), center_on_brain=False)

    # forward: the model-grid samples are the field at the model voxels' world points
    model = m.to_model(scan, default=np.nan)
    truth = sample_on(m.grid.shape, m.grid.affine_ras)
    inside = interior(np.isfinite(model), 2)
    assert inside.sum() > 500
    assert np.abs(model - truth)[inside].max() < tol(max(inplane, slice_mm))

    # back: the field sampled on the model grid, mapped to the scan, is the field on the scan
    back = m.to_source(truth, default=np.nan)
    # ITK treats points up to half a model voxel outside the grid as inside (clamped
    # neighbours, not linear), so the margin must cover half a model voxel in scan voxels
    covered = interior(np.isfinite(back), 2 + int(np.ceil(0.5 * grid_mm / min(inplane, slice_mm))))
    assert covered.sum() > 500
    assert np.abs(back - scan.array)[covered].max() < tol(grid_mm)


def test_identity_grid_is_exact():
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(12, 12, 12)).astype(np.float32)
    grid = ModelGrid((12, 12, 12), 2.0, (1.0, -3.0, 5.0))
    scan = Volume(arr, grid.affine_ras)
    m = ModelSpaceMapping.fit(scan, grid, center_on_brain=False)
    np.testing.assert_allclose(m.to_model(scan), arr, atol=1e-6)
    np.testing.assert_allclose(m.to_source(arr), arr, atol=1e-6)


def test_world_transform_is_applied():
    """With a model→scan world transform T, the model grid samples f(T·x)."""
    shape = (60, 60, 60)
    scan = Volume(np.zeros(shape), centred_oblique(3, (1.5, 1.5, 1.5), shape))
    scan = scan.with_array(sample_on(shape, scan.affine_ras))
    c, s = np.cos(0.2), np.sin(0.2)
    t = np.array([[c, -s, 0, 4.0], [s, c, 0, -2.0], [0, 0, 1, 3.0], [0, 0, 0, 1]])
    m = ModelSpaceMapping.fit(scan, ModelGrid((32, 32, 32), 2.0), model_to_source_world=t)
    model = m.to_model(scan, default=np.nan)
    truth = sample_on(m.grid.shape, t @ m.grid.affine_ras)
    inside = interior(np.isfinite(model), 2)
    assert np.abs(model - truth)[inside].max() < tol(1.5)


def test_labels_round_trip_with_nearest_neighbour():
    grid = ModelGrid((20, 20, 20), 2.0)
    labels = np.zeros(grid.shape, np.float32)
    labels[5:12, 6:15, 8:10] = 1
    labels[14:18, 2:6, 3:17] = 2
    # scan at exactly half the spacing, same axes: each model voxel maps to 2x2x2 scan voxels
    a = grid.affine_ras.copy()
    a[:3, :3] /= 2
    a[:3, 3] -= 0.5  # voxel centres of the finer grid
    scan = Volume(np.ones((40, 40, 40)), a)
    m = ModelSpaceMapping.fit(scan, grid, center_on_brain=False)
    back = m.to_source(labels, interpolation="nearest")
    assert set(np.unique(back)) == {0.0, 1.0, 2.0}
    np.testing.assert_array_equal(m.to_model(back, interpolation="nearest"), labels)


def test_grid_centres_on_brain_mask():
    arr = np.zeros((50, 50, 50), np.float32)
    arr[30:40, 10:20, 20:30] = 1.0
    scan = Volume(arr, np.diag([1.0, 1.0, 1.0, 1.0]))
    m = ModelSpaceMapping.fit(scan, ModelGrid((16, 16, 16), 1.0), brain_mask=arr > 0)
    np.testing.assert_allclose(m.grid.center_ras, (34.5, 14.5, 24.5))
    assert m.to_model(scan)[3:13, 3:13, 3:13].min() == 1.0  # the 10³ block sits in the middle
    assert m.to_model(scan).sum() == 1000


def test_shape_mismatch_is_clear():
    scan = Volume(np.random.rand(8, 8, 8), np.eye(4))
    m = ModelSpaceMapping.fit(scan, ModelGrid((4, 4, 4), 2.0), center_on_brain=False)
    with pytest.raises(InputError, match="does not match"):
        m.to_model(np.zeros((8, 8, 7)))
    with pytest.raises(InputError, match="does not match"):
        m.to_source(np.zeros((8, 8, 8)))


@pytest.mark.parametrize("shape,spacing", [((2, 3), 1.0), ((8, 8, 8), 0.0), ((8, 8, 8), -1.0)])
def test_bad_grids(shape, spacing):
    with pytest.raises(InputError):
        ModelGrid(shape, spacing)


def test_grid_json_round_trip():
    g = ModelGrid((32, 40, 36), 1.5, (0.0, -18.0, 10.0))
    assert ModelGrid.from_dict(g.to_dict()) == g


# -- intensity -------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 1000), scale=st.floats(1e-2, 1e4), offset=st.floats(-100, 100))
def test_intensity_normalisation_inverts_exactly(seed, scale, offset):
    rng = np.random.default_rng(seed)
    x = (rng.gamma(4, 1, (10, 10, 10)) * scale + offset).astype(np.float32)
    mask = rng.random(x.shape) > 0.3
    n = IntensityNormalizer.fit(x, mask)
    y = n.forward(x)
    np.testing.assert_allclose(n.inverse(y), x, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(n.inverse_delta(y - n.forward(np.zeros_like(x) + offset)), x - offset,
                               rtol=1e-4, atol=1e-4 * scale)
    assert IntensityNormalizer.from_dict(n.to_dict()) == n


def test_intensity_normalisation_is_robust_and_keeps_background():
    x = np.random.default_rng(0).uniform(100, 200, (20, 20, 20)).astype(np.float32)
    x[0, 0, 0] = 1e6  # one hot voxel must not set the scale
    n = IntensityNormalizer.fit(x, x > 0)
    assert n.forward(np.zeros(1))[0] == -1.0
    assert 195 < n.high < 201


def test_intensity_empty_mask_is_clear():
    with pytest.raises(InputError, match="fewer than 10"):
        IntensityNormalizer.fit(np.ones((4, 4, 4)), np.zeros((4, 4, 4)))


# -- real clinical geometry ---------------------------------------------------------------
def test_clinical_scan_maps_to_model_grid_and_back(clinical_flair_path):
    scan = read_volume(clinical_flair_path)
    mask = estimate_brain_mask(scan)
    m = ModelSpaceMapping.fit(scan, ModelGrid((96, 96, 96), 2.0), brain_mask=mask)
    model = m.to_model(scan)
    assert model.shape == (96, 96, 96) and model.max() > 0
    back = m.to_source(model)
    assert back.shape == scan.shape
    cov = m.source_coverage() & mask
    assert cov.sum() > 0.9 * mask.sum()  # the 192 mm grid covers the head
    # at 2 mm the image is blurred, not moved: correlation with the original stays high
    assert np.corrcoef(back[cov], scan.array[cov])[0, 1] > 0.8


def test_registration_recovers_a_known_affine():
    """Register a moved copy of a smooth blob image back; the transform must undo the move."""
    shape = (48, 48, 48)
    grid = ModelGrid(shape, 3.0)
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1) @ grid.affine_ras[:3, :3].T \
        + grid.affine_ras[:3, 3]
    def img(p):  # a head-like phantom: shell, "brain", two "ventricles", a bright spot; sharp edges
        def inside(c, r):
            return (np.linalg.norm((p - c) / r, axis=-1) < 1).astype(np.float32)
        out = 0.3 * inside([0, 0, 0], [60, 65, 55]) + 0.5 * inside([0, 5, 5], [52, 58, 45])
        out -= 0.6 * inside([-8, 10, 8], [5, 18, 8]) + 0.6 * inside([9, 10, 8], [5, 18, 8])
        out += 0.7 * inside([25, -30, -15], [8, 8, 8]) + 0.4 * inside([-20, 30, 25], [6, 12, 10])
        return out + 0.15 * np.sin(p[..., 0] / 7.0) * np.cos(p[..., 2] / 9.0)  # texture: gradients everywhere
    template = Volume(img(idx), grid.affine_ras)
    c, s = np.cos(0.15), np.sin(0.15)
    t_true = np.array([[c, 0, s, 6.0], [0, 1, 0, -4.0], [-s, 0, c, 3.0], [0, 0, 0, 1]])  # template → scan world
    scan_pts = idx @ np.linalg.inv(t_true)[:3, :3].T + np.linalg.inv(t_true)[:3, 3]
    scan = Volume(img(scan_pts), grid.affine_ras)  # scan(x) = template(T⁻¹x)
    res = register_affine(scan, template)
    assert res.correlation > 0.95
    probe = np.array([[0, 0, 0, 1], [30, 0, 0, 1], [0, 30, 0, 1], [0, 0, 30, 1.0]]).T
    err = np.linalg.norm((res.model_to_source_world @ probe - t_true @ probe)[:3], axis=0).max()
    assert err < 1.5, err  # mm, at 3 mm voxels


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), scale=st.floats(0.4, 2.5), edge=st.booleans())
def test_scipy_linear_resampling_matches_simpleitk(seed, scale, edge):
    """The evaluation's SimpleITK-free resampler gives SimpleITK's linear result, edge rule included."""
    from CounterfactualGenLib.geometry import resample_index_space, resample_linear_index_space

    rng = np.random.default_rng(seed)
    a = rng.normal(size=(9, 12, 7)).astype(np.float32)
    m = np.eye(4)
    if edge:  # output points exactly on the ±0.5 borders of the input's extent
        m[:3, :3] = np.diag([0.5, 0.5, 0.5])
        m[:3, 3] = -0.5
    else:
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        m[:3, :3] = q * scale
        m[:3, 3] = rng.uniform(-6, 12, 3)
    want = resample_index_space(a, (11, 8, 10), m, default=-1.0)
    got = resample_linear_index_space(a, (11, 8, 10), m, default=-1.0)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert ((got == -1.0) == (want == -1.0)).all()


def test_registration_coarsens_a_fine_scan_without_moving_it():
    """Before registration a scan finer than half the template's spacing is smoothed and resampled
    (geometry._coarsened): the physical extent and an object's position stay, axes already coarse
    keep their spacing, and a scan that is not finer is used as it is."""
    from CounterfactualGenLib.geometry import _coarsened, _to_sitk

    aff = oblique_affine(np.random.default_rng(4), spacing=(0.7, 0.7, 3.0))
    shape = (120, 110, 30)
    pts = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1) @ aff[:3, :3].T + aff[:3, 3]
    centre = pts[60, 55, 15] + [7.0, -5.0, 3.0]
    blob = np.exp(-np.sum((pts - centre) ** 2, -1) / (2 * 8.0**2)).astype(np.float32)
    img = _to_sitk(Volume(blob, aff))
    out = _coarsened(img, 2.5)
    np.testing.assert_allclose(out.GetSpacing(), (2.5, 2.5, 3.0), atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.GetSize()) * out.GetSpacing(), np.asarray(img.GetSize()) * img.GetSpacing(),
                               atol=1.25)  # the extent, to within half a new voxel
    d = np.asarray(img.GetDirection()).reshape(3, 3)

    def first_corner(im):  # the outer corner of voxel (0, 0, 0), LPS mm
        return np.asarray(im.GetOrigin()) - d @ (np.asarray(im.GetSpacing()) / 2)

    np.testing.assert_allclose(first_corner(out), first_corner(img), atol=1e-6)
    np.testing.assert_allclose(out.GetDirection(), img.GetDirection(), atol=1e-9)

    def centroid(im):  # LPS mm
        import SimpleITK as sitk

        a = sitk.GetArrayFromImage(im).transpose(2, 1, 0).astype(np.float64)
        ijk = np.stack(np.meshgrid(*[np.arange(s) for s in a.shape], indexing="ij"), -1).reshape(-1, 3)
        d = np.asarray(im.GetDirection()).reshape(3, 3) * np.asarray(im.GetSpacing())[None, :]
        phys = ijk @ d.T + np.asarray(im.GetOrigin())
        return (phys * a.reshape(-1, 1)).sum(0) / a.sum()

    np.testing.assert_allclose(centroid(out), centroid(img), atol=0.2)  # mm: the object did not move
    assert _coarsened(img, 0.5) is img  # nothing finer than 0.5 mm: used as it is
    assert _coarsened(img, 0.72) is img  # 0.7 vs 0.72 mm: not worth resampling
    with pytest.raises(InputError, match="moving_spacing_mm"):
        register_affine(Volume(blob, aff), Volume(blob, aff), moving_spacing_mm=-1.0)


def test_registration_of_the_clinical_flair_agrees_at_the_coarsened_and_own_resolution():
    """The default (the scan coarsened to half the template's spacing) lands within a millimetre of
    registering the 0.72×0.72×3 mm clinical FLAIR at its own resolution, and reports the same QC correlation."""
    from conftest import CLINICAL_FLAIR
    from CounterfactualGenLib.models import load_model, resolve_model

    m = load_model(resolve_model(None))
    tmpl, brain = m.template("image"), m.template("brain_mask").array > 0.5
    scan = read_volume(CLINICAL_FLAIR)
    own = register_affine(scan, tmpl, template_mask=brain, moving_spacing_mm=0.0)
    default = register_affine(scan, tmpl, template_mask=brain)
    pts = np.c_[np.argwhere(brain), np.ones(int(brain.sum()))] @ tmpl.affine_ras.T
    d = np.linalg.norm((pts @ default.model_to_source_world.T - pts @ own.model_to_source_world.T)[:, :3], axis=1)
    assert d.mean() < 1.0 and d.max() < 2.0, (d.mean(), d.max())
    assert default.correlation == pytest.approx(own.correlation, abs=0.02)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.7, 0.7, 3.0)])
def test_harmonic_interpolation_reproduces_a_linear_field_and_keeps_the_rest(spacing):
    """A linear field is harmonic, so filling a hole in it must give it back exactly (any voxel size);
    what lies outside the mask is returned as it was, and a part with no boundary gets 0."""
    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in (20, 18, 12)], indexing="ij")
    field = 2.0 * i - 0.5 * j + 3.0 * k + 7.0
    mask = np.zeros(field.shape, bool)
    mask[5:12, 4:9, 3:8] = True  # a block inside
    mask[15:17, 10:16, 9:11] = True  # another, touching nothing else
    holes = np.where(mask, 1e6, field)  # what the mask hides must not matter
    out = harmonic_interpolate(holes, mask, spacing)
    np.testing.assert_allclose(out[mask], field[mask], atol=1e-4)
    np.testing.assert_array_equal(out[~mask], field[~mask])
    every = harmonic_interpolate(field, np.ones(field.shape, bool), spacing)
    np.testing.assert_allclose(every, 0.0, atol=1e-6)
    with pytest.raises(InputError, match="mask shape"):
        harmonic_interpolate(field, mask[:-1], spacing)


def test_registration_of_a_real_scan_is_bit_reproducible():
    """The same scan and seed give the same transform to the last bit (ITK's multithreaded sums had moved
    it by ~1e-6 between runs, and with it a few hundred voxels of the same edit), and the caller's ITK
    thread setting is restored."""
    import SimpleITK as sitk

    from CounterfactualGenLib.geometry import register_affine
    from CounterfactualGenLib.models import load_model, resolve_model

    model = load_model(resolve_model("cfg-wdm-flair-5mm-cpu"))
    scan = read_volume(Path(__file__).resolve().parents[1] / "Resources" / "SampleData"
                       / "longitudinal_patient04_study1_FLAIR.nii.gz")
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    a, b = (register_affine(scan, model.template("image"), template_mask=model.template("brain_mask").array > 0.5)
            for _ in range(2))
    assert np.array_equal(a.model_to_source_world, b.model_to_source_world) and a.metric_value == b.metric_value
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == threads
