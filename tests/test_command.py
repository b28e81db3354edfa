"""The command agent: a program per message, its stdout streamed, its process group cleaned up.

Real time and real processes (small Python scripts written for these tests); every wait is
bounded with `trio.fail_after`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from _processes import HANGING, WAIT, alive, wait_for_file, wait_gone

from trio_relay._agents.agent import Agent, AgentError
from trio_relay._agents.command import CommandAgent
from trio_relay._agents.echo import EchoAgent
from trio_relay._store.backend import Change
from trio_relay._store.sqlite import SqliteBackend, open_sqlite_backend

PY = sys.executable

# The scripts write each line in one write(): with PYTHONUNBUFFERED set, print() writes the
# text and its newline apart.

# Writes a line, then waits for the file named by $GATE before writing the next one: the
# second line can only come once the first has reached whoever creates the file.
GATED = """
import os, sys, time
sys.stdout.write("first\\n"); sys.stdout.flush()
deadline = time.monotonic() + 10
while not os.path.exists(os.environ["GATE"]) and time.monotonic() < deadline:
    time.sleep(0.01)
sys.stdout.write("second\\n"); sys.stdout.flush()
"""

# Leaves a child running, holding stdout open, and exits at once.
LEAVES_A_CHILD = """
import os, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
with open(os.environ["PIDS"], "w") as f:
    f.write(f"{os.getpid()} {child.pid}")
sys.stdout.write("done\\n")
"""

FAILING = ("import sys; sys.stdout.write('partial\\n'); sys.stdout.flush();"
           " sys.stderr.write('boom: it broke\\n'); sys.exit(3)")
SHOW_INPUT = "import json, sys; print(json.dumps([sys.stdin.read(), sys.argv[1:]]))"
CAT = "import sys; sys.stdout.write(sys.stdin.read())"


def command(script: str, **options: Any) -> CommandAgent:
    return CommandAgent(argv=(PY, "-c", script), **options)


def read_pids(path: Path) -> list[int]:
    return [int(pid) for pid in path.read_text().split()]


# --- the agent on its own ---------------------------------------------------------------------


async def test_stdout_is_streamed_as_it_arrives(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    pieces: list[str] = []

    def emit(piece: str) -> None:
        pieces.append(piece)
        gate.touch()  # the script prints its second line only after this

    agent = command(GATED, env={"GATE": str(gate)})
    assert isinstance(agent, Agent)
    with trio.fail_after(WAIT):
        text = await agent.reply("hi", emit)
    assert pieces[0] == "first\n"  # emitted while the command was still running
    assert text == "".join(pieces) == "first\nsecond\n"


@pytest.mark.parametrize(("prompt", "expected"), [
    ("stdin", ["the message", []]),
    ("argument", ["", ["the message"]]),
])
async def test_the_prompt_goes_on_stdin_or_as_the_last_argument(
    prompt: str, expected: list[Any]
) -> None:
    with trio.fail_after(WAIT):
        text = await command(SHOW_INPUT, prompt=prompt).reply("the message", lambda _: None)
    assert json.loads(text) == expected


@pytest.mark.parametrize("prompt", ["stdin", "argument"])
async def test_history_comes_first_on_stdin_as_json_lines(prompt: str) -> None:
    history = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "ün\ntwo"}]
    agent = command(SHOW_INPUT, prompt=prompt, history=True)
    with trio.fail_after(WAIT):
        stdin, args = json.loads(await agent.reply("three", lambda _: None, history=history))
    lines = [json.loads(line) for line in stdin.splitlines()]
    if prompt == "stdin":
        assert lines == [*history, {"role": "user", "content": "three"}]
        assert args == []
    else:
        assert lines == history
        assert args == ["three"]
    # Without history = true, history is not passed even when offered.
    plain = command(SHOW_INPUT, prompt=prompt)
    with trio.fail_after(WAIT):
        stdin, _ = json.loads(await plain.reply("three", lambda _: None, history=history))
    assert stdin == ("three" if prompt == "stdin" else "")


async def test_environment_and_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRIO_RELAY_PIN", "s3cret")
    monkeypatch.setenv("SOME_VARIABLE", "inherited")
    script = "import json, os; print(json.dumps([dict(os.environ), os.getcwd()]))"
    agent = command(script, env={"EXTRA": "1", "SOME_VARIABLE": "overridden"}, cwd=tmp_path)
    with trio.fail_after(WAIT):
        env, cwd = json.loads(await agent.reply("x", lambda _: None))
    assert (env["EXTRA"], env["SOME_VARIABLE"]) == ("1", "overridden")
    assert env["PATH"] == os.environ["PATH"]
    assert not any(name.startswith("TRIO_RELAY_") for name in env)  # the PIN stays here
    assert Path(cwd) == tmp_path
    alone = command(script, env={"ONLY": "this"}, inherit_env=False)
    with trio.fail_after(WAIT):
        env, _ = json.loads(await alone.reply("x", lambda _: None))
    assert env["ONLY"] == "this"
    assert "PATH" not in env and "SOME_VARIABLE" not in env


async def test_output_is_decoded_incrementally(tmp_path: Path) -> None:
    # "é" is split across two writes, the second only once the first was emitted; a byte
    # that is not UTF-8 becomes U+FFFD.
    gate = tmp_path / "gate"
    script = ("import os, sys, time; out = sys.stdout.buffer\n"
              "out.write(b'caf\\xc3'); out.flush()\n"
              "deadline = time.monotonic() + 10\n"
              "while not os.path.exists(os.environ['GATE']) and time.monotonic() < deadline:\n"
              "    time.sleep(0.01)\n"
              "out.write(b'\\xa9 \\xff!'); out.flush()")
    pieces: list[str] = []

    def emit(piece: str) -> None:
        pieces.append(piece)
        gate.touch()

    with trio.fail_after(WAIT):
        text = await command(script, env={"GATE": str(gate)}).reply("x", emit)
    assert text == "".join(pieces) == "café \ufffd!"
    assert len(pieces) == 2


# --- failures ---------------------------------------------------------------------------------


async def test_a_non_zero_exit_is_an_error_with_the_stderr_tail() -> None:
    pieces: list[str] = []
    with trio.fail_after(WAIT), pytest.raises(AgentError) as raised:
        await command(FAILING, label="flaky").reply("x", pieces.append)
    assert str(raised.value) == "agent exited with status 3"
    assert raised.value.detail == f"flaky: {PY!r} exited with status 3; stderr: boom: it broke"
    assert pieces == ["partial\n"]  # what it printed was streamed all the same


async def test_a_killed_command_is_an_error() -> None:
    script = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    with trio.fail_after(WAIT), pytest.raises(AgentError, match=r"^agent was killed by SIGKILL$"):
        await command(script).reply("x", lambda _: None)


async def test_a_missing_program_or_directory_is_an_error(tmp_path: Path) -> None:
    missing = CommandAgent(argv=("no-such-agent-program-xyz", "--flag"), label="ghost")
    with pytest.raises(AgentError) as raised:
        await missing.reply("x", lambda _: None)
    assert str(raised.value) == "agent could not start: program 'no-such-agent-program-xyz'" \
        " not found"
    assert raised.value.detail == "ghost: could not start: program 'no-such-agent-program-xyz'" \
        " not found"
    nowhere = command("print(1)", cwd=tmp_path / "nope")
    with pytest.raises(AgentError, match=r"^agent could not start: cannot use directory '.*nope'"):
        await nowhere.reply("x", lambda _: None)
    not_a_program = tmp_path / "data.txt"
    not_a_program.write_text("hello")
    with pytest.raises(AgentError, match=r"could not start '.*data\.txt': Permission denied"):
        await CommandAgent(argv=(str(not_a_program),)).reply("x", lambda _: None)


async def test_too_much_output_stops_the_run() -> None:
    script = "import sys\nwhile True: sys.stdout.write('x' * 1000)"
    with trio.fail_after(WAIT), pytest.raises(AgentError) as raised:
        await command(script, max_output=10_000).reply("x", lambda _: None)
    assert str(raised.value) == "agent printed more than 10000 bytes"


async def test_a_timeout_stops_the_whole_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    agent = command(HANGING, env={"PIDS": str(pids)}, timeout=0.5, label="slow")
    with trio.fail_after(WAIT), pytest.raises(AgentError) as raised:
        await agent.reply("x", lambda _: None)
    assert str(raised.value) == "agent timed out after 0.5 s"
    assert raised.value.detail.startswith(f"slow: {PY!r} timed out after 0.5 s; stopped")
    await wait_gone(read_pids(pids))


# --- stopping: cancel, and what a finished command leaves behind ------------------------------


@pytest.mark.parametrize("ignore_term", [False, True], ids=["sigterm", "sigkill"])
async def test_cancelling_a_run_kills_its_process_group(tmp_path: Path, ignore_term: bool) -> None:
    pids = tmp_path / "pids"
    env = {"PIDS": str(pids), **({"IGNORE_TERM": "1"} if ignore_term else {})}
    agent = command(HANGING, env=env, stop_grace=0.3)
    with trio.fail_after(WAIT):
        with trio.CancelScope() as scope:

            def emit(piece: str) -> None:
                assert piece == "started\n"
                scope.cancel()

            await agent.reply("x", emit)
    assert scope.cancelled_caught
    leader, child = read_pids(pids)
    assert not alive(leader)  # stopped and reaped before the cancellation went on
    await wait_gone([leader, child])


async def test_what_a_finished_command_leaves_running_is_killed(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    start = trio.current_time()
    with trio.fail_after(WAIT):
        text = await command(LEAVES_A_CHILD, env={"PIDS": str(pids)}).reply("x", lambda _: None)
    assert text == "done\n"
    # The child held stdout open for a minute; the reply did not wait for it.
    assert trio.current_time() - start < 5
    await wait_gone(read_pids(pids))


# --- behind the default backend ---------------------------------------------------------------


async def next_change(feed: AsyncIterator[Change]) -> Change:
    with trio.fail_after(WAIT):
        return await feed.__anext__()


async def changes_until(feed: AsyncIterator[Change], kind: str, count: int = 1) -> list[Change]:
    """Changes up to the ``count``-th of type ``kind``; a stored user message does not count."""
    changes = []
    while count:
        change = await next_change(feed)
        changes.append(change)
        data = change.data
        if data["type"] == kind and not (kind == "message"
                                         and data["message"]["role"] == "user"):
            count -= 1
    return changes


def kinds(changes: list[Change]) -> list[str]:
    return [change.data["type"] for change in changes]


async def use_profiles(backend: SqliteBackend, **agents: Agent) -> None:
    await backend.set_model_profiles(
        [{"id": name, "name": name.title(), "agent": "command"} for name in agents], agents
    )


async def chat_with(backend: SqliteBackend, profile: str) -> str:
    chat_id = (await backend.create_chat("demo", "t", profile))["id"]
    assert isinstance(chat_id, str)
    return chat_id


async def test_the_backend_streams_a_command_and_stores_its_reply(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    async with open_sqlite_backend(tmp_path / "data") as backend:
        await use_profiles(backend, gated=command(GATED, env={"GATE": str(gate)}))
        chat_id = await chat_with(backend, "gated")
        async with backend.watch_chat(chat_id) as feed:
            await backend.send_message(chat_id, "go")
            before = await changes_until(feed, "chunk")
            assert kinds(before) == ["message", "reply_started", "chunk"]
            assert before[-1].data["text"] == "first\n"
            gate.touch()  # only now can the command finish
            after = await changes_until(feed, "message")
        chunks = [c.data["text"] for c in [*before, *after] if c.data["type"] == "chunk"]
        stored = after[-1].data["message"]
        assert stored["role"] == "assistant"
        assert stored["content"] == "".join(chunks) == "first\nsecond\n"
        assert stored["id"] == before[1].data["messageId"]
        history = (await backend.get_history(chat_id)).items
        assert [m["content"] for m in history] == ["go", "first\nsecond\n"]


async def test_a_failing_command_is_an_error_event_and_one_log_line(
    tmp_path: Path, log_lines: list[str]
) -> None:
    async with open_sqlite_backend(tmp_path / "data") as backend:
        await use_profiles(backend, flaky=attrs.evolve(command(FAILING), label="flaky"),
                           ghost=CommandAgent(argv=("no-such-agent-program-xyz",), label="ghost"))
        for profile, error in [("flaky", "agent exited with status 3"),
                               ("ghost", "agent could not start: program"
                                         " 'no-such-agent-program-xyz' not found")]:
            chat_id = await chat_with(backend, profile)
            async with backend.watch_chat(chat_id) as feed:
                for _ in range(2):  # and the chat keeps working
                    await backend.send_message(chat_id, "top secret words")
                    changes = await changes_until(feed, "error")
                    message_id = changes[1].data["messageId"]
                    assert changes[-1].data == {
                        "type": "error", "messageId": message_id, "error": error}
            history = (await backend.get_history(chat_id)).items
            assert [m["role"] for m in history] == ["user", "user"]  # nothing half-stored
    errors = [line for line in log_lines if line.startswith("ERROR|")]
    assert errors[0] == (f"ERROR|agent failed: flaky: {PY!r} exited with status 3;"
                         " stderr: boom: it broke\n")
    assert errors[2] == ("ERROR|agent failed: ghost: could not start: program"
                         " 'no-such-agent-program-xyz' not found\n")
    assert len(errors) == 4
    assert not any("Traceback" in line or "secret" in line for line in log_lines)


async def test_cancel_reply_kills_the_command_and_pushes_cancelled(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    async with open_sqlite_backend(tmp_path / "data") as backend:
        await use_profiles(backend, hang=command(HANGING, env={"PIDS": str(pids)}))
        chat_id = await chat_with(backend, "hang")
        async with backend.watch_chat(chat_id) as feed:
            await backend.send_message(chat_id, "go")
            started = await changes_until(feed, "chunk")
            assert await backend.cancel_reply(chat_id) is True
            cancelled = await changes_until(feed, "cancelled")
            assert cancelled[-1].data == {
                "type": "cancelled", "messageId": started[1].data["messageId"]}
            await wait_gone(read_pids(pids))
            assert await backend.cancel_reply(chat_id) is False


async def test_closing_the_backend_kills_running_commands(tmp_path: Path) -> None:
    all_pids: list[int] = []
    async with open_sqlite_backend(tmp_path / "data") as backend:
        # One that stops at SIGTERM, one that ignores it.
        agents: dict[str, Agent] = {}
        for i in range(2):
            env = {"PIDS": str(tmp_path / f"pids{i}"), **({"IGNORE_TERM": "1"} if i else {})}
            agents[f"hang{i}"] = command(HANGING, env=env, stop_grace=0.3)
        await use_profiles(backend, **agents)
        for i in range(2):
            chat_id = await chat_with(backend, f"hang{i}")
            await backend.send_message(chat_id, "go")
        for i in range(2):
            await wait_for_file(tmp_path / f"pids{i}")
            all_pids += read_pids(tmp_path / f"pids{i}")
        assert all(alive(pid) for pid in all_pids)
    await wait_gone(all_pids)


async def test_sends_queue_one_run_per_chat(tmp_path: Path) -> None:
    # Each run appends "start" and "end" to a file: runs of one chat never overlap. Each
    # run takes 0.2 s (its sleep is the slow agent, not a wait): room for an overlap.
    runs = tmp_path / "runs"
    script = ("import os, sys, time\nprompt = sys.stdin.read()\n"
              "open(os.environ['RUNS'], 'a').write(f'start {prompt}\\n')\n"
              "print(prompt, flush=True); time.sleep(0.2)\n"
              "open(os.environ['RUNS'], 'a').write(f'end {prompt}\\n')")
    async with open_sqlite_backend(tmp_path / "data") as backend:
        await use_profiles(backend, slow=command(script, env={"RUNS": str(runs)}))
        chat_id = await chat_with(backend, "slow")
        async with backend.watch_chat(chat_id) as feed:
            await backend.send_message(chat_id, "a")
            await backend.send_message(chat_id, "b")
            changes = await changes_until(feed, "message", 2)
    assert runs.read_text().splitlines() == ["start a", "end a", "start b", "end b"]
    replies = [c.data["message"]["content"] for c in changes
               if c.data["type"] == "message" and c.data["message"]["role"] == "assistant"]
    assert replies == ["a\n", "b\n"]


async def test_history_holds_the_messages_before_the_one_answered(tmp_path: Path) -> None:
    async with open_sqlite_backend(tmp_path / "data") as backend:
        await use_profiles(backend, cat=command(CAT, history=True))
        chat_id = await chat_with(backend, "cat")
        async with backend.watch_chat(chat_id) as feed:
            await backend.send_message(chat_id, "one")
            # Queued while "one" is answered: not part of the history of "one".
            await backend.send_message(chat_id, "two")
            changes = await changes_until(feed, "message", 2)
    replies = [c.data["message"]["content"] for c in changes
               if c.data["type"] == "message" and c.data["message"]["role"] == "assistant"]
    first = [json.loads(line) for line in replies[0].splitlines()]
    assert first == [{"role": "user", "content": "one"}]
    second = [json.loads(line) for line in replies[1].splitlines()]
    assert second == [{"role": "user", "content": "one"},
                      {"role": "assistant", "content": replies[0]},
                      {"role": "user", "content": "two"}]


async def test_profiles_and_their_agents(tmp_path: Path) -> None:
    cat = command(CAT)
    async with open_sqlite_backend(tmp_path / "data") as backend:
        assert (await backend.create_chat("demo", None))["modelProfileId"] == "echo"
        await backend.set_model_profiles(
            [{"id": "cat", "name": "Cat", "agent": "command"},
             {"id": "echo", "name": "Echo", "agent": "echo"}],
            {"cat": cat},
        )
        assert backend.agent_for("cat") is cat
        assert isinstance(backend.agent_for("echo"), EchoAgent)
        # Without a profile named, a chat gets the first one.
        assert (await backend.create_chat("demo", None))["modelProfileId"] == "cat"
        with pytest.raises(ValueError, match="agents for unknown model profiles: nope"):
            await backend.set_model_profiles([{"id": "a", "name": "A", "agent": "echo"}],
                                             {"nope": cat})
        # Profiles replaced without agents keep the ones given before.
        await backend.set_model_profiles([{"id": "cat", "name": "Cat", "agent": "command"}])
        assert backend.agent_for("cat") is cat
