"""`capsule.run_python` and sessions from a user's Python, as installed from the wheel."""

import asyncio
import subprocess
import sys

import pytest

import capsule


def test_run_python_gives_the_last_value_and_the_output(client):
    result = client.run_python("total = sum(range(10))\nprint('sum:', total)\ntotal * 2")
    assert (result.success, result.result, result.output.stdout) == (True, 90, "sum: 45\n")
    assert client.run_python("{'a': [1, 2]}").result == {"a": [1, 2]}
    assert client.run_python("object").result == "<class 'object'>"


def test_run_python_failures_are_results_and_bad_calls_raise(client):
    failed = client.run_python("1 / 0")
    assert (failed.error.type, failed.error.exc_type) == ("exception", "ZeroDivisionError")
    assert 'File "<cell 1>", line 1' in failed.error.traceback
    syntax = client.run_python("x = (1,")
    assert syntax.error.exc_type == "SyntaxError" and "was never closed" in syntax.error.message
    assert client.run_python("while True: pass", compute="LOW").error.type == "fuel"
    assert client.run_python("import time\nwhile True: time.sleep(0.01)", timeout=0.5).error.type == "timeout"
    assert client.run_python("b = bytearray(300 << 20)", ram="64MiB").error.type == "memory"
    flood = client.run_python("for i in range(200_000):\n    print('x' * 100)\n'done'", compute="HIGH")
    assert flood.result == "done" and flood.output.stdout_truncated and len(flood.output.stdout) < 20 << 20
    with pytest.raises(capsule.UsageError, match="`code` must be a string"):
        client.run_python(42)
    with pytest.raises(capsule.UsageError, match="ram"):
        client.run_python("1", ram="lots")


def test_run_python_reaches_only_what_it_is_given(tmp_path, client):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "in.txt").write_text("granted")
    (tmp_path / "secret.txt").write_text("not granted")
    read = "open('data/in.txt').read()"
    assert client.run_python(read, project=tmp_path).error.exc_type == "PermissionError"
    assert client.run_python(read, project=tmp_path, allowed_files=["data"]).result == "granted"
    escape = client.run_python("open('data/../secret.txt').read()", project=tmp_path, allowed_files=["data"])
    assert not escape.success
    # The project folder itself holds `.capsule/` (builds, journal): no call may be given it.
    with pytest.raises(capsule.UsageError, match=r"project folder itself, which holds `\.capsule/`"):
        client.run_python("1", project=tmp_path, allowed_files=[{"path": ".", "mode": "read-write"}])
    write = client.run_python("open('data/out.txt', 'w').write('x')", project=tmp_path, allowed_files=["data"])
    assert write.error.exc_type in ("PermissionError", "OSError")
    wrote = client.run_python(
        "open('data/out.txt', 'w').write('x')", project=tmp_path, allowed_files=[{"path": "data", "mode": "read-write"}]
    )
    assert wrote.result == 1 and (tmp_path / "data" / "out.txt").read_text() == "x"
    assert client.run_python("import os\nos.environ.get('GREETING')", env={"GREETING": "hi"}).result == "hi"
    assert client.run_python("import os\nos.environ.get('HOME')").result is None


def test_a_code_string_leaves_nothing_in_the_project_folder(tmp_path, client):
    result = client.run_python("21 * 2", project=tmp_path)
    assert result.result == 42 and result.run_id
    assert list(tmp_path.iterdir()) == [], "no journal: a code string has nothing to resume"


def test_a_session_keeps_its_state_and_a_stopped_call_leaves_no_trace(client):
    with client.session(ram="128MiB") as session:
        assert session.run("import math\nseen = []").success
        assert session.run("seen.append(math.pi); len(seen)").result == 1
        assert session.run("seen.append(2)\nwhile True: pass", timeout=0.3).error.type == "timeout"
        assert session.run("seen.append(3)\nwhile True: pass", compute="LOW").error.type == "fuel"
        assert session.run("hoard = bytearray(400 << 20)").error.type == "memory"
        assert session.run("len(seen)").result == 1
        raised = session.run("seen.append(4)\nraise KeyError('k')")
        assert raised.error.exc_type == "KeyError"
        assert session.run("len(seen)").result == 2, "a call that raises keeps what it did before"


def test_files_go_in_and_out_of_a_sessions_workspace(client):
    with client.session() as session:
        session.upload("in/data.csv", "a,b\n1,2\n")
        assert session.run("open('/in/data.csv').read().splitlines()").result == ["a,b", "1,2"]
        session.run("open('/report.txt', 'w').write('done')")
        assert session.download("report.txt") == b"done"
        with pytest.raises(capsule.UsageError, match="outside the session's workspace"):
            session.download("../../etc/passwd")
    assert not session.workspace.exists()


def test_saved_sessions_restore_and_forks_are_apart(client):
    session = client.session()
    session.run("model = {'weights': list(range(1000))}")
    saved = session.save()
    fork = session.fork()
    fork.run("model['weights'].clear()")
    assert session.run("len(model['weights'])").result == 1000
    assert fork.run("len(model['weights'])").result == 0
    session.close()
    fork.close()
    restored = client.session(restore=saved)
    assert restored.run("sum(model['weights'])").result == sum(range(1000))
    restored.close()
    with pytest.raises(capsule.UsageError, match="no saved session"):
        client.session(restore="0" * 64)
    with pytest.raises(capsule.UsageError, match="no session"):
        restored.run("1")


def test_async_code_strings_and_sessions(client):
    async def work():
        results = await asyncio.gather(*(client.run_python_async(f"{i} * 2") for i in range(50)))
        async with await client.session_async() as session:
            await session.run("n = 5")
            n = (await session.run("n + 1")).result
        return [r.result for r in results], n

    results, n = asyncio.run(work())
    assert results == [2 * i for i in range(50)] and n == 6


SAVE_AND_DIE = """
import os, capsule
session = capsule.Session()
session.run("import re, datetime\\nnotes = ['kept across processes']")
print(session.save(), flush=True)
os._exit(9)  # no clean-up: the process and its engine are gone
"""


def test_a_saved_session_outlives_its_process():
    done = subprocess.run([sys.executable, "-c", SAVE_AND_DIE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 9, done.stderr
    saved = done.stdout.strip()
    with capsule.Session.restore(saved) as session:
        assert session.run("notes + [datetime.date(2026, 1, 2).isoformat()]").result == [
            "kept across processes", "2026-01-02"
        ]
