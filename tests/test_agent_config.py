"""Model profiles in the config file (``[[model_profiles]]``), and ``trio-relay config check``."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import attrs
import pytest

from trio_relay._agents.command import CommandAgent
from trio_relay._agents.echo import EchoAgent
from trio_relay._agents.silent import SilentAgent
from trio_relay._settings.cli import main
from trio_relay._settings.load import load_settings
from trio_relay._settings.settings import (
    CommandProfile,
    EchoProfile,
    ServeSettings,
    SettingsError,
    SilentProfile,
    all_settings,
    check_programs,
)

DOCS = Path(__file__).parent.parent / "docs"

EXAMPLE = """
port = 9000

[[model_profiles]]
id = "echo"
name = "Echo"
agent = "echo"

[[model_profiles]]
id = "slow-echo"
agent = "echo"
chunk_delay = 0.5

[[model_profiles]]
id = "local"
name = "Local model"
agent = "command"
argv = ["bin/agent", "--quiet"]
cwd = "work"
env = { MODEL = "small", EMPTY = "" }
inherit_env = false
prompt = "argument"
history = true
timeout = 120
max_output = 5000
stop_grace = 0.5

[[model_profiles]]
id = "ollama"
agent = "command"
argv = ["ollama", "run", "llama3.2"]

[[model_profiles]]
id = "notes"
agent = "silent"
"""


def load(tmp_path: Path, toml: str) -> ServeSettings:
    config = tmp_path / "relay.toml"
    config.write_text(toml)
    return load_settings(config_file=config)


def problems(tmp_path: Path, toml: str) -> list[str]:
    config = tmp_path / "relay.toml"
    config.write_text(toml)
    with pytest.raises(SettingsError) as raised:
        load_settings(config_file=config)
    prefix = f"{config}: "
    assert all(problem.startswith(prefix) for problem in raised.value.problems)
    return [problem.removeprefix(prefix) for problem in raised.value.problems]


def test_model_profiles_from_the_config_file(tmp_path: Path) -> None:
    settings = load(tmp_path, EXAMPLE)
    assert settings.port == 9000
    assert settings.model_profiles is not None
    echo, slow, local, ollama, notes = settings.model_profiles
    assert echo == EchoProfile(id="echo", name="Echo")
    assert slow == EchoProfile(id="slow-echo", chunk_delay=0.5)
    # Relative paths are relative to the file: the working directory, and a program given as
    # a path; a bare program name is left to PATH.
    assert local == CommandProfile(
        id="local", name="Local model", argv=(str(tmp_path / "bin/agent"), "--quiet"),
        cwd=tmp_path / "work", env={"MODEL": "small", "EMPTY": ""}, inherit_env=False,
        prompt="argument", history=True, timeout=120.0, max_output=5000, stop_grace=0.5,
    )
    assert ollama == CommandProfile(id="ollama", argv=("ollama", "run", "llama3.2"))
    assert notes == SilentProfile(id="notes")
    # What clients see: never the command or its environment.
    assert [p.wire() for p in settings.model_profiles] == [
        {"id": "echo", "name": "Echo", "agent": "echo"},
        {"id": "slow-echo", "name": "slow-echo", "agent": "echo"},
        {"id": "local", "name": "Local model", "agent": "command"},
        {"id": "ollama", "name": "ollama", "agent": "command"},
        {"id": "notes", "name": "notes", "agent": "silent"},
    ]
    agents = settings.agents()
    assert agents["slow-echo"] == EchoAgent(chunk_delay=0.5)
    assert agents["local"] == CommandAgent(
        argv=local.argv, cwd=local.cwd, env=local.env, inherit_env=False, prompt="argument",
        history=True, timeout=120.0, max_output=5000, stop_grace=0.5, label="local",
    )
    assert isinstance(agents["local"], CommandAgent)
    assert agents["local"].env == {"MODEL": "small", "EMPTY": ""}
    assert agents["notes"] == SilentAgent()


def test_a_command_profiles_defaults_are_the_agents(tmp_path: Path) -> None:
    (profile,) = load(tmp_path, "[[model_profiles]]\nid = 'x'\nagent = 'command'\n"
                                "argv = ['x']\n").model_profiles or ()
    assert isinstance(profile, CommandProfile)
    default = CommandAgent(argv=("x",), label="x")
    assert profile.make_agent() == default
    assert (profile.prompt, profile.history, profile.inherit_env, profile.cwd, profile.env) == (
        "stdin", False, True, None, {})
    assert (profile.timeout, profile.max_output, profile.stop_grace) == (
        default.timeout, default.max_output, default.stop_grace)


def test_without_model_profiles_the_databases_are_kept(tmp_path: Path) -> None:
    assert load(tmp_path, "port = 1\n").model_profiles is None
    assert load(tmp_path, "port = 1\n").agents() == {}


def test_model_profiles_are_a_config_file_key_only() -> None:
    assert "model_profiles" not in {setting.name for setting in all_settings()}


@pytest.mark.parametrize(("toml", "message"), [
    ("model_profiles = 3\n",
     "model_profiles: expected an array of tables ([[model_profiles]]), got an integer"),
    ("[model_profiles]\nid = 'x'\n",
     "model_profiles: expected an array of tables ([[model_profiles]]), got a table"),
    ("model_profiles = []\n", "model_profiles: expected at least one profile"),
    ("model_profiles = ['echo']\n", "model_profiles[0]: expected a table, got a string"),
    ("[[model_profiles]]\nid = 'x'\n",
     'model_profiles[0].agent: must be "echo", "command" or "silent"; it is missing'),
    ("[[model_profiles]]\nid = 'x'\nagent = 'shell'\n",
     "model_profiles[0].agent: must be \"echo\", \"command\" or \"silent\"; got 'shell'"),
    ("[[model_profiles]]\nid = 'x'\nagent = 1\n",
     'model_profiles[0].agent: must be "echo", "command" or "silent"; got an integer'),
    ("[[model_profiles]]\nagent = 'echo'\n", "model_profiles[0].id: required, but missing"),
    ("[[model_profiles]]\nid = ''\nagent = 'echo'\n", "model_profiles[0].id: must not be empty"),
    ("[[model_profiles]]\nid = 'x'\nname = ''\nagent = 'echo'\n",
     "model_profiles[0].name: must not be empty"),
    ("[[model_profiles]]\nid = 'x'\nagent = 'echo'\nchunk_delay = -1\n",
     "model_profiles[0].chunk_delay: must not be negative, got -1.0"),
    ("[[model_profiles]]\nid = 'x'\nagent = 'echo'\nargv = ['x']\n",
     'model_profiles[0].argv: unknown key (only agent = "command" takes it)'),
    ("[[model_profiles]]\nid = 'x'\nagent = 'command'\n",
     "model_profiles[0].argv: required, but missing"),
    ("[[model_profiles]]\nid = 'x'\nagent = 'command'\nargv = []\n",
     "model_profiles[0].argv: must name a program: expected at least one item"),
    ("[[model_profiles]]\nid = 'x'\nagent = 'command'\nargv = ['']\n",
     "model_profiles[0].argv: item 0: the program must not be empty"),
    ("[[model_profiles]]\nid = 'x'\nagent = 'command'\nargv = 'claude -p'\n",
     "model_profiles[0].argv: expected an array of strings, got a string"),
    ("[[model_profiles]]\nid = 'x'\nagent = 'command'\nargv = ['x', 2]\n",
     "model_profiles[0].argv: item 1: expected a string, got an integer"),
    ("[[model_profiles]]\nid = 'x'\nagent = 'command'\nargv = ['x']\ncwd = 3\n",
     "model_profiles[0].cwd: expected a path (a string), got an integer"),
    ("[[model_profiles]]\nid = 'x'\nagent = 'command'\nargv = ['x']\nenv = ['A=1']\n",
     "model_profiles[0].env: expected a table of strings, got an array"),
    ("[[model_profiles]]\nid = 'x'\nagent = 'command'\nargv = ['x']\nenv = { A = 1 }\n",
     "model_profiles[0].env.A: expected a string, got an integer"),
    ("[[model_profiles]]\nid = 'x'\nagent = 'command'\nargv = ['x']\nenv = { 'A=B' = '' }\n",
     "model_profiles[0].env.A=B: not a variable name"),
    ("[[model_profiles]]\nid = 'x'\nagent = 'command'\nargv = ['x']\ninherit_env = 'no'\n",
     "model_profiles[0].inherit_env: expected true or false, got a string"),
    ("[[model_profiles]]\nid = 'x'\nagent = 'command'\nargv = ['x']\nprompt = 'args'\n",
     "model_profiles[0].prompt: must be \"stdin\" or \"argument\", got 'args'"),
    ("[[model_profiles]]\nid = 'x'\nagent = 'command'\nargv = ['x']\nhistory = 1\n",
     "model_profiles[0].history: expected true or false, got an integer"),
    ("[[model_profiles]]\nid = 'x'\nagent = 'command'\nargv = ['x']\ntimeout = 0\n",
     "model_profiles[0].timeout: must be positive, got 0.0"),
    ("[[model_profiles]]\nid = 'x'\nagent = 'command'\nargv = ['x']\ntimeout = inf\n",
     "model_profiles[0].timeout: expected a finite number, got inf"),
    ("[[model_profiles]]\nid = 'x'\nagent = 'command'\nargv = ['x']\nmax_output = 1.5\n",
     "model_profiles[0].max_output: expected an integer, got a float"),
    ("[[model_profiles]]\nid = 'x'\nagent = 'command'\nargv = ['x']\nstop_grace = -1\n",
     "model_profiles[0].stop_grace: must be positive, got -1.0"),
    ("[[model_profiles]]\nid = 'x'\nagent = 'command'\nargv = ['x']\ntimout = 5\n",
     "model_profiles[0].timout: unknown key (did you mean timeout?)"),
    ("[[model_profiles]]\nid = 'x'\nagent = 'command'\nargv = ['x']\nchunk_delay = 5\n",
     'model_profiles[0].chunk_delay: unknown key (only agent = "echo" takes it)'),
    ("[[model_profiles]]\nid = 'x'\nagent = 'echo'\n[[model_profiles]]\nid = 'x'\n"
     "agent = 'command'\nargv = ['x']\n",
     "model_profiles[1].id: 'x' is already the id of model_profiles[0]"),
    ("[[model_profile]]\nid = 'x'\n",
     "model_profile: unknown key (did you mean model_profiles?)"),
], ids=lambda v: v.split(":")[0] if v.startswith("model_profile") else None)
def test_a_bad_profile_names_the_file_and_the_key(
    tmp_path: Path, toml: str, message: str
) -> None:
    assert problems(tmp_path, toml) == [message]


def test_every_problem_in_the_profiles_is_reported_at_once(tmp_path: Path) -> None:
    found = problems(tmp_path, """
port = "x"
[[model_profiles]]
id = "a"
agent = "echo"
[[model_profiles]]
id = "b"
agent = "command"
argv = []
timeout = -1
[[model_profiles]]
agent = "robot"
[[model_profiles]]
id = "a"
agent = "echo"
""")
    assert sorted(found) == sorted([
        "port: expected an integer, got a string",
        "model_profiles[1].argv: must name a program: expected at least one item",
        "model_profiles[1].timeout: must be positive, got -1.0",
        "model_profiles[2].agent: must be \"echo\", \"command\" or \"silent\"; got 'robot'",
        "model_profiles[3].id: 'a' is already the id of model_profiles[0]",
    ])


def test_programs_that_cannot_be_found_are_reported_not_refused(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "not-executable").write_text("#!/bin/sh\n")
    settings = load(tmp_path, f"""
[[model_profiles]]
id = "fine"
agent = "command"
argv = ["{sys.executable}"]
[[model_profiles]]
id = "echo"
agent = "echo"
[[model_profiles]]
id = "ghost"
agent = "command"
argv = ["no-such-agent-program-xyz"]
[[model_profiles]]
id = "plain-file"
agent = "command"
argv = ["bin/not-executable"]
cwd = "nowhere"
[[model_profiles]]
id = "no-path"
agent = "command"
argv = ["sh"]
inherit_env = false
env = {{ PATH = "{tmp_path / 'bin'}" }}
""")
    assert check_programs(settings) == [
        ("model_profiles[2].argv", "program 'no-such-agent-program-xyz' not found on PATH"),
        ("model_profiles[3].cwd", f"no directory {str(tmp_path / 'nowhere')!r}"),
        ("model_profiles[3].argv",
         f"program {str(tmp_path / 'bin/not-executable')!r} not found or not executable"),
        ("model_profiles[4].argv", "program 'sh' not found on PATH"),
    ]


# --- trio-relay config check ------------------------------------------------------------------


def test_config_check_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                         monkeypatch: pytest.MonkeyPatch) -> None:
    for name in os.environ:
        if name.startswith("TRIO_RELAY_"):
            monkeypatch.delenv(name)
    config = tmp_path / "relay.toml"
    config.write_text(f"""
data_dir = "data"
[[model_profiles]]
id = "echo"
agent = "echo"
[[model_profiles]]
id = "py"
agent = "command"
argv = ["{sys.executable}", "-c", "print(1)"]
""")
    assert main(["config", "check", str(config)]) == 0
    out, err = capsys.readouterr()
    assert out == (f"ok: 2 model profiles: echo (echo), py (command); serving"
                   f" ws://127.0.0.1:8765/ws; data in {tmp_path / 'data'}\n")
    assert err == ""
    # The environment counts, as it does for serve.
    monkeypatch.setenv("TRIO_RELAY_PORT", "9")
    config.write_text("host = '::1'\n")
    assert main(["config", "check", str(config)]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith("ok: no model profiles (the database's are kept); serving"
                          " ws://[::1]:9/ws; data in ")


def test_config_check_warns_about_missing_programs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "relay.toml"
    config.write_text("[[model_profiles]]\nid = 'ghost'\nagent = 'command'\n"
                      "argv = ['no-such-agent-program-xyz']\n")
    assert main(["config", "check", str(config)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("ok: 1 model profile: ghost (command); ")
    assert err == (f"warning: {config}: model_profiles[0].argv: program"
                   " 'no-such-agent-program-xyz' not found on PATH\n")


def test_config_check_prints_a_line_per_problem_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "relay.toml"
    config.write_text("port = -1\n[[model_profiles]]\nid = 'x'\nagent = 'command'\n"
                      "argv = []\n")
    assert main(["config", "check", str(config)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert sorted(err.splitlines()) == [
        f"{config}: model_profiles[0].argv: must name a program: expected at least one item",
        f"{config}: port: must be between 0 and 65535, got -1",
    ]
    assert main(["config", "check", str(tmp_path / "missing.toml")]) == 2
    assert re.fullmatch(r".*missing\.toml: cannot read: No such file or directory\n",
                        capsys.readouterr().err)


def test_config_check_loads_the_tls_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "relay.toml"
    config.write_text("tls_cert = 'cert.pem'\ntls_key = 'key.pem'\n")
    assert main(["config", "check", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{config}: tls_cert, tls_key: cannot load {tmp_path / 'cert.pem'}")


# --- the docs ---------------------------------------------------------------------------------


def _toml_blocks(path: Path) -> list[str]:
    return re.findall(r"```toml\n(.*?)```", path.read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("doc", ["agents.md", "operations.md"])
def test_the_docs_config_examples_are_valid(tmp_path: Path, doc: str) -> None:
    blocks = _toml_blocks(DOCS / doc)
    assert blocks
    for block in blocks:
        load(tmp_path, block)


def test_the_agents_doc_lists_every_profile_key() -> None:
    text = (DOCS / "agents.md").read_text()
    rows = set(re.findall(r"^\| `(\w+)` \|", text, flags=re.MULTILINE))
    for cls in (EchoProfile, CommandProfile):
        for field in attrs.fields(cls):
            assert field.name in rows, f"docs/agents.md has no row for {field.name}"
