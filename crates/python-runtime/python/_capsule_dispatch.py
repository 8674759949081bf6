"""The dispatcher inside the sandbox; the C runtime calls these functions. Users never import
it, and it is not part of the `capsule` package that Python installs.

Not for use outside the sandbox: it relies on the in-memory importer (`_capsule_bootstrap`).
"""

import binascii
import gc
import importlib
import json
import linecache
import os
import sys
import traceback

import _capsule
import _capsule_bootstrap
from capsule import _context, _requests, _task, _unavailable, _urllib


class _HostTasks:
    """Sub-task calls, made by the host in fresh sandboxes (see `capsule._task.Task`)."""

    def _send(self, payload):
        return json.loads(_capsule.host_call(json.dumps(payload).encode()))

    def _request(self, method, name, args, kwargs):
        for position, value in [*enumerate(args, 1), *kwargs.items()]:
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise _task.TaskError(name, {
                    "type": "invalid_input", "exc_type": type(exc).__name__,
                    "message": f"argument {position!r} of `{name}` is not JSON: {exc}",
                }) from None
        return self._send({"method": method, "task": name, "args": list(args), "kwargs": kwargs})

    @staticmethod
    def _unwrap(name, reply):
        if not reply["ok"]:
            raise _task.TaskError(name, reply["error"])
        return reply["value"]

    def call(self, name, args, kwargs):
        return self._unwrap(name, self._request("task.call", name, args, kwargs))

    def spawn(self, name, args, kwargs):
        return self._unwrap(name, self._request("task.spawn", name, args, kwargs))

    def wait(self, name, handle):
        return self._unwrap(name, self._send({"method": "task.wait", "handle": handle}))


def initialize():
    """Import the user's module, as described by the build's JSON request on stdin.

    Returns None, or the traceback of the failed import (user frames only) as text.
    """
    request = json.loads(sys.stdin.buffer.read())
    user_paths = {module["path"] for module in request["modules"]}
    for module in request["modules"]:
        source = module["source"]
        _capsule_bootstrap.IMPORTER.add_user_module(
            module["name"], module["path"], source, module["is_package"]
        )
        # The sources are not on any file system at run time: keep them for tracebacks.
        lines = source.splitlines(keepends=True)
        linecache.cache[module["path"]] = (len(source), None, lines, module["path"])
    for data in request.get("data_files", ()):
        _capsule_bootstrap.IMPORTER.add_user_data(data["path"], binascii.a2b_base64(data["contents"]))
    _task._host = _HostTasks()
    _capsule_bootstrap.IMPORTER.after_import("urllib.request", _urllib.install)
    _capsule_bootstrap.IMPORTER.after_import("requests.sessions", _requests.install)
    _capsule_bootstrap.IMPORTER.after_import("certifi.core", _requests.install_certifi)
    _capsule_bootstrap.IMPORTER.after_import("socket", _unavailable.guard_sockets)
    _capsule_bootstrap.IMPORTER.after_import("threading", _unavailable.guard_threads)
    _capsule_bootstrap.IMPORTER.after_import("os", _unavailable.guard_links)
    try:
        # The runtime's own packages the project uses (numpy, for the data flavour): imported
        # now, they are in the snapshot and every run starts with them loaded.
        for name in request.get("preload", ()):
            importlib.import_module(name)
        importlib.import_module(request["entry_module"])
    except BaseException as exc:  # noqa: BLE001 (reported to the build with its traceback)
        return _user_traceback(exc, user_paths)
    # Nothing of the build machine's environment may reach a task.
    os.environ.clear()
    # Every run starts from this heap: keep runs from writing to it needlessly (see the C
    # side of `immortalize`), and keep the cyclic collector from walking it.
    _warm_up()
    gc.collect()
    _capsule.immortalize(gc.get_objects())
    gc.freeze()


# A no-op task registered only while the dispatcher warms up, under a name no real task has
# (it holds a NUL).
_WARM_UP_TASK = "\0capsule-warm-up"
# Python specialises bytecode after a few runs of it (PEP 659).
_WARM_UP_RUNS = 5


def _warm_up():
    """Run the dispatcher's whole path a few times, on a no-op task and on an unknown one, so
    its caches and specialised bytecode are in the snapshot instead of being rebuilt (and
    written to fresh pages) by every run: a trivial run then executes about a quarter fewer
    instructions."""
    def request(name):
        return json.dumps({"task": name, "args": [], "kwargs": {}, "env": {}, "attempt": 1}).encode()

    _task._registry[_WARM_UP_TASK] = _task.Task(lambda: "", {"name": _WARM_UP_TASK})
    try:
        for _ in range(_WARM_UP_RUNS):
            invoke(request(_WARM_UP_TASK))
    finally:
        del _task._registry[_WARM_UP_TASK]
    invoke(request(""))


def _user_traceback(exc, user_paths):
    """The traceback of `exc` without the frames of the import machinery and this module."""
    stack = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename in user_paths]
    lines = ["Traceback (most recent call last):\n"] if stack else []
    lines += traceback.format_list(stack)
    lines += traceback.format_exception_only(type(exc), exc)
    return "".join(lines)


def describe():
    tasks = [
        {"name": t.name, "function": t.qualified_name, "options": _jsonable(t.options)}
        for t in _task.registered_tasks().values()
    ]
    return json.dumps(tasks, sort_keys=True).encode()


def _jsonable(options):
    return {k: v for k, v in options.items() if isinstance(v, (str, int, dict, type(None)))}


def _prepare_run(request):
    # The snapshot froze `random`'s state at build time; draw a fresh seed from the host.
    random = sys.modules.get("random")
    if random is not None:
        random.seed()
    # Likewise numpy's global generator (`np.random.rand()`), once something imported it.
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        numpy_random.seed()
    os.environ.clear()
    os.environ.update(request.get("env") or {})
    _context._attempt = request.get("attempt", 1)


def _error(kind, exc_type, message, trace=""):
    return {"type": kind, "exc_type": exc_type, "message": message, "traceback": trace}


_SDK_FRAMES = "/lib/capsule-sdk/"
# The entry file of the built-in interpreter image: its frame says nothing about a cell's error.
_INTERPRETER_ENTRY = "capsule_python.py"


def _exception_error(exc):
    # The traceback starts in the user's code and leaves out Capsule's own frames (the
    # dispatcher, the sub-task plumbing), which say nothing about the user's problem.
    frames = [
        f for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith(_SDK_FRAMES) and f.filename != _INTERPRETER_ENTRY
    ]
    lines = ["Traceback (most recent call last):\n"] if frames else []
    trace = "".join(lines + traceback.format_list(frames) + traceback.format_exception_only(type(exc), exc))
    kind = "memory" if isinstance(exc, MemoryError) else "exception"
    return _error(kind, type(exc).__name__, str(exc), trace)


def _reply(payload, errors="strict"):
    # Unescaped, a lone surrogate (which JSON text cannot carry) fails the encoding here,
    # where it can be reported, instead of on the host.
    return json.dumps(payload, allow_nan=False, ensure_ascii=False).encode("utf-8", errors)


def invoke(request_bytes):
    request = json.loads(bytes(request_bytes))
    name = request["task"]
    registered = _task.registered_tasks().get(name)
    if registered is None:
        known = ", ".join(sorted(_task.registered_tasks())) or "none"
        return _reply({"ok": False, "error": _error(
            "invalid_input", "LookupError", f"no task named {name!r} (tasks: {known})")})
    args, kwargs = request.get("args", []), request.get("kwargs", {})
    _prepare_run(request)
    try:
        result = registered.function(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 (every failure of task code is reported)
        if isinstance(exc, TypeError) and exc.__traceback__.tb_next is None:
            # Raised by the call itself, before any of the task's code ran: the arguments
            # do not fit its signature.
            return _reply({"ok": False, "error": _error(
                "invalid_input", "TypeError", f"arguments do not match `{registered.qualified_name}`: {exc}")})
        return _reply({"ok": False, "error": _exception_error(exc)}, errors="replace")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    try:
        return _reply({"ok": True, "result": result})
    except (TypeError, ValueError, RecursionError) as exc:
        problem = str(exc)
        if isinstance(exc, UnicodeEncodeError):
            problem = f"it contains the lone surrogate {exc.object[exc.start]!r}, which JSON text cannot carry"
        return _reply({"ok": False, "error": _error(
            "exception", type(exc).__name__, f"the result of task {name!r} is not JSON: {problem}")}, errors="replace")
