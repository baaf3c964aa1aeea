"""Stand-in ``slicer`` package: an in-memory MRML scene with the node classes the module uses.

Method names follow MRML (vtkMRMLScene, vtkMRMLScalarVolumeNode, vtkMRMLSubjectHierarchyNode,
...). Only what CounterfactualGen calls is implemented; anything else raises AttributeError,
which is what makes the tests able to catch a call to a method the stand-in doesn't know.
"""

from __future__ import annotations

import itertools
import os
import tempfile

import numpy as np

_CLASS_PARENTS = {
    "vtkMRMLNode": None,
    "vtkMRMLStorableNode": "vtkMRMLNode",
    "vtkMRMLTransformableNode": "vtkMRMLStorableNode",
    "vtkMRMLDisplayableNode": "vtkMRMLTransformableNode",
    "vtkMRMLVolumeNode": "vtkMRMLDisplayableNode",
    "vtkMRMLScalarVolumeNode": "vtkMRMLVolumeNode",
    "vtkMRMLLabelMapVolumeNode": "vtkMRMLScalarVolumeNode",
    "vtkMRMLDisplayNode": "vtkMRMLNode",
    "vtkMRMLScalarVolumeDisplayNode": "vtkMRMLDisplayNode",
    "vtkMRMLLabelMapVolumeDisplayNode": "vtkMRMLDisplayNode",
    "vtkMRMLStorageNode": "vtkMRMLNode",
    "vtkMRMLVolumeArchetypeStorageNode": "vtkMRMLStorageNode",
    "vtkMRMLColorNode": "vtkMRMLStorableNode",
    "vtkMRMLColorTableNode": "vtkMRMLColorNode",
    "vtkMRMLTableNode": "vtkMRMLStorableNode",
    "vtkMRMLScriptedModuleNode": "vtkMRMLNode",
    "vtkMRMLSubjectHierarchyNode": "vtkMRMLNode",
    "vtkMRMLTransformNode": "vtkMRMLDisplayableNode",
    "vtkMRMLLinearTransformNode": "vtkMRMLTransformNode",
    "vtkMRMLGridTransformNode": "vtkMRMLTransformNode",
    "vtkMRMLSegmentationNode": "vtkMRMLDisplayableNode",
    "vtkMRMLSegmentationDisplayNode": "vtkMRMLDisplayNode",
}


def _isA(className, query):
    while className is not None:
        if className == query:
            return True
        className = _CLASS_PARENTS.get(className)
    return False


class vtkMRMLNode:
    className = "vtkMRMLNode"

    def __init__(self):
        self._id = None
        self._name = ""
        self._attributes = {}
        self._description = ""
        self._scene = None
        self._observers = {}
        self._tags = itertools.count(1)
        self.HideFromEditors = False

    # identity
    def GetClassName(self):
        return self.className

    def IsA(self, className):
        return _isA(self.className, className)

    def GetID(self):
        return self._id

    def GetName(self):
        return self._name

    def SetName(self, name):
        self._name = str(name)

    def GetScene(self):
        return self._scene

    # attributes
    def SetAttribute(self, name, value):
        if value is None:
            self._attributes.pop(name, None)
        else:
            self._attributes[str(name)] = str(value)

    def GetAttribute(self, name):
        return self._attributes.get(name)

    def GetAttributeNames(self):
        return list(self._attributes)

    def SetDescription(self, text):
        self._description = str(text)

    def GetDescription(self):
        return self._description

    def HideFromEditorsOff(self):
        self.HideFromEditors = False

    def SetHideFromEditors(self, value):
        self.HideFromEditors = bool(value)

    # observation (VTKObservationMixin calls these)
    def AddObserver(self, event, callback, priority=0.0):
        tag = next(self._tags)
        self._observers[tag] = (event, callback)
        return tag

    def RemoveObserver(self, tag):
        self._observers.pop(tag, None)

    def Modified(self):
        for event, callback in list(self._observers.values()):
            if event in (33, "ModifiedEvent"):
                callback(self, "ModifiedEvent")


class vtkMRMLStorageNode(vtkMRMLNode):
    className = "vtkMRMLVolumeArchetypeStorageNode"

    def __init__(self):
        super().__init__()
        self.fileName = ""

    def GetFileName(self):
        return self.fileName


class vtkMRMLStorableNode(vtkMRMLNode):
    className = "vtkMRMLStorableNode"

    def __init__(self):
        super().__init__()
        self._storageNodeID = None
        self.storableModifiedCount = 0

    def GetStorageNode(self):
        return self._scene.GetNodeByID(self._storageNodeID) if self._scene and self._storageNodeID else None

    def SetAndObserveStorageNodeID(self, nodeID):
        self._storageNodeID = nodeID

    def StorableModified(self):
        self.storableModifiedCount += 1


class vtkMRMLTransformableNode(vtkMRMLStorableNode):
    className = "vtkMRMLTransformableNode"

    def __init__(self):
        super().__init__()
        self._transformNodeID = None

    def SetAndObserveTransformNodeID(self, nodeID):
        self._transformNodeID = nodeID
        return True

    def GetTransformNodeID(self):
        return self._transformNodeID

    def GetParentTransformNode(self):
        return self._scene.GetNodeByID(self._transformNodeID) if self._scene and self._transformNodeID else None


class vtkMRMLDisplayNode(vtkMRMLNode):
    className = "vtkMRMLScalarVolumeDisplayNode"

    def __init__(self):
        super().__init__()
        self.colorNodeID = None
        self.autoWindowLevel = True
        self.windowLevelMinMax = None
        self.applyThreshold = 0
        self.threshold = None

    def SetAndObserveColorNodeID(self, nodeID):
        self.colorNodeID = nodeID

    def GetColorNode(self):
        return self._scene.GetNodeByID(self.GetColorNodeID()) if self._scene and self.GetColorNodeID() else None

    def GetColorNodeID(self):
        return self.colorNodeID

    def AutoWindowLevelOff(self):
        self.autoWindowLevel = False

    def SetWindowLevelMinMax(self, minimum, maximum):
        self.windowLevelMinMax = (float(minimum), float(maximum))

    def SetApplyThreshold(self, value):
        self.applyThreshold = int(value)

    def SetThreshold(self, lower, upper):
        self.threshold = (float(lower), float(upper))


class vtkMRMLDisplayableNode(vtkMRMLTransformableNode):
    className = "vtkMRMLDisplayableNode"

    def __init__(self):
        super().__init__()
        self._displayNodeIDs = []

    def GetDisplayNode(self):
        return self.GetNthDisplayNode(0) if self._displayNodeIDs else None

    def GetNumberOfDisplayNodes(self):
        return len(self._displayNodeIDs)

    def GetNthDisplayNode(self, n):
        return self._scene.GetNodeByID(self._displayNodeIDs[n]) if self._scene else None

    def SetAndObserveDisplayNodeID(self, nodeID):
        self._displayNodeIDs = [nodeID]

    def CreateDefaultDisplayNodes(self):
        if self.GetDisplayNode() is None and self._scene is not None:
            cls = ("vtkMRMLLabelMapVolumeDisplayNode" if self.IsA("vtkMRMLLabelMapVolumeNode")
                   else "vtkMRMLScalarVolumeDisplayNode")
            display = self._scene.AddNewNodeByClass(cls)
            self.SetAndObserveDisplayNodeID(display.GetID())


class vtkMRMLScalarVolumeNode(vtkMRMLDisplayableNode):
    className = "vtkMRMLScalarVolumeNode"

    def __init__(self):
        super().__init__()
        self._array = None
        self._ijkToRAS = np.eye(4)

    def GetIJKToRASMatrixArray(self):  # stand-in helper (real: GetIJKToRASMatrix(vtkMatrix4x4))
        return self._ijkToRAS.copy()

    def GetIJKToRASMatrix(self, matrix):
        for r in range(4):
            for c in range(4):
                matrix.SetElement(r, c, self._ijkToRAS[r, c])

    def SetIJKToRASMatrixArray(self, matrix):
        self._ijkToRAS = np.asarray(matrix, dtype=float).copy()

    def GetImageData(self):
        return self._array


class vtkMRMLLabelMapVolumeNode(vtkMRMLScalarVolumeNode):
    className = "vtkMRMLLabelMapVolumeNode"


class vtkSegmentation:
    """The segments of a segmentation node (IDs only; the stand-in keeps their binary labelmaps on the node)."""

    # extent computation modes (Libs/vtkSegmentationCore/vtkSegmentation.h, in this order)
    EXTENT_REFERENCE_GEOMETRY = 0
    EXTENT_UNION_OF_SEGMENTS = 1
    EXTENT_UNION_OF_SEGMENTS_PADDED = 2
    EXTENT_UNION_OF_EFFECTIVE_SEGMENTS = 3
    EXTENT_UNION_OF_EFFECTIVE_SEGMENTS_PADDED = 4
    EXTENT_UNION_OF_EFFECTIVE_SEGMENTS_AND_REFERENCE_GEOMETRY = 5

    def __init__(self):
        self._ids = []

    def GetNumberOfSegments(self):
        return len(self._ids)

    def GetNthSegmentID(self, index):
        return self._ids[index]


class vtkMRMLSegmentationDisplayNode(vtkMRMLDisplayNode):
    className = "vtkMRMLSegmentationDisplayNode"

    def __init__(self):
        super().__init__()
        self._hidden = set()

    def SetSegmentVisibility(self, segmentID, visible):
        (self._hidden.discard if visible else self._hidden.add)(segmentID)

    def GetSegmentVisibility(self, segmentID):
        return segmentID not in self._hidden

    def GetVisibleSegmentIDs(self, segmentIDs):
        """Fills a vtkStringArray with the visible segments' IDs (the node's segment order)."""
        node = next(n for n in self._scene.GetNodesByClassList("vtkMRMLSegmentationNode")
                    if self.GetID() in n._displayNodeIDs)
        for sid in node.GetSegmentation()._ids:
            if sid not in self._hidden:
                segmentIDs.InsertNextValue(sid)


class vtkMRMLSegmentationNode(vtkMRMLDisplayableNode):
    className = "vtkMRMLSegmentationNode"

    def __init__(self):
        super().__init__()
        self._segmentation = vtkSegmentation()
        self._labelmaps = {}

    def GetSegmentation(self):
        return self._segmentation

    def CreateDefaultDisplayNodes(self):
        if self.GetDisplayNode() is None and self._scene is not None:
            self.SetAndObserveDisplayNodeID(self._scene.AddNewNodeByClass("vtkMRMLSegmentationDisplayNode").GetID())

    def _setSegment(self, segmentID, array, ijkToRAS):  # stand-in helper: a segment's binary labelmap (KJI) and geometry
        if segmentID not in self._segmentation._ids:
            self._segmentation._ids.append(segmentID)
        self._labelmaps[segmentID] = (np.asarray(array) > 0, np.asarray(ijkToRAS, float))


class _SegmentationsLogic:
    """slicer.modules.segmentations.logic(): the export the module calls (vtkSlicerSegmentationsModuleLogic)."""

    @staticmethod
    def ExportSegmentsToLabelmapNode(segmentationNode, segmentIDs, labelmapNode, referenceVolumeNode=None,
                                     extentComputationMode=vtkSegmentation.EXTENT_UNION_OF_EFFECTIVE_SEGMENTS,
                                     colorTableNode=None):
        """Segment n of ``segmentIDs`` (a vtkStringArray) gets label n + 1, resampled (nearest) onto the
        reference volume's voxel grid; the stand-in needs a reference volume. Returns False for an unknown segment.

        As in Slicer (GenerateMergedLabelmapInReferenceGeometry), the default extent mode
        (EXTENT_UNION_OF_EFFECTIVE_SEGMENTS) crops the reference grid to the bounding box of the exported
        segments' voxels (the origin moves with it; no voxels at all when they are empty);
        EXTENT_REFERENCE_GEOMETRY keeps the reference volume's whole extent. The labelmap gets the reference
        volume's parent transform."""
        if referenceVolumeNode is None:
            raise NotImplementedError("stand-in exports onto a reference volume only")
        if extentComputationMode not in (vtkSegmentation.EXTENT_REFERENCE_GEOMETRY,
                                         vtkSegmentation.EXTENT_UNION_OF_EFFECTIVE_SEGMENTS):
            raise NotImplementedError(f"stand-in: extent mode {extentComputationMode}")
        ref = referenceVolumeNode.GetIJKToRASMatrixArray()
        shape = np.asarray(referenceVolumeNode._array).shape  # K, J, I
        k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
        ras = ref @ np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
        out = np.zeros(i.size, np.uint8)
        for n in range(segmentIDs.GetNumberOfValues()):
            sid = segmentIDs.GetValue(n)
            if sid not in segmentationNode._labelmaps:
                return False
            array, ijkToRAS = segmentationNode._labelmaps[sid]
            ijk = np.rint(np.linalg.inv(ijkToRAS) @ ras).astype(int)[:3]
            inside = np.all((ijk >= 0) & (ijk < np.array(array.shape[::-1])[:, None]), axis=0)
            hit = np.zeros(i.size, bool)
            hit[inside] = array[ijk[2, inside], ijk[1, inside], ijk[0, inside]]
            out[hit] = n + 1
        out = out.reshape(shape)
        ijkToRAS = ref.copy()
        if extentComputationMode == vtkSegmentation.EXTENT_UNION_OF_EFFECTIVE_SEGMENTS:
            found = np.nonzero(out)
            if found[0].size == 0:
                out = np.zeros((0, 0, 0), np.uint8)
            else:
                lo = [int(a.min()) for a in found]  # K, J, I
                hi = [int(a.max()) + 1 for a in found]
                out = out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
                ijkToRAS[:3, 3] = (ref @ np.array([lo[2], lo[1], lo[0], 1.0]))[:3]
        labelmapNode.SetIJKToRASMatrixArray(ijkToRAS)
        labelmapNode._array = out
        labelmapNode.SetAndObserveTransformNodeID(referenceVolumeNode.GetTransformNodeID())
        # as Slicer's export does: a display node for the labelmap and a new colour table named after the
        # segmentation (vtkSlicerSegmentationsModuleLogic.cxx, ExportSegmentsToLabelmapNode)
        labelmapNode.CreateDefaultDisplayNodes()
        colors = labelmapNode._scene.AddNewNodeByClass("vtkMRMLColorTableNode", segmentationNode.GetName() + "_ColorTable")
        labelmapNode.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
        return True


class vtkMRMLColorTableNode(vtkMRMLStorableNode):
    className = "vtkMRMLColorTableNode"

    def __init__(self):
        super().__init__()
        self.type = None
        self.colors = []

    def SetTypeToUser(self):
        self.type = "User"

    def SetNumberOfColors(self, n):
        self.colors = [("", (0.0, 0.0, 0.0, 0.0))] * int(n)

    def GetNumberOfColors(self):
        return len(self.colors)

    def SetColor(self, entry, name, r, g, b, a=1.0):
        if not 0 <= entry < len(self.colors):
            return False
        self.colors[entry] = (str(name), (r, g, b, a))
        return True

    def GetColorName(self, entry):
        return self.colors[entry][0]

    def GetColor(self, entry, color):
        """VTK's ``GetColor(int, double[4])``: fills ``color`` (a list of 4) with RGBA."""
        if not 0 <= entry < len(self.colors):
            return False
        color[:] = list(self.colors[entry][1])
        return True


class _Column:
    def __init__(self):
        self.name = ""

    def SetName(self, name):
        self.name = str(name)

    def GetName(self):
        return self.name


class vtkMRMLTableNode(vtkMRMLStorableNode):
    className = "vtkMRMLTableNode"

    def __init__(self):
        super().__init__()
        self.columns = []
        self.rows = []

    def AddColumn(self, column=None):
        col = column or _Column()
        self.columns.append(col)
        for row in self.rows:
            row.append("")
        return col

    def AddEmptyRow(self):
        self.rows.append([""] * len(self.columns))
        return len(self.rows) - 1

    def SetCellText(self, row, column, text):
        if not (0 <= row < len(self.rows) and 0 <= column < len(self.columns)):
            return False
        self.rows[row][column] = str(text)
        return True

    def GetCellText(self, row, column):
        return self.rows[row][column]

    def GetNumberOfRows(self):
        return len(self.rows)

    def GetNumberOfColumns(self):
        return len(self.columns)


class vtkMRMLScriptedModuleNode(vtkMRMLNode):
    className = "vtkMRMLScriptedModuleNode"

    def __init__(self):
        super().__init__()
        self._parameters = {}

    def SetParameter(self, name, value):
        """As vtkMRMLScriptedModuleNode::SetParameter: Modified only when the value changes (or is new)."""
        if name not in self._parameters or self._parameters[name] != str(value):
            self._parameters[name] = str(value)
            self.Modified()

    def HasParameter(self, name):
        return name in self._parameters

    def GetParameter(self, name):
        return self._parameters.get(name, "")

    def GetParameterNames(self):
        return list(self._parameters)


class vtkMRMLTransformNode(vtkMRMLDisplayableNode):
    """A transform to its parent (itself under a parent transform, as in Slicer). Linear ones hold a matrix;
    the grid transform stands for every non-linear kind."""

    className = "vtkMRMLTransformNode"

    def __init__(self):
        super().__init__()
        self._toParent = np.eye(4)

    def IsLinear(self):
        return not self.IsA("vtkMRMLGridTransformNode")

    def _toWorld(self):
        """This transform's chain to world as a matrix, or None where it is not linear."""
        matrix, node = np.eye(4), self
        while node is not None:
            if not node.IsLinear():
                return None
            matrix = node._toParent @ matrix
            node = node.GetParentTransformNode()
        return matrix

    @staticmethod
    def GetMatrixTransformBetweenNodes(sourceNode, targetNode, transformSourceToTarget):
        """Source transform's coordinates → target transform's (``None`` = world); False where not linear."""
        source = np.eye(4) if sourceNode is None else sourceNode._toWorld()
        target = np.eye(4) if targetNode is None else targetNode._toWorld()
        if source is None or target is None:
            transformSourceToTarget.Identity()
            return False
        matrix = np.linalg.inv(target) @ source
        for r in range(4):
            for c in range(4):
                transformSourceToTarget.SetElement(r, c, matrix[r, c])
        return True


class vtkMRMLLinearTransformNode(vtkMRMLTransformNode):
    className = "vtkMRMLLinearTransformNode"

    def SetMatrixTransformToParent(self, matrix):
        self._toParent = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])

    def GetMatrixTransformToParent(self, matrix):
        for r in range(4):
            for c in range(4):
                matrix.SetElement(r, c, self._toParent[r, c])


class vtkMRMLGridTransformNode(vtkMRMLTransformNode):
    className = "vtkMRMLGridTransformNode"


class vtkMRMLSubjectHierarchyNode(vtkMRMLNode):
    className = "vtkMRMLSubjectHierarchyNode"
    _instances = {}

    def __init__(self):
        super().__init__()
        self._ids = itertools.count(2)
        self._sceneItem = 1
        self._items = {1: {"parent": 0, "node": None, "name": "Scene", "attributes": {}}}

    @staticmethod
    def GetSubjectHierarchyNode(scene):
        sh = vtkMRMLSubjectHierarchyNode._instances.get(id(scene))
        if sh is None:
            sh = vtkMRMLSubjectHierarchyNode()
            sh._scene = scene
            vtkMRMLSubjectHierarchyNode._instances[id(scene)] = sh
        return sh

    def GetSceneItemID(self):
        return self._sceneItem

    def _itemFor(self, node):
        for item, rec in self._items.items():
            if rec["node"] is node:
                return item
        return 0

    def GetItemByDataNode(self, node):
        if node is None or self._scene is None or not self._scene.IsNodePresent(node):
            return 0
        item = self._itemFor(node)
        if not item:
            item = next(self._ids)
            self._items[item] = {"parent": self._sceneItem, "node": node, "name": node.GetName(), "attributes": {}}
        return item

    def GetItemDataNode(self, item):
        return self._items.get(item, {}).get("node")

    def GetItemParent(self, item):
        return self._items[item]["parent"] if item in self._items else 0

    def SetItemParent(self, item, parent):
        if item not in self._items or parent not in self._items:
            raise ValueError(f"invalid subject hierarchy item {item} or parent {parent}")
        self._items[item]["parent"] = parent

    def SetItemAttribute(self, item, name, value):
        self._items[item]["attributes"][name] = str(value)

    def GetItemAttribute(self, item, name):
        return self._items.get(item, {}).get("attributes", {}).get(name, "")

    def CreateFolderItem(self, parent, name):
        item = next(self._ids)
        self._items[item] = {"parent": parent, "node": None, "name": name, "attributes": {}}
        return item

    def CreateSubjectItem(self, parent, name):
        return self.CreateFolderItem(parent, name)

    def GetItemName(self, item):
        return self._items.get(item, {}).get("name", "")

    def _forget(self, node):
        item = self._itemFor(node)
        if item:
            del self._items[item]


_NODE_CLASSES = {
    "vtkMRMLScalarVolumeNode": vtkMRMLScalarVolumeNode,
    "vtkMRMLLabelMapVolumeNode": vtkMRMLLabelMapVolumeNode,
    "vtkMRMLScalarVolumeDisplayNode": vtkMRMLDisplayNode,
    "vtkMRMLLabelMapVolumeDisplayNode": vtkMRMLDisplayNode,
    "vtkMRMLVolumeArchetypeStorageNode": vtkMRMLStorageNode,
    "vtkMRMLColorTableNode": vtkMRMLColorTableNode,
    "vtkMRMLTableNode": vtkMRMLTableNode,
    "vtkMRMLScriptedModuleNode": vtkMRMLScriptedModuleNode,
    "vtkMRMLLinearTransformNode": vtkMRMLLinearTransformNode,
    "vtkMRMLGridTransformNode": vtkMRMLGridTransformNode,
    "vtkMRMLSegmentationNode": vtkMRMLSegmentationNode,
    "vtkMRMLSegmentationDisplayNode": vtkMRMLSegmentationDisplayNode,
}


class vtkMRMLScene:
    StartCloseEvent = 66001
    EndCloseEvent = 66002

    def __init__(self):
        self._nodes = {}
        self._counter = itertools.count(1)
        self._observers = {}
        self._tags = itertools.count(1)

    def CreateNodeByClass(self, className):
        cls = _NODE_CLASSES[className]
        node = cls()
        if node.className != className:
            node.className = className
        return node

    def AddNode(self, node):
        node._id = f"{node.className}{next(self._counter)}"
        node._scene = self
        self._nodes[node._id] = node
        return node

    def AddNewNodeByClass(self, className, nodeName=""):
        node = self.CreateNodeByClass(className)
        node.SetName(nodeName)
        return self.AddNode(node)

    def RemoveNode(self, node):
        if node is not None and node.GetID() in self._nodes:
            del self._nodes[node.GetID()]
            sh = vtkMRMLSubjectHierarchyNode._instances.get(id(self))
            if sh is not None:
                sh._forget(node)

    def IsNodePresent(self, node):
        return node is not None and self._nodes.get(node.GetID()) is node

    def GetNodeByID(self, nodeID):
        return self._nodes.get(nodeID)

    def GetFirstNodeByClass(self, className):
        for node in self._nodes.values():
            if node.IsA(className):
                return node
        return None

    def GetNodesByClassList(self, className):  # stand-in helper
        return [n for n in self._nodes.values() if n.IsA(className)]

    def GetNumberOfNodes(self):
        return len(self._nodes)

    def GetNodes(self):  # stand-in helper: all nodes
        return list(self._nodes.values())

    def Clear(self, removeSingletons=False):
        self._nodes.clear()
        vtkMRMLSubjectHierarchyNode._instances.pop(id(self), None)

    def AddObserver(self, event, callback, priority=0.0):
        tag = next(self._tags)
        self._observers[tag] = (event, callback)
        return tag

    def RemoveObserver(self, tag):
        self._observers.pop(tag, None)


class _CommandOptions:
    noMainWindow = True
    testingEnabled = True


class _Environment:
    def __init__(self, env):
        self._env = dict(env)

    def keys(self):
        return list(self._env)

    def value(self, key):
        return self._env.get(key, "")


class qSlicerApplication:
    """The parts of slicer.app the module uses; headless: no layout manager."""

    def __init__(self):
        self.temporaryPath = tempfile.mkdtemp(prefix="slicer_stub_tmp_")
        self.cachePath = tempfile.mkdtemp(prefix="slicer_stub_cache_")
        self._connections = []
        self.testing = True  # tests may turn it off (slicer.util.tryWithErrorDisplay shows dialogs only then)

    def layoutManager(self):
        return None

    def startupEnvironment(self):
        return _Environment(os.environ)

    def connect(self, signal, slot):
        self._connections.append((signal, slot))

    def testingEnabled(self):
        return self.testing

    def commandOptions(self):
        return _CommandOptions()


mrmlScene = vtkMRMLScene()
app = qSlicerApplication()


class _Module:
    def __init__(self, logic):
        self._logic = logic

    def logic(self):
        return self._logic


class _Modules:
    segmentations = _Module(_SegmentationsLogic())


modules = _Modules()

from . import util  # noqa: E402,F401  (slicer.util is always available in Slicer)
