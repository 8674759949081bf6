"""Capsule: run Python functions marked `@task` in WebAssembly sandboxes.

Write tasks with `@task` (and `http`, `gather`, `attempt`, `TaskError`). Inside Capsule each
task runs in its own sandbox with the limits given to `@task`; under a plain Python
interpreter (for example in your unit tests) a task is an ordinary function call.

From your own Python code, `capsule.run("tasks.py", "main", args=[...])` runs a task in its
sandbox and returns a `Result` (`await capsule.run_async(...)` for asyncio); `capsule.build`
builds a file. `capsule.run_python(code)` runs a string of Python in a fresh sandbox, and
`capsule.Session()` keeps one sandbox's state from call to call. These run in this process
(Capsule's engine is a native module of the package); `capsule.connect()` gives a `Client`
with the same methods that goes through a Capsule daemon instead.
"""

from capsule._context import attempt
from capsule._task import TASK_OPTIONS, Handle, Task, TaskError, gather, registered_tasks, task

# Type checkers see the host API here; at run time it loads on first use (`__getattr__`), and
# `typing` itself is not imported (it would weigh on every task's snapshot).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from capsule import http
    from capsule._host import (
        AsyncSession, BuildError, CapsuleError, Client, DaemonError, ErrorInfo, Execution, Manifest, Output,
        Result, Session, TaskFailed, UsageError, build, connect, run, run_async, run_python, run_python_async,
    )

# The host API is imported on first use, on the host only (the runtime does not carry it).
_HOST_API = (
    "AsyncSession", "BuildError", "CapsuleError", "Client", "DaemonError", "ErrorInfo", "Execution", "Manifest",
    "Output", "Result", "Session", "TaskFailed", "UsageError", "build", "connect", "run", "run_async", "run_python",
    "run_python_async",
)

__all__ = [
    "TASK_OPTIONS", "Handle", "Task", "TaskError", "attempt", "gather", "http", "registered_tasks", "task",
    *_HOST_API,
]


def __getattr__(name):
    if name in _HOST_API:
        import sys

        # The host API is not in the runtime: a task has no Capsule of its own to call.
        if "_capsule" in sys.builtin_module_names:
            raise RuntimeError(
                "capsule.run is for the host; inside a task, call another task directly (or `.spawn` it)"
            )
        from capsule import _host

        return getattr(_host, name)
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("capsule-sandbox")
        except PackageNotFoundError:
            return None
    raise AttributeError(f"module 'capsule' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
