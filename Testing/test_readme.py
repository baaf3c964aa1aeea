"""The README's commands are the ones CI runs, and its promises point at real things."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```(?:bash|sh)\n(.*?)```", text, re.S)
    assert block, "README must open with a bash block holding the two commands"
    return [line.strip() for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_readme_opens_with_exactly_two_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    assert "counterfactualgen demo" in cmds[0]
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _readme_commands()[1] in [line.strip() for line in ci]


def test_licence_and_notice_exist():
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    notice = (ROOT / "NOTICE").read_text()
    assert "Lesjak" in notice and "CC-BY" in notice


def test_readme_has_no_unfilled_placeholders():
    text = (ROOT / "README.md").read_text()
    prose = re.sub(r"`[^`]*`", "", re.sub(r"```.*?```", "", text, flags=re.S))  # code may hold METAVARS
    leftovers = re.findall(r"\b[A-Z]+(?:_[A-Z]+)+\b", prose)
    assert not leftovers, leftovers


def test_readme_numbers_are_the_bundled_models_recorded_metrics():
    """The numbers table is exactly what the bundled model's spec records (from `counterfactualgen evaluate`)."""
    import importlib.util
    import json
    import sys

    spec = importlib.util.spec_from_file_location("install_model", ROOT / "Training" / "install_model.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["install_model"] = mod
    spec.loader.exec_module(mod)
    from CounterfactualGenLib.models import registry, resolve_model

    folder = resolve_model(None)
    metrics = json.loads((folder / "model.json").read_text())["metrics"]
    entry = next(e for e in registry() if e["path"] == folder.name)
    table = mod.numbers_table(entry["id"], metrics, entry.get("expected_time") or {})
    text = (ROOT / "README.md").read_text()
    assert f"{mod.README_BEGIN}\n{table}\n{mod.README_END}" in text


def test_lower_bounds_file_matches_pyproject():
    """Testing/lower_bounds.txt pins every ``name>=X`` of pyproject.toml (torch aside) to the X series, and nothing else."""
    text = (ROOT / "pyproject.toml").read_text()
    deps = re.findall(r'"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?>=([0-9][0-9.]*)[^"]*"', text)

    def norm(name):
        return re.sub(r"[-_.]+", "-", name).lower()

    bounds = {norm(n): v for n, v in deps if norm(n) not in ("torch", "setuptools")}
    pins = {}
    for line in (ROOT / "Testing" / "lower_bounds.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[norm(name)] = version.removesuffix(".*")
    assert pins == bounds
