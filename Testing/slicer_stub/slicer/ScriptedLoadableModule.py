"""Stand-in slicer.ScriptedLoadableModule (same class and method signatures as Slicer's)."""

import os
import sys
import unittest


def _moduleFile(obj):
    return sys.modules[obj.__class__.__module__].__file__


class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent
        self.moduleName = self.__class__.__name__
        parent.title = ""
        parent.categories = []
        parent.dependencies = []
        parent.contributors = ["Andras Lasso (PerkLab, Queen's University), Steve Pieper (Isomics)"]
        parent.helpText = ""
        parent.acknowledgementText = ""

    def resourcePath(self, filename):
        return os.path.join(os.path.dirname(_moduleFile(self)), "Resources", filename)

    def getDefaultModuleDocumentationLink(self, docPage=None):
        return ""

    def runTest(self, msec=100, **kwargs):
        testCaseClass = getattr(sys.modules[self.__class__.__module__], self.moduleName + "Test")
        testCase = testCaseClass()
        testCase.messageDelay = msec
        testCase.runTest(**kwargs)


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.parent = parent
        self.moduleName = self.__class__.__name__
        if self.moduleName.endswith("Widget"):
            self.moduleName = self.moduleName[:-6]
        self.layout = None
        self.developerMode = False

    def resourcePath(self, filename):
        return os.path.join(os.path.dirname(_moduleFile(self)), "Resources", filename)

    def cleanup(self):
        pass

    def setupDeveloperSection(self):
        pass

    def setup(self):
        pass

    def onReload(self):
        pass

    def onTest(self, **kwargs):
        pass

    def onReloadAndTest(self, **kwargs):
        pass

    def onEditSource(self):
        pass


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        self.parent = parent
        self.moduleName = self.__class__.__name__
        if self.moduleName.endswith("Logic"):
            self.moduleName = self.moduleName[:-5]
        self.isSingletonParameterNode = True

    def getParameterNode(self):
        import slicer

        for node in slicer.mrmlScene.GetNodesByClassList("vtkMRMLScriptedModuleNode"):
            if node.GetAttribute("ModuleName") == self.moduleName:
                return node
        node = self.createParameterNode()
        return slicer.mrmlScene.AddNode(node)

    def getAllParameterNodes(self):
        import slicer

        return [n for n in slicer.mrmlScene.GetNodesByClassList("vtkMRMLScriptedModuleNode")
                if n.GetAttribute("ModuleName") == self.moduleName]

    def createParameterNode(self):
        import slicer

        node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.SetName(self.moduleName)
        node.SetAttribute("ModuleName", self.moduleName)
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.messageDelay = 50

    def delayDisplay(self, message, requestedDelay=None, msec=None):
        import slicer

        slicer.util.delayDisplay(message)

    def takeScreenshot(self, name, description, type=-1):
        pass

    def setUp(self):
        import slicer

        slicer.mrmlScene.Clear()

    def tearDown(self):
        pass

    def runTest(self):
        pass
