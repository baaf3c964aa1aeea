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


class vtkMatrix4x4:
    """4×4 matrix (identity when made), with the element accessors the module uses."""

    def __init__(self):
        self._m = [[1.0 if r == c else 0.0 for c in range(4)] for r in range(4)]

    def Identity(self):
        self.__init__()

    def GetElement(self, row, column):
        return self._m[row][column]

    def SetElement(self, row, column, value):
        self._m[row][column] = float(value)

    def DeepCopy(self, other):
        self._m = [list(row) for row in other._m]
