"""Run the CounterfactualGen command line in a child process and relay its progress.

Pure Python (no ``slicer``, ``qt`` or ``torch`` import), so it can be tested without
Slicer and used from the GUI, from headless batch mode and from plain scripts.

The child is started with ``--progress-json``: every stdout line is one JSON object
(``progress``, ``log``, ``error``, ``done``). Two reader threads put parsed lines on a
queue; the GUI drains it with :meth:`CounterfactualGenWorker.poll` from a ``qt.QTimer``
on the GUI thread (Qt objects must never be touched from the reader threads), batch
mode uses :meth:`CounterfactualGenWorker.run_blocking`.

Cancel ends the whole process tree: ``PythonSlicer`` is a launcher that starts the
real interpreter as its own child, so killing only the direct child would leave the
worker running. On POSIX the child gets its own session (process group): :meth:`cancel`
sends SIGTERM to the group and returns at once (it is called on the GUI thread); a
background thread sends SIGKILL if the group is still there after
:attr:`CounterfactualGenWorker.TERMINATE_GRACE_S`, and the ``exit`` event is queued only
once the group is gone, so the caller may then remove the worker's folders. On Windows
``taskkill /T /F`` ends the tree. :meth:`kill` is the bounded, blocking variant for
application exit and interrupted batch runs.

Example::

    worker = CounterfactualGenWorker([python, "-m", "CounterfactualGenLib.cli", "info", "--devices", "--json"])
    result = worker.run_blocking()
    devices = worker.json_output()
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["CounterfactualGenWorker", "WorkerResult", "friendly_error_message", "EXIT_CODE_KINDS"]

#: Exit codes of the command line (CounterfactualGenLib.errors) and what they mean.
EXIT_CODE_KINDS = {2: "UsageError", 3: "InputError", 4: "ModelError", 5: "ResourceError", 130: "Cancelled"}

#: Exception names that mean a Python package of the install is missing or broken (not a bug of ours).
_IMPORT_ERRORS = ("ModuleNotFoundError", "ImportError")

# What to tell the user for each error kind: what happened and what to do next.
_ADVICE = {
    "InputError": "Check the input volume and the optional masks (they must overlap the scan), then try again.",
    "ModelError": ("Check the model: choose the bundled model, or a folder that holds a model.json and its "
                   "*.safetensors files; a folder whose files fail their SHA-256 check must be copied again."),
    "OutOfMemory": ("The device ran out of memory. Choose the CPU device, use fewer steps, or close other programs "
                    "that use the GPU, then try again."),
    "Cancelled": "The run was cancelled; partial outputs were removed.",
    "MissingDependency": "Python packages are missing: click 'Install dependencies' in the Setup section, then restart Slicer.",
    "ResourceError": ("The computer lacks memory or a Python package for this run: see the log. Choose the CPU "
                      "device or fewer steps, or click 'Install dependencies' in the Setup section."),
    "Killed": "Close other programs that use much memory (or crop the input volume), then try again.",
    "StartFailed": "The worker could not be started: check that Slicer is installed completely (PythonSlicer).",
    "UsageError": "The command line rejected an option; see the log for details.",
    "InternalError": "This is a bug in CounterfactualGen; please report it with the log shown below.",
}


def _missing_package_message(text: str) -> str | None:
    """The line of ``text`` that says a package cannot be imported, unless it is our own library (a packaging bug)."""
    for line in reversed(text.splitlines()):
        if "No module named" in line or line.lstrip().startswith(_IMPORT_ERRORS):
            if "CounterfactualGen" in line:
                return None
            return line.strip()
    return None


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def friendly_error_message(kind: str, message: str = "", returncode: int | None = None) -> str:
    """A message for a dialog: what went wrong and what to do about it."""
    head = message.strip() or f"The worker process failed{'' if returncode is None else f' (exit code {returncode})'}."
    advice = _ADVICE.get(kind, "See the log for details.")
    if advice in head:
        return head
    return f"{head}\n\n{advice}"


@dataclass
class WorkerResult:
    """How a run ended."""

    ok: bool
    returncode: int | None
    summary_path: str | None = None
    error_kind: str | None = None
    message: str = ""
    cancelled: bool = False
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def user_message(self) -> str:
        if self.ok:
            return "Done."
        return friendly_error_message(self.error_kind or "InternalError", self.message, self.returncode)


class CounterfactualGenWorker:
    """One child process of the command line, its output queue and its fate.

    Args:
        args: the full command line (executable first).
        env: environment of the child (``None``: inherit).
        cwd: working directory of the child.
        force_cpu: hide all GPUs from the child (``CUDA_VISIBLE_DEVICES=-1``).
        keep_events: how many parsed events to remember for the result (the rest are only queued).
    """

    #: seconds the child gets to clean up after SIGTERM before the group is killed
    TERMINATE_GRACE_S = 3.0

    def __init__(self, args: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
                 force_cpu: bool = False, keep_events: int = 2000) -> None:
        self.args = [str(a) for a in args]
        self.env = dict(os.environ if env is None else env)
        self.env.setdefault("PYTHONUNBUFFERED", "1")  # progress lines must arrive while the child runs
        self.env.setdefault("PYTHONIOENCODING", "utf-8")
        if force_cpu:
            self.env["CUDA_VISIBLE_DEVICES"] = "-1"
        self.cwd = cwd
        self.keep_events = keep_events
        self.proc: subprocess.Popen | None = None
        self.queue: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._cancel_requested = False
        self._exit_seen = False
        self._leader_done = threading.Event()  # the direct child has exited (set by the wait thread)
        self._reaper: threading.Thread | None = None
        self.returncode: int | None = None
        self.summary_path: str | None = None
        self.error: dict[str, Any] | None = None
        self.events: list[dict[str, Any]] = []
        self.stderr_tail: list[str] = []
        self.stdout_text: list[str] = []  # stdout lines that were not events (e.g. ``info --json``)
        self.last_progress: dict[str, Any] | None = None

    # ------------------------------------------------------------------ start / state
    def start(self) -> "CounterfactualGenWorker":
        """Start the child; returns immediately."""
        if self.proc is not None:
            raise RuntimeError("This worker was already started; create a new one for another run.")
        kwargs: dict[str, Any] = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                      env=self.env, cwd=self.cwd, text=True, encoding="utf-8", errors="replace",
                                      bufsize=1)
        if os.name == "nt":
            info = subprocess.STARTUPINFO()
            info.dwFlags |= subprocess.STARTF_USESHOWWINDOW  # hide the console window, as Slicer does
            info.wShowWindow = 0
            kwargs["startupinfo"] = info
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            kwargs["start_new_session"] = True  # own process group: cancel can signal the whole tree
        try:
            self.proc = subprocess.Popen(self.args, **kwargs)
        except OSError as exc:
            self.returncode = -1
            self.error = {"event": "error", "kind": "StartFailed",
                          "message": f"Could not start {self.args[0]!r}: {exc}."}
            self.queue.put(self.error)
            self.queue.put({"event": "exit", "returncode": -1})
            return self
        for stream, name in ((self.proc.stdout, "stdout"), (self.proc.stderr, "stderr")):
            t = threading.Thread(target=self._read, args=(stream, name), daemon=True, name=f"CounterfactualGen-{name}")
            t.start()
            self._threads.append(t)
        threading.Thread(target=self._wait, daemon=True, name="CounterfactualGen-wait").start()
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def finished(self) -> bool:
        """True once the exit event has been drained by :meth:`poll`."""
        return self._exit_seen

    @property
    def cancelled(self) -> bool:
        return self._cancel_requested

    # ------------------------------------------------------------------ threads
    def _read(self, stream, name: str) -> None:
        try:
            for line in iter(stream.readline, ""):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                if name == "stdout":
                    self.queue.put(self._parse(line))
                else:
                    self.queue.put({"event": "log", "level": "stderr", "message": line})
        except (OSError, ValueError):
            pass  # the pipe closed under us (process killed)
        finally:
            try:
                stream.close()
            except OSError:
                pass

    def _wait(self) -> None:
        assert self.proc is not None
        rc = self.proc.wait()
        self._leader_done.set()
        reaper = self._reaper
        if reaper is not None:  # cancelled: the exit event only once the whole group is gone (or killed)
            deadline = time.monotonic() + self.TERMINATE_GRACE_S + 2.0
            while not reaper.is_alive() and reaper.ident is None and time.monotonic() < deadline:
                time.sleep(0.01)  # created but not started yet
            if reaper.ident is not None:
                reaper.join(timeout=max(0.0, deadline - time.monotonic()))
        for t in self._threads:
            t.join(timeout=5.0)  # all lines are queued before the exit event
        self.queue.put({"event": "exit", "returncode": rc})

    @staticmethod
    def _parse(line: str) -> dict[str, Any]:
        text = line.strip()
        if text.startswith("{"):
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                obj = None
            if isinstance(obj, dict) and isinstance(obj.get("event"), str):
                return obj
        return {"event": "output", "message": line}

    # ------------------------------------------------------------------ draining
    def poll(self, max_events: int | None = None) -> list[dict[str, Any]]:
        """Drain queued events (call on the GUI thread). Never blocks."""
        out: list[dict[str, Any]] = []
        while max_events is None or len(out) < max_events:
            try:
                ev = self.queue.get_nowait()
            except queue.Empty:
                break
            self._record(ev)
            out.append(ev)
        return out

    def _record(self, ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        if kind == "progress":
            self.last_progress = ev
        elif kind == "error":
            self.error = ev
        elif kind == "done":
            self.summary_path = ev.get("summary")
        elif kind == "output":
            self.stdout_text.append(str(ev.get("message", "")))
        elif kind == "log" and ev.get("level") == "stderr":
            self.stderr_tail = (self.stderr_tail + [str(ev.get("message", ""))])[-40:]
        elif kind == "exit":
            self.returncode = ev.get("returncode")
            self._exit_seen = True
        if kind != "output" and len(self.events) < self.keep_events:
            self.events.append(ev)

    # ------------------------------------------------------------------ ending
    def cancel(self) -> None:
        """Ask the child and everything it started to stop; never blocks (safe on the GUI thread, at any time).

        POSIX: SIGTERM to the process group (the command line then removes its partial outputs); a
        background thread sends SIGKILL to the group if it is still there after :attr:`TERMINATE_GRACE_S`.
        """
        first = not self._cancel_requested
        self._cancel_requested = True
        if self.proc is None:
            return
        if os.name == "nt":
            if self.proc.poll() is None:  # taskkill needs a live root
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.proc.pid)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
            return
        if not first:
            return
        # (set before signalling: the wait thread must see it once the leader dies of the signal)
        self._reaper = threading.Thread(target=self._reap, daemon=True, name="CounterfactualGen-reaper")
        # the group still exists while any member lives, even after the leader (its id) has exited
        self._signal_group(signal.SIGTERM)
        self._reaper.start()

    def _signal_group(self, signum: int) -> bool:
        """Signal the child's process group (POSIX; its id is the child's pid). False when it is gone."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signum)
        except ProcessLookupError:
            return False
        except PermissionError:  # the id was reused by someone else's group: ours is gone
            return False
        return True

    def _tree_alive(self) -> bool:
        if self.proc is None:
            return False
        if os.name == "nt":
            return self.proc.poll() is None
        return not self._leader_done.is_set() or _group_alive(self.proc.pid)

    def _reap(self) -> None:
        """Background: SIGKILL the group if it outlives the grace period after SIGTERM."""
        deadline = time.monotonic() + self.TERMINATE_GRACE_S
        while time.monotonic() < deadline:
            if not self._tree_alive():
                return
            time.sleep(0.05)
        self._signal_group(signal.SIGKILL)

    def kill(self, timeout_s: float = 1.0) -> None:
        """Cancel and make sure the tree is gone, blocking at most about ``timeout_s`` + 0.5 s.

        For application exit and interrupted batch runs, where nobody polls afterwards: SIGTERM, a
        bounded wait, then SIGKILL to the group."""
        self.cancel()
        if self.proc is None:
            return
        deadline = time.monotonic() + max(0.0, timeout_s)
        while self._tree_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if os.name != "nt" and self._tree_alive():
            self._signal_group(signal.SIGKILL)
        try:
            self.proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the exit event is queued and drained (or timeout). True when finished."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._exit_seen:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            try:
                ev = self.queue.get(timeout=0.1 if remaining is None else min(0.1, remaining))
            except queue.Empty:
                continue
            self._record(ev)
        return True

    def run_blocking(self, callback: Callable[[dict[str, Any]], None] | None = None,
                     timeout_s: float | None = None) -> WorkerResult:
        """Start (if needed), relay every event to ``callback`` and return the result."""
        if self.proc is None and self.returncode is None:
            self.start()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._exit_seen:
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                deadline = None
            try:
                ev = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            self._record(ev)
            if callback is not None:
                callback(ev)
        return self.result()

    def result(self) -> WorkerResult:
        """The outcome so far (meaningful once :attr:`finished`)."""
        rc = self.returncode
        if self._cancel_requested or rc == 130 or (self.error or {}).get("kind") == "Cancelled":
            return WorkerResult(False, rc, None, "Cancelled", _ADVICE["Cancelled"], True, self.events)
        tail = "\n".join(self.stderr_tail[-12:])
        if self.error is not None:
            kind = str(self.error.get("kind") or "InternalError")
            message = str(self.error.get("message", ""))
            if kind == "InternalError":
                # an older command line reports a missing package as an internal error ("ModuleNotFoundError: ...")
                missing = _missing_package_message(message) or (
                    _missing_package_message(tail) if message.startswith(_IMPORT_ERRORS) else None)
                if missing is not None:
                    kind, message = "MissingDependency", f"A Python package cannot be imported: {missing}"
            return WorkerResult(False, rc, None, kind, message, False, self.events)
        if rc is not None and rc < 0:  # POSIX: killed by a signal we did not send (e.g. SIGKILL from the OOM killer)
            msg = (f"The worker process was killed by the system ({_signal_name(-rc)}, signal {-rc}), often because "
                   "memory ran out; try a smaller input, the CPU device or fewer steps.")
            return WorkerResult(False, rc, None, "Killed", msg, False, self.events)
        if rc == 0 and self.summary_path:
            return WorkerResult(True, rc, self.summary_path, None, "", False, self.events)
        if rc == 0 and not self.summary_path and not any(e.get("event") == "done" for e in self.events):
            # Commands such as ``info`` print JSON and no done event: success is the exit code.
            return WorkerResult(True, rc, None, None, "", False, self.events)
        kind = EXIT_CODE_KINDS.get(rc or 0, "InternalError")
        if _missing_package_message(tail) is not None:
            kind = "MissingDependency"
        elif "out of memory" in tail.lower():
            kind = "OutOfMemory"
        msg = f"The worker process exited with code {rc}."
        if tail:
            msg += f"\nLast messages:\n{tail}"
        return WorkerResult(False, rc, None, kind, msg, False, self.events)

    def json_output(self) -> Any:
        """Parse the non-event stdout (e.g. ``info --json``) as one JSON document."""
        return json.loads("\n".join(self.stdout_text))


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


if __name__ == "__main__":  # pragma: no cover - manual use: python CounterfactualGenWorker.py cmd args...
    res = CounterfactualGenWorker(sys.argv[1:]).run_blocking(lambda e: print(json.dumps(e)))
    sys.exit(0 if res.ok else (res.returncode or 1))
