"""The `@task` decorator and the registry of tasks defined by the imported modules."""

import difflib
import functools

# The options `@task` accepts: the same as `manifest_schema::options::OPTIONS` (a test checks).
# `capsule build` reads them from the source before any Python runs and checks their values;
# here only unknown names are refused, so a typo fails under plain Python too.
TASK_OPTIONS = (
    "name", "compute", "ram", "timeout", "max_retries", "env_vars", "env_passthrough", "allowed_hosts",
    "secrets", "allowed_files", "max_written", "max_files_created",
)

_registry = {}

# Inside the sandbox, `_capsule_dispatch` sets this to the host's sub-task interface; under
# plain Python it stays None and tasks are ordinary function calls.
_host = None
_NOT_YET = object()


class TaskError(Exception):
    """A sub-task failed after its retries. `type` is one of the envelope's error types
    (`exception`, `timeout`, `fuel`, `memory`, `stack_overflow`, `host`, `invalid_input`,
    `diverged`)."""

    def __init__(self, task, error):
        self.task = task
        self.type = error["type"]
        self.exc_type = error.get("exc_type", "")
        self.message = error.get("message", "")
        self.traceback = error.get("traceback", "")
        what = f"{self.exc_type}: {self.message}" if self.exc_type else self.message
        super().__init__(f"task {task!r} failed ({self.type}): {what}")


class Handle:
    """A sub-task started with `spawn`; `result()` waits for it."""

    def __init__(self, task, handle=None, result=_NOT_YET, error=None):
        self.task = task
        self._handle = handle
        self._result = result
        self._error = error

    def result(self):
        if self._result is _NOT_YET and self._error is None:
            try:
                self._result = _host.wait(self.task, self._handle)
            except TaskError as error:
                self._error = error
        if self._error is not None:
            raise self._error
        return self._result


def gather(*handles):
    """The results of `handles`, in order; raises the first `TaskError`."""
    return [handle.result() for handle in handles]


class Task:
    """A function registered as a Capsule task.

    Calling it runs it: inside Capsule as a sub-task, in its own sandbox with its own limits;
    under plain Python as an ordinary call. `spawn` starts it without waiting, `map` runs it
    for every item of an iterable, concurrently.
    """

    def __init__(self, function, options):
        self.function = function
        self.options = dict(options)
        self.name = options.get("name") or function.__name__
        functools.update_wrapper(self, function)

    @property
    def qualified_name(self):
        return f"{self.function.__module__}.{self.function.__qualname__}"

    def __call__(self, *args, **kwargs):
        if _host is None:
            return self.function(*args, **kwargs)
        return _host.call(self.name, args, kwargs)

    def spawn(self, *args, **kwargs):
        if _host is not None:
            return Handle(self.name, handle=_host.spawn(self.name, args, kwargs))
        try:
            return Handle(self.name, result=self.function(*args, **kwargs))
        except Exception as error:  # noqa: BLE001 (kept for `result()`, as inside Capsule)
            return Handle(self.name, error=TaskError(self.name, {"type": "exception", "exc_type": type(error).__name__, "message": str(error)}))

    def map(self, iterable):
        return gather(*[self.spawn(item) for item in iterable])

    def __repr__(self):
        return f"<capsule task {self.name!r} ({self.qualified_name})>"


def _check_options(options):
    for key in options:
        if key not in TASK_OPTIONS:
            close = difflib.get_close_matches(key, TASK_OPTIONS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"@task got an unknown option {key!r}{hint}")
    name = options.get("name")
    if name is not None and (not isinstance(name, str) or not name):
        raise TypeError("@task option 'name' must be a non-empty string")


def _register(new):
    existing = _registry.get(new.name)
    # Re-running the same definition (a module reloaded in a test) replaces it.
    if existing is not None and existing.qualified_name != new.qualified_name:
        raise ValueError(
            f"task name {new.name!r} is used by both {existing.qualified_name} and {new.qualified_name}"
        )
    _registry[new.name] = new


def task(function=None, /, **options):
    """Mark a function as a Capsule task.

    Use it bare (`@task`) or with options (`@task(name=..., compute=..., ram=..., timeout=...,
    max_retries=..., env_vars=...)`).
    """
    _check_options(options)

    def decorate(function):
        if not callable(function):
            raise TypeError("@task must decorate a function")
        registered = Task(function, options)
        _register(registered)
        return registered

    return decorate(function) if function is not None else decorate


def registered_tasks():
    """The tasks registered so far, by name."""
    return dict(_registry)
