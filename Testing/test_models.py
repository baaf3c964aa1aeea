"""Model format: save → load round trip; refusal of corrupt, truncated, mismatched models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tiny_model import build_tiny_model, tiny_encoder, tiny_spec
from CounterfactualGenLib.errors import ModelError
from CounterfactualGenLib.models import load_model, load_spec, resolve_model


@pytest.fixture
def tiny(tmp_path):
    return build_tiny_model(tmp_path / "tiny")


def test_round_trip_is_exact(tiny):
    m1 = load_model(tiny)
    m2 = load_model(tiny)
    for (k1, v1), (k2, v2) in zip(m1.denoiser.state_dict().items(), m2.denoiser.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    spec = load_spec(tiny)
    assert spec.grid.shape == (16, 16, 16) and spec.text_encoder["id"] == "tiny-hash"
    assert all(len(f["sha256"]) == 64 for f in spec.files)
    assert not any(p.suffix in (".pt", ".pth", ".bin", ".ckpt") for p in tiny.iterdir())


def test_saved_weights_reproduce_predictions(tmp_path):
    from CounterfactualGenLib.models import DiffusionModel, save_model
    from CounterfactualGenLib.nets.unet import build_denoiser

    spec = tiny_spec()
    torch.manual_seed(3)
    model = DiffusionModel(spec, build_denoiser(spec.denoiser))
    x = torch.randn(1, 8, 8, 8, 8)
    ctx = tiny_encoder().encode(["Subject has high lesion load."]).tokens
    t = torch.tensor([0.5])
    with torch.no_grad():
        ref = model.denoiser(x, t, ctx)
        save_model(model, tmp_path / "m")
        out = load_model(tmp_path / "m").denoiser(x, t, ctx)
    torch.testing.assert_close(out, ref)


def test_tampered_weights_fail_hash(tiny):
    f = next(tiny.glob("denoiser*.safetensors"))
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="SHA-256"):
        load_model(tiny)


def test_truncated_weights_are_named(tiny):
    f = next(tiny.glob("denoiser*.safetensors"))
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ModelError, match="truncated"):
        load_model(tiny)


def test_missing_weight_file(tiny):
    next(tiny.glob("denoiser*.safetensors")).unlink()
    with pytest.raises(ModelError, match="missing"):
        load_model(tiny)


def test_architecture_mismatch_is_clear(tiny):
    spec = json.loads((tiny / "model.json").read_text())
    spec["denoiser"]["channels"] = [8, 16, 32]
    (tiny / "model.json").write_text(json.dumps(spec))
    with pytest.raises(ModelError, match="do not match the architecture"):
        load_model(tiny)


def test_wrong_text_encoder_is_refused(tiny):
    from CounterfactualGenLib.text import load_text_encoder

    with pytest.raises(ModelError, match="trained with text encoder"):
        load_model(tiny, text_encoder=load_text_encoder("tiny-hash", dim=16, max_tokens=16))


def test_pickle_files_are_never_loaded(tiny):
    """Even if someone drops a pickle next to the weights, loading reads only safetensors."""
    (tiny / "denoiser.pt").write_bytes(b"\x80\x04not really a pickle")
    load_model(tiny)


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": "something-else"}),
                                     json.dumps({"format": "counterfactualgen-model", "format_version": 1})])
def test_bad_specs(tmp_path, content):
    (tmp_path / "model.json").write_text(content)
    with pytest.raises(ModelError):
        load_spec(tmp_path)


def test_newer_format_is_refused(tiny):
    spec = json.loads((tiny / "model.json").read_text())
    spec["format_version"] = 99
    (tiny / "model.json").write_text(json.dumps(spec))
    with pytest.raises(ModelError, match="newer"):
        load_spec(tiny)


def test_resolve_model(tiny, tmp_path):
    assert resolve_model(str(tiny)) == tiny
    (tmp_path / "Models").mkdir()
    (tmp_path / "Models.json").write_text(json.dumps({"default": "t", "models": [{"id": "t", "path": "t"}]}))
    with pytest.raises(ModelError, match="not installed"):
        resolve_model(None, resources=tmp_path)
    with pytest.raises(ModelError, match="No model folder"):
        resolve_model("nope", resources=tmp_path)


def test_large_state_is_split_into_parts(tmp_path, monkeypatch):
    import CounterfactualGenLib.models as models

    monkeypatch.setattr(models, "MAX_FILE_BYTES", 20_000)
    folder = build_tiny_model(tmp_path / "split")
    parts = sorted(p.name for p in folder.glob("denoiser-*-of-*.safetensors"))
    assert len(parts) > 1
    m = load_model(folder)
    assert m.parameter_count() > 0


def test_wdm_encode_decode_is_exact(tiny):
    m = load_model(tiny)
    x = torch.randn(2, 1, 16, 16, 16)
    z = m.encode(x)
    assert z.shape == m.diffusion_shape(2)
    torch.testing.assert_close(m.decode(z), x, atol=1e-5, rtol=0)
    # white noise stays white under the orthonormal DWT; the low band is then scaled by 1/3 (WDM)
    assert np.isclose(float(z[:, 0].std() * 3), float(x.std()), rtol=0.1)
