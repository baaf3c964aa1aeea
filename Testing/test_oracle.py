"""The evaluation oracle: format round trip, tamper detection, input checks, a tiny training run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from CounterfactualGenLib.errors import InputError, ModelError
from CounterfactualGenLib.evaluation.oracle import (Oracle, OracleSpec, apply_calibration, fit_calibration, load_oracle,
                                                    save_oracle)
from CounterfactualGenLib.geometry import ModelGrid

ROOT = Path(__file__).resolve().parents[1]
GRID = ModelGrid((16, 16, 16), 8.0, (0.0, -18.0, 8.0))
SMALL = {"channels": [4, 8, 16], "head_hidden": 8, "norm_groups": 4}


def _images(n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, *GRID.shape)).astype(np.float32)


@pytest.fixture
def saved(tmp_path) -> Path:
    import torch

    torch.manual_seed(0)
    return save_oracle(Oracle(OracleSpec(id="t", grid=GRID, architecture=SMALL)), tmp_path / "oracle")


def test_predict_shapes_and_lesion_ml_is_sum_of_probabilities():
    oracle = Oracle(OracleSpec(id="t", grid=GRID, architecture=SMALL))
    out = oracle.predict(_images(3))
    assert out["lesion_prob"].shape == (3, *GRID.shape)
    assert out["diagnosis_probs"].shape == (3, 3) and np.allclose(out["diagnosis_probs"].sum(1), 1, atol=1e-5)
    assert len(out["diagnosis"]) == 3 and set(out["diagnosis"]) <= {"CN", "MCI", "AD"}
    assert out["features"].shape == (3, oracle.n_features)
    voxel_ml = 8.0**3 / 1000
    assert np.allclose(out["lesion_ml_seg"], out["lesion_prob"].reshape(3, -1).sum(1) * voxel_ml, rtol=1e-5)
    assert np.array_equal(out["lesion_ml"], out["lesion_ml_seg"])  # lesion_ml_from="segmentation" (default)
    assert out["lesion_ml_volume_head"].shape == (3,) and (out["lesion_ml_volume_head"] >= 0).all()
    head = Oracle(OracleSpec(id="t", grid=GRID, architecture=SMALL, lesion_ml_from="volume_head"), net=oracle.net)
    assert np.array_equal(head.predict(_images(3))["lesion_ml"], out["lesion_ml_volume_head"])
    no_head = Oracle(OracleSpec(id="t", grid=GRID, architecture={**SMALL, "volume_head": False})).predict(_images(2))
    assert np.array_equal(no_head["lesion_ml"], no_head["lesion_ml_seg"])  # without the head: the segmentation sum
    assert oracle.predict(_images(1)[0])["lesion_prob"].shape == (1, *GRID.shape)  # a single volume is accepted


def test_predict_refuses_wrong_grid_and_nan():
    oracle = Oracle(OracleSpec(id="t", grid=GRID, architecture=SMALL))
    with pytest.raises(InputError, match="Resample"):
        oracle.predict(np.zeros((1, 16, 16, 8), np.float32))
    bad = _images(1)
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        oracle.predict(bad)


def test_save_load_round_trip_is_exact(saved):
    spec = json.loads((saved / "oracle.json").read_text())
    assert spec["format"] == "counterfactualgen-oracle" and spec["files"][0]["sha256"]
    loaded = load_oracle(saved)
    again = load_oracle(saved)
    x = _images(2, seed=1)
    a, b = loaded.predict(x), again.predict(x)
    assert np.array_equal(a["lesion_prob"], b["lesion_prob"]) and np.array_equal(a["features"], b["features"])
    assert loaded.grid == GRID and loaded.spec.architecture["channels"] == SMALL["channels"]


def test_round_trip_matches_the_saved_network(tmp_path):
    import torch

    torch.manual_seed(3)
    o = Oracle(OracleSpec(id="t", grid=GRID, architecture=SMALL))
    x = _images(2, seed=2)
    before = o.predict(x)
    after = load_oracle(save_oracle(o, tmp_path / "o")).predict(x)
    assert np.allclose(before["lesion_prob"], after["lesion_prob"], atol=1e-6)


def test_tampered_weights_are_refused(saved):
    f = saved / "oracle.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="SHA-256"):
        load_oracle(saved)


def test_missing_or_mismatched_files_are_refused(saved, tmp_path):
    spec = json.loads((saved / "oracle.json").read_text())
    spec["architecture"]["channels"] = [4, 8, 32]  # weights no longer fit the architecture
    (saved / "oracle.json").write_text(json.dumps(spec))
    with pytest.raises(ModelError, match="do not match"):
        load_oracle(saved)
    (saved / "oracle.safetensors").unlink()
    with pytest.raises(ModelError, match="missing"):
        load_oracle(saved)
    with pytest.raises(ModelError, match="oracle.json"):
        load_oracle(tmp_path / "nowhere")
    spec["format"] = "counterfactualgen-model"
    (saved / "oracle.json").write_text(json.dumps(spec))
    with pytest.raises(ModelError, match="Not a CounterfactualGen oracle"):
        load_oracle(saved)


def _train_module():
    spec = importlib.util.spec_from_file_location("train_oracle", ROOT / "Training" / "train_oracle.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_oracle_card_names_the_brains_it_was_trained_on():
    mod = _train_module()
    assert mod._anatomy_words({"data": {}}) == "MNI ICBM152 2009a anatomy"
    words = mod._anatomy_words({"data": {"anatomies": ["icbm152", "colin27", "clinical04"]}})
    assert words.startswith("anatomy of 3 brains, MNI ICBM152 2009a, Colin27 and clinical MS patient 04")


def test_tiny_training_run_writes_a_loadable_oracle_with_metrics(tmp_path):
    mod = _train_module()
    cfg = json.loads(json.dumps(mod.DEFAULTS))
    cfg.update({"grid": {"shape": [16, 16, 16], "spacing_mm": 8.0, "center_ras": [0.0, -18.0, 8.0]},
                "architecture": SMALL,
                "data": {"train_subjects": 6, "val_subjects": 4, "calibration_subjects": 8, "pool_workers": 1},
                "iterations": 3, "batch_size": 2, "log_every": 1})
    folder = mod.train(cfg, tmp_path / "run")
    oracle = load_oracle(folder)
    assert (folder / "ORACLE_CARD.md").exists()
    m = oracle.spec.metrics
    for key in ("lesion_ml_mae", "dice_mean", "diagnosis_accuracy", "lesion_class_accuracy"):
        assert key in m
    assert 0.0 <= m["diagnosis_accuracy"] <= 1.0 and m["lesion_ml_mae"] >= 0
    assert oracle.spec.training["iterations"] == 3
    assert oracle.spec.lesion_ml_calibration is not None and m["calibration"]["subjects"] == 8
    pool = np.load(next((tmp_path / "run").glob("pool_val_*.npz")))
    out = oracle.predict(pool["images"].astype(np.float32))
    assert out["lesion_prob"].shape == (4, 16, 16, 16) and len(out["diagnosis"]) == 4
    # the pool holds the engine's exact truth, in model units
    assert pool["images"].min() >= -1.0 and set(np.unique(pool["lesion"])) <= {0, 1}
    # a second stage continues from the first oracle's weights; the card says so; a mismatch is refused
    cfg2 = {**cfg, "init_from": str(folder), "iterations": 1, "lr": 0.0}
    second = load_oracle(mod.train(cfg2, tmp_path / "run2"))
    for k, v in oracle.net.state_dict().items():
        assert torch.equal(second.net.state_dict()[k], v), k  # lr 0: exactly the first oracle
    assert second.spec.training["init_from"]["iterations"] == 3
    assert "initialised from" in (tmp_path / "run2" / "oracle" / "ORACLE_CARD.md").read_text()
    with pytest.raises(Exception, match="init_from"):
        mod.train({**cfg2, "architecture": {**SMALL, "channels": [4, 8]}}, tmp_path / "run3")
    # re-calibration on a larger pool (the same seeds, extended): recorded in spec, config and card
    small = np.load(next((tmp_path / "run").glob("pool_cal_*.npz")))
    mod.revalidate(folder, tmp_path / "run", calibration_subjects=12)
    recal = load_oracle(folder)
    assert recal.spec.metrics["calibration"]["subjects"] == 12
    assert recal.spec.training["config"]["data"]["calibration_subjects"] == 12
    assert recal.spec.training["recalibrated"] == {"calibration_subjects": 12}
    big = np.load(next((tmp_path / "run").glob("pool_cal_*.npz")))
    np.testing.assert_array_equal(big["images"][:8], small["images"])  # the larger pool extends the smaller
    assert "--calibration-subjects 12" in (folder / "ORACLE_CARD.md").read_text()
    for k, v in oracle.net.state_dict().items():
        assert torch.equal(recal.net.state_dict()[k], v), k  # weights untouched
    with pytest.raises(InputError, match="at least 8"):
        mod.revalidate(folder, tmp_path / "run", calibration_subjects=3)


def test_oracle_training_never_replaces_a_trained_oracle_and_checks_its_config(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("train_oracle_main", ROOT / "Training" / "train_oracle.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    (tmp_path / "run" / "oracle").mkdir(parents=True)
    (tmp_path / "run" / "oracle" / "oracle.json").write_text("{}")
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"iterations": 1}))
    with pytest.raises(SystemExit) as info:
        mod.main(["--config", str(cfg), "--out", str(tmp_path / "run")])
    assert info.value.code == 2 and "already holds a trained oracle" in capsys.readouterr().err
    assert (tmp_path / "run" / "oracle" / "oracle.json").read_text() == "{}"
    cfg.write_text(json.dumps({"iteratons": 1}))
    with pytest.raises(SystemExit):
        mod.main(["--config", str(cfg), "--out", str(tmp_path / "new")])
    assert "did you mean 'iterations'" in capsys.readouterr().err and not (tmp_path / "new").exists()
    cfg.write_text(json.dumps({"data": {"anatomies": ["mni305"]}}))
    with pytest.raises(SystemExit):
        mod.main(["--config", str(cfg), "--out", str(tmp_path / "new")])
    assert "data.anatomies must be" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_oracle_pools_from_both_anatomies_are_cached_apart(tmp_path):
    """data.anatomies: subjects from ICBM152 and Colin27; their cache does not replace the ICBM152 one."""
    mod = _train_module()
    from CounterfactualGenLib.geometry import ModelGrid

    grid = ModelGrid.from_dict({"shape": [16, 16, 16], "spacing_mm": 8.0, "center_ras": [0.0, -18.0, 8.0]})
    icbm = mod.validation_pool(grid, "FLAIR", 0, 4, 1, tmp_path)
    both = mod.validation_pool(grid, "FLAIR", 0, 4, 1, tmp_path, ("icbm152", "colin27"))
    assert sorted(p.name for p in tmp_path.glob("pool_val_*.npz")) == ["pool_val_0_16x16x16.npz",
                                                                      "pool_val_0_16x16x16_icbm152+colin27.npz"]
    assert not np.array_equal(icbm["images"], both["images"])
    np.testing.assert_array_equal(mod.validation_pool(grid, "FLAIR", 0, 4, 1, tmp_path)["images"], icbm["images"])


def test_resolve_oracle_takes_a_folder_or_a_registered_id(tmp_path):
    """--oracle takes the id Resources/Models.json registers, as --model does; a model's id is not an oracle."""
    from CounterfactualGenLib.errors import ModelError
    from CounterfactualGenLib.evaluation.oracle import resolve_oracle

    (tmp_path / "Models" / "o1").mkdir(parents=True)
    (tmp_path / "Models" / "o1" / "oracle.json").write_text("{}")
    (tmp_path / "Models.json").write_text(json.dumps({"models": [
        {"id": "my-oracle", "kind": "oracle", "path": "o1"}, {"id": "my-model", "path": "m1"}]}))
    assert resolve_oracle("my-oracle", resources=tmp_path) == tmp_path / "Models" / "o1"
    assert resolve_oracle(str(tmp_path / "Models" / "o1"), resources=tmp_path) == tmp_path / "Models" / "o1"
    with pytest.raises(ModelError, match=r"Registered oracles: \['my-oracle'\]"):
        resolve_oracle("my-model", resources=tmp_path)
    with pytest.raises(ModelError, match="No oracle at"):
        resolve_oracle(str(tmp_path), resources=tmp_path)  # a folder without oracle.json


@pytest.mark.skipif(not (ROOT / "Resources" / "Models" / "oracle-5mm" / "oracle.json").exists(),
                    reason="bundled oracle not present")
def test_bundled_oracle_loads_and_reads_engine_subjects():
    from CounterfactualGenLib.evaluation.oracle import resolve_oracle, to_model_units
    from CounterfactualGenLib.synth import SubjectSpec, lesion_load_series

    oracle = load_oracle(resolve_oracle(None))
    g = oracle.grid
    series = lesion_load_series(SubjectSpec(seed=11), ("none", "high"), shape=g.shape, spacing_mm=g.spacing_mm,
                                center_mm=g.center_ras)
    x = np.stack([to_model_units(s.image.array, s.brain_mask) for s in series])
    ml = oracle.predict(x)["lesion_ml"]
    assert ml[1] > ml[0] + 5.0  # a high lesion load reads far above its lesion-free twin


def test_calibration_recovers_a_monotone_bias_and_extrapolates_with_slope_one():
    rng = np.random.default_rng(0)
    true = rng.uniform(0, 40, 300)
    raw = 0.6 * true + 2.0  # an oracle that over-reads small and under-reads large loads
    cal = fit_calibration(raw, true, max_knots=32)
    assert len(cal["x"]) <= 32 and np.all(np.diff(cal["x"]) > 0) and np.all(np.diff(cal["y"]) >= 0)
    q = np.array([5.0, 10.0, 20.0])
    np.testing.assert_allclose(apply_calibration(q, cal), (q - 2.0) / 0.6, atol=0.8)
    far = cal["x"][-1] + 10.0
    assert apply_calibration(np.array([far]), cal)[0] == pytest.approx(cal["y"][-1] + 10.0)
    assert apply_calibration(np.array([-5.0]), cal)[0] >= 0.0
    np.testing.assert_array_equal(apply_calibration(q, None), q)
    with pytest.raises(InputError):
        fit_calibration(raw[:3], true[:3])


def test_calibration_is_saved_checked_and_applied(tmp_path):
    import torch

    torch.manual_seed(0)
    cal = {"x": [0.0, 10.0], "y": [0.0, 20.0]}
    o = Oracle(OracleSpec(id="t", grid=GRID, architecture=SMALL, lesion_ml_calibration=cal))
    folder = save_oracle(o, tmp_path / "o")
    back = load_oracle(folder)
    assert back.spec.lesion_ml_calibration == cal
    out = back.predict(_images(2))
    np.testing.assert_allclose(out["lesion_ml"], apply_calibration(out["lesion_ml_raw"], cal))
    assert not np.allclose(out["lesion_ml"], out["lesion_ml_raw"])
    with pytest.raises(ModelError, match="calibration"):
        OracleSpec(id="t", grid=GRID, architecture=SMALL, lesion_ml_calibration={"x": [1.0, 0.0], "y": [0.0, 1.0]})


def test_compare_oracles_reads_each_runs_own_validation_subjects_and_the_twins(tmp_path):
    """Training/compare_oracles.py measures every oracle on the same ground truth the runs held out."""
    spec = importlib.util.spec_from_file_location("compare_oracles", ROOT / "Training" / "compare_oracles.py")
    cmp_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cmp_mod)
    mod = _train_module()
    cfg = json.loads(json.dumps(mod.DEFAULTS))
    cfg.update({"grid": {"shape": [16, 16, 16], "spacing_mm": 8.0, "center_ras": [0.0, -18.0, 8.0]},
                "architecture": SMALL, "seed": 3, "weights_dtype": None,
                "data": {"train_subjects": 4, "val_subjects": 4, "calibration_subjects": 8, "pool_workers": 1},
                "iterations": 2, "batch_size": 2, "log_every": 1})
    trained = mod.train(cfg, tmp_path / "run")
    torch.manual_seed(1)
    untrained = save_oracle(Oracle(OracleSpec(id="u", grid=GRID, architecture=SMALL)), tmp_path / "untrained")
    c = cmp_mod.compare([trained, untrained], val_seeds=[3], val_subjects=4, twins=1, twin_seed=5000,
                        cache=tmp_path / "cmp")
    own = load_oracle(trained).spec.metrics
    got = c["oracles"][0]["validation"]["3"]
    # the seed-3 run's own held-out subjects: the comparison reproduces the run's validation figures
    assert got["lesion_ml_mae"] == pytest.approx(own["lesion_ml_mae"], abs=1e-3)
    assert got["lesion_class_accuracy"] == own["lesion_class_accuracy"] and got["n_subjects"] == 4
    assert c["oracles"][0]["trained_on_seed"] == 3
    for r in c["oracles"]:
        assert r["twins"]["n_subjects"] == 1 and 0.0 <= r["twins"]["lesion_accuracy"] <= 1.0
    md = cmp_mod.comparison_markdown(c)
    assert "seed-3 run" in md and "exact twins" in md and str(untrained) in md
    other = save_oracle(Oracle(OracleSpec(id="o", grid=ModelGrid((16, 16, 16), 6.0), architecture=SMALL)),
                        tmp_path / "other")
    with pytest.raises(InputError, match="another grid"):
        cmp_mod.compare([trained, other], val_seeds=[3], val_subjects=4, twins=0, twin_seed=5000, cache=tmp_path / "c2")
