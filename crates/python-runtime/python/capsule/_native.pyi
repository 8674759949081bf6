"""Types of `capsule._native`, Capsule's engine and builder in the Python process (Rust, PyO3).

Every call answers as the daemon's API does: `(status, body)`, the HTTP status and the JSON
body (an error body `{"error": {"kind", "message", "hint"}}` when the status is 300 or more).
"""

from typing import Callable

Answer = tuple[int, bytes]

class Engine:
    """The engine in this process, answering the daemon's API requests without a socket."""

    def __init__(self) -> None: ...
    def request(self, method: str, route: str, body: bytes | None = None) -> Answer: ...
    def request_later(self, method: str, route: str, body: bytes | None, done: Callable[[int, bytes], None]) -> None:
        """Answers by calling `done(status, body)` from one of Capsule's threads."""
    def close(self) -> None: ...

class Daemon:
    """A client of a daemon: a socket's path, or `host:port` with its token; without a
    target, the user's daemon (`CAPSULE_SOCKET`, else the default socket)."""

    def __init__(self, target: str | None = None, token: str | None = None) -> None: ...
    @property
    def target(self) -> str: ...
    def request(self, method: str, route: str, body: bytes | None = None) -> Answer: ...
    def request_later(self, method: str, route: str, body: bytes | None, done: Callable[[int, bytes], None]) -> None: ...

def build(entry: str, out_dir: str | None = None, force: bool = False, runtime: str | None = None) -> Answer:
    """Builds `entry` unless it is up to date; the body is `{"manifest": path}`."""

def interpreter_image(runtime: str | None = None) -> Answer:
    """The interpreter image (`run_python`, sessions), built once per runtime; as `build`."""
