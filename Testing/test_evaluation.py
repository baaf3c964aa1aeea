"""Evaluation metrics (properties) and the evaluate report: the metrics must respond.

A prompt-blind generator must score chance alignment and no monotone series; a
generator that returns the engine's exact twins, read by a perfect oracle (the engine's
own ground truth), must score 100 %; an identity edit must have perfect composition.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest

from CounterfactualGenLib.errors import InputError
from CounterfactualGenLib.evaluation import metrics as M
from CounterfactualGenLib.evaluation.report import (
    DIAGNOSIS_SERIES,
    LESION_SERIES,
    evaluate_generator,
    to_grid,
    write_report,
)
from CounterfactualGenLib.geometry import ModelGrid


def _vol(seed: int = 0, shape=(24, 24, 24)) -> np.ndarray:
    """A smooth-ish random volume in model units."""
    from scipy.ndimage import gaussian_filter

    x = gaussian_filter(np.random.default_rng(seed).normal(size=shape), 1.5)
    return (x / np.abs(x).max()).astype(np.float32)


def _noisy(x: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    return x + sigma * np.random.default_rng(seed).normal(size=x.shape).astype(np.float32)


# ---------------------------------------------------------------------------------
# image metrics
# ---------------------------------------------------------------------------------
def test_psnr_and_mae():
    x = _vol()
    assert M.psnr(x, x) == math.inf and M.mae(x, x) == 0.0
    assert M.psnr(x, _noisy(x, 0.01)) > M.psnr(x, _noisy(x, 0.1)) > 0
    y = x + 0.5
    assert M.mae(x, y) == pytest.approx(0.5)
    assert M.psnr(x, y) == pytest.approx(10 * math.log10(4 / 0.25))  # L = 2, MSE = 0.25
    mask = np.zeros(x.shape, bool)
    mask[:4] = True
    z = x.copy()
    z[~mask] += 1.0  # changes outside the mask are not counted
    assert M.psnr(x, z, mask) == math.inf and M.mae(x, z, mask) == 0.0
    with pytest.raises(InputError):
        M.psnr(x, x[:-1])


@pytest.mark.parametrize("fn", [M.ssim3d, M.ms_ssim3d])
def test_ssim_is_one_for_identical_and_decreases_with_noise(fn):
    x = _vol()
    assert fn(x, x) == pytest.approx(1.0, abs=1e-9)
    vals = [fn(x, _noisy(x, s)) for s in (0.02, 0.1, 0.3, 1.0)]
    assert all(a > b for a, b in zip(vals, vals[1:])), vals
    assert all(0.0 <= v <= 1.0 for v in vals)
    assert fn(x, _noisy(x, 0.1)) == pytest.approx(fn(_noisy(x, 0.1), x), abs=1e-9)  # symmetric


def test_ms_ssim_uses_the_scales_the_volume_allows():
    x = _vol(shape=(32, 40, 32))
    M.ms_ssim3d(x, x, scales=3)
    with pytest.raises(InputError, match="scales"):
        M.ms_ssim3d(x, x, scales=4)  # 32 / 8 = 4 voxels < kernel 7
    with pytest.raises(InputError):
        M.ssim3d(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)))


def test_dice_bounds():
    rng = np.random.default_rng(0)
    a, b = rng.random((10, 10, 10)) > 0.5, rng.random((10, 10, 10)) > 0.5
    assert 0.0 < M.dice(a, b) < 1.0
    assert M.dice(a, a) == 1.0 and M.dice(a, ~a) == 0.0
    assert M.dice(np.zeros((3, 3, 3)), np.zeros((3, 3, 3))) == 1.0
    assert M.dice(a, np.zeros_like(a)) == 0.0


def test_frechet_distance():
    f = np.random.default_rng(0).normal(size=(200, 6))
    assert M.frechet_distance(f, f) == pytest.approx(0.0, abs=1e-6)
    shifted = f + np.array([3.0, 0, 0, 0, 0, 0])
    assert M.frechet_distance(f, shifted) == pytest.approx(9.0, rel=1e-6)  # same covariance: ‖Δμ‖²
    # scaled by 2: ‖μ‖² + Tr Σ + Tr 4Σ − 2 Tr 2Σ = ‖μ‖² + Tr Σ
    expected = float(f.mean(0) @ f.mean(0) + np.trace(np.cov(f, rowvar=False)))
    assert M.frechet_distance(f, 2 * f) == pytest.approx(expected, rel=1e-9)
    # fewer samples than features (singular covariances, as with the evaluation's 24 references): finite, symmetric
    g = np.random.default_rng(1).normal(size=(24, 64))
    h = np.random.default_rng(2).normal(size=(30, 64)) * 1.5
    assert np.isfinite(M.frechet_distance(g, h))
    assert M.frechet_distance(g, h) == pytest.approx(M.frechet_distance(h, g), rel=1e-6)
    with pytest.raises(InputError):
        M.frechet_distance(f, f[:, :3])


def test_directional_score():
    src = np.zeros((2, 4))
    tgt = np.array([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]])
    s = M.directional_score(src, tgt, np.zeros(4), np.array([2.0, 0, 0, 0]))
    assert s.tolist() == pytest.approx([1.0, -1.0])
    with pytest.raises(InputError, match="projection"):
        M.directional_score(src, tgt, np.zeros(3), np.ones(3))
    # a text → feature map fitted on paired data carries a text direction into feature space
    rng = np.random.default_rng(0)
    t = rng.normal(size=(40, 3))
    true = rng.normal(size=(3, 4))
    proj = M.fit_text_to_feature_projection(t, t @ true, ridge=1e-6)
    assert M.directional_score(t[:1] @ true, t[1:2] @ true, t[0], t[1], projection=proj)[0] == pytest.approx(1.0)


def test_lesion_class_and_alignment():
    assert [M.lesion_class_of_ml(v) for v in (0.0, 0.3, 1.0, 5.0, 5.1, 15.0, 30.0)] == \
        ["none", "none", "minimal", "minimal", "moderate", "moderate", "high"]
    prompts = list(LESION_SERIES)
    assert M.alignment_accuracy(prompts, ["none", "minimal", "moderate", "high"], "lesion_load") == 1.0
    assert M.alignment_accuracy(prompts, ["high"] * 4, "lesion_load") == 0.25
    assert M.alignment_accuracy(list(DIAGNOSIS_SERIES), ["CN", "CN", "AD"], "diagnosis") == pytest.approx(2 / 3)
    with pytest.raises(InputError):
        M.alignment_accuracy(["A sunny day."], ["CN"], "diagnosis")


def test_seed_interval_covers_the_estimate_counts_seeds_as_clusters_and_stays_honest_at_100_percent():
    rng = np.random.default_rng(0)
    few = [list(rng.random(4) < 0.88) for _ in range(10)]
    many = [list(rng.random(4) < 0.88) for _ in range(200)]
    for hits in (few, many):
        p = np.mean([h for row in hits for h in row])
        lo, hi = M.seed_interval(hits)
        assert lo <= p <= hi
    assert np.diff(M.seed_interval(many)) < np.diff(M.seed_interval(few))
    # Wilson at the boundary: 40 of 40 is not certainty (textbook value 91.24 %)
    assert M.seed_interval([[True]] * 40) == [0.9124, 1.0]
    assert M.seed_interval([[False]] * 40) == [0.0, 0.0876]
    # members that always agree within a seed are 40 draws, not 160: the interval widens to the 40-seed one
    corr = [[bool(v)] * 4 for v in rng.random(40) < 0.5]
    indep = [list(rng.random(4) < 0.5) for _ in range(40)]
    assert np.diff(M.seed_interval(corr)) > 1.8 * np.diff(M.seed_interval(indep))
    np.testing.assert_allclose(M.seed_interval(corr), M.seed_interval([[r[0]] for r in corr]), atol=2e-3)
    for bad in ([], [[]]):
        with pytest.raises(InputError):
            M.seed_interval(bad)
    with pytest.raises(InputError):
        M.seed_interval(few, level=1.0)


def test_diversity_is_one_for_copies_and_lower_for_different_volumes():
    x = _vol(0)
    assert M.pairwise_ms_ssim([x, x, x]) == pytest.approx(1.0)
    assert M.pairwise_ms_ssim([_vol(0), _vol(1), _vol(2)]) < 0.5
    with pytest.raises(InputError):
        M.pairwise_ms_ssim([x])


def test_axioms_identity_edit_is_perfect_and_a_drifting_edit_is_not():
    x = _vol()
    identity = lambda v: v.copy()  # noqa: E731
    assert M.composition(identity, x, m=10) == 0.0
    assert M.reversibility(identity, identity, x) == 0.0
    drift = lambda v: v + 0.01  # noqa: E731 — a model that changes the image on a null edit
    assert M.composition(drift, x, m=1) == pytest.approx(0.01, rel=1e-3)
    assert M.composition(drift, x, m=10) == pytest.approx(0.1, rel=1e-3)  # errors accumulate
    add, sub = (lambda v: v + 0.2), (lambda v: v - 0.2)
    assert M.reversibility(add, sub, x) == pytest.approx(0.0, abs=1e-6)
    assert M.reversibility(add, identity, x) == pytest.approx(0.2, rel=1e-3)
    assert M.effectiveness(["CN", "AD"], ["CN", "MCI"]) == 0.5
    with pytest.raises(InputError):
        M.composition(identity, x, m=0)


# ---------------------------------------------------------------------------------
# the metrics respond: fake generators read by a perfect oracle
# ---------------------------------------------------------------------------------
TEST_GRID = ModelGrid((20, 24, 20), 8.0, (0.0, -18.0, 8.0))


class TruthOracle:
    """A perfect oracle: the engine's own ground truth, looked up by the image's bytes."""

    def __init__(self, grid: ModelGrid) -> None:
        self.grid = grid
        self.table: dict[str, dict] = {}

    @staticmethod
    def key(img: np.ndarray) -> str:
        return hashlib.sha1(np.ascontiguousarray(img, np.float32).tobytes()).hexdigest()

    def register(self, img: np.ndarray, attributes: dict) -> None:
        self.table[self.key(img)] = attributes

    def predict(self, images: np.ndarray) -> dict:
        attrs = [self.table[self.key(im)] for im in images]
        return {"lesion_ml": np.array([a["lesion_ml"] for a in attrs]),
                "diagnosis": [a["diagnosis"] for a in attrs],
                "features": np.array([[a["lesion_ml"], a["atrophy"], a["ventricle_ml"]] for a in attrs])}


def _engine_image(subject) -> np.ndarray:
    from CounterfactualGenLib.evaluation.oracle import to_model_units

    return to_model_units(subject.image.array, subject.brain_mask)


def _twin_generator(oracle: TruthOracle):
    """Returns the exact engine twin each prompt asks for (a perfect counterfactual model)."""
    from CounterfactualGenLib.synth import SubjectSpec, make_twin
    from CounterfactualGenLib.text.prompts import classify_prompt

    g = oracle.grid

    def generate(prompts, seed):
        spec = SubjectSpec(seed=seed, atrophy=0.5)
        out = []
        for p in prompts:
            c = classify_prompt(p)
            s = make_twin(spec, shape=g.shape, spacing_mm=g.spacing_mm, center_mm=g.center_ras,
                          lesion_class=c["lesion_load"], diagnosis=c["diagnosis"])
            img = _engine_image(s)
            oracle.register(img, s.attributes)
            out.append(img)
        return np.stack(out)

    return generate


def _blind_generator(oracle: TruthOracle):
    """Ignores the prompt: every member of a series is the same random subject."""
    from CounterfactualGenLib.synth import make_subject, random_spec

    g = oracle.grid

    def generate(prompts, seed):
        s = make_subject(random_spec(seed), shape=g.shape, spacing_mm=g.spacing_mm, center_mm=g.center_ras)
        img = _engine_image(s)
        oracle.register(img, s.attributes)
        return np.stack([img] * len(prompts))

    return generate


def test_exact_twins_with_a_perfect_oracle_score_100_percent():
    oracle = TruthOracle(TEST_GRID)
    r = evaluate_generator(_twin_generator(oracle), oracle, seeds=[1, 2, 3])
    assert r["lesion_monotone_fraction"] == 1.0 and r["lesion_monotone_with_none_fraction"] == 1.0
    assert r["alignment"]["lesion_accuracy"] == 1.0 and r["alignment"]["diagnosis_accuracy"] == 1.0
    # twins share anatomy and noise: members of a series are very similar, subjects across seeds are not
    assert r["subject_ms_ssim"]["lesion_series"] > r["diversity_pairwise_ms_ssim"]["value"]
    assert r["n_volumes"] == 21 and len(r["per_seed"]) == 3


def test_diversity_compares_only_the_first_seeds(monkeypatch):
    """Diversity is quadratic in the seeds, so it uses the first DIVERSITY_SEEDS of them (and says how many)."""
    import CounterfactualGenLib.evaluation.report as report
    from CounterfactualGenLib.evaluation.metrics import pairwise_ms_ssim
    from CounterfactualGenLib.evaluation.report import LESION_SERIES

    oracle = TruthOracle(TEST_GRID)
    gen = _twin_generator(oracle)
    monkeypatch.setattr(report, "DIVERSITY_SEEDS", 2)
    r = evaluate_generator(gen, oracle, seeds=[1, 2, 3])
    d = r["diversity_pairwise_ms_ssim"]
    assert d["n_seeds"] == 2 and r["n_seeds"] == 3
    first_two = [gen(LESION_SERIES, seed)[2] for seed in (1, 2)]
    assert d["value"] == pytest.approx(pairwise_ms_ssim(first_two), abs=1e-5)
    all_three = first_two + [gen(LESION_SERIES, 3)[2]]
    assert abs(d["value"] - pairwise_ms_ssim(all_three)) > 1e-4  # the cap changed what was compared


def test_a_prompt_blind_generator_scores_chance():
    oracle = TruthOracle(TEST_GRID)
    r = evaluate_generator(_blind_generator(oracle), oracle, seeds=list(range(6)))
    assert r["alignment"]["lesion_accuracy"] == pytest.approx(0.25)  # exactly one of 4 prompts matches
    iv = r["intervals_95"]  # every seed scores exactly 1 of 4: a plain Wilson interval on 24 members
    z, n, p = 1.959964, 24, 0.25  # Wilson (1927) for 6 of 24, written out
    c, h = (p + z * z / (2 * n)) / (1 + z * z / n), z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    np.testing.assert_allclose(iv["lesion_accuracy"], [c - h, c + h], atol=1e-4)
    assert iv["lesion_monotone_fraction"][0] == 0.0 and 0.3 < iv["lesion_monotone_fraction"][1] < 0.5
    assert r["alignment"]["diagnosis_accuracy"] == pytest.approx(1 / 3, abs=1e-3)
    assert r["lesion_monotone_fraction"] == 0.0
    assert r["subject_ms_ssim"]["lesion_series"] == pytest.approx(1.0)  # identical members
    assert math.isnan(r["subject_psnr_db"]["lesion_series"])  # every pair is identical (PSNR = inf)


def test_report_files_and_resampling(tmp_path):
    oracle = TruthOracle(TEST_GRID)
    r = evaluate_generator(_twin_generator(oracle), oracle, seeds=[4, 5])
    report = {"command": "counterfactualgen evaluate …", "model": {"id": "twins", "grid": TEST_GRID.to_dict()},
              "oracle": {"id": "truth", "grid": TEST_GRID.to_dict(), "validation": {}},
              "settings": {"steps": 0, "guidance": 1.0, "device": "cpu"}, "results": r}
    paths = write_report(report, tmp_path)
    assert json.loads(paths["json"].read_text())["results"]["lesion_monotone_fraction"] == 1.0
    md = paths["markdown"].read_text()
    assert "Imagining Alternatives" in md and "94.58" in md and "| 4 | " in md
    assert "100.0% [" in md and "Wilson, seeds as clusters" in md  # the 95 % intervals
    assert paths["plot"].stat().st_size > 1000
    # resampling between grids of one world: identity on the same grid, right shape on another
    x = np.random.default_rng(0).uniform(-1, 1, (2, *TEST_GRID.shape)).astype(np.float32)
    assert to_grid(x, TEST_GRID, TEST_GRID) is not None and np.array_equal(to_grid(x, TEST_GRID, TEST_GRID), x)
    other = ModelGrid((10, 12, 10), 16.0, TEST_GRID.center_ras)
    y = to_grid(x, TEST_GRID, other)
    assert y.shape == (2, 10, 12, 10) and np.isfinite(y).all()


# ---------------------------------------------------------------------------------
# counterfactualgen evaluate --quick, end to end on a tiny random model
# ---------------------------------------------------------------------------------
def test_evaluate_quick_end_to_end(tmp_path):
    import torch

    from tiny_model import build_tiny_model
    from CounterfactualGenLib.cli import main
    from CounterfactualGenLib.evaluation.oracle import Oracle, OracleSpec, save_oracle

    model = build_tiny_model(tmp_path / "tiny")
    torch.manual_seed(0)
    grid = ModelGrid((16, 16, 16), 8.0, (0.0, -18.0, 8.0))
    oracle = save_oracle(Oracle(OracleSpec(id="tiny-oracle", grid=grid,
                                           architecture={"channels": [4, 8, 16], "head_hidden": 8})),
                         tmp_path / "oracle")
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(model), "--oracle", str(oracle), "--out", str(out), "--quick",
                 "--device", "cpu"]) == 0
    for name in ("report.json", "report.md", "report.png"):
        assert (out / name).exists(), name
    rep = json.loads((out / "report.json").read_text())
    assert rep["synthetic"] is True and rep["model"]["id"] == "tiny-wdm-test" and rep["oracle"]["id"] == "tiny-oracle"
    assert rep["command"].startswith("counterfactualgen evaluate") and "--quick" in rep["command"]
    r = rep["results"]
    assert r["n_seeds"] == 2 and r["n_volumes"] == 14 and rep["settings"]["steps"] <= 4
    for key in ("lesion_monotone_fraction", "alignment", "subject_ms_ssim", "subject_psnr_db",
                "diversity_pairwise_ms_ssim", "oracle_feature_fd", "directional_score", "per_seed"):
        assert key in r, key
    assert 0.0 <= r["alignment"]["lesion_accuracy"] <= 1.0 and 0.0 <= r["lesion_monotone_fraction"] <= 1.0
    assert r["oracle_feature_fd"]["value"] >= 0 and r["oracle_feature_fd"]["n_reference"] == 4
    assert -1.0 <= r["directional_score"]["lesion_none_to_high"]["mean"] <= 1.0
    md = (out / "report.md").read_text()
    assert "Imagining Alternatives" in md and "94.58" in md and rep["command"] in md
    assert not list(out.glob(".partial-*"))
    # the sweeps and the exact-twin edits ran, and their sections are in the report
    sw = r["sweep"]
    assert [row["guidance"] for row in sw["guidance"]] == [1.0, 3.0] and [row["steps"] for row in sw["steps"]] == [2, 4]
    assert [row["share"] for row in sw["share"]] == [0.0, 0.3] and rep["settings"]["share"] == 0.0
    assert [row["separation"] for row in sw["separation"]] == [0.0, 2.0] and rep["settings"]["separation"] == 0.0
    assert rep["settings"]["separation_lesion_load"] == 0.0  # the tiny model has no separation of its own for them
    # the other sweeps run at the model's own separation for each series, and say so
    assert all(row["separation"] is None for row in sw["guidance"] + sw["steps"] + sw["share"])
    assert "| model's |" in md
    e = r["edits"]
    assert e["n_subjects"] == 1 and set(e["summary"]) >= {"fill", "fill_with_mask", "add", "composition_l1"}
    assert set(e["summary"]["composition_l1"]) == {"1", "2"} and e["seconds_per_edit"] > 0
    assert e["summary"]["fill"]["outside_brain_bit_identical"] == 1.0  # never touched outside the brain
    assert e["editor"] == {"strength": {"lesion_load": 0.6, "diagnosis": 0.8, "diagnosis_down": 0.6},
                           "edit_region": "auto", "direction": "auto"}
    assert ("strength 0.6 for lesion-load edits, 0.8 for diagnosis edits towards AD and 0.6 for diagnosis edits "
            "towards CN") in md
    assert "every edit keeping only the change in its prompts' direction (--direction auto)" in md
    assert "exact twins" in md and "Guidance, steps, sharing and separation sweeps" in md and (out / "edits_best_worst.png").exists()
    assert rep["peak_memory_mb"]["cpu_rss"] > 100
    tw = r["twin_reference"]
    assert tw["n_subjects"] == 2 and "exact engine twins" in md
    # exact lesion twins differ only inside the lesions; exact atrophy twins differ much more
    assert 0.98 < tw["subject_ms_ssim"]["lesion"] <= 1.0
    assert tw["subject_ms_ssim"]["diagnosis"] < tw["subject_ms_ssim"]["lesion"]
    # the oracle reads the exact twins too: what it lets a perfect model score
    assert set(tw["alignment"]) >= {"lesion_accuracy", "diagnosis_accuracy", "lesion_by_prompt_class"}
    assert 0.0 <= tw["alignment"]["lesion_accuracy"] <= 1.0 and "read by the oracle" in md


def test_evaluate_without_twins_sweeps_or_edits(tmp_path):
    """The lean run a short GPU lease affords (Training/gpu_lease.sh): --twins 0 skips the twin ceiling."""
    from tiny_model import build_tiny_model
    from CounterfactualGenLib.cli import main
    from CounterfactualGenLib.evaluation.oracle import Oracle, OracleSpec, save_oracle

    model = build_tiny_model(tmp_path / "tiny")
    oracle = save_oracle(Oracle(OracleSpec(id="tiny-oracle", grid=ModelGrid((16, 16, 16), 8.0, (0.0, -18.0, 8.0)),
                                           architecture={"channels": [4, 8, 16], "head_hidden": 8})),
                         tmp_path / "oracle")
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(model), "--oracle", str(oracle), "--out", str(out), "--seeds", "1",
                 "--steps", "2", "--edits", "0", "--sweep", "none", "--reference", "0", "--twins", "0",
                 "--device", "cpu"]) == 0
    r = json.loads((out / "report.json").read_text())["results"]
    assert r["n_seeds"] == 1 and "twin_reference" not in r and "sweep" not in r and "edits" not in r
    assert "exact engine twins" not in (out / "report.md").read_text()


# ---------------------------------------------------------------------------------
# edits against exact twins, and the axioms: the numbers must respond
# ---------------------------------------------------------------------------------
class _Result:
    def __init__(self, cf, labels, report):
        from CounterfactualGenLib.volume import Volume

        self.counterfactual = cf
        self.change_labels = Volume(labels.astype(np.float32), cf.affine_ras)
        self.report = report


def _identity_editor(scan, *, target, source, brain_mask, lesion_mask=None, auto_lesion_mask=True):
    return _Result(scan, np.zeros(scan.shape), {"timings_s": {"sample": 0.0}})


def _twin_editor(grid, n, seed=0):
    """A perfect editor: returns the exact engine twin the target asks for (identity for null edits)."""
    from CounterfactualGenLib.evaluation.edits import diagnosis_twin, held_out_pairs

    table, dx = {}, {}
    for subj, twin in held_out_pairs(grid, n, seed=seed):
        table[TruthOracle.key(subj.image.array)] = twin
        table[TruthOracle.key(twin.image.array)] = subj
        cn, mci, ad = (diagnosis_twin(subj, grid, d) for d in ("CN", "MCI", "AD"))
        dx[TruthOracle.key(cn.image.array)] = {"(AD)": ad, "(MCI)": mci}
        dx[TruthOracle.key(ad.image.array)] = {"(CN)": cn}

    def edit(scan, *, target, source, brain_mask, lesion_mask=None, auto_lesion_mask=True):
        key = TruthOracle.key(scan.array)
        if key in dx and any(m in target for m in ("(CN)", "(MCI)", "(AD)")):  # a diagnosis edit: that twin
            other = next((t for marker, t in dx[key].items() if marker in target), None)
        else:
            other = table.get(key)
        if target == source or other is None:
            return _Result(scan, np.zeros(scan.shape), {"timings_s": {}})
        changed = other.image.array != scan.array
        label = 2 if "no lesions" in target else 1 if "lesion" in target else 3
        return _Result(other.image, changed * label,
                       {"lesion_ml_after": float(other.attributes["lesion_ml"]),
                        "diagnosis_after": other.attributes["diagnosis"], "timings_s": {}})

    return edit


def test_edits_of_a_perfect_editor_match_the_twins():
    from CounterfactualGenLib.evaluation.edits import evaluate_edits

    r = evaluate_edits(_twin_editor(TEST_GRID, 2), grid=TEST_GRID, n_subjects=2, composition_sizes=(1, 2))
    s = r["summary"]
    assert r["n_subjects"] == 2 and s["fill"]["psnr_db"] is None  # PSNR ∞ against the twin (not averaged)
    assert all(math.isinf(row["fill"]["psnr_db"]) for row in r["per_subject"])
    assert all(np.isfinite(row["fill"]["baseline_psnr_db"]) for row in r["per_subject"])  # doing nothing is worse
    assert s["fill"]["dice_removed_vs_true"] > 0.9 and s["add"]["dice_added_vs_true"] > 0.9
    assert s["fill"]["oracle_ml_error_vs_twin"] == 0.0 and s["add"]["oracle_ml_error_vs_twin"] == 0.0
    assert s["fill"]["effectiveness"] == 1.0 and s["add"]["effectiveness"] == 1.0
    assert s["composition_l1"] == {"1": 0.0, "2": 0.0} and s["reversibility_l1"] == 0.0
    assert s["fill"]["outside_brain_bit_identical"] == 1.0
    # the diagnosis edit: the CN twin becomes its exact AD twin, read as AD
    assert all(math.isinf(row["atrophy"]["psnr_db"]) and np.isfinite(row["atrophy"]["baseline_psnr_db"])
               for row in r["per_subject"])
    assert s["atrophy"]["effectiveness"] == 1.0


def test_edit_tasks_run_only_what_is_asked():
    from CounterfactualGenLib.errors import InputError
    from CounterfactualGenLib.evaluation.edits import evaluate_edits

    r = evaluate_edits(_twin_editor(TEST_GRID, 1), grid=TEST_GRID, n_subjects=1, tasks=("mci", "atrophy", "cn"))
    row, s = r["per_subject"][0], r["summary"]
    assert not {"fill", "fill_text_only", "add", "reversibility_l1", "composition_l1"} & set(row)
    assert r["n_edits"] == 3 and s["reversibility_l1"] is None
    # the perfect editor makes the exact MCI twin: read as MCI, not AD, and closer to it than the AD twin is
    assert math.isinf(row["mci"]["psnr_db"]) and s["mci"]["effectiveness"] == 1.0 and s["mci"]["read_as_ad"] == 0.0
    assert s["mci"]["read_as"] == {"CN": 0, "MCI": 1, "AD": 0}
    # AD → CN: the AD twin becomes the CN twin, which the AD twin differs from as much as the CN twin from AD
    assert math.isinf(row["cn"]["psnr_db"]) and s["cn"]["effectiveness"] == 1.0 and s["cn"]["read_as"]["CN"] == 1
    assert row["cn"]["baseline_psnr_db"] < 30.0 and row["cn"]["oracle_diagnosis_after"] == "CN"
    assert row["mci"]["baseline_psnr_db"] > row["atrophy"]["baseline_psnr_db"]  # CN is nearer MCI than AD
    ident = evaluate_edits(_identity_editor, grid=TEST_GRID, n_subjects=1, tasks=("mci", "fill_text_only"))
    assert ident["per_subject"][0]["mci"]["psnr_db"] == row["mci"]["baseline_psnr_db"]
    assert {"fill_text_only", "mci"} <= set(ident["per_subject"][0]) and not {"fill", "fill_with_mask"} & set(
        ident["per_subject"][0]) and set(ident["summary"]) >= {"fill_text_only", "mci"} and ident["n_edits"] == 2
    for bad in (("fill", "nonsense"), ()):
        with pytest.raises(InputError, match="edit task"):
            evaluate_edits(_identity_editor, grid=TEST_GRID, n_subjects=1, tasks=bad)


def test_edits_of_an_identity_editor_score_the_baseline():
    from CounterfactualGenLib.evaluation.edits import evaluate_edits

    r = evaluate_edits(_identity_editor, grid=TEST_GRID, n_subjects=1, composition_sizes=(1,))
    row = r["per_subject"][0]
    assert row["fill"]["psnr_db"] == row["fill"]["baseline_psnr_db"]  # nothing changed: the baseline exactly
    assert row["fill"]["dice_removed_vs_true"] == 0.0 and row["composition_l1"] == {"1": 0.0}
    assert row["fill"]["oracle_class_after"] is None and r["summary"]["fill"]["effectiveness"] is None
    assert row["atrophy"]["psnr_db"] == row["atrophy"]["baseline_psnr_db"] < 30.0  # CN and AD twins differ
    assert r["summary"]["atrophy"]["effectiveness"] is None
    assert row["true_lesion_ml"] > 5.0  # moderate lesion load: there was something to remove


# ---------------------------------------------------------------------------------
# 3D FID on MedicalNet features (weights the user supplies, as safetensors)
# ---------------------------------------------------------------------------------
def test_medicalnet_fid_loads_safetensors_and_responds(tmp_path):
    import torch
    from monai.networks.nets import resnet10
    from safetensors.torch import save_file

    from CounterfactualGenLib.errors import ModelError
    from CounterfactualGenLib.evaluation.medicalnet import MedicalNetFeatures, medicalnet_fid, parse_fid_weights

    torch.manual_seed(0)
    net = resnet10(spatial_dims=3, n_input_channels=1, feed_forward=False, shortcut_type="B")
    state = {f"module.{k}": v.contiguous() for k, v in net.state_dict().items()}  # a DataParallel checkpoint
    state["module.conv_seg.0.weight"] = torch.zeros(2, 2)  # MedicalNet's decoder: dropped
    path = tmp_path / "resnet_10.safetensors"
    save_file(state, str(path))
    depth, p = parse_fid_weights(f"resnet10:{path}")
    ext = MedicalNetFeatures(depth, p)
    rng = np.random.default_rng(0)
    a = np.stack([_vol(i, (16, 20, 16)) for i in range(6)])
    b = np.stack([_vol(i + 50, (16, 20, 16)) for i in range(6)])
    noisy = a + rng.normal(0, 1.0, a.shape).astype(np.float32)
    same = medicalnet_fid(ext, a, a)["value"]
    assert same == pytest.approx(0.0, abs=1e-6)
    assert medicalnet_fid(ext, noisy, a)["value"] > medicalnet_fid(ext, b, a)["value"] >= 0
    assert ext.features(a).shape == (6, 512)
    # wrong files are clear errors; pickles are never read
    with pytest.raises(InputError, match="safetensors"):
        parse_fid_weights(f"resnet10:{tmp_path / 'w.pth'}")
    with pytest.raises(InputError, match="resnetN"):
        parse_fid_weights(f"vgg:{path}")
    with pytest.raises(ModelError, match="not a MedicalNet ResNet-18"):
        MedicalNetFeatures(18, path)

    # and inside the evaluation: generated series vs reference subjects on the oracle's grid
    oracle = TruthOracle(TEST_GRID)
    gen = _twin_generator(oracle)
    ref = gen(list(LESION_SERIES), 99)
    r = evaluate_generator(gen, oracle, seeds=[1, 2], reference=(ref, list(LESION_SERIES)),
                           fid=lambda g, f: medicalnet_fid(ext, g, f))
    assert r["fid_medicalnet"]["n_generated"] == 14 and r["fid_medicalnet"]["value"] >= 0


def test_recorded_command_reruns_the_same_evaluation():
    """report.json's command, parsed again, gives the same settings as the run it records (cards cite it)."""
    import shlex

    from CounterfactualGenLib.cli import build_parser
    from CounterfactualGenLib.evaluation.report import _command_line

    argv = ["evaluate", "--model", "m", "--out", "o", "--seed", "3", "--seeds", "200", "--twins", "200",
            "--edits", "0", "--reference", "0", "--sweep", "none", "--share", "0.4", "--separation", "1.5",
            "--guidance", "4", "--steps", "20", "--text-encoder-path", "t.safetensors", "--device", "cpu",
            "--precision", "fp32", "--format", "nrrd"]
    parser = build_parser()
    ran = parser.parse_args(argv)
    again = parser.parse_args(shlex.split(_command_line(ran))[1:])
    assert vars(again) == vars(ran)
