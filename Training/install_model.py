#!/usr/bin/env python
"""Install a trained model (or oracle) into ``Resources/`` and register it in ``Resources/Models.json``.

    python Training/install_model.py runs/cfg-wdm-flair-5mm-cpu/model --evaluation runs/eval --default \\
        --expected-time "demo, 2-core CPU=40 s" --expected-time "edit, 2-core CPU=5 s"
    python Training/install_model.py runs/oracle_5mm/oracle --as oracle-5mm

The folder is verified first (every file's size and SHA-256 against its spec, the weights
load strictly), then copied atomically to ``Resources/Models/<id>`` (oracles: ``--as``,
default ``oracle-5mm``). With ``--evaluation DIR`` the numbers of that
``counterfactualgen evaluate`` report (``DIR/report.json``) are written into the spec's
``metrics`` and appended to the model card with the command that produced them, so the
card's numbers always come from a command anyone can rerun. The registry entry lists every
file with its SHA-256 and size, the licence and the expected times you measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from CounterfactualGenLib.errors import InputError  # noqa: E402
from CounterfactualGenLib.models import publish_folder  # noqa: E402
from CounterfactualGenLib.evaluation.report import separation_text  # noqa: E402

RESOURCES = ROOT / "Resources"
MAX_FILE_BYTES = 16 * 1024 * 1024  # the Extensions Index / device limits: each file ≤ 16 MiB
MAX_TOTAL_BYTES = 60 * 1024 * 1024


def card_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The acceptance numbers of an evaluation report, flat, for a spec's ``metrics``."""
    r = report["results"]
    m: dict[str, Any] = {
        "command": report["command"], "n_seeds": r["n_seeds"], "steps": report["settings"]["steps"],
        "guidance": report["settings"]["guidance"], "share": report["settings"].get("share", 0.0),
        "separation": report["settings"].get("separation", 0.0),
        "separation_lesion_load": report["settings"].get("separation_lesion_load",
                                                         report["settings"].get("separation", 0.0)),
        "oracle": report["oracle"]["id"],
        "lesion_monotone_fraction": r["lesion_monotone_fraction"],
        "lesion_monotone_with_none_fraction": r["lesion_monotone_with_none_fraction"],
        "alignment_lesion": r["alignment"]["lesion_accuracy"], "alignment_diagnosis": r["alignment"]["diagnosis_accuracy"],
        "alignment_overall": r["alignment"]["overall_accuracy"],
        "subject_ms_ssim_lesion": r["subject_ms_ssim"]["lesion_series"],
        "subject_ms_ssim_diagnosis": r["subject_ms_ssim"]["diagnosis_series"],
        "subject_psnr_db_lesion": r["subject_psnr_db"]["lesion_series"],
        "diversity_pairwise_ms_ssim": r["diversity_pairwise_ms_ssim"]["value"],
        "diversity_n_seeds": r["diversity_pairwise_ms_ssim"].get("n_seeds", r["n_seeds"]),
    }
    if r.get("intervals_95"):
        m["intervals_95"] = {k: v for k, v in r["intervals_95"].items() if k != "method"}
    if r.get("twin_reference"):
        m["twin_subject_ms_ssim_lesion"] = r["twin_reference"]["subject_ms_ssim"]["lesion"]
        m["twin_subject_ms_ssim_diagnosis"] = r["twin_reference"]["subject_ms_ssim"]["diagnosis"]
        if r["twin_reference"].get("alignment"):
            m["twin_alignment_lesion"] = r["twin_reference"]["alignment"]["lesion_accuracy"]
            m["twin_alignment_diagnosis"] = r["twin_reference"]["alignment"]["diagnosis_accuracy"]
            if r["twin_reference"].get("intervals_95"):
                m["twin_alignment_lesion_interval_95"] = r["twin_reference"]["intervals_95"]["lesion_accuracy"]
    if r.get("oracle_feature_fd"):
        m["oracle_feature_fd"] = r["oracle_feature_fd"]["value"]
    if r.get("edits"):
        e = r["edits"]["summary"]
        m["edits"] = {"n_subjects": r["edits"]["n_subjects"], "seconds_per_edit": r["edits"]["seconds_per_edit"],
                      "fill": e["fill"], "fill_text_only": e.get("fill_text_only"), "fill_with_mask": e["fill_with_mask"],
                      "add": e["add"], **({"atrophy": e["atrophy"]} if e.get("atrophy") else {}),
                      "composition_l1": e["composition_l1"], "reversibility_l1": e["reversibility_l1"]}
    return m


def _pct(v: Any, nd: int = 0) -> str:
    return "—" if v is None else f"{100 * float(v):.{nd}f} %"


def _num(v: Any, nd: int = 3) -> str:
    return "—" if v is None else f"{float(v):.{nd}f}"


def _interval(iv: Any, nd: int = 0) -> str:
    """``" (95 % interval a–b %)"`` for a recorded interval over seeds, or nothing."""
    return f" (95 % interval {100 * iv[0]:.{nd}f}–{100 * iv[1]:.{nd}f} %)" if iv else ""


def numbers_table(model_id: str, metrics: dict[str, Any], expected_time: dict[str, str]) -> str:
    """The README's numbers table, made from the bundled model's recorded metrics (a test keeps them equal)."""
    m = metrics
    iv = m.get("intervals_95") or {}
    rows = [
        ("lesion-load series monotone, oracle ml minimal < moderate < high", _pct(m["lesion_monotone_fraction"]),
         f"of {m['n_seeds']} seeds{_interval(iv.get('lesion_monotone_fraction'))} (with *none* in front: "
         f"{_pct(m['lesion_monotone_with_none_fraction'])})"),
        # one decimal: the acceptance target (≥ 90 %) must not be met by rounding
        ("text alignment: lesion load / CN-MCI-AD / all", f"{_pct(m['alignment_lesion'], 1)} / "
         f"{_pct(m['alignment_diagnosis'], 1)} / {_pct(m['alignment_overall'], 1)}",
         "oracle class = prompt class; chance 25 % / 33 %"
         + (f"; lesion load{_interval(iv['lesion_accuracy'], 1)}, seeds as clusters" if iv.get("lesion_accuracy") else "")
         + (f"; exact engine twins read by the same oracle: {_pct(m['twin_alignment_lesion'], 1)}"
            f"{_interval(m.get('twin_alignment_lesion_interval_95'), 1)} / "
            f"{_pct(m['twin_alignment_diagnosis'], 1)}" if m.get("twin_alignment_lesion") is not None else "")),
        ("subject MS-SSIM within a series (lesion / diagnosis)", f"{_num(m['subject_ms_ssim_lesion'])} / "
         f"{_num(m['subject_ms_ssim_diagnosis'])}", "one shared noise"
         + (f" and the first {_pct(m['share'])} of the steps" if m.get("share") else "")
         + (f"; separation {separation_text(m)}" if m.get("separation") or m.get("separation_lesion_load") else "")
         + "; Imagining Alternatives WDM (MS): 0.968"
         + (f"; exact engine twins: {_num(m['twin_subject_ms_ssim_lesion'])} / {_num(m['twin_subject_ms_ssim_diagnosis'])}"
            if m.get("twin_subject_ms_ssim_lesion") is not None else "")),
        ("diversity across seeds (pairwise MS-SSIM, lower = more diverse)", _num(m["diversity_pairwise_ms_ssim"]),
         f"first {m['diversity_n_seeds']} seeds" if m.get("diversity_n_seeds", m["n_seeds"]) < m["n_seeds"] else ""),
    ]
    e = m.get("edits")
    if e:
        f, ft, fm, a = e["fill"], e.get("fill_text_only"), e["fill_with_mask"], e["add"]
        rows += [
            ("lesion filling without a mask (the oracle's segmentation) vs exact twin: PSNR in brain (unedited input)",
             f"{_num(f['psnr_db'], 2)} dB ({_num(f['baseline_psnr_db'], 2)} dB)", f"{e['n_subjects']} held-out subjects"
             + (f"; by the text alone (no segmentation): {_num(ft['psnr_db'], 2)} dB" if ft else "")),
            ("lesion filling with the lesion mask (inpainting): PSNR (unedited) / Dice of removed voxels",
             f"{_num(fm['psnr_db'], 2)} dB ({_num(fm['baseline_psnr_db'], 2)} dB) / {_num(fm['dice_removed_vs_true'])}",
             f"the mask filled by harmonic interpolation alone, without the model: {_num(fm['laplace_psnr_db'], 2)} dB"
             if fm.get("laplace_psnr_db") is not None else ""),
            ("lesion volume error vs exact twin (oracle): filling / with the mask / addition",
             f"{_num(f['oracle_ml_error_vs_twin'], 2)} ml / {_num(fm['oracle_ml_error_vs_twin'], 2)} ml / "
             f"{_num(a['oracle_ml_error_vs_twin'], 2)} ml", ""),
            ("effectiveness (oracle class after edit = target): filling / with the mask / addition",
             f"{_pct(f['effectiveness'])} / {_pct(fm['effectiveness'])} / {_pct(a['effectiveness'])}",
             "Monteiro et al. axiom" + ("; filling without a mask is read by the oracle that chose its voxels "
                                        f"(by the text alone: {_pct(ft['effectiveness'])})" if ft else "")),
            *([("diagnosis edit CN → AD vs the exact AD twin: PSNR in brain (unedited CN twin) / read as AD",
                f"{_num(e['atrophy']['psnr_db'], 2)} dB ({_num(e['atrophy']['baseline_psnr_db'], 2)} dB) / "
                f"{_pct(e['atrophy']['effectiveness'])}", "the same subjects' CN twins, oracle diagnosis after")]
              if e.get("atrophy") else []),
            ("composition L1, m = " + ", ".join(e["composition_l1"]) + " null edits; reversibility L1",
             ", ".join(_num(v, 4) for v in e["composition_l1"].values()) + f"; {_num(e['reversibility_l1'], 4)}",
             "brain, model units (range 2); 0 = perfect"),
            ("voxels outside the brain bit-identical to the input", _pct(f["outside_brain_bit_identical"]), "every edit"),
            ("edit time (model grid, registration skipped)", f"{_num(e['seconds_per_edit'], 2)} s", "2-core CPU"),
        ]
    for k, v in expected_time.items():
        rows.append((f"wall time: {k}", v, ""))
    lines = [f"Model `{model_id}`, {m['n_seeds']} seeds, {m['steps']} steps, guidance {m['guidance']}, "
             f"shared steps {m.get('share', 0.0):g}, separation {separation_text(m)}, oracle "
             f"`{m['oracle']}`. Recompute: `{m['command']}`.", "",
             "| measure | value | note |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def card_section(report: dict[str, Any], markdown: str) -> str:
    """The measured section appended to the model card: the report's Markdown, minus its title."""
    body = markdown.split("\n", 1)[1] if markdown.startswith("# ") else markdown
    body = body.replace("![oracle readings](report.png)", "")
    body = body.replace(f"Command: `{report['command']}`\n", "")
    return ("\n## Measured (by `counterfactualgen evaluate`)\n\n"
            f"Recompute: `{report['command']}` (then `Training/install_model.py --evaluation` copies the numbers "
            f"here).\n{body}")


def _files_entry(folder: Path, files: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for f in files:
        p = folder / f["name"]
        if p.stat().st_size > MAX_FILE_BYTES:
            raise InputError(f"{p} is {p.stat().st_size / 2**20:.1f} MiB; bundled files must be ≤ 16 MiB "
                             "(save with split files / fp16).")
        out.append({"name": f["name"], "sha256": f["sha256"], "bytes": int(f["bytes"]), "role": f.get("role")})
    if sum(f["bytes"] for f in out) > MAX_TOTAL_BYTES:
        raise InputError("A bundled model must total ≤ 60 MiB.")
    return out


def _copy_atomic(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=str(dest.parent)))
    try:
        for f in src.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
                os.chmod(tmp / f.name, 0o644)
        os.chmod(tmp, 0o755)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_folder(tmp, dest)


README_BEGIN = "<!-- numbers:begin (written by Training/install_model.py --default; Testing/test_readme.py checks it) -->"
README_END = "<!-- numbers:end -->"


def write_readme_numbers(readme: Path, table: str) -> None:
    """Replace the README's numbers block (between the two markers) with ``table``."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise InputError(f"{readme} has no numbers block ({README_BEGIN} … {README_END}).")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    tmp = readme.with_name(".partial-" + readme.name)
    tmp.write_text(f"{head}{README_BEGIN}\n{table}\n{README_END}{tail}")
    os.replace(tmp, readme)


def _write_registry(entry: dict[str, Any], default: bool) -> Path:
    path = RESOURCES / "Models.json"
    data = json.loads(path.read_text()) if path.exists() else {"format": "counterfactualgen-registry", "models": []}
    data["models"] = [e for e in data.get("models", []) if e.get("id") != entry["id"]] + [entry]
    if default:
        data["default"] = entry["id"]
    tmp = path.with_name(".partial-Models.json")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def _set_default(spec: dict, work: Path, key: str, value: Any, note: str, card_line: str) -> None:
    """Record ``schedule.default_<key>`` (and its note) in the staged model.json, and a ``| <key> |`` row in its card."""
    import re

    spec["schedule"][f"default_{key}"] = value
    if note:
        spec["schedule"][f"default_{key}_note"] = note
    (work / "model.json").write_text(json.dumps(spec, indent=2))
    if not (work / "MODEL_CARD.md").exists():
        return
    text = (work / "MODEL_CARD.md").read_text()
    cut = text.find("\n## ")  # only the card's first table: later sections have tables of their own
    card, rest = (text, "") if cut < 0 else (text[:cut], text[cut:])
    row = re.escape(card_line.split(" | ")[0] + " |")  # e.g. "| series |"
    if re.search(rf"^{row}.*$", card, flags=re.M):
        card = re.sub(rf"^{row}.*$", lambda _m: card_line, card, count=1, flags=re.M)
    elif re.search(r"^\| schedule \|.*$", card, flags=re.M):
        card = re.sub(r"^(\| schedule \|.*)$", lambda mt: mt.group(1) + "\n" + card_line, card, count=1, flags=re.M)
    else:  # a card without the training table: a table of its own
        card = card.rstrip("\n") + "\n\n| | |\n|---|---|\n" + card_line + "\n"
    (work / "MODEL_CARD.md").write_text(card + rest)


def install(src: Path, *, evaluation: Path | None, default: bool, expected: dict[str, str],
            oracle_name: str = "oracle-5mm", readme: Path | None = ROOT / "README.md",
            default_guidance: float | None = None, guidance_note: str = "",
            default_share: float | None = None, share_note: str = "",
            default_steps: int | None = None, steps_note: str = "",
            default_separation: float | None = None, separation_note: str = "",
            default_separation_lesion_load: float | None = None, separation_lesion_load_note: str = "") -> Path:
    if (src / "oracle.json").exists():
        from CounterfactualGenLib.evaluation.oracle import load_oracle

        oracle = load_oracle(src)  # verifies sizes, hashes, strict load
        files = _files_entry(src, oracle.spec.files)
        dest = RESOURCES / "Models" / oracle_name
        _copy_atomic(src, dest)
        _write_registry({"id": oracle.id, "kind": "oracle", "path": oracle_name, "name": f"Evaluation oracle {oracle.id}",
                         "licence": oracle.spec.licence, "files": files, "grid": oracle.grid.to_dict(),
                         "validation": oracle.spec.metrics}, default=False)
        return dest

    from CounterfactualGenLib.models import load_model

    model = load_model(src)  # verifies sizes, hashes, strict load
    spec_path = src / "model.json"
    spec = json.loads(spec_path.read_text())
    work = Path(tempfile.mkdtemp(prefix="install-"))
    try:
        for f in src.iterdir():
            if f.is_file():
                shutil.copy2(f, work / f.name)
        if default_guidance is not None:
            import re

            old = spec["schedule"].get("default_guidance")
            spec["schedule"]["default_guidance"] = float(default_guidance)
            if guidance_note:
                spec["schedule"]["default_guidance_note"] = guidance_note
            (work / "model.json").write_text(json.dumps(spec, indent=2))
            if (work / "MODEL_CARD.md").exists():
                card = (work / "MODEL_CARD.md").read_text()
                card = re.sub(r"(Euler steps by default, guidance )[0-9.]+",
                              lambda mt: f"{mt.group(1)}{float(default_guidance):g}"
                              + (f" ({guidance_note})" if guidance_note else ""), card, count=1)
                (work / "MODEL_CARD.md").write_text(card)
            print(f"Default guidance {old} → {float(default_guidance):g}.", file=sys.stderr)
        if default_share is not None:
            if not 0.0 <= float(default_share) < 1.0:
                raise InputError(f"--default-share must be at least 0 and below 1; got {default_share}.")
            old = spec["schedule"].get("default_share", 0.0)
            _set_default(spec, work, "share", float(default_share), share_note,
                         f"| series | one shared noise; the first {float(default_share):g} of the sampler steps are shared "
                         f"too before the series branches{f' ({share_note})' if share_note else ''} |")
            print(f"Default share {old:g} → {float(default_share):g}.", file=sys.stderr)
        if default_separation is not None:
            if not 0.0 <= float(default_separation) <= 20.0:
                raise InputError(f"--default-separation must be between 0 and 20; got {default_separation}.")
            old = spec["schedule"].get("default_separation", 0.0)
            _set_default(spec, work, "separation", float(default_separation), separation_note,
                         f"| separation | after the branch each member of a series is guided away from the member "
                         f"before it with scale {float(default_separation):g}"
                         f"{f' ({separation_note})' if separation_note else ''} |")
            print(f"Default separation {old:g} → {float(default_separation):g}.", file=sys.stderr)
        if default_separation_lesion_load is not None:
            if not 0.0 <= float(default_separation_lesion_load) <= 20.0:
                raise InputError("--default-separation-lesion-load must be between 0 and 20; got "
                                 f"{default_separation_lesion_load}.")
            old = spec["schedule"].get("default_separation_lesion_load", spec["schedule"].get("default_separation", 0.0))
            _set_default(spec, work, "separation_lesion_load", float(default_separation_lesion_load),
                         separation_lesion_load_note,
                         f"| separation, lesion-load series | a series whose prompts all name a lesion load (and no "
                         f"diagnosis) is separated with scale {float(default_separation_lesion_load):g} instead"
                         f"{f' ({separation_lesion_load_note})' if separation_lesion_load_note else ''} |")
            print(f"Default separation of lesion-load series {old:g} → {float(default_separation_lesion_load):g}.",
                  file=sys.stderr)
        if default_steps is not None:
            if not 1 <= int(default_steps) <= 1000:
                raise InputError(f"--default-steps must be between 1 and 1000; got {default_steps}.")
            old = spec["schedule"].get("default_steps")
            _set_default(spec, work, "steps", int(default_steps), steps_note,
                         f"| steps | {int(default_steps)} sampler steps by default"
                         f"{f' ({steps_note})' if steps_note else ''} |")
            if (work / "MODEL_CARD.md").exists():
                import re

                card = re.sub(r"(rectified flow, )[0-9]+( Euler steps by default)",
                              lambda mt: f"{mt.group(1)}{int(default_steps)}{mt.group(2)}",
                              (work / "MODEL_CARD.md").read_text(), count=1)
                (work / "MODEL_CARD.md").write_text(card)
            print(f"Default steps {old} → {int(default_steps)}.", file=sys.stderr)
        if evaluation is not None:
            report = json.loads((evaluation / "report.json").read_text())
            if report["model"]["id"] != model.id:
                raise InputError(f"The evaluation in {evaluation} is of '{report['model']['id']}', not '{model.id}'.")
            g = float(spec["schedule"].get("default_guidance", 1.0))
            if abs(float(report["settings"]["guidance"]) - g) > 1e-9:
                raise InputError(f"The evaluation in {evaluation} ran at guidance {report['settings']['guidance']}, "
                                 f"but the model's default guidance is {g:g}: its numbers would not describe "
                                 "what users get. Evaluate at the default guidance.")
            n = spec["schedule"].get("default_steps")
            if n is not None and int(report["settings"]["steps"]) != int(n):
                raise InputError(f"The evaluation in {evaluation} ran {report['settings']['steps']} steps, but the "
                                 f"model's default is {int(n)}: evaluate at the default steps.")
            f = float(spec["schedule"].get("default_share", 0.0))
            if abs(float(report["settings"].get("share", 0.0)) - f) > 1e-9:
                raise InputError(f"The evaluation in {evaluation} shared {report['settings'].get('share', 0.0):g} of the "
                                 f"steps, but the model's default share is {f:g}: evaluate at the default share.")
            a = float(spec["schedule"].get("default_separation", 0.0))
            if abs(float(report["settings"].get("separation", 0.0)) - a) > 1e-9:
                raise InputError(f"The evaluation in {evaluation} ran at separation "
                                 f"{report['settings'].get('separation', 0.0):g}, but the model's default is {a:g}: "
                                 "evaluate at the default separation.")
            lesion_a = float(spec["schedule"].get("default_separation_lesion_load", a))
            ran = float(report["settings"].get("separation_lesion_load", report["settings"].get("separation", 0.0)))
            if abs(ran - lesion_a) > 1e-9:
                raise InputError(f"The evaluation in {evaluation} separated its lesion-load series with scale {ran:g}, "
                                 f"but the model's default for them is {lesion_a:g}: evaluate at the defaults "
                                 "(without --separation).")
            spec["metrics"] = card_metrics(report)
            (work / "model.json").write_text(json.dumps(spec, indent=2))
            card = (work / "MODEL_CARD.md").read_text() if (work / "MODEL_CARD.md").exists() else f"# {model.id}\n"
            card = card.split("\n## Measured (by `counterfactualgen evaluate`)")[0]
            card = card.replace("## Metrics\nNot measured yet: run the evaluation script (see README).\n",
                                "## Metrics\nSee *Measured* below.\n")
            (work / "MODEL_CARD.md").write_text(card.rstrip() + "\n" + card_section(report, (evaluation / "report.md").read_text()))
        files = _files_entry(work, spec["files"])
        dest = RESOURCES / "Models" / model.id
        _copy_atomic(work, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_model(dest)  # the installed copy verifies too
    entry = {"id": model.id, "kind": "generator", "path": model.id, "name": model.spec.name or model.id,
             "description": model.spec.description, "family": model.spec.family, "contrast": model.spec.contrast,
             "grid": model.spec.grid.to_dict(), "text_encoder": model.spec.text_encoder["id"],
             "licence": model.spec.licence, "files": files, "expected_time": expected,
             "defaults": {k: spec["schedule"][f"default_{k}"]
                          for k in ("steps", "guidance", "share", "separation", "separation_lesion_load")
                          if f"default_{k}" in spec["schedule"]}}
    _write_registry(entry, default=default)
    if default and spec.get("metrics", {}).get("command") and readme is not None:
        write_readme_numbers(readme, numbers_table(model.id, spec["metrics"], expected))
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", help="a trained model folder (model.json) or oracle folder (oracle.json)")
    ap.add_argument("--evaluation", default=None, help="a `counterfactualgen evaluate` output folder for this model")
    ap.add_argument("--default", action="store_true", help="make it the default model")
    ap.add_argument("--as", dest="name", default="oracle-5mm", help="folder name for an oracle (default oracle-5mm)")
    ap.add_argument("--expected-time", action="append", default=[], metavar="TASK=TIME",
                    help="a wall time you measured, shown in the Slicer panel, e.g. 'demo, 2-core CPU=40 s' (repeatable)")
    ap.add_argument("--default-guidance", type=float, default=None,
                    help="set the model's default guidance scale (e.g. chosen from evaluate's guidance sweep)")
    ap.add_argument("--guidance-note", default="", help="how the default guidance was chosen (recorded in spec and card)")
    ap.add_argument("--default-share", type=float, default=None,
                    help="set the fraction of sampler steps a series shares by default (e.g. from evaluate's share sweep)")
    ap.add_argument("--share-note", default="", help="how the default share was chosen (recorded in spec and card)")
    ap.add_argument("--default-steps", type=int, default=None,
                    help="set the model's default sampler steps (e.g. from evaluate's steps sweep)")
    ap.add_argument("--steps-note", default="", help="how the default steps were chosen (recorded in spec and card)")
    ap.add_argument("--default-separation", type=float, default=None,
                    help="set the model's default series separation (e.g. from evaluate's separation sweep)")
    ap.add_argument("--separation-note", default="",
                    help="how the default separation was chosen (recorded in spec and card)")
    ap.add_argument("--default-separation-lesion-load", type=float, default=None,
                    help="set the model's default separation for series of lesion-load prompts (default: the "
                         "general one)")
    ap.add_argument("--separation-lesion-load-note", default="",
                    help="how the lesion-load series' separation was chosen (recorded in spec and card)")
    args = ap.parse_args(argv)
    expected = dict(kv.split("=", 1) for kv in args.expected_time)
    dest = install(Path(args.folder), evaluation=Path(args.evaluation) if args.evaluation else None,
                   default=args.default, expected=expected, oracle_name=args.name,
                   default_guidance=args.default_guidance, guidance_note=args.guidance_note,
                   default_share=args.default_share, share_note=args.share_note,
                   default_steps=args.default_steps, steps_note=args.steps_note,
                   default_separation=args.default_separation, separation_note=args.separation_note,
                   default_separation_lesion_load=args.default_separation_lesion_load,
                   separation_lesion_load_note=args.separation_lesion_load_note)
    print(f"Installed {args.folder} → {dest} and registered it in {RESOURCES / 'Models.json'}.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
