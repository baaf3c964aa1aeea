"""Dataset manifests (CounterfactualGenLib/manifest.py) and training configs (CounterfactualGenLib/config.py):
what spreadsheets write is read, every problem is refused before training with its line, and a model
trained on a manifest edits scans as it saw them in training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from CounterfactualGenLib.config import check_keys, load_config, parse_override
from CounterfactualGenLib.errors import InputError
from CounterfactualGenLib.manifest import prompt_config_from_dict, read_manifest

ROOT = Path(__file__).resolve().parents[1]


def _touch(folder: Path, *names: str) -> None:
    for n in names:
        (folder / n).parent.mkdir(parents=True, exist_ok=True)
        (folder / n).write_bytes(b"x")


def test_reads_what_spreadsheets_write(tmp_path):
    """UTF-8 byte-order mark, ';' separators, spaces, blank lines, Windows separators in relative paths:
    paths resolve against the manifest's folder, and the columns it has make the prompts."""
    d = tmp_path / "cohort"
    _touch(d, "scans/a.nii.gz", "scans/b.nii.gz", "scans/c.nii.gz", "masks/b_les.nii.gz")
    text = ("\ufeff image ; lesion_mask ; lesion_ml ; diagnosis ; age ; sex \r\n"
            "scans\\a.nii.gz;;0;CN;61;F\r\n"
            "\r\n"
            "scans/b.nii.gz ; masks/b_les.nii.gz ; 21.5 ; AD ; 74 ; M\r\n"
            f"{d / 'scans' / 'c.nii.gz'};;3.2;lmci;;\r\n")
    (d / "m.csv").write_bytes(text.encode("utf-8"))
    m = read_manifest(d / "m.csv")
    assert [r.line for r in m.rows] == [2, 4, 5]
    assert m.rows[0].image == d / "scans" / "a.nii.gz" and m.rows[1].lesion_mask == d / "masks" / "b_les.nii.gz"
    assert m.rows[0].prompt == ("Subject has no lesions. Subject is cognitively normal (CN). "
                                "Subject is a 61-year-old female.")
    assert m.rows[2].prompt == "Subject has minimal lesion load. Subject has mild cognitive impairment (MCI)."
    assert [(r.lesion_load, r.diagnosis) for r in m.rows] == [("none", "CN"), ("high", "AD"), ("minimal", "MCI")]
    assert [r.lesion_ml for r in m.rows] == [0.0, 21.5, 3.2]
    assert m.class_counts() == {"lesion_load": {"none": 1, "minimal": 1, "moderate": 0, "high": 1},
                                "diagnosis": {"CN": 1, "MCI": 1, "AD": 1}}
    assert any("moderate" in w for w in m.warnings)  # a class no row has: a warning, not an error
    assert "3 scans" in m.summary()


def test_every_problem_is_listed_with_its_line(tmp_path):
    _touch(tmp_path, "a.nii.gz", "b.nii.gz")
    (tmp_path / "m.csv").write_text("image,lesion_ml\na.nii.gz,2\nmissing1.nii.gz,20\nb.nii.gz,-3\n"
                                    "missing2.nii.gz,banana\n")
    with pytest.raises(InputError) as info:
        read_manifest(tmp_path / "m.csv")
    msg = str(info.value)
    assert "2 file(s) not found" in msg and "line 3, image" in msg and "line 5, image" in msg
    assert str(tmp_path) in msg  # says where relative paths are looked for
    assert "line 4" in msg and ">= 0" in msg and "line 5" in msg and "banana" in msg


@pytest.mark.parametrize("content, expected", [
    ("scan,lesion_ml\na.nii.gz,1\n", "needs an 'image' column"),
    ("image,lesion_volume\na.nii.gz,1\n", "neither a 'lesion_ml' nor a 'diagnosis'"),
    ("image,lesion_ml,diagnosis,lesoin_ml\na.nii.gz,1,CN,1\n", "'lesoin_ml' (did you mean 'lesion_ml'?)"),
    ("image,lesion_ml\na.nii.gz,1\nb.nii.gz,2\n", "every row's lesion load is 'minimal'"),
    ("image,lesion_ml,age\na.nii.gz,1,50\nb.nii.gz,,60\n", "names no lesion load and no diagnosis"),
    ("image,image\na.nii.gz,a.nii.gz\n", "more than once"),
    ("image,,lesion_ml\na.nii.gz,x,1\n", "a column without a name (column 2"),
    ("image,lesion_ml\na.nii.gz,NA\nb.nii.gz,-\n", "cells are all empty or not recorded ('NA')"),
    ("image,lesion_ml\na.nii.gz,1,extra\n", "3 cells for 2 columns"),
    ("image,lesion_ml\n", "no rows"),
    ("", "is empty"),
])
def test_bad_manifests_are_refused_clearly(tmp_path, content, expected):
    _touch(tmp_path, "a.nii.gz", "b.nii.gz")
    (tmp_path / "m.csv").write_text(content)
    with pytest.raises(InputError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        read_manifest(tmp_path / "m.csv")


def test_ignored_columns_and_a_configured_prompt(tmp_path):
    _touch(tmp_path, "a.nii.gz", "b.nii.gz")
    (tmp_path / "m.csv").write_text("image,subject,t2_volume,dx\na.nii.gz,S1,2.5,CN\nb.nii.gz,S2,12,AD\n")
    with pytest.raises(InputError, match="'subject'"):
        read_manifest(tmp_path / "m.csv", {"columns": {"lesion": "t2_volume"}})
    cfg = prompt_config_from_dict({"clauses": ["lesion_load"], "optional_clauses": ["diagnosis"],
                                   "columns": {"lesion": "t2_volume", "diagnosis": "dx"},
                                   "thresholds_ml": {"minimal": 3, "moderate": 10}})
    m = read_manifest(tmp_path / "m.csv", cfg, ignore_columns=["subject"])
    assert [r.prompt for r in m.rows] == ["Subject has minimal lesion load. Subject is cognitively normal (CN).",
                                          "Subject has high lesion load. Subject has mild Alzheimer's dementia (AD)."]
    with pytest.raises(InputError, match="unknown key"):
        prompt_config_from_dict({"columns": {"lesions": "x"}, "clauses": ["lesion_load"]})
    with pytest.raises(InputError, match="increase strictly"):
        prompt_config_from_dict({"thresholds_ml": {"minimal": 20}, "clauses": ["lesion_load"]})
    with pytest.raises(InputError, match="numbers of ml"):
        prompt_config_from_dict({"thresholds_ml": {"minimal": "3 ml"}, "clauses": ["lesion_load"]})
    with pytest.raises(InputError, match="must be a list"):
        prompt_config_from_dict({"clauses": "diagnosis"})


def test_configured_columns_keep_the_other_clauses_and_say_what_is_unused(tmp_path):
    """data.prompts naming columns (no clauses) keeps every clause whose column the manifest has; required
    clauses whose column is absent are refused by name; configured-out columns are reported."""
    _touch(tmp_path, "a.nii.gz", "b.nii.gz")
    (tmp_path / "m.csv").write_text("Image,T2_Volume,DX,Age\na.nii.gz,2.5,HC,70\nb.nii.gz,12,Dementia,80\n")
    m = read_manifest(tmp_path / "m.csv", {"columns": {"lesion": "t2_volume", "diagnosis": "dx"},
                                           "diagnosis_aliases": {"HC": "cn"}})
    assert m.rows[0].prompt == "Subject has minimal lesion load. Subject is cognitively normal (CN). Subject is a 70-year-old subject."
    assert m.rows[1].diagnosis == "AD" and not any("make no part" in w for w in m.warnings)
    adni = read_manifest(tmp_path / "m.csv", {"columns": {"diagnosis": "dx"}, "clauses": ["diagnosis"]},
                         ignore_columns=["t2_volume"])
    assert [r.prompt for r in adni.rows] == ["Subject is cognitively normal (CN).", "Subject has mild Alzheimer's dementia (AD)."]
    assert any("['age']" in w for w in adni.warnings)  # a prompt column the clauses leave out
    with pytest.raises(InputError, match="lacks the column.*lesion_load \\(column 'lesion_ml'\\).*data.prompts.clauses"):
        read_manifest(tmp_path / "m.csv", {"columns": {"diagnosis": "dx"}, "clauses": ["lesion_load"]},
                      ignore_columns=["t2_volume"])


def test_european_and_unicode_exports_and_implausible_volumes(tmp_path):
    _touch(tmp_path, "a.nii.gz", "b.nii.gz")
    (tmp_path / "semi.csv").write_text("image;lesion_ml;\na.nii.gz;12,4;\nb.nii.gz;0;\n")  # decimal comma, trailing ';'
    assert [r.lesion_ml for r in read_manifest(tmp_path / "semi.csv").rows] == [12.4, 0.0]
    (tmp_path / "u16.csv").write_bytes("image\tlesion_ml\na.nii.gz\t1\nb.nii.gz\t4500\n".encode("utf-16"))
    m = read_manifest(tmp_path / "u16.csv")
    assert any("mm³" in w and "4500" in w for w in m.warnings)
    (tmp_path / "bin.csv").write_bytes(b"image,lesion_ml\na\x81.nii.gz,1\n")
    with pytest.raises(InputError, match="not text in UTF-8"):
        read_manifest(tmp_path / "bin.csv")


def test_config_keys_and_overrides_are_checked():
    defaults = {"iterations": 10, "lr": 1e-3, "data": {"kind": "synthetic", "pool_size": 4}}
    with pytest.raises(InputError, match="'iteration' \\(did you mean 'iterations'\\?\\)"):
        check_keys({"iteration": 5}, defaults)
    assert parse_override("lr=0.5") == ("lr", 0.5)
    with pytest.raises(InputError, match="expected KEY=JSON"):
        parse_override("lr")
    with pytest.raises(InputError, match="double quotes"):
        parse_override("init_from=runs/a")
    assert load_config(defaults, None, ["iterations=3"])["iterations"] == 3
    merged = load_config(defaults, None, ['data={"pool_size": 8}'], merge_sections=True)
    assert merged["data"] == {"kind": "synthetic", "pool_size": 8}
    assert load_config(defaults, None, ['data={"pool_size": 8}'])["data"] == {"pool_size": 8}
    assert defaults["iterations"] == 10  # the defaults are not changed


def _engine_manifest(folder: Path) -> Path:
    """Four engine subjects at 4 mm as NIfTI files, with the tabular columns a cohort has."""
    from CounterfactualGenLib.synth import make_subject
    from CounterfactualGenLib.synth.spec import random_spec
    from CounterfactualGenLib.volume import Volume, write_volume

    folder.mkdir(parents=True, exist_ok=True)
    rows = ["image,lesion_mask,lesion_ml,diagnosis"]
    for i, (les, dx) in enumerate([("none", "CN"), ("high", "AD"), ("minimal", "MCI"), ("moderate", "CN")]):
        s = make_subject(random_spec(300 + i, lesion_class=les, diagnosis=dx), shape=(40, 48, 40), spacing_mm=4.0,
                         center_mm=(0.0, -18.0, 8.0))
        write_volume(s.image, folder / f"s{i}.nii.gz")
        write_volume(Volume(s.lesion_mask.astype(np.float32), s.image.affine_ras), folder / f"s{i}_lesions.nii.gz")
        rows.append(f"s{i}.nii.gz,s{i}_lesions.nii.gz,{float(s.lesion_mask.sum()) * 64 / 1000:.2f},{dx}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder / "manifest.csv"


def _train(args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "Training" / "train_diffusion.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))


def test_training_on_a_manifest_gives_a_model_that_edits(tmp_path):
    """--check reads the manifest and writes nothing; training registers each scan to the template the
    model ships (as an edit does) and the model edits a scan; config mistakes stop it before any work."""
    manifest = _engine_manifest(tmp_path / "cohort")
    cfg = {"id": "tiny-manifest", "family": "wdm", "size": "tiny",
           "grid": {"shape": [32, 40, 32], "spacing_mm": 5.0, "center_ras": [0.0, -18.0, 8.0]},
           "text_encoder": {"id": "tiny-hash", "dim": 32, "max_tokens": 16},
           "data": {"kind": "manifest", "manifest": str(manifest)},
           "schedule": {"kind": "rflow", "default_steps": 2, "default_guidance": 2.0, "base_numel": 32768},
           "batch_size": 2, "iterations": 2, "checkpoint_every": 1, "sample_every": 0, "log_every": 1,
           "ema_start": 0, "weights_dtype": None}
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(cfg))
    out = tmp_path / "run"
    p = _train(["--config", str(config), "--out", str(out), "--check"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "4 scans" in p.stdout and "lesion_load: none 1, minimal 1, moderate 1, high 1" in p.stdout
    assert not out.exists()
    for bad, words in ((['--set', 'iteration=2'], "did you mean 'iterations'"),
                       (['--set', 'text_encoder={"id": "tiny-hash", "dim": 32, "max_token": 16}'],
                        "'max_token' (did you mean 'max_tokens'?)"),
                       (['--set', 'contrast="T2"'], "contrast 'T2'"),
                       (['--set', 'denoiser_overrides={"chanels": [8, 16, 32]}', '--check'], "does not build"),
                       (['--set', 'schedule={"kind": "ddpm"}'], "rectified-flow"),
                       (['--set', 'data={"kind": "manifest"}'], "needs data.manifest"),
                       (['--set', 'lesion_prior_weight=2'], "lesion_prior_weight needs the synthetic pool"),
                       (['--set', 'text_encoder={"id": "tiny-hash", "dim": 32, "max_tokens": 8}'],
                        "longer than text_encoder.max_tokens = 8"),
                       (['--set', 'text_encoder={"id": "tiny-hash", "dim": 32, "max_tokens": 8}', '--check'],
                        "Set text_encoder.max_tokens to"),
                       (['--set', f'data={{"kind": "manifest", "manifest": "{manifest}", "cache_mb": -1}}'],
                        "data.cache_mb"),
                       (['--set', f'data={{"kind": "manifest", "manifest": "{manifest}", "ignore": 1}}'], "'ignore'")):
        p = _train(["--config", str(config), "--out", str(out), *bad], tmp_path)
        assert p.returncode == 2 and words in p.stderr, (bad, p.stderr[-1500:])
        assert not out.exists()
    # a scan that registration would refuse stops --check and training before the first step
    from CounterfactualGenLib.volume import Volume, write_volume

    write_volume(Volume(np.random.default_rng(0).random((40, 48, 40)).astype(np.float32), np.diag([4.0, 4, 4, 1])),
                 manifest.parent / "noise.nii.gz")
    noisy = manifest.parent / "noisy.csv"
    noisy.write_text(manifest.read_text() + "noise.nii.gz,,1.5,MCI\n")
    for extra in (["--check"], []):
        p = _train(["--config", str(config), "--out", str(out), "--set",
                    f'data={{"kind": "manifest", "manifest": "{noisy}"}}', *extra], tmp_path)
        assert p.returncode == 2 and "line 6 (noise.nii.gz)" in p.stderr and "correlation" in p.stderr, p.stderr[-1500:]
        assert "Traceback" not in p.stderr and not out.exists()
    # a lesion mask outside the brain, or far from the row's volume, is reported by --check
    from CounterfactualGenLib.volume import read_volume

    s0 = read_volume(manifest.parent / "s0.nii.gz")
    corner = np.zeros(s0.shape, np.float32)
    corner[:4, :4, :4] = 1
    write_volume(Volume(corner, s0.affine_ras), manifest.parent / "corner.nii.gz")
    odd = manifest.parent / "odd.csv"
    odd.write_text(manifest.read_text() + "s0.nii.gz,corner.nii.gz,30,CN\n")
    p = _train(["--config", str(config), "--out", str(out), "--check", "--set",
                f'data={{"kind": "manifest", "manifest": "{odd}"}}'], tmp_path)
    assert p.returncode == 0, p.stderr[-1500:]
    assert "line 6: most of the lesion mask lies outside the brain" in p.stderr
    assert "line 6: the lesion mask holds 4.1 ml, the table says 30 ml" in p.stderr and not out.exists()
    p = _train(["--config", str(config), "--out", str(out)], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Warning" not in p.stderr  # masks, volumes and names agree with their rows
    reg = json.loads((out / "registration.json").read_text())["scans"]
    assert len(reg) == 4 and min(e["correlation"] for e in reg) >= 0.3
    from CounterfactualGenLib.models import load_model

    model = load_model(out / "model")
    assert model.spec.template.get("image") and model.template("brain_mask").array.max() == 1.0
    edit = subprocess.run([sys.executable, "-m", "CounterfactualGenLib.cli", "edit", "--model", str(out / "model"),
                           "--input", str(manifest.parent / "s1.nii.gz"), "--to", "Subject has no lesions.",
                           "--lesion-mask", str(manifest.parent / "s1_lesions.nii.gz"), "--oracle", "none",
                           "--out", str(tmp_path / "edited")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    assert edit.returncode == 0, edit.stderr[-2000:]
    assert (tmp_path / "edited" / "counterfactual_SYNTHETIC.nii.gz").exists()


def test_flat_background_draws_of_a_manifest_set_the_outside_of_each_scans_brain_to_minus_one(tmp_path):
    """data.flat_background_prob with a manifest: every draw at 1 has −1 outside the scan's brain mask on the
    grid (the template's brain here, carried through the registration) and brain voxels inside."""
    import importlib.util

    from CounterfactualGenLib.geometry import ModelGrid

    spec = importlib.util.spec_from_file_location("train_diffusion_mod", ROOT / "Training" / "train_diffusion.py")
    td = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(td)
    manifest_path = _engine_manifest(tmp_path / "cohort")
    grid_d = {"shape": [32, 40, 32], "spacing_mm": 5.0, "center_ras": [0.0, -18.0, 8.0]}
    cfg = {**td.DEFAULTS, "contrast": "FLAIR", "grid": grid_d,
           "data": {"kind": "manifest", "manifest": str(manifest_path), "flat_background_prob": 1.0}}
    _, manifest = td.check_config(cfg)
    grid = ModelGrid.from_dict(grid_d)
    templates = td.edit_templates(cfg, grid)
    tpl_brain = templates["brain_mask"].array > 0.5
    registered = td.register_manifest(cfg, grid, manifest, templates, verbose=False)
    it = iter(td.Stream(cfg, grid, 0, None, manifest, registered, tpl_brain))
    for _ in range(4):
        img = next(it)[0][0].numpy()
        outside = img == -1.0
        assert outside.any() and (img[~outside] > -1.0).mean() > 0.99
        assert (~outside).sum() == pytest.approx(tpl_brain.sum(), rel=0.15)
