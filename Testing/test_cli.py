"""The CLI contract end to end on a tiny model: outputs, provenance, progress, errors, cancel."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tiny_model import build_tiny_model, build_tiny_oracle
from CounterfactualGenLib.cli import main
from CounterfactualGenLib.volume import read_volume

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Subject has no lesions.", "Subject has high lesion load."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("m") / "tiny")


def _generate(tiny, out, *extra, prompts=PROMPTS):
    args = ["generate", "--model", str(tiny), "--out", str(out), "--seed", "5", "--steps", "3"]
    for p in prompts:
        args += ["--prompt", p]
    return main(args + list(extra))


def test_generate_writes_synthetic_volumes_in_model_geometry(tiny, tmp_path):
    assert _generate(tiny, tmp_path / "o") == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["synthetic"] is True and len(summary["outputs"]) == 2
    assert Path(summary["montage"]).exists()
    for o, prompt in zip(summary["outputs"], PROMPTS):
        v = read_volume(o["path"])
        assert "SYNTHETIC" in Path(o["path"]).name  # a copied file keeps the mark in its name
        assert v.is_synthetic and json.loads(v.metadata["CounterfactualGen.Prompts"]) == [prompt]
        assert v.metadata["CounterfactualGen.Seed"] == "5"
        assert v.shape == (16, 16, 16)
        assert not np.allclose(v.affine_ras, np.eye(4))  # never an identity affine
        np.testing.assert_allclose(v.spacing_mm, (8.0, 8.0, 8.0))
    assert not [p for p in (tmp_path / "o").iterdir() if p.name.startswith(".partial")]


def test_generate_reports_the_oracle_reading_of_each_member(tiny, tmp_path, capsys):
    """With an oracle, each member's lesion ml, class and diagnosis are the oracle's reading of the written
    volume (as evaluate reads it); the montage label keeps the SYNTHETIC mark; --oracle none gives none."""
    from CounterfactualGenLib.evaluation.metrics import lesion_class_of_ml
    from CounterfactualGenLib.evaluation.oracle import load_oracle
    from CounterfactualGenLib.models import load_model
    from CounterfactualGenLib.pipeline import OUTPUT_SCALE

    folder = build_tiny_oracle(tmp_path / "oracle")
    capsys.readouterr()
    assert _generate(tiny, tmp_path / "o", "--oracle", str(folder)) == 0
    err = capsys.readouterr().err
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["oracle"] == "tiny-oracle" and "not ground truth" in summary["oracle_note"]
    oracle, grid = load_oracle(folder), load_model(tiny).spec.grid
    for o in summary["outputs"]:
        x = read_volume(o["path"]).array / (OUTPUT_SCALE / 2.0) - 1.0
        want = float(oracle.read(x, grid)["lesion_ml"][0])
        r = o["oracle_reading"]
        assert r["lesion_ml"] == pytest.approx(want, abs=0.006) and r["lesion_ml"] > 0
        assert r["lesion_load"] == lesion_class_of_ml(r["lesion_ml"]) and r["diagnosis"] in ("CN", "MCI", "AD")
        assert f"{o['prompt']}  oracle: {r['lesion_ml']:.1f} ml lesions" in err
    assert _generate(tiny, tmp_path / "n", "--oracle", "none") == 0
    summary = json.loads((tmp_path / "n" / "summary.json").read_text())
    assert summary["oracle"] is None and not any("oracle_reading" in o for o in summary["outputs"])
    assert _generate(tiny, tmp_path / "x", "--oracle", str(tmp_path / "nowhere")) == 4
    assert not (tmp_path / "x").exists()


def test_generate_warns_about_prompts_it_cannot_check(tiny, tmp_path, capsys):
    """A prompt naming neither a lesion load nor a diagnosis still generates, with a warning on stderr and in
    summary.json; recognised prompts do not warn."""
    from CounterfactualGenLib.text.prompts import unrecognised_prompt_warning

    warning = unrecognised_prompt_warning("purple elephant")
    assert warning is not None and "purple elephant" in warning and unrecognised_prompt_warning(" ") is None
    capsys.readouterr()
    assert _generate(tiny, tmp_path / "o", "--oracle", "none", prompts=["purple elephant", PROMPTS[1]]) == 0
    assert capsys.readouterr().err.count("warning: ") == 1
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["warnings"] == [warning] and len(summary["outputs"]) == 2
    assert _generate(tiny, tmp_path / "n", "--oracle", "none", prompts=PROMPTS + ["Subject is cognitively normal (CN)."]) == 0
    assert "warning:" not in capsys.readouterr().err
    assert json.loads((tmp_path / "n" / "summary.json").read_text())["warnings"] == []


def test_montage_label_never_loses_the_synthetic_mark():
    from CounterfactualGenLib.cli import MONTAGE_LABEL_CHARS, _montage_label

    reading = {"lesion_ml": 12.345, "lesion_load": "moderate", "diagnosis": "MCI"}
    long = "Subject has moderate lesion load " + "and a long free-form description " * 4
    for prompt, r in (("Subject has no lesions.", None), (long, None), (long, reading)):
        label = _montage_label(prompt, r)
        assert len(label) <= MONTAGE_LABEL_CHARS and "[SYNTHETIC]" in label
        assert (r is None) == ("oracle" not in label)
    assert _montage_label(long, reading).endswith("[SYNTHETIC]  oracle: 12.3 ml, MCI")
    assert _montage_label("Subject has no lesions.", None) == "Subject has no lesions.  [SYNTHETIC]"


def test_same_seed_same_result_and_shared_noise(tiny, tmp_path):
    same = ["Subject has high lesion load."] * 2
    assert _generate(tiny, tmp_path / "a", prompts=same) == 0
    assert _generate(tiny, tmp_path / "b", prompts=same) == 0
    a = [read_volume(o["path"]).array for o in json.loads((tmp_path / "a/summary.json").read_text())["outputs"]]
    b = [read_volume(o["path"]).array for o in json.loads((tmp_path / "b/summary.json").read_text())["outputs"]]
    np.testing.assert_array_equal(a[0], a[1])  # identical prompts from one shared noise → identical members
    np.testing.assert_array_equal(a[0], b[0])  # same seed → same result


def test_different_prompts_differ(tiny, tmp_path):
    assert _generate(tiny, tmp_path / "o") == 0
    outs = json.loads((tmp_path / "o/summary.json").read_text())["outputs"]
    assert not np.array_equal(read_volume(outs[0]["path"]).array, read_volume(outs[1]["path"]).array)


def test_shared_steps_keep_a_series_closer_and_are_recorded(tiny, tmp_path):
    """--share runs the first steps of a series as one trajectory: the members end closer
    together than with only the noise shared; the setting is recorded; one prompt is unaffected."""
    from CounterfactualGenLib.cli import Events, _load
    from CounterfactualGenLib.pipeline import generate_series

    def spread(share):
        out = tmp_path / f"s{share}"
        assert _generate(tiny, out, "--share", str(share)) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["share"] == share
        vols = [read_volume(o["path"]) for o in summary["outputs"]]
        assert all(float(v.metadata["CounterfactualGen.share"]) == share for v in vols)
        return float(np.abs(vols[0].array - vols[1].array).mean())

    assert spread(0.67) < 0.8 * spread(0.0)  # 2 of the 3 steps shared
    model, enc = _load(str(tiny), None, Events(json_mode=False))
    one = [generate_series(model, enc, PROMPTS[:1], seed=3, steps=3, share=f).volumes[0].array for f in (0.0, 0.67)]
    np.testing.assert_array_equal(one[0], one[1])
    model.spec.schedule["default_share"] = 0.34  # the model's default applies when none is asked for
    assert generate_series(model, enc, PROMPTS, seed=3, steps=3).share == 0.34


def test_separation_pushes_the_members_apart_and_is_recorded(tiny, tmp_path):
    """--separation guides each member away from the member before it: the members end further
    apart than without it; the setting is recorded; a one-prompt series is unaffected."""
    from CounterfactualGenLib.cli import Events, _load
    from CounterfactualGenLib.pipeline import generate_series

    def spread(a):
        out = tmp_path / f"a{a}"
        assert _generate(tiny, out, "--separation", str(a)) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["separation"] == a
        vols = [read_volume(o["path"]) for o in summary["outputs"]]
        assert all(float(v.metadata["CounterfactualGen.separation"]) == a for v in vols)
        return float(np.abs(vols[0].array - vols[1].array).mean())

    assert spread(3.0) > 1.2 * spread(0.0)
    model, enc = _load(str(tiny), None, Events(json_mode=False))
    one = [generate_series(model, enc, PROMPTS[:1], seed=3, steps=3, separation=a) for a in (0.0, 3.0)]
    np.testing.assert_array_equal(one[0].volumes[0].array, one[1].volumes[0].array)
    assert one[1].separation == 0.0  # nothing to separate from: recorded as off
    model.spec.schedule["default_separation"] = 1.5  # the model's default applies when none is asked for
    assert generate_series(model, enc, PROMPTS, seed=3, steps=3).separation == 1.5


def test_a_lesion_load_series_takes_the_models_lesion_separation(tiny):
    """A model may separate a series of lesion-load prompts more than other series: without --separation a
    series whose every prompt names a lesion load (and none a diagnosis) gets the model's
    ``default_separation_lesion_load``, any other series the general default; an asked-for one wins."""
    from CounterfactualGenLib.cli import Events, _load
    from CounterfactualGenLib.errors import ModelError
    from CounterfactualGenLib.models import ModelSpec
    from CounterfactualGenLib.pipeline import generate_series, series_separation

    lesion = ["Subject has no lesions.", "Subject has high lesion load."]
    dx = ["Subject is cognitively normal (CN).", "Subject has mild Alzheimer's dementia (AD)."]
    mixed = ["Subject has no lesions.", "Subject has mild Alzheimer's dementia (AD)."]
    schedule = {"default_separation": 1.5, "default_separation_lesion_load": 2.5}
    assert series_separation(schedule, lesion) == 2.5
    assert series_separation(schedule, dx) == 1.5 and series_separation(schedule, mixed) == 1.5
    assert series_separation(schedule, ["Subject is cognitively normal (CN) with no lesions.", *lesion]) == 1.5
    assert series_separation(schedule, ["A brain.", *lesion]) == 1.5  # a prompt on no known scale
    assert series_separation({"default_separation": 1.5}, lesion) == 1.5  # a model without one
    assert series_separation({}, lesion) == 0.0
    model, enc = _load(str(tiny), None, Events(json_mode=False))
    model.spec.schedule.update(schedule)
    assert generate_series(model, enc, lesion, seed=3, steps=2).separation == 2.5
    assert generate_series(model, enc, dx, seed=3, steps=2).separation == 1.5
    assert generate_series(model, enc, lesion, seed=3, steps=2, separation=0.5).separation == 0.5
    spec = model.spec.to_dict()
    for bad in (-1, 21, "2", True):
        spec["schedule"]["default_separation_lesion_load"] = bad
        with pytest.raises(ModelError, match="default_separation_lesion_load"):
            ModelSpec.from_dict(spec)


def test_separation_guides_each_member_away_from_the_one_before_it(tiny, monkeypatch):
    """The away prompt of member i is member i−1's (the first member's is the second's), not the series' mean."""
    import torch

    from CounterfactualGenLib.cli import Events, _load
    from CounterfactualGenLib.pipeline import generate_series
    from CounterfactualGenLib.sampling import samplers

    seen, real = [], samplers.guided

    def spy(model, cond, null, scale, *, away_context=None, away_scale=0.0):
        if away_scale:
            seen.append((cond.clone(), away_context.clone()))
        return real(model, cond, null, scale, away_context=away_context, away_scale=away_scale)

    monkeypatch.setattr(samplers, "guided", spy)
    model, enc = _load(str(tiny), None, Events(json_mode=False))
    prompts = ["Subject has no lesions.", "Subject has minimal lesion load.", "Subject has high lesion load."]
    generate_series(model, enc, prompts, seed=3, steps=3, share=0.0, separation=2.0)
    assert seen
    cond, away = seen[0]
    assert cond.shape[0] == 3 and away.shape == cond.shape
    for i, j in ((0, 1), (1, 0), (2, 1)):
        assert torch.equal(away[i], cond[j]), (i, j)
    assert not torch.allclose(away[1], cond.mean(0))


def test_progress_json_lines(tiny, tmp_path, capsys):
    assert _generate(tiny, tmp_path / "o", "--progress-json") == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    prog = [e for e in lines if e["event"] == "progress" and e["stage"] == "sample"]
    assert [e["step"] for e in prog][-3:] == [1, 2, 3] and all(e["total"] == 3 for e in prog)
    assert all(set(e) >= {"stage", "step", "total", "eta_s"} for e in prog)
    assert lines[-1]["event"] == "done" and lines[-1]["summary"].endswith("summary.json")


@pytest.mark.parametrize(
    "args,code,msg",
    [
        (["--steps", "0"], 3, "steps"),
        (["--guidance", "-1"], 3, "guidance"),
        (["--device", "cuda:7"], 3, "cuda|CUDA|GPU"),
        (["--share", "1"], 3, "share"),
        (["--share", "-0.1"], 3, "share"),
        (["--separation", "-1"], 3, "separation"),
        (["--separation", "21"], 3, "separation"),
    ],
)
def test_bad_arguments_are_clear_and_write_nothing(tiny, tmp_path, capsys, args, code, msg):
    assert _generate(tiny, tmp_path / "o", *args) == code
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    import re

    assert re.search(msg, err)
    assert not (tmp_path / "o").exists()


def test_missing_model_is_a_model_error(tmp_path, capsys):
    assert _generate(tmp_path / "nope", tmp_path / "o") == 4
    assert "No model folder" in capsys.readouterr().err


@pytest.mark.parametrize("case, msg", [
    ("input", "input scan file does not exist"),
    ("input_dir", "input scan path is a folder"),
    ("mask", "brain mask file does not exist"),
    ("lesion_mask", "lesion mask file does not exist"),
    ("out_file", "exists and is not a folder"),
])
def test_edit_refuses_bad_paths_before_loading_the_model(tmp_path, capsys, case, msg):
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(b"not read: the paths are checked first")
    out = tmp_path / "o"
    args = {"input": str(scan), "out": str(out)}
    extra: list[str] = []
    if case == "input":
        args["input"] = str(tmp_path / "missing.nii.gz")
    elif case == "input_dir":
        args["input"] = str(tmp_path)
    elif case == "mask":
        extra = ["--mask", str(tmp_path / "no_mask.nii.gz")]
    elif case == "lesion_mask":
        extra = ["--lesion-mask", str(tmp_path / "no_lesions.nii.gz")]
    else:
        out.write_text("a file")
    # the model folder does not exist either: an error about it (exit 4) would mean the model loaded first
    rc = main(["edit", "--model", str(tmp_path / "no_model"), "--input", args["input"], "--out", args["out"],
               "--to", "Subject has no lesions.", *extra])
    err = capsys.readouterr().err
    assert rc == 3, err
    assert msg in err and "Traceback" not in err
    if case != "out_file":
        assert not out.exists()
    rc = main(["batch", "--model", str(tmp_path / "no_model"), "--input", str(tmp_path), "--out", str(tmp_path / "b"),
               "--to", "Subject has no lesions.", *extra])
    if case in ("mask", "lesion_mask"):
        assert rc == 3 and msg in capsys.readouterr().err


def test_existing_files_in_out_are_kept_on_failure(tiny, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert _generate(tiny, out, "--steps", "0", "--overwrite") == 3
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]


def test_info_prints_card_and_devices(tiny, capsys):
    assert main(["info", str(tiny)]) == 0
    assert "Tiny test model" in capsys.readouterr().out
    assert main(["info", str(tiny), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == "tiny-wdm-test"
    assert main(["info", "--devices", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0] == {"id": "cpu", "name": "CPU"}


def test_sigterm_cancels_and_removes_partial_outputs(tiny, tmp_path):
    out = tmp_path / "o"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "CounterfactualGenLib.cli", "generate", "--model", str(tiny), "--out", str(out),
           "--steps", "1000", "--prompt", "Subject has high lesion load.", "--progress-json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    deadline = time.time() + 120
    for line in proc.stdout:
        ev = json.loads(line)
        if ev["event"] == "progress" and ev["stage"] == "sample" and ev["step"] >= 2:
            proc.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == 130
    events = [json.loads(x) for x in rest.splitlines() if x.strip()]
    assert events[-1]["event"] == "error" and events[-1]["kind"] == "Cancelled"
    assert not out.exists()


def test_demo_takes_a_text_encoder_table_and_the_precision(tiny, tmp_path, monkeypatch):
    """`demo --text-encoder-path TABLE` replays the prompts from a precomputed table (a GPU machine without the
    encoder) with the same result, and `--precision` reaches the sampler."""
    import CounterfactualGenLib.pipeline as pipeline
    from tiny_model import tiny_encoder
    from CounterfactualGenLib.cli import DIAGNOSIS_SERIES, LESION_SERIES
    from CounterfactualGenLib.text import write_embedding_table

    table = write_embedding_table(tiny_encoder(), LESION_SERIES + DIAGNOSIS_SERIES, tmp_path / "t.safetensors")
    real = pipeline.generate_series
    seen = []
    monkeypatch.setattr(pipeline, "generate_series", lambda *a, **k: seen.append(k["precision"]) or real(*a, **k))
    base = ["demo", "--model", str(tiny), "--steps", "2", "--precision", "fp32"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 0
    assert main(base + ["--text-encoder-path", str(table), "--out", str(tmp_path / "b")]) == 0
    assert seen == ["fp32"] * 4
    for f in sorted((tmp_path / "a").glob("*.nii.gz")):
        np.testing.assert_array_equal(read_volume(f).array, read_volume(tmp_path / "b" / f.name).array)
    assert len(list((tmp_path / "a").glob("*.nii.gz"))) == len(LESION_SERIES + DIAGNOSIS_SERIES)
    # the table is what encodes: one without the diagnosis prompts is refused, and nothing is written
    partial = write_embedding_table(tiny_encoder(), LESION_SERIES, tmp_path / "p.safetensors")
    assert main(base + ["--text-encoder-path", str(partial), "--out", str(tmp_path / "c")]) != 0
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("exc, kind, words", [
    (MemoryError(), "OutOfMemory", "Out of memory"),
    (ModuleNotFoundError("No module named 'monai'", name="monai"), "MissingDependency", "monai"),
])
def test_memory_and_missing_packages_are_not_reported_as_bugs(monkeypatch, capsys, exc, kind, words):
    """The machine's limits get their own exit code (5) and event kind, which the Slicer module explains;
    they are not a bug of ours (1, with a traceback)."""
    import CounterfactualGenLib.cli as cli

    def boom(args, ev):
        raise exc

    monkeypatch.setitem(cli.COMMANDS, "demo", boom)
    assert main(["demo", "--out", "unused", "--progress-json"]) == 5
    out, err = capsys.readouterr()
    events = [json.loads(line) for line in out.splitlines()]
    assert events[-1]["event"] == "error" and events[-1]["kind"] == kind and words in events[-1]["message"]
    assert "Traceback" not in err


def test_a_cancel_stops_at_the_next_stage_and_after_the_model_loads(tiny, tmp_path):
    """Registration, the oracle and text encoding poll nothing inside: a cancel asked for during them (or
    while the model loads) stops the run when the next stage starts, not only once sampling begins."""
    from CounterfactualGenLib.cli import Events, _load
    from CounterfactualGenLib.errors import Cancelled
    from CounterfactualGenLib.pipeline import Reporter

    asked = []
    rep = Reporter(None, lambda: bool(asked))
    rep.start("register")
    asked.append(True)
    with pytest.raises(Cancelled):
        rep.start("oracle")
    ev = Events(json_mode=False, quiet=True)
    ev.cancel_requested = True
    with pytest.raises(Cancelled):
        _load(str(tiny), None, ev)
