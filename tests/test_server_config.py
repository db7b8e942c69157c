"""Server configuration: TOML plus flags, and errors that say what to change."""

from __future__ import annotations

from pathlib import Path

import pytest

from zorba_server.cli import config_from_args, parse_args
from zorba_server.config import SECRET_ENV, ConfigError, load_config

TOML = """
enrolment_secret = "from-the-file-1234"
[server]
port = 9000
[storage]
path = "run.sqlite3"
synchronous = "normal"
[run]
seed = 7
lr = 1
min_reports = 2
model_fingerprint = "tiny"
[run.footprint]
block_params = [10, 10]
quantizable_block_params = [8, 8]
embed_head_params = 50
hidden_size = 8
vocab_size = 10
num_layers = 2
intermediate_size = 16
[aggregation]
method = "median"
clip = 5.0
"""


def test_a_toml_file_fills_every_section(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text(TOML)
    config = load_config(path, environ={})
    assert config.enrolment_secret == "from-the-file-1234"
    assert config.server.port == 9000 and config.storage.synchronous == "normal"
    assert config.run.seed == 7 and config.run.lr == 1.0 and config.run.min_reports == 2
    assert config.run.footprint is not None and config.run.footprint.block_params == (10, 10)
    assert config.aggregation.method == "median" and config.aggregation.clip == 5.0


def test_flags_override_the_file_and_the_secret_can_come_from_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "server.toml"
    path.write_text("[run]\nseed = 1\n")
    monkeypatch.setenv(SECRET_ENV, "from-the-environment")
    config = config_from_args(parse_args(["--config", str(path), "--seed", "9", "--port", "0",
                                          "--db", "x.sqlite3", "--min-reports", "3",
                                          "--estimator", "antithetic", "--directions", "2"]))
    assert config.run.seed == 9 and config.server.port == 0 and config.storage.path == "x.sqlite3"
    assert config.run.min_reports == 3 and config.enrolment_secret == "from-the-environment"
    assert (config.run.estimator, config.run.directions) == ("antithetic", 2)
    # Unflagged, the run takes the measured defaults (docs/learning.md).
    default = config_from_args(parse_args(["--config", str(path)]))
    assert (default.run.estimator, default.run.directions, default.run.lr,
            default.run.lr_scaling) == ("one-sided", 4, 1e-4, "none")


@pytest.mark.parametrize(("text", "needle"), [
    ("[run]\nseed = 1\n", "no enrolment secret"),
    ('enrolment_secret = "short"\n', "at least 16 characters (it has 5): make one with"),
    ('enrolment_secret = "short"\ninsecure_secret = "yes"\n', "expected true or false"),
    ('enrolment_secret = "sixteen-chars-ok"\n[runn]\n', "unknown config section [runn]"),
    ('enrolment_secret = "sixteen-chars-ok"\n[run]\nsead = 1\n', "unknown key(s) ['sead'] in [run]"),
    ('enrolment_secret = "sixteen-chars-ok"\n[run]\nseed = "one"\n', "run.seed = 'one': expected int"),
    ('enrolment_secret = "sixteen-chars-ok"\n[run]\nmin_reports = 0\n', "run.min_reports must be >= 1"),
    ('enrolment_secret = "sixteen-chars-ok"\n[run]\nestimator = "normalised"\ndirections = 1\n',
     "needs run.directions >= 2"),
    ('enrolment_secret = "sixteen-chars-ok"\n[aggregation]\nmethod = "max"\n', "use mean, sum, trimmed_mean"),
    ('enrolment_secret = "sixteen-chars-ok"\n[server]\ntls_cert = "c.pem"\n', "go together"),
    ("enrolment_secret = \n", "not valid TOML"),
    ('enrolment_secret = "sixteen-chars-ok"\n[run]\nmodel_fingerprint = "m"\n', "give both"),
    ('enrolment_secret = "sixteen-chars-ok"\n[run]\npool_slices = "split"\n', "use one of shared, disjoint"),
    ('enrolment_secret = "sixteen-chars-ok"\n[run]\npool_slices = "disjoint"\n[aggregation]\n'
     'method = "median"\n', "gives each direction one"),
])
def test_bad_settings_are_refused_with_what_to_change(tmp_path: Path, text: str,
                                                      needle: str) -> None:
    path = tmp_path / "server.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert needle in str(err.value)


def test_the_secret_can_be_read_from_a_file_next_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("  file-secret-12345\n")
    path = tmp_path / "server.toml"
    path.write_text('enrolment_secret_file = "secret.txt"\n')
    assert load_config(path, environ={}).enrolment_secret == "file-secret-12345"


def test_an_unreachable_postgresql_database_is_named_and_the_server_exits_2(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from zorba_server.cli import main

    monkeypatch.setenv(SECRET_ENV, "a-long-enough-secret")
    code = main(["--db", "postgresql://nobody@/run?host=/nonexistent-socket-dir", "--port", "0",
                 "--log-level", "ERROR"])
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot open the PostgreSQL database" in err and "nonexistent-socket-dir" in err
