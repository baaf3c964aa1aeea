"""Stand-in for the few vtk names the module uses."""


class vtkCommand:
    ModifiedEvent = 33


class vtkObject:
    pass


class vtkStringArray:
    def __init__(self):
        self._values = []

    def InsertNextValue(self, value):
        self._values.append(str(value))
        return len(self._values) - 1

    def GetNumberOfValues(self):
        return len(self._values)

    def GetValue(self, index):
        return self._values[index]
