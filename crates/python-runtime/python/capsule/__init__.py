"""Capsule: run Python functions marked `@task` in WebAssembly sandboxes.

Inside `capsule run` or `capsule-exec` each task runs in its own sandbox with the limits given
to `@task`. Under a plain Python interpreter (for example in your unit tests) a task is an
ordinary function call, so the same code can be tested with pytest.
"""

from capsule._context import attempt
from capsule._task import TASK_OPTIONS, Handle, Task, TaskError, gather, registered_tasks, task

__all__ = ["TASK_OPTIONS", "Handle", "Task", "TaskError", "attempt", "gather", "registered_tasks", "task"]
