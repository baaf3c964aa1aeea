"""Volume I/O: exact geometry through every format, provenance, bad input, inputs untouched."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import file_sha256, oblique_affine
from CounterfactualGenLib.errors import InputError
from CounterfactualGenLib.volume import (
    SYNTHETIC_KEY,
    Provenance,
    Volume,
    read_volume,
    sidecar_path,
    validate_volume,
    write_volume,
)

FORMATS = ["nii", "nii.gz", "nrrd"]


def _vol(rng, shape=(11, 9, 7), spacing=(0.72, 0.72, 3.0)) -> Volume:
    return Volume(rng.normal(100, 20, shape).astype(np.float32), oblique_affine(rng, spacing))


@pytest.mark.parametrize("fmt", FORMATS)
def test_geometry_round_trip_oblique_anisotropic(tmp_path, fmt):
    rng = np.random.default_rng(1)
    v = _vol(rng)
    p = write_volume(v, tmp_path / f"v.{fmt}")
    w = read_volume(p)
    assert w.shape == v.shape
    np.testing.assert_allclose(w.affine_ras, v.affine_ras, atol=1e-6)
    np.testing.assert_array_equal(w.array, v.array)
    np.testing.assert_allclose(w.spacing_mm, (0.72, 0.72, 3.0), rtol=1e-6)


@pytest.mark.parametrize("src,dst", [(a, b) for a in FORMATS for b in FORMATS if a != b])
def test_cross_format_conversion_keeps_geometry(tmp_path, src, dst):
    rng = np.random.default_rng(2)
    v = _vol(rng)
    w = read_volume(write_volume(read_volume(write_volume(v, tmp_path / f"a.{src}")), tmp_path / f"b.{dst}"))
    np.testing.assert_allclose(w.affine_ras, v.affine_ras, atol=1e-6)
    np.testing.assert_array_equal(w.array, v.array)


def test_nrrd_is_stored_lps_and_read_as_ras(tmp_path):
    """A file written by ITK (LPS) with a known origin reads back with the RAS sign flip."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.uint16).reshape(6, 5, 4))  # (k, j, i)
    img.SetSpacing((0.5, 0.75, 3.0))
    img.SetOrigin((10.0, 20.0, 30.0))  # LPS
    sitk.WriteImage(img, str(tmp_path / "lps.nrrd"))
    v = read_volume(tmp_path / "lps.nrrd")
    assert v.shape == (4, 5, 6) and v.source_dtype == "uint16"
    np.testing.assert_allclose(v.affine_ras, [[-0.5, 0, 0, -10], [0, -0.75, 0, -20], [0, 0, 3, 30], [0, 0, 0, 1]])
    assert v.array[1, 2, 3] == sitk.GetArrayViewFromImage(img)[3, 2, 1]


def test_real_clinical_flair_geometry(clinical_flair_path, tmp_path):
    import nibabel as nib

    ref = nib.load(str(clinical_flair_path))
    v = read_volume(clinical_flair_path)
    assert v.shape == (320, 320, 48) and v.source_dtype == "uint16"
    np.testing.assert_allclose(v.affine_ras, ref.affine)
    np.testing.assert_allclose(v.spacing_mm, (0.71875, 0.71875, 3.0), atol=1e-5)
    for fmt in FORMATS:
        w = read_volume(write_volume(v, tmp_path / f"c.{fmt}", dtype=np.uint16))
        np.testing.assert_allclose(w.affine_ras, v.affine_ras, atol=1e-5)
        np.testing.assert_array_equal(w.array, v.array)
        assert w.source_dtype == "uint16"


@pytest.mark.parametrize("fmt", FORMATS)
def test_provenance_marks_synthetic(tmp_path, fmt):
    rng = np.random.default_rng(3)
    prov = Provenance("tiny-wdm", ["Subject has no lesions.", "Subject has high lesion load."], 7, "ab" * 32,
                      kind="counterfactual", extra={"strength": 0.6})
    p = write_volume(_vol(rng), tmp_path / f"s.{fmt}", provenance=prov)
    w = read_volume(p)
    assert w.is_synthetic and w.metadata[SYNTHETIC_KEY] == "true"
    assert json.loads(w.metadata["CounterfactualGen.Prompts"]) == list(prov.prompts)
    assert w.metadata["CounterfactualGen.Seed"] == "7"
    assert w.metadata["CounterfactualGen.SourceSHA256"] == "ab" * 32
    assert w.metadata["CounterfactualGen.Model"] == "tiny-wdm"
    if fmt.startswith("nii"):
        import nibabel as nib

        assert nib.load(str(p)).header["descrip"].tobytes().startswith(b"SYNTHETIC")
        assert json.loads(sidecar_path(p).read_text())[SYNTHETIC_KEY] == "true"
    else:
        assert b"CounterfactualGen.Synthetic:=true" in p.read_bytes()[:4096]


def test_write_is_atomic_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    import nibabel as nib

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(nib, "save", boom)
    with pytest.raises(RuntimeError):
        write_volume(_vol(np.random.default_rng(0)), tmp_path / "x.nii.gz", provenance=Provenance("m"))
    assert os.listdir(tmp_path) == []


def test_integer_output_is_rounded_and_clipped(tmp_path):
    v = Volume(np.array([-5.0, 0.4, 0.6, 70000.0] * 2, np.float32).reshape(2, 2, 2), np.eye(4))
    w = read_volume(write_volume(v, tmp_path / "i.nrrd", dtype=np.uint16), validate=False)
    assert sorted(set(w.array.ravel().tolist())) == [0.0, 1.0, 65535.0]


# -- bad input ------------------------------------------------------------------------
def _nifti(tmp_path, arr, affine=np.eye(4), name="bad.nii.gz"):
    import nibabel as nib

    p = tmp_path / name
    nib.save(nib.Nifti1Image(arr, affine), str(p))
    return p


@pytest.mark.parametrize(
    "arr,msg",
    [
        (np.zeros((4, 4, 4, 3), np.float32), "3D"),
        (np.zeros((16, 16), np.float32), "3D"),
        (np.full((4, 4, 4), np.nan, np.float32), "NaN"),
        (np.array([np.inf] + [1.0] * 63, np.float32).reshape(4, 4, 4), "NaN/Inf"),
        (np.full((4, 4, 4), 7, np.float32), "constant"),
        (np.zeros((1, 4, 4), np.float32) + np.arange(4), "flat"),
    ],
)
def test_bad_values_are_refused(tmp_path, arr, msg):
    p = _nifti(tmp_path, arr)
    with pytest.raises(InputError, match=msg):
        read_volume(p)


def test_singular_affine_refused(tmp_path):
    import nibabel as nib

    # nibabel refuses to *make* such a header, so patch the raw sform rows like a broken scanner export.
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((4, 4, 4))
    hdr.set_data_dtype(np.float32)
    hdr["sform_code"], hdr["qform_code"] = 1, 0
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]
    p = tmp_path / "singular.nii"
    with open(p, "wb") as f:
        hdr.write_to(f)
        f.write(b"\0" * (int(hdr["vox_offset"]) - f.tell()))
        f.write(np.random.rand(4, 4, 4).astype(np.float32).tobytes(order="F"))
    with pytest.raises(InputError, match="singular"):
        read_volume(p)


def test_voxel_budget_checked_from_header(tmp_path):
    p = _nifti(tmp_path, np.random.rand(20, 20, 20).astype(np.float32))
    with pytest.raises(InputError, match="over the limit"):
        read_volume(p, max_voxels=1000)


def test_singleton_fourth_axis_reads_as_3d(tmp_path):
    p = _nifti(tmp_path, np.random.rand(5, 6, 7, 1).astype(np.float32))
    assert read_volume(p).shape == (5, 6, 7)


@pytest.mark.parametrize("fmt", ["nii.gz", "nrrd", "nii"])
def test_truncated_file_is_refused(tmp_path, fmt):
    rng = np.random.default_rng(4)
    p = write_volume(_vol(rng, shape=(40, 40, 20)), tmp_path / f"t.{fmt}")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated|corrupt|not a readable"):
        read_volume(p)


@pytest.mark.parametrize(
    "name,content,msg",
    [
        ("garbage.nii.gz", gzip.compress(b"hello world" * 10), "truncated|corrupt|not a readable"),
        ("garbage.nrrd", b"NRRD0004\nthis is not a header\n", "not a readable|corrupt"),
        ("empty.nii", b"", "empty"),
        ("scan.dcm", b"DICM", "Unsupported"),
    ],
)
def test_corrupt_and_unsupported_files(tmp_path, name, content, msg):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(InputError, match=msg):
        read_volume(p)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_volume(tmp_path / "nope.nii.gz")


def test_reading_never_modifies_the_input(clinical_flair_path, tmp_path):
    before = file_sha256(clinical_flair_path)
    v = read_volume(clinical_flair_path)
    v.array += 1  # mutate the in-memory copy
    write_volume(v, tmp_path / "copy.nii.gz")
    assert file_sha256(clinical_flair_path) == before


def test_validate_refuses_sheared_nrrd_write(tmp_path):
    a = np.eye(4)
    a[0, 1] = 0.5  # shear
    v = Volume(np.random.rand(4, 4, 4), a)
    validate_volume(v)
    with pytest.raises(InputError, match="sheared"):
        write_volume(v, tmp_path / "s.nrrd")
    w = read_volume(write_volume(v, tmp_path / "s.nii.gz"))  # NIfTI's sform stores shear
    np.testing.assert_allclose(w.affine_ras, a, atol=1e-6)


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_outputs_get_the_users_umask_not_the_temp_files_0600(tmp_path):
    """Atomic writes go through mkstemp/mkdtemp (0600/0700); the written files and model folders must get
    what a plain write gives (0644/0755 under umask 022), or nobody else on a shared machine can read them."""
    import stat

    from CounterfactualGenLib.volume import umask_mode

    old = os.umask(0o022)
    try:
        assert umask_mode() == 0o644 and umask_mode(directory=True) == 0o755
        for name in ("v.nii.gz", "v.nrrd"):
            write_volume(Volume(np.ones((4, 4, 4), np.float32), np.eye(4)), tmp_path / name)
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
        from tiny_model import build_tiny_model

        folder = build_tiny_model(tmp_path / "model", with_templates=True)
        assert stat.S_IMODE(Path(folder).stat().st_mode) == 0o755
        assert all(stat.S_IMODE(f.stat().st_mode) == 0o644 for f in Path(folder).iterdir())
    finally:
        os.umask(old)


def test_nifti_space_codes_are_kept_on_the_scans_grid(tmp_path):
    """A scan whose header says 'aligned to another scan' (2) or MNI (4) keeps that in what is written
    on its grid; an unknown code (0) is written as scanner (1), since the affine is always meant."""
    import nibabel as nib

    from CounterfactualGenLib.volume import read_volume, write_volume

    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), affine)
    img.set_sform(affine, code=4)
    img.set_qform(affine, code=2)
    nib.save(img, str(tmp_path / "in.nii.gz"))
    scan = read_volume(tmp_path / "in.nii.gz", validate=False)
    assert scan.nifti_codes == (4, 2)
    out = nib.load(str(write_volume(scan.with_array(scan.array + 1), tmp_path / "out.nii.gz")))
    assert (int(out.header["sform_code"]), int(out.header["qform_code"])) == (4, 2)
    out = nib.load(str(write_volume(scan, tmp_path / "zero.nii.gz", nifti_codes=(0, 0))))
    assert (int(out.header["sform_code"]), int(out.header["qform_code"])) == (1, 1)
    np.testing.assert_allclose(out.affine, affine)
