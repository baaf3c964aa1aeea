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

RESOURCES = ROOT / "Resources"
MAX_FILE_BYTES = 16 * 1024 * 1024  # the Extensions Index / device limits: each file ≤ 16 MiB
MAX_TOTAL_BYTES = 60 * 1024 * 1024


def card_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The acceptance numbers of an evaluation report, flat, for a spec's ``metrics``."""
    r = report["results"]
    m: dict[str, Any] = {
        "command": report["command"], "n_seeds": r["n_seeds"], "steps": report["settings"]["steps"],
        "guidance": report["settings"]["guidance"], "oracle": report["oracle"]["id"],
        "lesion_monotone_fraction": r["lesion_monotone_fraction"],
        "lesion_monotone_with_none_fraction": r["lesion_monotone_with_none_fraction"],
        "alignment_lesion": r["alignment"]["lesion_accuracy"], "alignment_diagnosis": r["alignment"]["diagnosis_accuracy"],
        "alignment_overall": r["alignment"]["overall_accuracy"],
        "subject_ms_ssim_lesion": r["subject_ms_ssim"]["lesion_series"],
        "subject_ms_ssim_diagnosis": r["subject_ms_ssim"]["diagnosis_series"],
        "subject_psnr_db_lesion": r["subject_psnr_db"]["lesion_series"],
        "diversity_pairwise_ms_ssim": r["diversity_pairwise_ms_ssim"]["value"],
    }
    if r.get("oracle_feature_fd"):
        m["oracle_feature_fd"] = r["oracle_feature_fd"]["value"]
    if r.get("edits"):
        e = r["edits"]["summary"]
        m["edits"] = {"n_subjects": r["edits"]["n_subjects"], "seconds_per_edit": r["edits"]["seconds_per_edit"],
                      "fill": e["fill"], "fill_with_mask": e["fill_with_mask"], "add": e["add"],
                      "composition_l1": e["composition_l1"], "reversibility_l1": e["reversibility_l1"]}
    return m


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
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


def install(src: Path, *, evaluation: Path | None, default: bool, expected: dict[str, str],
            oracle_name: str = "oracle-5mm") -> Path:
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
        if evaluation is not None:
            report = json.loads((evaluation / "report.json").read_text())
            if report["model"]["id"] != model.id:
                raise InputError(f"The evaluation in {evaluation} is of '{report['model']['id']}', not '{model.id}'.")
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
             "licence": model.spec.licence, "files": files, "expected_time": expected}
    _write_registry(entry, default=default)
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", help="a trained model folder (model.json) or oracle folder (oracle.json)")
    ap.add_argument("--evaluation", default=None, help="a `counterfactualgen evaluate` output folder for this model")
    ap.add_argument("--default", action="store_true", help="make it the default model")
    ap.add_argument("--as", dest="name", default="oracle-5mm", help="folder name for an oracle (default oracle-5mm)")
    ap.add_argument("--expected-time", action="append", default=[], metavar="TASK=TIME",
                    help="a wall time you measured, shown in the Slicer panel, e.g. 'demo, 2-core CPU=40 s' (repeatable)")
    args = ap.parse_args(argv)
    expected = dict(kv.split("=", 1) for kv in args.expected_time)
    dest = install(Path(args.folder), evaluation=Path(args.evaluation) if args.evaluation else None,
                   default=args.default, expected=expected, oracle_name=args.name)
    print(f"Installed {args.folder} → {dest} and registered it in {RESOURCES / 'Models.json'}.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
