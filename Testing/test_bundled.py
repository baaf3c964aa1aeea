"""The bundled default model and oracle: registered, verified, and the README's demo works on them.

These are the files a user gets; if one is missing, corrupt or unregistered, the README's
first command fails, so these tests fail too (they do not skip).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from CounterfactualGenLib.cli import main
from CounterfactualGenLib.models import RESOURCES, default_model_id, load_model, registry, resolve_model

ROOT = Path(__file__).resolve().parents[1]


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_registry_lists_every_bundled_file_with_its_hash_and_size():
    entries = registry()
    assert entries, "Resources/Models.json must register the bundled models"
    ids = [e["id"] for e in entries]
    assert len(ids) == len(set(ids))
    total = 0
    for e in entries:
        folder = RESOURCES / "Models" / e["path"]
        assert folder.is_dir(), folder
        assert e.get("licence"), e["id"]
        for f in e["files"]:
            p = folder / f["name"]
            assert p.stat().st_size == f["bytes"] and _sha(p) == f["sha256"], p
            assert f["bytes"] <= 16 * 2**20, p  # each file ≤ 16 MiB
            total += f["bytes"]
    assert total <= 60 * 2**20


def test_default_model_loads_and_is_the_one_registered():
    default = default_model_id()
    assert default and any(e["id"] == default and e.get("kind") != "oracle" for e in registry())
    m = load_model(resolve_model(None))
    assert m.id == default and m.spec.contrast == "FLAIR"
    assert m.spec.metrics.get("command", "").startswith("counterfactualgen evaluate"), \
        "the model card's numbers must come from `counterfactualgen evaluate` (Training/install_model.py)"
    card = (m.path / "MODEL_CARD.md").read_text()
    assert "SYNTHETIC" in card and "## Measured" in card and m.spec.metrics["command"] in card


def test_oracle_ids_are_not_generation_models():
    oracles = [e for e in registry() if e.get("kind") == "oracle"]
    assert oracles, "the evaluation oracle must be registered"
    from CounterfactualGenLib.errors import ModelError

    with pytest.raises(ModelError, match="No model folder or registered model"):
        resolve_model(oracles[0]["id"])


def test_demo_on_the_bundled_model(tmp_path):
    """The README's first command, with fewer steps (CI time): two series, montages, SYNTHETIC volumes."""
    from CounterfactualGenLib.volume import read_volume

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "4"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert set(s["series"]) == {"lesion_load", "diagnosis"}
    assert len(s["series"]["lesion_load"]["outputs"]) == 4 and len(s["series"]["diagnosis"]["outputs"]) == 3
    v = read_volume(s["series"]["lesion_load"]["outputs"][0]["path"])
    m = load_model(resolve_model(None))
    assert v.is_synthetic and v.shape == tuple(m.spec.grid.shape)
    np.testing.assert_allclose(v.affine_ras, m.spec.grid.affine_ras, atol=1e-5)
    assert Path(s["series"]["lesion_load"]["montage"]).stat().st_size > 1000
    # each member read by the bundled oracle (the edit's and evaluate's oracle)
    assert s["oracle"] == "oracle-flair-5mm"
    assert all(o["oracle_reading"]["diagnosis"] in ("CN", "MCI", "AD")
               for series in s["series"].values() for o in series["outputs"])


def test_edit_sample_scan_with_bundled_model_and_oracle(tmp_path):
    """The Slicer tutorial's edit on the bundled sample scan, end to end: oracle numbers in the report."""
    from conftest import CLINICAL_FLAIR, file_sha256

    before = file_sha256(CLINICAL_FLAIR)
    out = tmp_path / "edit"
    assert main(["edit", "--input", str(CLINICAL_FLAIR), "--to", "Subject has high lesion load.", "--steps", "4",
                 "--out", str(out)]) == 0
    assert file_sha256(CLINICAL_FLAIR) == before
    rep = json.loads((out / "report.json").read_text())
    assert rep["registration_score"] > 0.35  # 0.41 measured when aligned; a 10 mm shift gives 0.12
    assert rep["oracle"] is not None and rep["lesion_ml_before"] is not None and rep["lesion_ml_after"] is not None
    assert rep["source_prompt_origin"] == "oracle reading of the scan"


def test_install_model_registers_and_records_the_evaluation(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("install_model", ROOT / "Training" / "install_model.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["install_model"] = mod
    spec.loader.exec_module(mod)
    from tiny_model import build_tiny_model

    res = tmp_path / "Resources"
    monkeypatch.setattr(mod, "RESOURCES", res)
    src = build_tiny_model(tmp_path / "tiny")
    ev = tmp_path / "eval"
    ev.mkdir()
    real = RESOURCES / "Models.json"
    real_before = _sha(real) if real.exists() else None
    report = {"command": "counterfactualgen evaluate --model x --out y", "model": {"id": "tiny-wdm-test"},
              "oracle": {"id": "o"}, "settings": {"steps": 4, "guidance": 2.0},
              "results": {"n_seeds": 2, "lesion_monotone_fraction": 0.5, "lesion_monotone_with_none_fraction": 0.0,
                          "alignment": {"lesion_accuracy": 0.25, "diagnosis_accuracy": 0.5, "overall_accuracy": 0.4},
                          "subject_ms_ssim": {"lesion_series": 0.9, "diagnosis_series": 0.95},
                          "subject_psnr_db": {"lesion_series": 25.0},
                          "diversity_pairwise_ms_ssim": {"value": 0.5}}}
    (ev / "report.json").write_text(json.dumps(report))
    (ev / "report.md").write_text("# Counterfactual evaluation\n\n| metric | value |\n|---|---|\n| x | 0.25 |\n")
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{mod.README_BEGIN}\nold\n{mod.README_END}\n\nrest\n")
    dest = mod.install(src, evaluation=ev, default=True, expected={"demo, 2-core CPU": "1 s"}, readme=readme)
    text = readme.read_text()
    assert "old" not in text and "| text alignment: lesion load / CN-MCI-AD / all | 25.0 % / 50.0 % / 40.0 % |" in text
    assert text.endswith("\n\nrest\n") and report["command"] in text
    m = load_model(dest)
    assert m.spec.metrics["alignment_lesion"] == 0.25 and m.spec.metrics["command"] == report["command"]
    card = (dest / "MODEL_CARD.md").read_text()
    assert "## Measured" in card and report["command"] in card
    reg = json.loads((res / "Models.json").read_text())
    assert reg["default"] == "tiny-wdm-test" and reg["models"][0]["expected_time"] == {"demo, 2-core CPU": "1 s"}
    assert all(_sha(dest / f["name"]) == f["sha256"] for f in reg["models"][0]["files"])
    # an evaluation of another model is refused, and nothing is changed
    report["model"]["id"] = "another"
    (ev / "report.json").write_text(json.dumps(report))
    with pytest.raises(Exception, match="another"):
        mod.install(src, evaluation=ev, default=True, expected={}, readme=readme)
    assert json.loads((dest / "model.json").read_text())["metrics"]["alignment_lesion"] == 0.25
    # a default guidance set at install time; an evaluation at another guidance is refused
    report["model"]["id"] = "tiny-wdm-test"
    (ev / "report.json").write_text(json.dumps(report))
    dest = mod.install(src, evaluation=None, default=False, expected={}, readme=readme, default_guidance=3.0,
                       guidance_note="chosen by the sweep")
    assert load_model(dest).spec.schedule["default_guidance"] == 3.0
    with pytest.raises(Exception, match="guidance"):
        mod.install(dest, evaluation=ev, default=True, expected={}, readme=readme)
    # likewise a default share: recorded in spec, card and registry; an evaluation at another share is refused
    report["settings"]["guidance"] = 3.0
    (ev / "report.json").write_text(json.dumps(report))
    dest = mod.install(dest, evaluation=None, default=False, expected={}, readme=readme, default_share=0.2,
                       share_note="chosen by the share sweep")
    assert load_model(dest).spec.schedule["default_share"] == 0.2 and "| series |" in (dest / "MODEL_CARD.md").read_text()
    assert json.loads((res / "Models.json").read_text())["models"][0]["defaults"]["share"] == 0.2
    with pytest.raises(Exception, match="share"):
        mod.install(dest, evaluation=ev, default=True, expected={}, readme=readme)
    with pytest.raises(Exception, match="share"):
        mod.install(dest, evaluation=None, default=False, expected={}, readme=readme, default_share=1.0)
    # and default steps: an evaluation at other steps is refused
    report["settings"]["share"] = 0.2
    (ev / "report.json").write_text(json.dumps(report))
    card_path = dest / "MODEL_CARD.md"
    card_path.write_text(card_path.read_text() + "\n## Sweeps\n\n| steps | guidance |\n|---|---|\n| 4 | 2 |\n")
    dest = mod.install(dest, evaluation=None, default=False, expected={}, readme=readme, default_steps=8,
                       steps_note="chosen by the steps sweep")
    assert "| steps | guidance |" in card_path.read_text()  # a later section's table is not the card's row
    assert load_model(dest).spec.schedule["default_steps"] == 8 and "| steps | 8 sampler steps" in (dest / "MODEL_CARD.md").read_text()
    assert "| series |" in (dest / "MODEL_CARD.md").read_text()  # the other rows stay
    with pytest.raises(Exception, match="steps"):
        mod.install(dest, evaluation=ev, default=True, expected={}, readme=readme)
    report["settings"]["steps"] = 8
    (ev / "report.json").write_text(json.dumps(report))
    # and a default separation: recorded in spec, card and registry; an evaluation at another one is refused
    dest = mod.install(dest, evaluation=None, default=False, expected={}, readme=readme, default_separation=2.0,
                       separation_note="chosen by the separation sweep")
    assert load_model(dest).spec.schedule["default_separation"] == 2.0
    assert "| separation |" in (dest / "MODEL_CARD.md").read_text()
    assert json.loads((res / "Models.json").read_text())["models"][0]["defaults"]["separation"] == 2.0
    with pytest.raises(Exception, match="separation"):
        mod.install(dest, evaluation=ev, default=True, expected={}, readme=readme)
    with pytest.raises(Exception, match="separation"):
        mod.install(dest, evaluation=None, default=False, expected={}, readme=readme, default_separation=-1.0)
    report["settings"]["separation"] = 2.0
    (ev / "report.json").write_text(json.dumps(report))
    assert mod.install(dest, evaluation=ev, default=False, expected={}, readme=readme) == dest
    # a separation of its own for lesion-load series: recorded, and an evaluation that ran them otherwise is refused
    dest = mod.install(dest, evaluation=None, default=False, expected={}, readme=readme,
                       default_separation_lesion_load=3.0, separation_lesion_load_note="chosen on probe seeds")
    assert load_model(dest).spec.schedule["default_separation_lesion_load"] == 3.0
    assert load_model(dest).spec.schedule["default_separation"] == 2.0
    assert "| separation, lesion-load series |" in (dest / "MODEL_CARD.md").read_text()
    assert json.loads((res / "Models.json").read_text())["models"][0]["defaults"]["separation_lesion_load"] == 3.0
    with pytest.raises(Exception, match="lesion-load series"):
        mod.install(dest, evaluation=ev, default=False, expected={}, readme=readme)  # its lesion series ran at 2
    with pytest.raises(Exception, match="between 0 and 20"):
        mod.install(dest, evaluation=None, default=False, expected={}, readme=readme,
                    default_separation_lesion_load=21.0)
    report["settings"]["separation_lesion_load"] = 3.0
    (ev / "report.json").write_text(json.dumps(report))
    assert mod.install(dest, evaluation=ev, default=False, expected={}, readme=readme) == dest
    spec = json.loads((dest / "model.json").read_text())
    assert spec["metrics"]["separation"] == 2.0 and spec["metrics"]["separation_lesion_load"] == 3.0
    assert "separation 2 (lesion-load series 3)" in mod.numbers_table(spec["id"], spec["metrics"], {})
    assert (_sha(real) if real.exists() else None) == real_before  # the real registry was not touched


def test_registration_threshold_separates_aligned_from_misaligned():
    """The QC threshold (pipeline.MIN_REGISTRATION_CORRELATION) against the bundled clinical FLAIR:
    the registered scan scores above it, the same scan shifted 10 mm or rotated 20° scores below."""
    from conftest import CLINICAL_FLAIR
    from CounterfactualGenLib.geometry import ModelSpaceMapping, register_affine
    from CounterfactualGenLib.pipeline import MIN_REGISTRATION_CORRELATION
    from CounterfactualGenLib.volume import read_volume

    scan = read_volume(CLINICAL_FLAIR)
    m = load_model(resolve_model(None))
    tmpl, brain = m.template("image").array, m.template("brain_mask").array > 0.5
    reg = register_affine(scan, m.template("image"), template_mask=brain)
    again = register_affine(scan, m.template("image"), template_mask=brain)
    # seeded sampling: repeatable (up to multithreaded float order)
    np.testing.assert_allclose(again.model_to_source_world, reg.model_to_source_world, atol=1e-4)

    def corr(t):
        w = ModelSpaceMapping(m.spec.grid, scan.shape, scan.affine_ras, t).to_model(scan, default=0.0)
        return float(np.corrcoef(tmpl[brain], w[brain])[0, 1])

    shifted = reg.model_to_source_world.copy()
    shifted[0, 3] += 10.0
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    rot = np.eye(4)
    rot[1:3, 1:3] = [[c, -s], [s, c]]
    aligned = corr(reg.model_to_source_world)
    assert aligned == pytest.approx(reg.correlation, abs=0.02)
    assert aligned > MIN_REGISTRATION_CORRELATION + 0.05
    assert corr(shifted) < MIN_REGISTRATION_CORRELATION - 0.05
    assert corr(reg.model_to_source_world @ rot) < MIN_REGISTRATION_CORRELATION - 0.05


def test_masked_lesion_filling_with_the_bundled_model_is_effective_against_the_exact_twin():
    """Effectiveness (issue #5): filling a held-out engine subject's lesions through its mask moves the oracle's
    lesion volume to (near) none and brings the scan closer to its exact lesion-free twin than doing nothing."""
    from CounterfactualGenLib.cli import Events, _load
    from CounterfactualGenLib.evaluation.edits import NONE_PROMPT, _units, held_out_pairs
    from CounterfactualGenLib.evaluation.metrics import dice, psnr
    from CounterfactualGenLib.evaluation.oracle import default_oracle_path, load_oracle
    from CounterfactualGenLib.pipeline import edit_scan

    model, encoder = _load(None, None, Events(json_mode=False, quiet=True))
    oracle = load_oracle(default_oracle_path())
    subj, twin = next(iter(held_out_pairs(model.spec.grid, 1, seed=3, lesion_classes=("high",))))
    brain = subj.brain_mask > 0
    r = edit_scan(model, encoder, subj.image, target_prompt=NONE_PROMPT, source_prompt="Subject has high lesion load.",
                  brain_mask=brain, lesion_mask=subj.lesion_mask, registration="none", oracle=oracle, seed=0)
    u = _units(subj.image.array, brain)
    assert r.report["method"] == "inpainting"
    assert r.report["lesion_ml_before"] > 15 and r.report["lesion_ml_after"] < 2.0
    edited = psnr(u(r.counterfactual.array), u(twin.image.array), brain, data_range=2.0)
    unedited = psnr(u(subj.image.array), u(twin.image.array), brain, data_range=2.0)
    assert edited > unedited + 3.0
    true = (subj.lesion_mask > 0) & ~(twin.lesion_mask > 0)
    assert dice(r.change_labels.array == 2, true) > 0.8
    outside = ~(subj.lesion_mask > 0)  # scan on the model grid: the mask's footprint is the mask itself
    assert np.array_equal(r.counterfactual.array[outside], subj.image.array[outside])


def test_gpu_console_times_script_runs_end_to_end_on_cpu(tmp_path):
    """Testing/Benchmarks/gpu_console_times.sh (demo and edit times on a bare GPU machine) with DEVICE=cpu: from
    the canonical-prompt table alone it runs the demo twice and edits the sample FLAIR along the asked paths."""
    import os
    import shutil
    import subprocess

    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    env = dict(os.environ, PYTHONPATH=str(ROOT), PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    table = tmp_path / "canonical.safetensors"
    subprocess.run([sys.executable, str(ROOT / "Training" / "embed_prompts.py"), "--config",
                    str(ROOT / "Training" / "configs" / "wdm_cpu_demo.json"), "--canonical-only", "--out", str(table)],
                   cwd=tmp_path, env=env, check=True, capture_output=True)
    out = tmp_path / "out"
    p = subprocess.run(["bash", str(ROOT / "Testing" / "Benchmarks" / "gpu_console_times.sh"), "--paths", "add", "fill",
                        "--threads", "2"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(env, OUT=str(out), DEVICE="cpu", REPEATS="1", TABLE=str(table), DEMO_ARGS="--steps 2"))
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    rows = json.loads((out / "bench_edit_cpu.json").read_text())["rows"]
    assert [r["path"] for r in rows] == ["add", "fill"]
    assert rows[0]["method"] == "inversion" and rows[1]["method"] == "inpainting"
    assert all(r["best_s"] > 0 and r["stages_median_s"]["register"] > 0 for r in rows)
    assert rows[1]["lesion_ml_after"] < rows[1]["lesion_ml_before"]  # the fill removed the oracle's lesions
    assert "| add |" in (out / "bench_edit_cpu.log").read_text()
    demo = (out / "demo_cpu.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in demo] == ["demo run 1", "demo run 2"]
    assert all(float(line.split(": ")[1].split()[0]) > 0 for line in demo)


def test_masked_lesion_filling_of_a_finer_scan_beats_the_spread_change(tmp_path):
    """Testing/Benchmarks/bench_fine_filling.py on one subject at 2.5 mm (twice the model's resolution): with the
    true mask, what edit_scan writes scores closer to the exact twin than the model grid's change spread by
    interpolation (the rule before December 2026), changes no healthy voxel and leaves less of the lesions."""
    spec = importlib.util.spec_from_file_location("bench_fine_filling", ROOT / "Testing" / "Benchmarks" / "bench_fine_filling.py")
    sys.path.insert(0, str(ROOT / "Testing" / "Benchmarks"))
    try:
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        out = tmp_path / "fine.json"
        assert bench.main(["--subjects", "1", "--seed", "0", "--spacing", "2.5", "2.5", "2.5", "--threads", "2",
                           "--json", str(out)]) == 0
    finally:
        sys.path.remove(str(ROOT / "Testing" / "Benchmarks"))
    rows = {r["mask"]: r for r in json.loads(out.read_text())["rows"]}
    given = rows["given"]
    assert given["written"]["psnr_db"] > given["spread"]["psnr_db"] + 2.0
    assert given["written"]["mae_healthy"] == 0.0 < given["spread"]["mae_healthy"]
    assert given["written"]["mae_lesion"] < given["spread"]["mae_lesion"] < given["unedited"]["mae_lesion"]
    # the oracle's 5 mm segmentation keeps the spread change
    assert rows["oracle"]["written"]["psnr_db"] == pytest.approx(rows["oracle"]["spread"]["psnr_db"], abs=0.02)


def test_lesion_addition_may_be_brighter_than_anything_in_the_scan():
    """A lesion addition may brighten voxels beyond the scan's maximum, as FLAIR lesions can be; the output was
    clipped there, which hid part of an addition from the written file while the oracle's reading after the
    edit saw the unclipped change. On a lesion-free engine twin the brightest voxels are cortex, outside the
    white matter a lesion-load edit acts in, so the scan here is capped at its white matter's brightest value,
    and the edit must write voxels above it."""
    from CounterfactualGenLib.evaluation.edits import held_out_pairs
    from CounterfactualGenLib.evaluation.oracle import default_oracle_path, load_oracle
    from CounterfactualGenLib.cli import Events, _load
    from CounterfactualGenLib.pipeline import edit_scan, white_matter_region
    from CounterfactualGenLib.volume import Volume

    m, encoder = _load(None, None, Events(json_mode=False, quiet=True))
    _, twin = next(held_out_pairs(m.spec.grid, 1, seed=0))
    brain = twin.brain_mask > 0
    region = white_matter_region(m.template("white_matter").array, brain, m.spec.grid.spacing_mm)
    cap = float(twin.image.array[region].max())
    assert cap < float(twin.image.array.max())
    scan = Volume(np.minimum(twin.image.array, cap), twin.image.affine_ras)
    r = edit_scan(m, encoder, scan, target_prompt="Subject has high lesion load.",
                  source_prompt="Subject has no lesions.", brain_mask=brain, registration="none",
                  oracle=load_oracle(default_oracle_path()))
    over = r.counterfactual.array > cap
    assert over.any() and (r.change_labels.array[over] > 0).all() and not over[~region].any()
    assert r.report["lesion_ml_after"] > r.report["lesion_ml_before"] + 5.0
