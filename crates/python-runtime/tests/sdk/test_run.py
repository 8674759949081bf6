"""`capsule.run` and friends from a user's Python, as installed from the wheel.

Run by `cargo xtask test-wheel` (and so by CI) in a fresh virtual environment with the wheel
installed; each test that takes `client` runs in this process's engine and through a daemon.
"""

import asyncio
import importlib.util
import os
import subprocess
import sys
import sysconfig

import pytest

import capsule
from capsule import _host
from conftest import Daemon

TASKS = '''
from capsule import task


@task(max_retries=0)
def main(name="world"):
    return f"Hello, {name}!"


@task(max_retries=0)
def fail(message="boom"):
    raise ValueError(message)


@task(compute=20_000_000, max_retries=0)
def spin():
    while True:
        pass


@task(max_retries=0)
def add(a, b):
    return a + b
'''


@pytest.fixture
def project(tmp_path):
    (tmp_path / "tasks.py").write_text(TASKS)
    return tmp_path


def test_run_returns_the_tasks_result(project, client):
    result = client.run(project / "tasks.py", args=["Ada"])
    assert (result.success, result.result, result.error) == (True, "Hello, Ada!", None)
    assert result.execution.task == "main" and result.execution.attempts == 1 and result.run_id
    assert client.run(project / "tasks.py", "add", args=[20, 22]).unwrap() == 42
    assert client.run("tasks.py", "add", kwargs={"a": 1, "b": 2}, project=project).unwrap() == 3
    assert client.run(project / "tasks.py", "add", json_args="[1, 2]").unwrap() == 3


def test_the_packages_functions_run_in_this_process(project):
    assert capsule.run(project / "tasks.py", args=["Bo"]).result == "Hello, Bo!"
    assert _host._here().where == "in this process"
    assert capsule.run_python("6 * 7").result == 42


def test_importing_capsule_starts_nothing():
    script = "import os, capsule, capsule._host; print(len(os.listdir('/proc/self/task')), len(capsule.__all__))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    threads, _ = done.stdout.split()
    assert threads == "1", "no thread (and so no engine) before the first call"


def test_a_failing_task_is_a_result_with_its_error_type(project, client):
    failed = client.run(project / "tasks.py", "fail")
    assert not failed.success and failed.result is None
    assert (failed.error.type, failed.error.exc_type, failed.error.message) == ("exception", "ValueError", "boom")
    assert "Traceback" in failed.error.traceback
    with pytest.raises(capsule.TaskFailed) as caught:
        failed.unwrap()
    assert str(caught.value) == "task `fail` failed (exception): ValueError: boom"
    assert client.run(project / "tasks.py", "spin").error.type == "fuel"


def cli_error(*arguments):
    """The first `error:` line (without `error: `) and its hint, as the `capsule` command prints them."""
    command = [os.path.join(sysconfig.get_path("scripts"), "capsule"), *arguments]
    lines = subprocess.run(command, capture_output=True, text=True).stderr.splitlines()
    message = next(line for line in lines if line.startswith("error: "))[len("error: "):]
    hints = [line[len("  hint: "):] for line in lines if line.startswith("  hint: ")]
    return message, (hints[0] if hints else None)


def test_bad_calls_raise_typed_errors_with_the_messages_of_the_cli(project, client):
    with pytest.raises(capsule.UsageError) as caught:
        client.run(project / "tasks.py", "nope")
    assert (caught.value.message, caught.value.hint) == cli_error("run", str(project / "tasks.py"), "--task", "nope")
    with pytest.raises(capsule.UsageError, match="not JSON"):
        client.run(project / "tasks.py", "add", args=[object(), 1])
    with pytest.raises(capsule.UsageError, match="`json_args` is not valid JSON"):
        client.run(project / "tasks.py", "add", json_args="[1,")

    with pytest.raises(capsule.BuildError) as caught:
        client.run(project / "missing.py")
    assert caught.value.message == cli_error("build", str(project / "missing.py"))[0]
    (project / "broken.py").write_text("from capsule import task\n\n@task(rma='1MB')\ndef main():\n    pass\n")
    with pytest.raises(capsule.BuildError) as caught:
        client.run(project / "broken.py")
    assert (caught.value.message, caught.value.hint) == cli_error("build", str(project / "broken.py"))
    assert caught.value.message == "broken.py:3:7: unknown `@task` option `rma`"


def test_build_gives_the_manifest_and_a_manifest_runs(project, client):
    manifest = capsule.build(project / "tasks.py")
    assert set(manifest.tasks) == {"main", "fail", "spin", "add"}
    assert manifest.options["spin"]["compute"] == 20_000_000
    assert client.run(manifest.path, "add", args=[1, 1]).unwrap() == 2


def test_a_thousand_concurrent_async_runs_all_complete(project, client):
    async def many():
        return await asyncio.gather(*(client.run_async(project / "tasks.py", "add", args=[i, i]) for i in range(1000)))

    results = asyncio.run(many())
    assert [r.unwrap() for r in results] == [2 * i for i in range(1000)]
    assert len({r.run_id for r in results}) == 1000


def test_connect_finds_the_users_daemon_as_the_command_does(daemon, monkeypatch):
    monkeypatch.setenv("CAPSULE_SOCKET", str(daemon.socket))
    client = capsule.connect()
    assert client.where == f"through the daemon at {daemon.socket}"
    assert client.run_python("6 * 7").result == 42
    with pytest.raises(capsule.UsageError, match="a token goes with a daemon's `host:port`"):
        capsule.connect(token="secret")


def test_a_restarted_daemon_is_reached_again_and_a_missing_one_says_so(project, tmp_path):
    daemon = Daemon(tmp_path / "daemon")
    client = capsule.connect(daemon.socket)
    assert client.run(project / "tasks.py", "add", args=[1, 2]).unwrap() == 3
    daemon.stop(kill=True)
    with pytest.raises(capsule.UsageError, match="no daemon answers on `.*daemon.sock`") as caught:
        client.run(project / "tasks.py", "add", args=[1, 2])
    assert caught.value.hint == "start one with `capsule daemon`, or run in this process (no `capsule.connect`)"
    daemon.start()
    assert client.run(project / "tasks.py", "add", args=[2, 3]).unwrap() == 5
    daemon.stop()


def test_tasks_stay_plain_functions_under_python(project):
    spec = importlib.util.spec_from_file_location("tasks_module", project / "tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main("pytest") == "Hello, pytest!"
    assert module.add(2, 2) == 4
