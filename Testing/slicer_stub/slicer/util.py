"""Stand-in slicer.util: same names, parameter names and defaults as Base/Python/slicer/util.py.

Only the functions the CounterfactualGen module uses. Volumes go through SimpleITK with
Slicer's convention: files are LPS, nodes are RAS, arrays are [k, j, i].
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os

import numpy as np

#: Every dialog shown, as (kind, text) - tests read it.
displayed = []
#: Answer of confirm dialogs (tests may change it).
confirmAnswer = True


class MRMLNodeNotFoundException(Exception):
    pass


def mainWindow():
    return None  # headless


def startupEnvironment():
    import slicer

    startupEnv = slicer.app.startupEnvironment()
    return {varname: startupEnv.value(varname) for varname in list(startupEnv.keys()) if varname}


def tempDirectory(key="__SlicerTemp__", tempDir=None, includeDateTime=True):
    import slicer

    if not tempDir:
        tempDir = slicer.app.temporaryPath
    if includeDateTime:
        tempDirName = key + datetime.datetime.now().strftime("%Y-%m-%d_%H+%M+%S.%f")[:-3]
    else:
        tempDirName = key
    dirPath = os.path.join(tempDir, tempDirName)
    os.makedirs(dirPath, exist_ok=True)
    return dirPath


# ---------------------------------------------------------------------------- volumes
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_WRITABLE = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")


def _ijkToRASFromImage(image):
    d = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = d @ np.diag(image.GetSpacing())
    m[:3, 3] = image.GetOrigin()
    return _LPS_TO_RAS @ m


def _imageFromNode(node):
    import SimpleITK as sitk

    arr = np.asarray(node._array)
    image = sitk.GetImageFromArray(arr)
    m = _LPS_TO_RAS @ node.GetIJKToRASMatrixArray()
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (m[:3, :3] / spacing).ravel()])
    image.SetOrigin([float(v) for v in m[:3, 3]])
    return image


def loadNodeFromFile(filename, filetype=None, properties={}, returnNode=False):
    import SimpleITK as sitk

    import slicer

    if filetype != "VolumeFile":
        raise NotImplementedError(f"stand-in loads only volumes, not {filetype}")
    if not os.path.isfile(filename):
        logging.error(f"Failed to load node from file: {filename}")
        return None
    image = sitk.ReadImage(str(filename))
    labelmap = bool(properties.get("labelmap", False))
    className = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    name = properties.get("name") or os.path.basename(filename).split(".")[0]
    node = slicer.mrmlScene.AddNewNodeByClass(className, name)
    node._array = sitk.GetArrayFromImage(image)
    node.SetIJKToRASMatrixArray(_ijkToRASFromImage(image))
    storage = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.fileName = str(filename)
    node.SetAndObserveStorageNodeID(storage.GetID())
    node.CreateDefaultDisplayNodes()
    return node


def loadLabelVolume(filename, properties={}, returnNode=False):
    properties["labelmap"] = True
    return loadNodeFromFile(filename, "VolumeFile", properties, returnNode)


def loadVolume(filename, properties={}, returnNode=False):
    filetype = "VolumeFile"
    return loadNodeFromFile(filename, filetype, properties, returnNode)


def exportNode(node, filename, properties={}, world=False):
    import SimpleITK as sitk

    if not str(filename).lower().endswith(_WRITABLE):
        raise ValueError(f"Failed to export {node.GetID()} - no known file format was found for filename {filename}")
    if world and node.GetTransformNodeID():
        raise NotImplementedError("stand-in cannot harden transforms")
    properties["fileFormat"] = os.path.splitext(str(filename))[1]
    sitk.WriteImage(_imageFromNode(node), str(filename))
    return True


def saveNode(node, filename, properties={}):
    return exportNode(node, filename, properties)


def arrayFromVTKMatrix(vmatrix):
    return np.array([[vmatrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def vtkMatrixFromArray(narray):
    import vtk

    vmatrix = vtk.vtkMatrix4x4()
    narray = np.asarray(narray, dtype=float)
    for r in range(4):
        for c in range(4):
            vmatrix.SetElement(r, c, narray[r, c])
    return vmatrix


def arrayFromVolume(volumeNode):
    return volumeNode._array


def updateVolumeFromArray(volumeNode, narray):
    volumeNode._array = np.array(narray, copy=True)


def addVolumeFromArray(narray, ijkToRAS=None, name=None, nodeClassName=None):
    import slicer

    if name is None:
        name = ""
    if nodeClassName is None:
        nodeClassName = "vtkMRMLScalarVolumeNode"
    volumeNode = slicer.mrmlScene.AddNewNodeByClass(nodeClassName, name)
    if ijkToRAS is not None:
        volumeNode.SetIJKToRASMatrixArray(np.asarray(ijkToRAS, dtype=float))
    updateVolumeFromArray(volumeNode, narray)
    volumeNode.CreateDefaultDisplayNodes()
    return volumeNode


def getNode(pattern="*", index=0, scene=None):
    import fnmatch

    import slicer

    scene = scene or slicer.mrmlScene
    found = [n for n in scene.GetNodes() if fnmatch.fnmatchcase(n.GetName(), pattern) or n.GetID() == pattern]
    if len(found) <= index:
        raise MRMLNodeNotFoundException(f"could not find nodes in the scene by name or id '{pattern}'")
    return found[index]


def setSliceViewerLayers(background="keep-current", foreground="keep-current", label="keep-current",
                         foregroundOpacity=None, labelOpacity=None, fit=False, rotateToVolumePlane=False):
    import slicer

    if fit and slicer.app.layoutManager() is None:
        return  # as in Slicer: fitting needs views


# ---------------------------------------------------------------------------- dialogs
def delayDisplay(message, autoCloseMsec=1000, parent=None, **kwargs):
    displayed.append(("delay", message))


def infoDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
    displayed.append(("info", text))


def warningDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
    displayed.append(("warning", text))


def errorDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
    displayed.append(("error", text))


def confirmOkCancelDisplay(text, windowTitle=None, parent=None, **kwargs):
    displayed.append(("confirm", text))
    return confirmAnswer


def confirmYesNoDisplay(text, windowTitle=None, parent=None, **kwargs):
    displayed.append(("confirm", text))
    return confirmAnswer


@contextlib.contextmanager
def tryWithErrorDisplay(message=None, show=True, waitCursor=False):
    """As Slicer's: shows the error (not in testing mode) and raises it again (Base/Python/slicer/util.py)."""
    try:
        yield
    except Exception as e:
        import slicer

        if show and not slicer.app.testingEnabled():
            errorMessage = f"{message}\n\n{e}" if message is not None else str(e)
            errorDisplay(errorMessage)
        raise


# ---------------------------------------------------------------------------- GUI helpers
def loadUI(path):
    raise NotImplementedError("the stand-in has no Qt: widgets are not created in tests")


def childWidgetVariables(widget):
    raise NotImplementedError("the stand-in has no Qt: widgets are not created in tests")


class VTKObservationMixin:
    def __init__(self):
        super().__init__()
        self.__observations = []

    @property
    def Observations(self):
        return self.__observations

    def removeObservers(self, method=None):
        for obj, event, m, tag in list(self.__observations):
            if method is None or m == method:
                obj.RemoveObserver(tag)
                self.__observations.remove((obj, event, m, tag))

    def addObserver(self, obj, event, method, group="none", priority=0.0):
        tag = obj.AddObserver(event, method, priority)
        self.__observations.append((obj, event, method, tag))

    def removeObserver(self, obj, event, method):
        for o, e, m, tag in list(self.__observations):
            if o is obj and e == event and m == method:
                obj.RemoveObserver(tag)
                self.__observations.remove((o, e, m, tag))

    def hasObserver(self, obj, event, method):
        return any(o is obj and e == event and m == method for o, e, m, _ in self.__observations)


# ---------------------------------------------------------------------------- packages
#: pip_install calls recorded for tests.
pipInstallCalls = []


def pip_install(requirements, **kwargs):
    pipInstallCalls.append((requirements, kwargs))
