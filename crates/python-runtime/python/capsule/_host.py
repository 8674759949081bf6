"""Running tasks from your own Python process: `capsule.run`, `capsule.run_async`, `capsule.build`.

A run goes to the Capsule daemon over its Unix socket (`CAPSULE_SOCKET`, else
`$XDG_RUNTIME_DIR/capsule/daemon.sock`, else `~/.capsule/daemon.sock`). When none answers, a
private daemon is started for this process; it stops when the process exits (or dies). The
file is built first if it changed, by the `capsule` command installed with this package; an
unchanged build is recognised from its `fingerprint.json` without starting any process.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

__all__ = [
    "AsyncSession", "BuildError", "CapsuleError", "DaemonError", "ErrorInfo", "Execution", "Manifest", "Output",
    "Result", "Session", "TaskFailed", "UsageError", "build", "run", "run_async", "run_python", "run_python_async",
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
    """The daemon could not be started or reached, or broke off."""


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


# --- Finding things -------------------------------------------------------------------------


def _capsule_command() -> str:
    """The `capsule` command: `$CAPSULE_BIN`, the one installed with this package, or on PATH."""
    explicit = os.environ.get("CAPSULE_BIN")
    if explicit:
        return explicit
    beside = pathlib.Path(sysconfig.get_path("scripts")) / "capsule"
    if beside.exists():
        return str(beside)
    found = shutil.which("capsule")
    if found:
        return found
    raise DaemonError(
        "cannot find the `capsule` command",
        "install Capsule's wheel (`pip install capsule-...whl`), or set CAPSULE_BIN",
    )


def _default_socket() -> pathlib.Path:
    if os.environ.get("CAPSULE_SOCKET"):
        return pathlib.Path(os.environ["CAPSULE_SOCKET"])
    if os.environ.get("XDG_RUNTIME_DIR"):
        return pathlib.Path(os.environ["XDG_RUNTIME_DIR"]) / "capsule" / "daemon.sock"
    return pathlib.Path.home() / ".capsule" / "daemon.sock"


def _stamp(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


_fingerprints: dict[str, tuple[list[int] | None, Any]] = {}
# The format of `fingerprint.json` this reads (`VERSION` in `fingerprint.rs`).
_FINGERPRINT_VERSION = 3
# Where an installation keeps the runtime, from its `capsule` command (`INSTALLED_RUNTIME` in
# `python-runtime`'s lib.rs).
_INSTALLED_RUNTIME = os.path.join("..", "share", "capsule", "capsule-python.wasm")
_runtimes: dict[tuple[str | None, str | None], str | None] = {}


def _runtime() -> str | None:
    """The runtime a `capsule build` started from here would use, found as it finds it
    (`python_runtime::runtime_path`): `$CAPSULE_RUNTIME`, else the one installed beside the
    command. None when neither is there: a `capsule` built in a checkout knows its own."""
    key = (os.environ.get("CAPSULE_RUNTIME"), os.environ.get("CAPSULE_BIN"))
    if key not in _runtimes:
        try:
            installed = os.path.join(os.path.dirname(os.path.realpath(_capsule_command())), _INSTALLED_RUNTIME)
        except DaemonError:
            installed = None
        _runtimes[key] = key[0] or (installed if installed and os.path.isfile(installed) else None)
    return _runtimes[key]


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _up_to_date(out_dir: pathlib.Path) -> pathlib.Path | None:
    """The manifest in `out_dir` if its build's `fingerprint.json` still holds (see
    `capsule-build`'s `fingerprint.rs`: the same runtime, every file with the same size and
    times, every absent file still absent). The file is read again only when it changed."""
    path = os.path.join(out_dir, "fingerprint.json")
    stamp = _stamp(path)
    known = _fingerprints.get(path)
    if known is None or known[0] != stamp:
        try:
            with open(path, "rb") as file:
                known = _fingerprints[path] = (stamp, json.load(file))
        except (OSError, ValueError):
            return None
    fingerprint = known[1]
    if fingerprint.get("version") != _FINGERPRINT_VERSION:
        return None
    runtime = _runtime()
    if runtime is not None and not _same_file(fingerprint["runtime"], runtime):
        return None
    for file, file_stamp in fingerprint["files"]:
        if _stamp(file) != file_stamp:
            return None
    if any(os.path.exists(file) for file in fingerprint["absent"]):
        return None
    manifest = os.path.join(out_dir, "manifest.toml")
    return pathlib.Path(manifest) if os.path.exists(manifest) else None


def _failure(stderr: str) -> CapsuleError:
    """The failure a `capsule` command printed with `--message-format json`, as an exception."""
    for line in reversed(stderr.splitlines()):
        try:
            error = json.loads(line)["error"]
            return _exception(error["kind"], error["message"], error.get("hint"))
        except (ValueError, KeyError, TypeError):
            continue
    return DaemonError(stderr.strip() or "the command failed")


_building: dict[pathlib.Path, threading.Lock] = {}
_building_lock = threading.Lock()


def _build(entry: pathlib.Path, force: bool = False) -> pathlib.Path:
    """Builds `entry` with the `capsule` command; its manifest. Threads of this process that
    want the same build wait for one of them (and `capsule build` itself takes turns)."""
    out_dir = entry.parent / ".capsule" / "build" / entry.stem
    if not force:
        manifest = _up_to_date(out_dir)
        if manifest is not None:
            return manifest
    with _building_lock:
        turn = _building.setdefault(out_dir, threading.Lock())
    with turn:
        if not force:
            manifest = _up_to_date(out_dir)
            if manifest is not None:
                return manifest
        command = [_capsule_command(), "--message-format", "json", "build", str(entry), "-o", str(out_dir)]
        done = subprocess.run(command + (["--force"] if force else []), capture_output=True, text=True)
    if done.returncode != 0:
        raise _failure(done.stderr)
    return out_dir / "manifest.toml"


def _source(file_or_manifest: str | os.PathLike[str], project: str | os.PathLike[str] | None) -> pathlib.Path:
    path = pathlib.Path(file_or_manifest)
    if not path.is_absolute():
        path = pathlib.Path(project or os.getcwd()) / path
    return pathlib.Path(os.path.abspath(path))


def build(file: str | os.PathLike[str], *, project: str | os.PathLike[str] | None = None, force: bool = False) -> Manifest:
    """Build `file` (cached, like `capsule build`) and return its manifest."""
    return Manifest.load(_build(_source(file, project), force))


# --- The daemon -----------------------------------------------------------------------------


class _PrivateDaemon:
    """A daemon started for this process when none answers; it ends with the process."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="capsule-")
        self.socket = pathlib.Path(self.dir) / "daemon.sock"
        self.process = subprocess.Popen(
            [_capsule_command(), "--message-format", "json", "daemon", "--socket", str(self.socket),
             "--state-dir", os.path.join(self.dir, "state"),
             "--no-resume", "--exit-with", str(os.getpid())],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 30
        while not _answers(self.socket):
            if self.process.poll() is not None:
                failure = _failure(self.process.stderr.read().decode(errors="replace"))
                raise DaemonError(f"the daemon did not start: {failure.message}", failure.hint)
            if time.monotonic() > deadline:
                self.stop()
                raise DaemonError("the daemon did not start within 30 s")
            time.sleep(0.01)
        atexit.register(self.stop)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _answers(path: pathlib.Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
            return True
        except OSError:
            return False


_lock = threading.Lock()
_private: _PrivateDaemon | None = None
_chosen: tuple[int, pathlib.Path] | None = None


def _daemon_socket(fresh: bool = False) -> pathlib.Path:
    """The socket of the daemon to use: the user's if it answers, else this process's own
    (started now). Chosen once per process; `fresh` chooses again (the last one failed)."""
    global _private, _chosen
    with _lock:
        # After a fork, the child chooses (and if need be starts) a daemon of its own.
        if _chosen is not None and _chosen[0] == os.getpid() and not fresh:
            return _chosen[1]
        shared = _default_socket()
        if _answers(shared):
            path = shared
        else:
            if _private is None or _private.process.poll() is not None or _chosen is None or _chosen[0] != os.getpid():
                _private = _PrivateDaemon()
            path = _private.socket
        _chosen = (os.getpid(), path)
        return path


class _Connection:
    """One keep-alive HTTP/1.1 connection to the daemon, with the few requests the SDK makes."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")

    def request(self, method: str, route: str, body: bytes | None, timeout: float | None) -> tuple[int, bytes]:
        self.sock.settimeout(timeout)
        head = f"{method} {route} HTTP/1.1\r\nHost: capsule\r\nContent-Type: application/json\r\nContent-Length: {len(body or b'')}\r\n\r\n"
        self.sock.sendall(head.encode() + (body or b""))
        status = int(self.file.readline().split()[1])
        length = 0
        while True:
            line = self.file.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, self.file.read(length)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


_local = threading.local()


def _exchange(method: str, route: str, body: bytes | None, timeout: float | None) -> tuple[int, bytes]:
    """A request on this thread's connection to the daemon, reconnecting once if it was closed."""
    path = _daemon_socket()
    for attempt in (1, 2):
        connection = getattr(_local, "connection", None)
        try:
            if connection is None or connection.path != path:
                connection = _local.connection = _Connection(path)
            return connection.request(method, route, body, timeout)
        except (OSError, ValueError, IndexError) as error:
            if connection is not None:
                connection.close()
            _local.connection = None
            if isinstance(error, TimeoutError) or attempt == 2:
                raise DaemonError(f"the daemon on `{path}` did not answer: {error}") from error
            path = _daemon_socket(fresh=True)
    raise AssertionError("unreachable")


# --- Runs -----------------------------------------------------------------------------------


def _request(
    file_or_manifest: str | os.PathLike[str],
    task: str | None,
    args: Sequence[Any],
    kwargs: Mapping[str, Any] | None,
    timeout: float | None,
    project: str | os.PathLike[str] | None,
    json_args: str | None,
) -> tuple[pathlib.Path, dict[str, Any]]:
    source = _source(file_or_manifest, project)
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
        request["default_timeout"] = f"{max(1, round(timeout * 1000))}ms"
    return source, request


def _encode(request: Mapping[str, Any]) -> bytes:
    try:
        return json.dumps(request, allow_nan=False).encode()
    except (TypeError, ValueError) as error:
        raise UsageError(f"the arguments are not JSON: {error}", "pass str, int, float, bool, None, lists and dicts") from None


def _exception(kind: str | None, message: str, hint: str | None) -> CapsuleError:
    """The SDK's exception for a failure of `kind`: the category the daemon's API and the
    `capsule` command (`--message-format json`) both give every failure."""
    if kind in ("build", "load"):
        return BuildError(message, hint)
    if kind in ("usage", "bad_request", "not_found", "conflict", "too_large"):
        return UsageError(message, hint)
    return DaemonError(message, hint)


def _raise_error(body: bytes) -> None:
    """Raises the SDK's exception for the daemon's error answer."""
    try:
        error = json.loads(body).get("error", {})
    except ValueError:
        error = {}
    raise _exception(error.get("kind"), error.get("message", body.decode(errors="replace")), error.get("hint"))


def _answer(status: int, body: bytes) -> Result:
    if status != 200:
        _raise_error(body)
    answer = json.loads(body)
    return Result._from(answer["outcome"], answer["run"]["id"])


def _reply(status: int, body: bytes) -> Any:
    """The JSON of a successful answer (None for an empty one)."""
    if status >= 300:
        _raise_error(body)
    return json.loads(body) if body else None


def _manifest_of(source: pathlib.Path) -> pathlib.Path:
    if source.suffix == ".toml":
        return source
    return _build(source)


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
    """Run `task` (default: `main`, else the only task) of a Python file or a built
    `manifest.toml`, in its sandbox, and return its `Result`.

    The file is built first when it changed. `timeout` (seconds) is the deadline of each
    attempt for tasks that set none. A failing task gives a `Result` with `error`
    (`.unwrap()` raises `TaskFailed`); a failing build raises `BuildError`, an unknown task or
    arguments that are not JSON `UsageError`, an unreachable daemon `DaemonError`.
    """
    _refuse_inside_a_task()
    source, request = _request(file_or_manifest, task, tuple(args), kwargs, timeout, project, json_args)
    request["manifest"] = str(_manifest_of(source))
    wait = None if timeout is None else timeout * 2 + 60
    status, body = _exchange("POST", "/v1/runs", _encode(request), wait)
    try:
        return _answer(status, body)
    except BuildError:
        if source.suffix == ".toml":
            raise
        # A build by another Capsule version (or a missing artifact): build afresh, once.
        request["manifest"] = str(_build(source, force=True))
        return _answer(*_exchange("POST", "/v1/runs", _encode(request), wait))


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
    _refuse_inside_a_task()
    source, request = _request(file_or_manifest, task, tuple(args), kwargs, timeout, project, json_args)
    loop = asyncio.get_running_loop()
    if source.suffix == ".toml":
        request["manifest"] = str(source)
    else:
        out_dir = source.parent / ".capsule" / "build" / source.stem
        manifest = _up_to_date(out_dir)
        # Building is rare and slow: it runs in a thread so the loop is not blocked.
        request["manifest"] = str(manifest or await loop.run_in_executor(None, _build, source))
    wait = None if timeout is None else timeout * 2 + 60
    return _answer(*await _async_exchange("POST", "/v1/runs", _encode(request), wait))


class _AsyncPool:
    """Keep-alive connections to the daemon for one event loop, at most `size` at once."""

    def __init__(self, path: pathlib.Path, size: int = 32):
        self.path = path
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.slots = asyncio.Semaphore(size)

    async def exchange(self, method: str, route: str, body: bytes | None, timeout: float | None) -> tuple[int, bytes]:
        async with self.slots:
            for attempt in (1, 2):
                connection = self.idle.pop() if self.idle else None
                try:
                    if connection is None:
                        connection = await asyncio.open_unix_connection(str(self.path))
                    answer = await asyncio.wait_for(self._send(*connection, method, route, body), timeout)
                    self.idle.append(connection)
                    return answer
                except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as error:
                    if connection is not None:
                        connection[1].close()
                    if attempt == 2:
                        raise DaemonError(f"the daemon on `{self.path}` did not answer: {error}") from error
                except asyncio.TimeoutError as error:
                    if connection is not None:
                        connection[1].close()
                    raise DaemonError(f"the daemon on `{self.path}` did not answer in time") from error
        raise AssertionError("unreachable")

    @staticmethod
    async def _send(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, method: str, route: str, body: bytes | None
    ) -> tuple[int, bytes]:
        body = body or b""
        head = f"{method} {route} HTTP/1.1\r\nHost: capsule\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        writer.write(head.encode() + body)
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        length = 0
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await reader.readexactly(length)


_pools: dict[tuple[int, pathlib.Path], _AsyncPool] = {}


def _pool(path: pathlib.Path) -> _AsyncPool:
    key = (id(asyncio.get_running_loop()), path)
    pool = _pools.get(key)
    if pool is None:
        pool = _pools[key] = _AsyncPool(path)
    return pool


async def _async_exchange(method: str, route: str, body: bytes | None, timeout: float | None) -> tuple[int, bytes]:
    """`_exchange` for asyncio, on the loop's pool of connections."""
    # Choosing may start a daemon (once): not on the loop's thread.
    if _chosen is not None and _chosen[0] == os.getpid():
        path = _chosen[1]
    else:
        path = await asyncio.get_running_loop().run_in_executor(None, _daemon_socket)
    return await _pool(path).exchange(method, route, body, timeout)


def _refuse_inside_a_task() -> None:
    if "_capsule" in sys.builtin_module_names:
        raise RuntimeError(
            "capsule.run is for the host; inside a task, call another task directly (or `.spawn` it)"
        )


# --- Code strings and sessions --------------------------------------------------------------

_image: tuple[int, str] | None = None


def _interpreter_image() -> str:
    """The built-in interpreter image's manifest: built (once per runtime) by the `capsule`
    command, then known for the life of the process."""
    global _image
    if _image is not None and _image[0] == os.getpid():
        return _image[1]
    done = subprocess.run([_capsule_command(), "--message-format", "json", "python", "--image"], capture_output=True, text=True)
    if done.returncode != 0:
        raise _failure(done.stderr)
    _image = (os.getpid(), done.stdout.strip())
    return _image[1]


async def _interpreter_image_async() -> str:
    if _image is not None and _image[0] == os.getpid():
        return _image[1]
    return await asyncio.get_running_loop().run_in_executor(None, _interpreter_image)


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
    """The sandbox options the caller set, in the manifest's form: the daemon checks each and
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


def run_python(
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
    _refuse_inside_a_task()
    _interpreter_image()  # the daemon runs it, and never builds
    request = _python_request(
        code, project, compute=compute, ram=ram, timeout=timeout,
        allowed_hosts=allowed_hosts, allowed_files=allowed_files, env=env,
    )
    return _answer(*_exchange("POST", "/v1/python", request, None))


async def run_python_async(code: str, **options: Any) -> Result:
    """`run_python`, for asyncio (the same keyword arguments)."""
    _refuse_inside_a_task()
    await _interpreter_image_async()  # the daemon runs it, and never builds
    request = _python_request(code, **options)
    return _answer(*await _async_exchange("POST", "/v1/python", request, None))


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
    branches it. The session closes after `idle_timeout` seconds without a call.
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
    ):
        _refuse_inside_a_task()
        request = _open_request(restore, idle_timeout, compute, ram, timeout, allowed_hosts, env)
        self._adopt(_reply(*_exchange("POST", "/v1/sessions", request, None)))

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
        envelope = _reply(*_exchange("POST", f"/v1/sessions/{self.id}/run", _call_request(code, compute, timeout), None))
        return Result._from(envelope, None)

    def save(self) -> str:
        """Saves the session's state (its memory where it differs from a fresh interpreter); its id."""
        return _reply(*_exchange("POST", f"/v1/sessions/{self.id}/save", None, None))["id"]

    def fork(self) -> Session:
        """A second, independent session starting from this one's state and a copy of its workspace."""
        fork = object.__new__(Session)
        fork._adopt(_reply(*_exchange("POST", f"/v1/sessions/{self.id}/fork", None, None)))
        return fork

    def close(self) -> None:
        """Ends the session and removes its workspace (a closed session closes quietly)."""
        status, body = _exchange("DELETE", f"/v1/sessions/{self.id}", None, None)
        if status != 404:
            _reply(status, body)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncSession(_SessionFiles):
    """`Session`, for asyncio: `async with await AsyncSession.open(...) as session:`, then
    `await session.run(code)`."""

    def __init__(self, view: Mapping[str, Any]):
        self.id: str = view["id"]
        self.workspace = pathlib.Path(view["workspace"])

    @classmethod
    async def open(cls, *, idle_timeout: float = 600, restore: str | None = None, **options: Any) -> AsyncSession:
        """Opens a session; the keyword arguments are `Session`'s."""
        _refuse_inside_a_task()
        await _interpreter_image_async()
        request = _open_request(restore, idle_timeout, **options)
        return cls(_reply(*await _async_exchange("POST", "/v1/sessions", request, None)))

    async def run(self, code: str, *, compute: str | int | None = None, timeout: float | str | None = None) -> Result:
        request = _call_request(code, compute, timeout)
        return Result._from(_reply(*await _async_exchange("POST", f"/v1/sessions/{self.id}/run", request, None)), None)

    async def save(self) -> str:
        return _reply(*await _async_exchange("POST", f"/v1/sessions/{self.id}/save", None, None))["id"]

    async def fork(self) -> AsyncSession:
        return AsyncSession(_reply(*await _async_exchange("POST", f"/v1/sessions/{self.id}/fork", None, None)))

    async def close(self) -> None:
        status, body = await _async_exchange("DELETE", f"/v1/sessions/{self.id}", None, None)
        if status != 404:
            _reply(status, body)

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
