"""`capsule.run` and friends from a user's Python, as installed from the wheel.

Run by `cargo xtask test-wheel` (and so by CI) in a fresh virtual environment with the wheel
installed and no daemon running: the SDK starts one for the test process.
"""

import asyncio
import importlib.util
import os
import signal
import subprocess
import sysconfig

import pytest

import capsule
from capsule import _host

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


def test_run_returns_the_tasks_result(project):
    result = capsule.run(project / "tasks.py", args=["Ada"])
    assert (result.success, result.result, result.error) == (True, "Hello, Ada!", None)
    assert result.execution.task == "main" and result.execution.attempts == 1 and result.run_id
    assert capsule.run(project / "tasks.py", "add", args=[20, 22]).unwrap() == 42
    assert capsule.run("tasks.py", "add", kwargs={"a": 1, "b": 2}, project=project).unwrap() == 3
    assert capsule.run(project / "tasks.py", "add", json_args="[1, 2]").unwrap() == 3


def test_a_failing_task_is_a_result_with_its_error_type(project):
    failed = capsule.run(project / "tasks.py", "fail")
    assert not failed.success and failed.result is None
    assert (failed.error.type, failed.error.exc_type, failed.error.message) == ("exception", "ValueError", "boom")
    assert "Traceback" in failed.error.traceback
    with pytest.raises(capsule.TaskFailed) as caught:
        failed.unwrap()
    assert str(caught.value) == "task `fail` failed (exception): ValueError: boom"
    assert capsule.run(project / "tasks.py", "spin").error.type == "fuel"


def cli_error(*arguments):
    """The first `error:` line (without `error: `) and its hint, as the `capsule` command prints them."""
    command = [os.path.join(sysconfig.get_path("scripts"), "capsule"), *arguments]
    lines = subprocess.run(command, capture_output=True, text=True).stderr.splitlines()
    message = next(line for line in lines if line.startswith("error: "))[len("error: "):]
    hints = [line[len("  hint: "):] for line in lines if line.startswith("  hint: ")]
    return message, (hints[0] if hints else None)


def test_bad_calls_raise_typed_errors_with_the_messages_of_the_cli(project):
    with pytest.raises(capsule.UsageError) as caught:
        capsule.run(project / "tasks.py", "nope")
    assert (caught.value.message, caught.value.hint) == cli_error("run", str(project / "tasks.py"), "--task", "nope")
    with pytest.raises(capsule.UsageError, match="not JSON"):
        capsule.run(project / "tasks.py", "add", args=[object(), 1])
    with pytest.raises(capsule.UsageError, match="`json_args` is not valid JSON"):
        capsule.run(project / "tasks.py", "add", json_args="[1,")

    with pytest.raises(capsule.BuildError) as caught:
        capsule.run(project / "missing.py")
    assert caught.value.message == cli_error("build", str(project / "missing.py"))[0]
    (project / "broken.py").write_text("from capsule import task\n\n@task(rma='1MB')\ndef main():\n    pass\n")
    with pytest.raises(capsule.BuildError) as caught:
        capsule.run(project / "broken.py")
    assert (caught.value.message, caught.value.hint) == cli_error("build", str(project / "broken.py"))
    assert caught.value.message == "broken.py:3:7: unknown `@task` option `rma`"


def test_build_gives_the_manifest_and_a_manifest_runs(project):
    manifest = capsule.build(project / "tasks.py")
    assert set(manifest.tasks) == {"main", "fail", "spin", "add"}
    assert manifest.options["spin"]["compute"] == 20_000_000
    assert capsule.run(manifest.path, "add", args=[1, 1]).unwrap() == 2


def test_a_thousand_concurrent_async_runs_all_complete(project):
    async def many():
        return await asyncio.gather(*(capsule.run_async(project / "tasks.py", "add", args=[i, i]) for i in range(1000)))

    results = asyncio.run(many())
    assert [r.unwrap() for r in results] == [2 * i for i in range(1000)]
    assert len({r.run_id for r in results}) == 1000


def test_a_dead_daemon_is_replaced(project):
    assert capsule.run(project / "tasks.py", "add", args=[1, 2]).unwrap() == 3
    daemon = _host._private.process
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.wait()
    assert capsule.run(project / "tasks.py", "add", args=[2, 3]).unwrap() == 5
    assert _host._private.process.pid != daemon.pid


def test_tasks_stay_plain_functions_under_python(project):
    spec = importlib.util.spec_from_file_location("tasks_module", project / "tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main("pytest") == "Hello, pytest!"
    assert module.add(2, 2) == 4
