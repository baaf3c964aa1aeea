"""Stand-in slicer.parameterNodeWrapper: typed members stored in a vtkMRMLScriptedModuleNode.

Implements the decorator, Default and the validators the module uses, with Slicer's
signatures. GUI binding (connectGui) records the request only: tests create no widgets.
"""

from __future__ import annotations

import abc
import typing

__all__ = ["parameterNodeWrapper", "isParameterNodeWrapper", "Default", "Validator", "WithinRange", "Minimum",
           "Maximum", "Choice", "NotNone"]


class Default:
    def __init__(self, value=None, *, generator=None):
        self._value = value
        self._generator = generator

    @property
    def value(self):
        return self._generator() if self._generator is not None else self._value


class Validator(abc.ABC):
    @abc.abstractmethod
    def validate(self, value) -> None:
        pass


class NotNone(Validator):
    def validate(self, value) -> None:
        if value is None:
            raise ValueError("Value must not be None")


class WithinRange(Validator):
    def __init__(self, minimum, maximum):
        self.minimum = minimum
        self.maximum = maximum

    def validate(self, value) -> None:
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"Value must be within range [{self.minimum}, {self.maximum}], is {value}")


class Minimum(Validator):
    def __init__(self, minimum):
        self.minimum = minimum

    def validate(self, value) -> None:
        if value < self.minimum:
            raise ValueError(f"Value must be at least {self.minimum}, is {value}")


class Maximum(Validator):
    def __init__(self, maximum):
        self.maximum = maximum

    def validate(self, value) -> None:
        if value > self.maximum:
            raise ValueError(f"Value must be at most {self.maximum}, is {value}")


class Choice(Validator):
    def __init__(self, choices):
        self.choices = choices

    def validate(self, value) -> None:
        if value not in self.choices:
            raise ValueError(f"Value must be one of {self.choices}, is {value}")


def _isNodeType(t):
    return isinstance(t, type) and hasattr(t, "className") and t.__module__.startswith("slicer")


def _nodeTypes(t):
    """The node classes of a node type or of a typing.Union of node types (with or without None), else None.

    Slicer's wrapper takes ``typing.Union[vtkMRMLModelNode, vtkMRMLScalarVolumeNode, None]`` for a member
    that holds either kind (its docs: the None is needed for the default None)."""
    if _isNodeType(t):
        return (t,)
    if typing.get_origin(t) is typing.Union:
        args = typing.get_args(t)
        nodes = tuple(a for a in args if a is not type(None))
        if nodes and all(_isNodeType(a) for a in nodes):
            if type(None) not in args:
                raise TypeError("a Union of nodes needs None in it for the default None (Slicer's docs)")
            return nodes
    return None


def _member(name, base, validators, default):
    key = name

    def getter(self):
        return self._values.get(key, default)

    def setter(self, value):
        nodes = _nodeTypes(base)
        if nodes:
            if value is not None and not isinstance(value, nodes):
                raise TypeError(f"{name} must be a {' or '.join(n.__name__ for n in nodes)}")
        elif value is not None and base in (int, float, str, bool):
            if base is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, base):
                raise TypeError(f"{name} must be {base.__name__}, got {type(value).__name__}")
        for v in validators:
            v.validate(value)
        self._values[key] = value
        # (for a node, its ID, as Slicer's NodeSerializer keeps a node reference)
        text = "" if value is None else (value.GetID() or "") if nodes else str(value)
        self.parameterNode.SetParameter(key, text)  # Modified only when the stored text changes, as in Slicer

    return property(getter, setter)


def isParameterNodeWrapper(classOrObj):
    return getattr(classOrObj, "_is_parameter_node_wrapper", False)


def parameterNodeWrapper(classtype=None):
    def wrap(cls):
        hints = typing.get_type_hints(cls, include_extras=True)
        members = {}
        for name, hint in hints.items():
            base, extras = hint, []
            if typing.get_origin(hint) is typing.Annotated:
                base, *extras = typing.get_args(hint)
            validators = [e for e in extras if isinstance(e, Validator)]
            defaults = [e.value for e in extras if isinstance(e, Default)]
            if name in cls.__dict__:
                default = cls.__dict__[name]
            elif defaults:
                default = defaults[0]
            elif _nodeTypes(base):
                default = None
            else:
                default = {int: 0, float: 0.0, str: "", bool: False}.get(base)
            for v in validators:
                if default is not None:
                    v.validate(default)
            members[name] = (base, validators, default)

        def __init__(self, parameterNode, prefix=None):
            self.parameterNode = parameterNode
            self._values = parameterNode.__dict__.setdefault("_wrapperValues", {})
            self._guiTags = {}

        def connectGui(self, gui):
            tag = len(self._guiTags) + 1
            self._guiTags[tag] = gui
            return tag

        def disconnectGui(self, tag):
            self._guiTags.pop(tag, None)

        def AddObserver(self, event, callback, priority=0.0):
            return self.parameterNode.AddObserver(event, callback, priority)

        def RemoveObserver(self, tag):
            self.parameterNode.RemoveObserver(tag)

        def Modified(self):
            self.parameterNode.Modified()

        def getValue(self, name):
            return getattr(self, name)

        def setValue(self, name, value):
            setattr(self, name, value)

        namespace = dict(__init__=__init__, connectGui=connectGui, disconnectGui=disconnectGui,
                         AddObserver=AddObserver, RemoveObserver=RemoveObserver, Modified=Modified,
                         getValue=getValue, setValue=setValue, _is_parameter_node_wrapper=True,
                         allParameters={n: m for n, m in members.items()})
        for name, (base, validators, default) in members.items():
            namespace[name] = _member(name, base, validators, default)
        return type(cls.__name__, (), namespace)

    if classtype is None:
        return wrap
    return wrap(classtype)
