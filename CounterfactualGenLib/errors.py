"""User-facing errors.

Everything a user can cause (a bad file, a wrong model, a cancelled run) raises a
subclass of :class:`CounterfactualGenError`. The CLI prints its message without a
traceback and exits with :attr:`exit_code`; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class CounterfactualGenError(Exception):
    """Base class of errors whose message is meant for the user."""

    exit_code = 2


class InputError(CounterfactualGenError):
    """An input volume, mask or argument is unusable (says what and what to do)."""

    exit_code = 3


class ModelError(CounterfactualGenError):
    """A model file is missing, corrupt, or does not match what it is used with."""

    exit_code = 4


class ResourceError(CounterfactualGenError):
    """The machine lacks what the run needs: memory, or a Python package the command uses."""

    exit_code = 5


class Cancelled(CounterfactualGenError):
    """The run was cancelled (SIGINT/SIGTERM or a cancel callback); partial outputs were removed."""

    exit_code = 130
