"""The SDK's tests run twice: against the engine in the test process (what `capsule.run` and
the other functions use) and through a daemon (`capsule.connect`), which the fixture starts
from the installed `capsule` command and stops afterwards."""

import os
import pathlib
import socket
import subprocess
import sysconfig
import tempfile
import time

import pytest

import capsule
from capsule import _host


def capsule_command() -> str:
    return os.path.join(sysconfig.get_path("scripts"), "capsule")


def answers(path: pathlib.Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
            return True
        except OSError:
            return False


class Daemon:
    """A `capsule daemon` of the test's own, on a socket in a temporary folder."""

    def __init__(self, folder: pathlib.Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.socket = folder / "daemon.sock"
        self.state = folder / "state"
        self.process = None
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(
            [capsule_command(), "daemon", "--socket", str(self.socket), "--state-dir", str(self.state),
             "--no-resume", "--exit-with", str(os.getpid())],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        while not answers(self.socket):
            if self.process.poll() is not None:
                raise RuntimeError(f"the daemon did not start: {self.process.stderr.read().decode()}")
            if time.monotonic() > deadline:
                raise RuntimeError("the daemon did not start within 60 s")
            time.sleep(0.02)

    def stop(self, kill: bool = False) -> None:
        if self.process.poll() is None:
            self.process.kill() if kill else self.process.terminate()
            self.process.wait(timeout=30)


@pytest.fixture(scope="session")
def daemon():
    with tempfile.TemporaryDirectory(prefix="capsule-sdk-") as folder:
        started = Daemon(pathlib.Path(folder))
        yield started
        started.stop()


@pytest.fixture(params=["here", "daemon"])
def client(request):
    """Where the test's calls go: this process's engine, or a daemon."""
    if request.param == "here":
        return _host._here()
    return capsule.connect(request.getfixturevalue("daemon").socket)
