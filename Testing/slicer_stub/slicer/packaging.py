"""Stand-in slicer.packaging (Slicer >= 5.12): same signatures; records calls instead of installing."""

from __future__ import annotations

#: (function name, args, kwargs) of every call, for tests.
calls = []


def load_requirements(path):
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def load_pyproject_dependencies(path):
    raise NotImplementedError


def pip_check(req, _seen=None):
    calls.append(("pip_check", (req,), {}))
    return False


def isPipInstallInProgress():
    return False


def pip_ensure(requirements, constraints=None, skip_packages=None, prompt_install=True, prompt_restart=True,
               requester=None, skip_in_testing=True, show_progress=True):
    calls.append(("pip_ensure", (requirements,), dict(constraints=constraints, skip_packages=skip_packages,
                                                       prompt_install=prompt_install, requester=requester)))
    return None


def pip_install(requirements, constraints=None, no_deps_requirements=None, skip_packages=None, blocking=True,
                show_progress=True, requester=None, logCallback=None, completedCallback=None):
    calls.append(("pip_install", (requirements,), dict(constraints=constraints)))
    return None


def pip_uninstall(requirements, blocking=True, logCallback=None, completedCallback=None):
    calls.append(("pip_uninstall", (requirements,), {}))
