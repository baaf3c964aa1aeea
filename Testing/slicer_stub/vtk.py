"""Stand-in for the few vtk names the module uses."""


class vtkCommand:
    ModifiedEvent = 33


class vtkObject:
    pass
