"""`trio-relay serve` settings: defaults < config file < environment < flags, one error each."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest

from trio_relay import RelayConfig
from trio_relay._settings.cli import _parser, flag_values, main
from trio_relay._settings.load import load_settings, unknown_variables
from trio_relay._settings.settings import ServeSettings, Setting, SettingsError, all_settings

DOCS = Path(__file__).parent.parent / "docs" / "operations.md"


def _load(
    tmp_path: Path,
    toml: str | None = None,
    env: Mapping[str, str] | None = None,
    argv: Sequence[str] = (),
) -> ServeSettings:
    """Settings as `trio-relay serve` would load them, from a file, variables and flags."""
    args = _parser().parse_args(["serve", *argv])
    config = None
    if toml is not None:
        config = tmp_path / "trio-relay.toml"
        config.write_text(toml)
    return load_settings(config_file=config, environ=env or {}, flags=flag_values(args))


def _error(
    tmp_path: Path,
    toml: str | None = None,
    env: Mapping[str, str] | None = None,
    argv: Sequence[str] = (),
) -> str:
    with pytest.raises(SettingsError) as raised:
        _load(tmp_path, toml, env, argv)
    assert len(raised.value.problems) == 1, raised.value.problems
    return str(raised.value)


def _value(settings: ServeSettings, setting: Setting) -> Any:
    value: Any = settings
    for part in setting.path:
        value = getattr(value, part)
    return value


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))
    if isinstance(value, tuple):
        return json.dumps(list(value))
    return repr(value)


def _setting(name: str) -> Setting:
    return next(s for s in all_settings() if s.name == name)


# --- precedence --------------------------------------------------------------------------------

# (name, file value, variable text, flag text, and what each layer should give)
PRECEDENCE = [
    ("port", 1111, "2222", "3333", (1111, 2222, 3333)),  # int, top level
    ("max_message_size", 1000, "2000", "3000", (1000, 2000, 3000)),  # int, [relay]
    ("ping_interval", 1.5, "2.5", "3.5", (1.5, 2.5, 3.5)),  # float
    ("host", "::1", "0.0.0.0", "localhost", ("::1", "0.0.0.0", "localhost")),  # str
    ("log_level", "DEBUG", "WARNING", "ERROR", ("DEBUG", "WARNING", "ERROR")),  # str
    ("allowed_origins", ("https://a.example",), "https://b.example,https://c.example",
     "https://d.example", (("https://a.example",), ("https://b.example", "https://c.example"),
                           ("https://d.example",))),  # tuple
    ("data_dir", "/srv/file", "/srv/env", "/srv/flag",
     (Path("/srv/file"), Path("/srv/env"), Path("/srv/flag"))),  # path
]


@pytest.mark.parametrize(("name", "in_file", "in_env", "in_flag", "expected"), PRECEDENCE,
                         ids=[row[0] for row in PRECEDENCE])
def test_file_then_environment_then_flag(
    tmp_path: Path, name: str, in_file: Any, in_env: str, in_flag: str, expected: tuple[Any, ...]
) -> None:
    setting = _setting(name)
    table = f"[{'.'.join(setting.path[:-1])}]\n" if len(setting.path) > 1 else ""
    toml = f"{table}{name} = {_toml(in_file)}\n"
    env = {setting.env: in_env}
    argv = [setting.flag, in_flag]
    assert _value(_load(tmp_path), setting) == setting.default
    assert _value(_load(tmp_path, toml), setting) == expected[0]
    assert _value(_load(tmp_path, toml, env), setting) == expected[1]
    assert _value(_load(tmp_path, toml, env, argv), setting) == expected[2]
    # Each layer alone, too: a flag beats a default without a file or a variable.
    assert _value(_load(tmp_path, argv=argv), setting) == expected[2]
    assert _value(_load(tmp_path, env=env), setting) == expected[1]


def test_layers_combine_key_by_key(tmp_path: Path) -> None:
    settings = _load(
        tmp_path,
        "port = 1\nhost = 'file'\n[relay]\nrequest_rate = 1.0\nrequest_burst = 1\n",
        {"TRIO_RELAY_HOST": "env", "TRIO_RELAY_REQUEST_BURST": "2"},
        ["--request-rate", "3"],
    )
    assert (settings.port, settings.host) == (1, "env")
    assert (settings.relay.request_rate, settings.relay.request_burst) == (3.0, 2)
    assert settings.relay.max_subscriptions == RelayConfig().max_subscriptions


def test_defaults_without_any_source() -> None:
    settings = load_settings()
    assert settings == ServeSettings()
    assert settings.relay == RelayConfig()
    assert (settings.host, settings.port, settings.pin, settings.log_level) == (
        "127.0.0.1", 8765, None, "INFO")
    assert settings.data_dir is settings.tls_cert is settings.tls_key is None


def test_an_empty_variable_or_flag_counts_as_unset(tmp_path: Path) -> None:
    settings = _load(tmp_path, "pin = 'from-file'\nport = 9\n",
                     {"TRIO_RELAY_PIN": "", "TRIO_RELAY_PORT": ""}, ["--pin", ""])
    assert settings.pin == "from-file"
    assert settings.port == 9
    assert _load(tmp_path, env={"TRIO_RELAY_PIN": ""}).pin is None


def test_allowed_origins_flag_repeats_and_splits_on_commas(tmp_path: Path) -> None:
    argv = ["--allowed-origins", "https://a.example, https://b.example",
            "--allowed-origins", "https://c.example"]
    assert _load(tmp_path, argv=argv).relay.allowed_origins == (
        "https://a.example", "https://b.example", "https://c.example")


def test_relative_paths_in_the_file_are_relative_to_the_file(tmp_path: Path) -> None:
    settings = _load(tmp_path, "data_dir = 'data'\ntls_cert = 'c.pem'\ntls_key = '/abs/k.pem'\n")
    assert settings.data_dir == tmp_path / "data"
    assert settings.tls_cert == tmp_path / "c.pem"
    assert settings.tls_key == Path("/abs/k.pem")
    # On the command line and in the environment they are relative to where you are.
    assert _load(tmp_path, argv=["--data-dir", "data"]).data_dir == Path("data")


def test_the_pin_is_never_shown(tmp_path: Path) -> None:
    settings = _load(tmp_path, env={"TRIO_RELAY_PIN": "s3cret-pin"})
    assert settings.pin == "s3cret-pin"
    assert "s3cret-pin" not in repr(settings)
    message = _error(tmp_path, "pin = 987654\n")
    assert message == f"{tmp_path / 'trio-relay.toml'}: pin: expected a string, got an integer"
    assert "987654" not in message
    assert _error(tmp_path, "pin = ''\n").endswith("pin: must not be empty")


# --- every field is a key, a variable and a flag ----------------------------------------------


def _other_value(setting: Setting) -> tuple[Any, str]:
    """A valid value that is not the default, and its text form."""
    if setting.name == "log_level":
        return "DEBUG", "DEBUG"
    if setting.is_list:
        return ("https://x.example", "https://y.example"), "https://x.example,https://y.example"
    if setting.type is int:
        value = (setting.default or 0) + 7
        return value, str(value)
    if setting.type is float:
        return setting.default * 3, repr(setting.default * 3)
    if setting.type is Path:
        return Path("/some/where.pem"), "/some/where.pem"
    if setting.type is bool:
        return not setting.default, str(not setting.default).lower()
    assert setting.type is str, setting
    return "something-else", "something-else"


def _fields(cls: type, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths: list[tuple[str, ...]] = []
    for field in attrs.fields(cls):
        if isinstance(field.type, type) and attrs.has(field.type):
            paths += _fields(field.type, (*prefix, field.name))
        else:
            paths.append((*prefix, field.name))
    return paths


def test_every_field_is_a_setting() -> None:
    paths = [setting.path for setting in all_settings()]
    # model_profiles, an array of tables, has no text form: a config-file key only.
    assert paths == [path for path in _fields(ServeSettings) if path != ("model_profiles",)]
    assert {("relay", field.name) for field in attrs.fields(RelayConfig)} <= set(paths)
    assert [s.name for s in all_settings()][:10] == [
        "host", "port", "pin", "data_dir", "database", "database_lease", "database_pool_size",
        "log_level", "tls_cert", "tls_key"]
    for setting in all_settings():
        assert setting.env == "TRIO_RELAY_" + setting.name.upper()
        assert setting.flag == "--" + setting.name.replace("_", "-")
        assert setting.doc, f"{setting.key} has no #: comment"


@pytest.mark.parametrize("setting", all_settings(), ids=lambda s: s.key)
def test_every_setting_has_a_key_a_variable_and_a_flag(tmp_path: Path, setting: Setting) -> None:
    value, text = _other_value(setting)
    assert value != setting.default
    extra: dict[str, str] = {}
    if setting.name in ("tls_cert", "tls_key"):  # these two come as a pair
        partner = "tls_key" if setting.name == "tls_cert" else "tls_cert"
        extra = {f"TRIO_RELAY_{partner.upper()}": "/partner.pem"}
    table = f"[{'.'.join(setting.path[:-1])}]\n" if len(setting.path) > 1 else ""
    from_file = _load(tmp_path, f"{table}{setting.path[-1]} = {_toml(value)}\n", extra)
    from_env = _load(tmp_path, env={setting.env: text, **extra})
    from_flag = _load(tmp_path, env=extra, argv=[setting.flag, text])
    assert _value(from_file, setting) == _value(from_env, setting) == _value(from_flag, setting)
    assert _value(from_flag, setting) == value


def test_help_lists_every_flag_with_its_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for setting in all_settings():
        assert setting.flag in text
        assert "$" + setting.env in text
    assert "--config FILE" in text


# --- errors: one SettingsError naming the file (or variable, or flag) and the key -------------


@pytest.mark.parametrize(("toml", "message"), [
    ("[relay]\nmax_message_size = -1\n", "relay.max_message_size: must be positive, got -1"),
    ("[relay]\nping_timeout = 0.0\n", "relay.ping_timeout: must be positive, got 0.0"),
    ("port = 70000\n", "port: must be between 0 and 65535, got 70000"),
    ("log_level = 'LOUD'\n",
     "log_level: must be one of TRACE, DEBUG, INFO, WARNING, ERROR, got 'LOUD'"),
    ("[relay]\nmax_message_size = '64k'\n",
     "relay.max_message_size: expected an integer, got a string"),
    ("[relay]\nmax_message_size = 1.5\n",
     "relay.max_message_size: expected an integer, got a float"),
    ("[relay]\nmax_message_size = true\n",
     "relay.max_message_size: expected an integer, got a boolean"),
    ("[relay]\nbackend_timeout = 'ten'\n",
     "relay.backend_timeout: expected a number, got a string"),
    ("[relay]\nbackend_timeout = inf\n",
     "relay.backend_timeout: expected a finite number, got inf"),
    ("host = 127\n", "host: expected a string, got an integer"),
    ("data_dir = 1\n", "data_dir: expected a path (a string), got an integer"),
    ("[relay]\nallowed_origins = 'https://a.example'\n",
     "relay.allowed_origins: expected an array of strings, got a string"),
    ("[relay]\nallowed_origins = ['https://a.example', 1]\n",
     "relay.allowed_origins: item 1: expected a string, got an integer"),
    ("relay = 5\n", "relay: expected a table, got an integer"),
    ("max_message_size = 1\n",
     "max_message_size: unknown key (did you mean relay.max_message_size?)"),
    ("[relay]\nmax_mesage_size = 1\n",
     "relay.max_mesage_size: unknown key (did you mean max_message_size?)"),
    ("[server]\nport = 1\n", "server: unknown key"),
], ids=lambda v: v.split("\n")[0] if "\n" in v else None)
def test_a_bad_config_file_names_the_file_and_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toml: str, message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "trio-relay.toml").write_text(toml)
    with pytest.raises(SettingsError) as raised:
        load_settings(config_file="trio-relay.toml")
    assert str(raised.value) == f"trio-relay.toml: {message}"
    assert raised.value.problems == (str(raised.value),)


def test_every_problem_in_a_file_is_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as raised:
        _load(tmp_path, "port = 'x'\nbogus = 1\n[relay]\nmax_strikes = 0\n")
    assert sorted(p.split(": ")[1] for p in raised.value.problems) == [
        "bogus", "port", "relay.max_strikes"]


def test_a_relay_key_that_is_not_a_table_hides_no_other_problem(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as raised:
        _load(tmp_path, "relay = 5\n", {"TRIO_RELAY_MAX_STRIKES": "0"})
    assert sorted(raised.value.problems) == sorted([
        "TRIO_RELAY_MAX_STRIKES: must be positive, got 0",
        f"{tmp_path / 'trio-relay.toml'}: relay: expected a table, got an integer",
    ])


@pytest.mark.parametrize(("toml", "line"), [("port = \n", 1), ("[relay]\n[relay]\n", 2)])
def test_invalid_toml_names_the_file_and_the_line(tmp_path: Path, toml: str, line: int) -> None:
    # The parser's own words vary between tomli and tomllib versions; the place does not.
    message = _error(tmp_path, toml)
    assert message.startswith(f"{tmp_path / 'trio-relay.toml'}: invalid TOML: ")
    assert f"line {line}" in message


def test_not_utf8_and_unreadable_files(tmp_path: Path) -> None:
    config = tmp_path / "latin1.toml"
    config.write_bytes(b"host = '\xe9'\n")
    with pytest.raises(SettingsError, match=r"latin1\.toml: invalid TOML: not UTF-8$"):
        load_settings(config_file=config)
    with pytest.raises(SettingsError, match=r"missing\.toml: cannot read: No such file"):
        load_settings(config_file=tmp_path / "missing.toml")


@pytest.mark.parametrize(("env", "message"), [
    ({"TRIO_RELAY_PORT": "http"}, "TRIO_RELAY_PORT: expected an integer, got 'http'"),
    ({"TRIO_RELAY_PORT": "-5"}, "TRIO_RELAY_PORT: must be between 0 and 65535, got -5"),
    ({"TRIO_RELAY_MAX_MESSAGE_SIZE": "1.5"},
     "TRIO_RELAY_MAX_MESSAGE_SIZE: expected an integer, got '1.5'"),
    ({"TRIO_RELAY_MAX_MESSAGE_SIZE": "-1"},
     "TRIO_RELAY_MAX_MESSAGE_SIZE: must be positive, got -1"),
    ({"TRIO_RELAY_PING_INTERVAL": "soon"},
     "TRIO_RELAY_PING_INTERVAL: expected a number, got 'soon'"),
    ({"TRIO_RELAY_PING_INTERVAL": "nan"},
     "TRIO_RELAY_PING_INTERVAL: expected a finite number, got nan"),
    ({"TRIO_RELAY_LOG_LEVEL": "debug"},
     "TRIO_RELAY_LOG_LEVEL: must be one of TRACE, DEBUG, INFO, WARNING, ERROR, got 'debug'"),
])
def test_a_bad_variable_is_named(tmp_path: Path, env: dict[str, str], message: str) -> None:
    assert _error(tmp_path, env=env) == message


def test_a_bad_flag_is_named(tmp_path: Path) -> None:
    assert _error(tmp_path, argv=["--max-strikes", "many"]) == (
        "--max-strikes: expected an integer, got 'many'")
    assert _error(tmp_path, argv=["--request-rate", "0"]) == (
        "--request-rate: must be positive, got 0.0")


def test_a_valid_flag_does_not_excuse_a_bad_file(tmp_path: Path) -> None:
    # The file is checked as a whole even where a flag overrides a key: it is still wrong.
    message = _error(tmp_path, "bogus = 1\n", argv=["--port", "1"])
    assert message.endswith("trio-relay.toml: bogus: unknown key")


@pytest.mark.parametrize(("toml", "env", "argv", "message"), [
    ("tls_cert = '/c.pem'\n", {}, [], "trio-relay.toml: tls_cert: needs tls_key as well"),
    (None, {"TRIO_RELAY_TLS_KEY": "/k.pem"}, [], "TRIO_RELAY_TLS_KEY: needs tls_cert as well"),
    (None, {}, ["--tls-cert", "/c.pem"], "--tls-cert: needs tls_key as well"),
])
def test_tls_cert_and_key_come_together(
    tmp_path: Path, toml: str | None, env: dict[str, str], argv: list[str], message: str
) -> None:
    assert _error(tmp_path, toml, env, argv).endswith(message + "; give both or neither")


def test_tls_cert_and_key_may_come_from_different_places(tmp_path: Path) -> None:
    settings = _load(tmp_path, "tls_cert = '/c.pem'\n", {"TRIO_RELAY_TLS_KEY": "/k.pem"})
    assert (settings.tls_cert, settings.tls_key) == (Path("/c.pem"), Path("/k.pem"))
    with pytest.raises(ValueError, match="together"):
        ServeSettings(tls_cert=Path("/c.pem"))


def test_the_command_reports_a_settings_error_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "relay.toml"
    config.write_text("[relay]\nmax_message_size = -1\n")
    assert main(["serve", "--config", str(config)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"trio-relay: {config}: relay.max_message_size: must be positive, got -1\n")
    assert main(["serve", "--port", "http", "--pin", "1234"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "trio-relay: --port: expected an integer, got 'http'\n"


# --- the docs ---------------------------------------------------------------------------------


def test_the_operations_doc_lists_every_setting() -> None:
    """docs/operations.md has a row per setting with its flag, variable and default;
    ``python -m trio_relay._settings`` prints the tables to paste."""
    rows: dict[str, list[str]] = {}
    for line in DOCS.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 5 and re.fullmatch(r"`\w+`", cells[0]) and cells[1].startswith("`--"):
            rows[cells[0].strip("`")] = cells
    assert sorted(rows) == sorted(setting.path[-1] for setting in all_settings())
    for setting in all_settings():
        _, flag, env, default, meaning = rows[setting.path[-1]]
        assert flag == f"`{setting.flag}`"
        assert env == f"`{setting.env}`"
        assert default.replace("`", "").startswith(setting.default_text.replace("`", "")), (
            setting.key)
        assert meaning


def test_unknown_trio_relay_variables_are_named_never_their_values() -> None:
    environ = {"TRIO_RELAY_PIN": "1", "TRIO_RELAY_MAX_MESAGE_SIZE": "9", "HOME": "/x",
               "TRIO_RELAY_PORTT": "secret"}
    assert unknown_variables(environ) == ["TRIO_RELAY_MAX_MESAGE_SIZE", "TRIO_RELAY_PORTT"]
