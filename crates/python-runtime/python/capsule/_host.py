"""Running tasks from your own Python process: `capsule.run`, `run_python`, `Session` and friends.

Capsule runs inside this process by default: the native module `capsule._native` holds the
engine, which runs each task in its sandbox on threads of its own with the GIL released, and
answers the same requests as the daemon's API (without a socket). `capsule.connect()` gives a
`Client` of a daemon instead, with the same methods and results, for runs that must outlive
this process or be shared. Either way a Python file is built here first when it changed.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import pathlib
import sysconfig
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

__all__ = [
    "AsyncSession", "BuildError", "CapsuleError", "Client", "DaemonError", "ErrorInfo", "Execution", "Manifest",
    "Output", "Result", "Session", "TaskFailed", "UsageError", "build", "connect", "run", "run_async", "run_python",
    "run_python_async",
]


class CapsuleError(Exception):
    """Something went wrong before or around a task (not in it: see `Result.error`)."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if self.hint is None else f"{self.message}\n  hint: {self.hint}"


class BuildError(CapsuleError):
    """The file could not be built, or its artifact not loaded (as `capsule build` says)."""


class UsageError(CapsuleError, ValueError):
    """The call asked for something that is not there: an unknown task, arguments that are not JSON."""


class DaemonError(CapsuleError):
    """Capsule could not serve the call: a daemon busy or gone mid-call, a token refused, or a
    failure of Capsule itself (not of the task)."""


@dataclass(frozen=True)
class ErrorInfo:
    """Why a task failed: `type` is `exception`, `timeout`, `fuel`, `memory`,
    `stack_overflow`, `host`, `invalid_input`, `cancelled` or `diverged`."""

    type: str
    message: str
    exc_type: str = ""
    traceback: str = ""

    @classmethod
    def _from(cls, error: Mapping[str, Any]) -> ErrorInfo:
        return cls(error["type"], error.get("message", ""), error.get("exc_type", ""), error.get("traceback", ""))


class TaskFailed(CapsuleError):
    """Raised by `Result.unwrap()` when the task failed."""

    def __init__(self, result: Result):
        error = result.error
        assert error is not None
        what = f"{error.exc_type}: {error.message}" if error.exc_type else error.message
        super().__init__(f"task `{result.execution.task}` failed ({error.type}): {what}")
        self.result = result
        self.error = error


@dataclass(frozen=True)
class Execution:
    task: str
    duration_ms: int
    attempts: int
    fuel_consumed: int
    peak_memory_bytes: int
    attempt_errors: tuple[ErrorInfo, ...] = ()
    host_requests: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class Output:
    stdout: str
    stderr: str
    stdout_truncated: bool = False
    stderr_truncated: bool = False


@dataclass(frozen=True)
class Result:
    """What a run did: the same envelope as `capsule run --json`."""

    success: bool
    result: Any
    error: ErrorInfo | None
    execution: Execution
    output: Output
    run_id: str | None = None

    def unwrap(self) -> Any:
        """The task's result, or `TaskFailed` if it failed."""
        if not self.success:
            raise TaskFailed(self)
        return self.result

    @classmethod
    def _from(cls, envelope: Mapping[str, Any], run_id: str | None) -> Result:
        execution = envelope["execution"]
        output = envelope["output"]
        return cls(
            success=envelope["success"],
            result=envelope["result"],
            error=ErrorInfo._from(envelope["error"]) if envelope.get("error") else None,
            execution=Execution(
                task=execution["task"],
                duration_ms=execution["duration_ms"],
                attempts=execution["attempts"],
                fuel_consumed=execution["fuel_consumed"],
                peak_memory_bytes=execution["peak_memory_bytes"],
                attempt_errors=tuple(ErrorInfo._from(e) for e in execution.get("attempt_errors", ())),
                host_requests=tuple(execution.get("host_requests", ())),
            ),
            output=Output(
                stdout=output["stdout"]["text"],
                stderr=output["stderr"]["text"],
                stdout_truncated=output["stdout"]["truncated"],
                stderr_truncated=output["stderr"]["truncated"],
            ),
            run_id=run_id,
        )


@dataclass(frozen=True)
class Manifest:
    """A build: its `manifest.toml` and what it says."""

    path: pathlib.Path
    tasks: tuple[str, ...]
    sha256: str
    source: str
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: pathlib.Path) -> Manifest:
        import tomllib

        with open(path, "rb") as file:
            data = tomllib.load(file)
        tasks = data.get("tasks", [])
        return cls(
            path=path,
            tasks=tuple(t["name"] for t in tasks),
            sha256=data["artifact"]["sha256"],
            source=data["artifact"]["source"],
            options={t["name"]: t.get("options", {}) for t in tasks},
        )


# --- Where requests go ----------------------------------------------------------------------
#
# A transport answers the daemon's API requests with `(status, body)`: `_native.Engine` in this
# process, `_native.Daemon` through a daemon. `request` blocks (with the GIL released);
# `request_later` calls `done(status, body)` from another thread when the answer is there.


def _installed_runtime() -> str | None:
    """The runtime installed with this package (`share/capsule/` of the environment), if any."""
    path = pathlib.Path(sysconfig.get_path("data")) / "share" / "capsule" / "capsule-python.wasm"
    return str(path) if path.is_file() else None


def _settle(future: asyncio.Future[tuple[int, bytes]], status: int, body: bytes) -> None:
    if not future.done():
        future.set_result((status, body))


def _exception(kind: str | None, message: str, hint: str | None) -> CapsuleError:
    """The SDK's exception for a failure of `kind`: the category every failure has, in the
    daemon's API, the native module and the `capsule` command alike."""
    if kind in ("build", "load"):
        return BuildError(message, hint)
    if kind in ("usage", "bad_request", "not_found", "conflict", "too_large"):
        return UsageError(message, hint)
    return DaemonError(message, hint)


def _reply(status: int, body: bytes) -> Any:
    """The JSON of a successful answer (None for an empty one), else the failure it reports."""
    if status < 300:
        return json.loads(body) if body else None
    try:
        error = json.loads(body).get("error", {})
    except ValueError:
        error = {}
    raise _exception(error.get("kind"), error.get("message", body.decode(errors="replace")), error.get("hint"))


def _encode(request: Mapping[str, Any]) -> bytes:
    try:
        return json.dumps(request, allow_nan=False).encode()
    except (TypeError, ValueError) as error:
        raise UsageError(f"the arguments are not JSON: {error}", "pass str, int, float, bool, None, lists and dicts") from None


# --- Builds ---------------------------------------------------------------------------------


def _built(answer: tuple[int, bytes]) -> pathlib.Path:
    return pathlib.Path(_reply(*answer)["manifest"])


def _build(entry: pathlib.Path, force: bool = False) -> pathlib.Path:
    """Builds `entry` here (an unchanged build is found, not redone); its manifest."""
    from capsule import _native

    return _built(_native.build(str(entry), None, force, _installed_runtime()))


def _source(file_or_manifest: str | os.PathLike[str], project: str | os.PathLike[str] | None) -> pathlib.Path:
    path = pathlib.Path(file_or_manifest)
    if not path.is_absolute():
        path = pathlib.Path(project or os.getcwd()) / path
    return pathlib.Path(os.path.abspath(path))


def _manifest_of(source: pathlib.Path, force: bool = False) -> pathlib.Path:
    return source if source.suffix == ".toml" else _build(source, force)


_image: tuple[int, str] | None = None


def _interpreter_image() -> str:
    """The built-in interpreter image's manifest (`run_python`, sessions): built once per
    runtime, then known for the life of the process."""
    global _image
    if _image is None or _image[0] != os.getpid():
        from capsule import _native

        _image = (os.getpid(), str(_built(_native.interpreter_image(_installed_runtime()))))
    return _image[1]


def build(file: str | os.PathLike[str], *, project: str | os.PathLike[str] | None = None, force: bool = False) -> Manifest:
    """Build `file` (cached, like `capsule build`) and return its manifest."""
    return Manifest.load(_build(_source(file, project), force))


# --- Requests -------------------------------------------------------------------------------


def _run_request(
    source: pathlib.Path,
    task: str | None,
    args: Sequence[Any],
    kwargs: Mapping[str, Any] | None,
    timeout: float | None,
    project: str | os.PathLike[str] | None,
    json_args: str | None,
) -> dict[str, Any]:
    if json_args is not None:
        if args:
            raise UsageError("give the arguments as `args` or as `json_args`, not both")
        try:
            args = json.loads(json_args)
        except ValueError as error:
            raise UsageError(f"`json_args` is not valid JSON: {error}") from None
        if not isinstance(args, list):
            raise UsageError("`json_args` must be a JSON array", "e.g. json_args='[1, \"two\"]'")
    request: dict[str, Any] = {
        "manifest": "",
        "entry": str(source),
        "project": str(pathlib.Path(project).resolve()) if project else str(source.parent),
        "args": list(args),
        "kwargs": dict(kwargs or {}),
        "wait": True,
        "stream": False,
    }
    if task is not None:
        request["task"] = task
    if timeout is not None:
        request["default_timeout"] = _duration(timeout)
    return request


def _duration(timeout: float | str) -> str:
    """Seconds (or a duration such as "30s") in the manifest's form."""
    return timeout if isinstance(timeout, str) else f"{max(1, round(timeout * 1000))}ms"


def _options(
    compute: str | int | None = None,
    ram: str | int | None = None,
    timeout: float | str | None = None,
    allowed_hosts: Iterable[str] = (),
    allowed_files: Iterable[str | Mapping[str, str]] = (),
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The sandbox options the caller set, in the manifest's form: the engine checks each and
    takes the rest from its defaults for code strings."""
    options: dict[str, Any] = {}
    if compute is not None:
        options["compute"] = compute
    if ram is not None:
        options["ram"] = ram
    if timeout is not None:
        options["timeout"] = _duration(timeout)
    if env:
        options["env_vars"] = dict(env)
    if allowed_hosts:
        options["allowed_hosts"] = list(allowed_hosts)
    grants = [grant if isinstance(grant, Mapping) else {"path": grant} for grant in allowed_files]
    if grants:
        options["allowed_files"] = [{"path": g["path"], "mode": g.get("mode", "read-only")} for g in grants]
    return options


def _python_request(code: str, project: str | os.PathLike[str] | None = None, **options: Any) -> bytes:
    if not isinstance(code, str):
        raise UsageError("`code` must be a string of Python")
    root = str(pathlib.Path(project or os.getcwd()).resolve())
    return _encode({"code": code, "options": _options(**options), "project": root})


def _open_request(
    restore: str | None,
    idle_timeout: float,
    compute: str | int | None = None,
    ram: str | int | None = None,
    timeout: float | str | None = None,
    allowed_hosts: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
) -> bytes:
    request: dict[str, Any] = {
        "manifest": _interpreter_image(),
        "options": _options(compute, ram, timeout, allowed_hosts, (), env),
        "idle_seconds": max(1, int(idle_timeout)),
    }
    if restore is not None:
        request["restore"] = restore
    return _encode(request)


def _call_request(code: str, compute: str | int | None, timeout: float | str | None) -> bytes:
    if not isinstance(code, str):
        raise UsageError("`code` must be a string of Python")
    call: dict[str, Any] = {"args": [code]}
    if compute is not None:
        call["compute"] = compute
    if timeout is not None:
        call["timeout"] = _duration(timeout)
    return _encode(call)


def _result(answer: Mapping[str, Any]) -> Result:
    return Result._from(answer["outcome"], answer["run"]["id"])


# --- Clients --------------------------------------------------------------------------------


class Client:
    """Where runs, code strings and sessions go: Capsule's engine in this process (what
    `capsule.run` and the other functions of the package use), or a daemon (`connect`).
    The methods are the package's functions, with the same arguments and results."""

    def __init__(self, transport: Any, where: str):
        self._transport = transport
        self.where = where

    def __repr__(self) -> str:
        return f"<capsule.Client {self.where}>"

    def _call(self, method: str, route: str, body: bytes | None = None) -> Any:
        return _reply(*self._transport.request(method, route, body))

    async def _call_async(self, method: str, route: str, body: bytes | None = None) -> Any:
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[tuple[int, bytes]] = loop.create_future()

        def done(status: int, answer: bytes) -> None:  # on one of Capsule's threads
            loop.call_soon_threadsafe(_settle, answered, status, answer)

        self._transport.request_later(method, route, body, done)
        return _reply(*await answered)

    def run(
        self,
        file_or_manifest: str | os.PathLike[str],
        task: str | None = None,
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        project: str | os.PathLike[str] | None = None,
        json_args: str | None = None,
    ) -> Result:
        """Run `task` (default: `main`, else the only task) of a Python file or a built
        `manifest.toml`, in its sandbox, and return its `Result`.

        The file is built first when it changed. `timeout` (seconds) is the deadline of each
        attempt for tasks that set none. A failing task gives a `Result` with `error`
        (`.unwrap()` raises `TaskFailed`); a failing build raises `BuildError`, an unknown task
        or arguments that are not JSON `UsageError`, a failure of Capsule itself `DaemonError`.
        """
        source = _source(file_or_manifest, project)
        request = _run_request(source, task, tuple(args), kwargs, timeout, project, json_args)
        request["manifest"] = str(_manifest_of(source))
        try:
            return _result(self._call("POST", "/v1/runs", _encode(request)))
        except BuildError:
            if source.suffix == ".toml":
                raise
            # A build by another Capsule version (or a missing artifact): build afresh, once.
            request["manifest"] = str(_manifest_of(source, force=True))
            return _result(self._call("POST", "/v1/runs", _encode(request)))

    async def run_async(
        self,
        file_or_manifest: str | os.PathLike[str],
        task: str | None = None,
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        project: str | os.PathLike[str] | None = None,
        json_args: str | None = None,
    ) -> Result:
        """`run`, for asyncio: many runs may be awaited at once."""
        source = _source(file_or_manifest, project)
        request = _run_request(source, task, tuple(args), kwargs, timeout, project, json_args)
        # An unchanged build is found at once; a build (rare, slow) is not on the loop's thread.
        loop = asyncio.get_running_loop()
        request["manifest"] = str(await loop.run_in_executor(None, _manifest_of, source))
        return _result(await self._call_async("POST", "/v1/runs", _encode(request)))

    def run_python(
        self,
        code: str,
        *,
        compute: str | int | None = None,
        ram: str | int | None = None,
        timeout: float | str | None = None,
        allowed_hosts: Iterable[str] = (),
        allowed_files: Iterable[str | Mapping[str, str]] = (),
        env: Mapping[str, str] | None = None,
        project: str | os.PathLike[str] | None = None,
    ) -> Result:
        """Run `code` in a fresh sandbox, like a notebook cell: the value of a final expression
        is the result (itself when it is JSON, else its repr); `output` has what it printed.

        `compute` (LOW, MEDIUM, HIGH or fuel units), `ram` ("256MiB") and `timeout` (seconds)
        limit it; `allowed_hosts`, `allowed_files` (folders of `project`, by default the current
        folder; `{"path": "out", "mode": "read-write"}` to write) and `env` are what it may reach.
        """
        _interpreter_image()  # the engine runs it, and never builds
        request = _python_request(
            code, project, compute=compute, ram=ram, timeout=timeout,
            allowed_hosts=allowed_hosts, allowed_files=allowed_files, env=env,
        )
        return _result(self._call("POST", "/v1/python", request))

    async def run_python_async(self, code: str, **options: Any) -> Result:
        """`run_python`, for asyncio (the same keyword arguments)."""
        if _image is None or _image[0] != os.getpid():
            await asyncio.get_running_loop().run_in_executor(None, _interpreter_image)
        return _result(await self._call_async("POST", "/v1/python", _python_request(code, **options)))

    def session(self, **options: Any) -> Session:
        """A `Session` here (the keyword arguments are `Session`'s)."""
        return Session(client=self, **options)

    async def session_async(self, **options: Any) -> AsyncSession:
        """An `AsyncSession` here (the keyword arguments are `Session`'s)."""
        return await AsyncSession.open(client=self, **options)


_engine_lock = threading.Lock()
_local: tuple[int, Client] | None = None


def _close_engine(pid: int, engine: Any) -> None:
    # A forked child inherits this exit handler, not the engine's threads: only its maker closes it.
    if os.getpid() == pid:
        engine.close()


def _here() -> Client:
    """The client of this process's engine, started at the first call (again in a forked
    child: threads do not survive a fork)."""
    global _local
    with _engine_lock:
        if _local is None or _local[0] != os.getpid():
            from capsule import _native

            engine = _native.Engine()
            atexit.register(_close_engine, os.getpid(), engine)
            _local = (os.getpid(), Client(engine, "in this process"))
        return _local[1]


def connect(target: str | os.PathLike[str] | None = None, *, token: str | None = None) -> Client:
    """A `Client` of a running daemon (`capsule daemon`): its socket (by default
    `CAPSULE_SOCKET`, else the user's), or `host:port` with the daemon's `token`. Runs there
    outlive this process and are seen by `capsule list`. Nothing is sent until the first call."""
    from capsule import _native

    if target is not None and token is None:
        target = pathlib.Path(target).absolute()
    try:
        daemon = _native.Daemon(None if target is None else str(target), token)
    except ValueError as error:
        message, _, hint = str(error).partition("\n  hint: ")
        raise UsageError(message, hint or None) from None
    return Client(daemon, f"through the daemon at {daemon.target}")


def run(
    file_or_manifest: str | os.PathLike[str],
    task: str | None = None,
    args: Iterable[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    timeout: float | None = None,
    project: str | os.PathLike[str] | None = None,
    json_args: str | None = None,
) -> Result:
    """Run `task` of a Python file or manifest in this process's engine: see `Client.run`."""
    return _here().run(
        file_or_manifest, task, args, kwargs, timeout=timeout, project=project, json_args=json_args
    )


async def run_async(
    file_or_manifest: str | os.PathLike[str],
    task: str | None = None,
    args: Iterable[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    timeout: float | None = None,
    project: str | os.PathLike[str] | None = None,
    json_args: str | None = None,
) -> Result:
    """`run`, for asyncio: many runs may be awaited at once."""
    return await _here().run_async(
        file_or_manifest, task, args, kwargs, timeout=timeout, project=project, json_args=json_args
    )


def run_python(code: str, **options: Any) -> Result:
    """Run `code` in a fresh sandbox of this process's engine: see `Client.run_python`."""
    return _here().run_python(code, **options)


async def run_python_async(code: str, **options: Any) -> Result:
    """`run_python`, for asyncio (the same keyword arguments)."""
    return await _here().run_python_async(code, **options)


# --- Sessions -------------------------------------------------------------------------------


class _SessionFiles:
    """The workspace, a session's `/`: where `upload` puts files and `download` finds them."""

    workspace: pathlib.Path

    def upload(self, name: str, data: bytes | str) -> None:
        """Writes `data` to `name` in the workspace, where the session's code finds it as `/name`."""
        target = self._file(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data.encode() if isinstance(data, str) else data)

    def download(self, name: str) -> bytes:
        """The content of `name` in the workspace (written by the session's code)."""
        return self._file(name).read_bytes()

    def _file(self, name: str) -> pathlib.Path:
        target = (self.workspace / name.lstrip("/")).resolve()
        if not target.is_relative_to(self.workspace.resolve()):
            raise UsageError(f"`{name}` is outside the session's workspace")
        return target


class Session(_SessionFiles):
    """A sandbox that keeps its Python state from call to call: variables, imports and
    definitions carry over, like a notebook's cells.

    Each call has its own fuel and deadline (`compute`, `timeout`); the session has its memory
    limit (`ram`). A call that raises keeps what it did before raising; a call stopped by its
    deadline, fuel or memory limit leaves the session as it was before that call. `save()`
    returns an id that `Session(restore=id)` continues, in this process or another; `fork()`
    branches it. The session closes after `idle_timeout` seconds without a call. It lives in
    this process's engine unless `client` (from `capsule.connect`) says otherwise.
    """

    def __init__(
        self,
        *,
        compute: str | int | None = None,
        ram: str | int | None = None,
        timeout: float | str | None = None,
        allowed_hosts: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
        idle_timeout: float = 600,
        restore: str | None = None,
        client: Client | None = None,
    ):
        self._client = client or _here()
        request = _open_request(restore, idle_timeout, compute, ram, timeout, allowed_hosts, env)
        self._adopt(self._client._call("POST", "/v1/sessions", request))

    def _adopt(self, view: Mapping[str, Any]) -> None:
        self.id: str = view["id"]
        self.workspace = pathlib.Path(view["workspace"])

    @classmethod
    def restore(cls, saved: str, **options: Any) -> Session:
        """A session continuing the one `save()` returned `saved` for (in any process of the
        user); the keyword arguments are the constructor's."""
        return cls(restore=saved, **options)

    def run(self, code: str, *, compute: str | int | None = None, timeout: float | str | None = None) -> Result:
        """Runs `code` in the session; see `run_python` for what the `Result` holds."""
        envelope = self._client._call("POST", f"/v1/sessions/{self.id}/run", _call_request(code, compute, timeout))
        return Result._from(envelope, None)

    def save(self) -> str:
        """Saves the session's state (its memory where it differs from a fresh interpreter); its id."""
        return self._client._call("POST", f"/v1/sessions/{self.id}/save")["id"]

    def fork(self) -> Session:
        """A second, independent session starting from this one's state and a copy of its workspace."""
        fork = object.__new__(Session)
        fork._client = self._client
        fork._adopt(self._client._call("POST", f"/v1/sessions/{self.id}/fork"))
        return fork

    def close(self) -> None:
        """Ends the session and removes its workspace (a closed session closes quietly)."""
        try:
            self._client._call("DELETE", f"/v1/sessions/{self.id}")
        except UsageError:
            pass  # closed already, or closed when idle

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncSession(_SessionFiles):
    """`Session`, for asyncio: `async with await AsyncSession.open(...) as session:`, then
    `await session.run(code)`."""

    def __init__(self, view: Mapping[str, Any], client: Client):
        self.id: str = view["id"]
        self.workspace = pathlib.Path(view["workspace"])
        self._client = client

    @classmethod
    async def open(
        cls, *, idle_timeout: float = 600, restore: str | None = None, client: Client | None = None, **options: Any
    ) -> AsyncSession:
        """Opens a session; the keyword arguments are `Session`'s."""
        client = client or _here()
        if _image is None or _image[0] != os.getpid():
            await asyncio.get_running_loop().run_in_executor(None, _interpreter_image)
        request = _open_request(restore, idle_timeout, **options)
        return cls(await client._call_async("POST", "/v1/sessions", request), client)

    async def run(self, code: str, *, compute: str | int | None = None, timeout: float | str | None = None) -> Result:
        request = _call_request(code, compute, timeout)
        return Result._from(await self._client._call_async("POST", f"/v1/sessions/{self.id}/run", request), None)

    async def save(self) -> str:
        return (await self._client._call_async("POST", f"/v1/sessions/{self.id}/save"))["id"]

    async def fork(self) -> AsyncSession:
        return AsyncSession(await self._client._call_async("POST", f"/v1/sessions/{self.id}/fork"), self._client)

    async def close(self) -> None:
        try:
            await self._client._call_async("DELETE", f"/v1/sessions/{self.id}")
        except UsageError:
            pass

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
