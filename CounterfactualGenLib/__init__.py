"""CounterfactualGen library: language-guided 3D counterfactual brain MRI.

Pure Python: never imports slicer, qt or vtk. Heavy modules (torch, MONAI, open_clip)
are imported lazily by the submodules that need them, so ``import CounterfactualGenLib``
is cheap.
"""

__version__ = "0.1.0"

from .errors import Cancelled, CounterfactualGenError, InputError, ModelError  # noqa: E402,F401
