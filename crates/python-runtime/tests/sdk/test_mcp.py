"""`capsule mcp` as an agent meets it: the official MCP client (`mcp` from PyPI) starts the
server from the installed wheel over stdio, lists its tools and calls them."""

import asyncio
import os
import shutil

import mcp  # the wheel test installs the official client
import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

TOOLS = '''
from typing import Literal, Optional

from capsule import task


@task(max_retries=0)
def word_count(text: str, unique: bool = False) -> int:
    """Counts the words of `text` (the distinct ones with `unique`)."""
    words = text.split()
    return len(set(words)) if unique else len(words)


@task(compute="LOW", max_retries=0)
def spin(mode: Literal["fast", "slow"] = "fast", rounds: Optional[list[int]] = None):
    while True:
        pass
'''


def serve(*arguments, cwd):
    """A client session with `capsule mcp ARGUMENTS`, for `body(session)`."""
    command = shutil.which("capsule")
    # No daemon answers on this socket: the server starts its own.
    env = {**os.environ, "CAPSULE_SOCKET": str(cwd / "no-daemon.sock")}
    params = StdioServerParameters(command=command, args=["mcp", *arguments], env=env, cwd=str(cwd))

    def run(body):
        async def session():
            async with stdio_client(params) as (read, write), ClientSession(read, write) as client:
                await client.initialize()
                return await body(client)

        return asyncio.run(session())

    return run


def test_tools_are_listed_with_the_schemas_of_the_tasks_signatures(tmp_path):
    (tmp_path / "tools.py").write_text(TOOLS)

    async def tools(client):
        return {tool.name: tool for tool in (await client.list_tools()).tools}

    listed = serve("tools.py", cwd=tmp_path)(tools)
    assert set(listed) == {"run_python", "session_create", "session_run", "session_close", "word_count", "spin"}
    count = listed["word_count"]
    assert count.description.startswith("Counts the words of `text`")
    assert count.input_schema == {
        "type": "object",
        "properties": {"text": {"type": "string"}, "unique": {"type": "boolean", "default": False}},
        "required": ["text"],
        "additionalProperties": False,
    }
    assert listed["spin"].input_schema["properties"] == {
        "mode": {"enum": ["fast", "slow"], "default": "fast"},
        "rounds": {"anyOf": [{"type": "array", "items": {"type": "integer"}}, {"type": "null"}]},
    }
    assert listed["run_python"].input_schema["required"] == ["code"]


def test_calls_carry_the_envelope_and_bad_calls_are_tool_errors(tmp_path):
    (tmp_path / "tools.py").write_text(TOOLS)

    async def calls(client):
        ran = await client.call_tool("run_python", {"code": "print('hi')\n6 * 7"})
        assert not ran.is_error and ran.structured_content["result"] == 42
        assert ran.structured_content["output"]["stdout"]["text"] == "hi\n"
        assert ran.content[0].text == "42\n\n[stdout]\nhi"
        failed = await client.call_tool("run_python", {"code": "1 / 0"})
        assert failed.is_error and "ZeroDivisionError" in failed.content[0].text
        counted = await client.call_tool("word_count", {"text": "a b a", "unique": True})
        assert (counted.is_error, counted.structured_content["result"]) == (False, 2)
        wrong = await client.call_tool("word_count", {"text": 3})
        assert wrong.is_error and wrong.content[0].text == "`text` must be a string, not the number 3"
        missing = await client.call_tool("word_count", {})
        assert missing.is_error and missing.content[0].text == "missing argument `text`"
        spun = await client.call_tool("spin", {"mode": "slow"})
        assert spun.is_error and spun.structured_content["error"]["type"] == "fuel"
        with pytest.raises(mcp.MCPError, match="no tool `nope`"):
            await client.call_tool("nope", {})
        # The server is still there.
        return await client.call_tool("run_python", {"code": "'still here'"})

    assert serve("tools.py", cwd=tmp_path)(calls).content[0].text == "still here"


def test_sessions_keep_state_and_limits_apply_to_every_call(tmp_path):
    async def session(client):
        opened = await client.call_tool("session_create", {})
        session_id = opened.structured_content["session_id"]
        run = lambda code: client.call_tool("session_run", {"session_id": session_id, "code": code})  # noqa: E731
        await run("import json\nstate = {'n': 1}")
        assert (await run("state['n'] += 1; state")).structured_content["result"] == {"n": 2}
        stopped = await run("state['n'] = 100\nwhile True: pass")
        assert stopped.is_error and stopped.structured_content["error"]["type"] == "timeout"
        after = (await run("json.dumps(state)")).structured_content["result"]
        other = await client.call_tool("session_run", {"session_id": "not-mine", "code": "1"})
        closed = await client.call_tool("session_close", {"session_id": session_id})
        gone = await run("state")
        return after, other, closed, gone

    after, other, closed, gone = serve("--timeout", "1s", cwd=tmp_path)(session)
    assert after == '{"n": 2}', "a call stopped by its deadline leaves the state before it"
    assert other.is_error and "no open session `not-mine`" in other.content[0].text
    assert not closed.is_error and gone.is_error
