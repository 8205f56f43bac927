"""The `fedcost` command line as a user meets it: every mistake of theirs is one line per
problem naming the file, field or argument, exit code 2, no traceback and no local
variable; a bug is one line, exit code 1 and a log file; every argument has its help.

The commands run as real processes (``python -c "from fedcost.cli import app; app()"``,
this checkout first on PYTHONPATH). Quick: none of them gets as far as loading torch.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer.main

from fedcost import __version__
from fedcost.audit import AuditLog
from fedcost.cli import app
from fedcost.identity import Identity
from fedcost.wire.events import Event

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "byo"
# What a rich traceback or a leaked local variable looks like on screen.
TRACEBACK_SIGNS = ("Traceback", "╭", "│", "locals", 'File "')


def fedcost(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", "TMPDIR": str(cwd)}
    command = [sys.executable, "-c", "from fedcost.cli import app; app()", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def assert_user_error(result: subprocess.CompletedProcess, *lines: str) -> None:
    """Exit code 2 and exactly one ``error:`` line per expected problem, each containing its text."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    shown = [line for line in output.splitlines() if line.strip()]
    assert len(shown) == len(lines), output
    for line, expected in zip(shown, lines, strict=True):
        assert line.startswith("error: ") and expected in line, output
    assert not any(sign in output for sign in TRACEBACK_SIGNS), output


def test_a_node_name_that_is_a_path_is_one_line_and_creates_nothing(tmp_path: Path) -> None:
    data = tmp_path / "byo"
    shutil.copytree(EXAMPLE, data)
    mapping = data / "mapping.toml"
    mapping.write_text(mapping.read_text().replace("[nodes.st-mary]", '[nodes."../../evil"]'))
    result = fedcost("simulate", "--data-dir", "byo", "--out", "run", cwd=tmp_path)
    assert_user_error(result, "byo/mapping.toml, field 'nodes.../../evil': a party's name becomes a file name")
    assert "st-mary.csv" not in result.stdout, "the mapping's contents stay off the screen"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["byo"]

    assert fedcost("federation", "init", "fed", cwd=tmp_path).returncode == 0
    enrolled = fedcost("federation", "add-node", "../../evil", "--role", "hospital", "-f", "fed", cwd=tmp_path)
    assert_user_error(enrolled, "field 'name': a party's name becomes a file name")
    assert not (tmp_path / "evil").exists(), "fed/kits/../../evil"
    assert not any((tmp_path / "fed" / "kits").iterdir())


def test_every_mistake_in_a_mapping_is_one_line_each(tmp_path: Path) -> None:
    data = tmp_path / "byo"
    shutil.copytree(EXAMPLE, data)
    mapping = data / "mapping.toml"
    text = mapping.read_text().replace("[nodes.st-mary]", '[nodes."../../evil"]')
    mapping.write_text(text.replace('role = "insurer"', 'role = "payer"'))
    result = fedcost("simulate", "--data-dir", "byo", "--out", "run", cwd=tmp_path)
    assert_user_error(
        result,
        "byo/mapping.toml, field 'nodes.../../evil': a party's name becomes a file name",
        "byo/mapping.toml, field 'nodes.northcare.role': role must be one of",
    )
    assert not (tmp_path / "run").exists()


def test_out_on_a_file_is_refused_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine\n")
    result = fedcost("simulate", "--out", "notes.txt", cwd=tmp_path)
    assert_user_error(result, "notes.txt, field '--out': is a file: give --out the path of a new folder")
    inside = fedcost("analyze", "--out", "notes.txt/run", cwd=tmp_path)
    assert_user_error(inside, "notes.txt, field '--out': is a file")
    assert (tmp_path / "notes.txt").read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_every_mistake_in_a_config_is_reported_together(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text('[run]\nseeed = 3\n[model]\nkind = "forest"\n[strategi]\nname = "fedavg"\n')
    result = fedcost("simulate", "bad.toml", "--out", "run", cwd=tmp_path)
    assert_user_error(
        result,
        "bad.toml, field 'strategi': unknown section",
        "bad.toml, field 'run.seeed': unknown key",
        "bad.toml, field 'model.kind': must be one of glm, mlp, multitask, not 'forest'",
    )
    assert not (tmp_path / "run").exists()


def test_a_bug_is_one_line_and_a_log_without_local_variables(tmp_path: Path) -> None:
    script = (
        "from fedcost.cli import app\n"
        "@app.command('boom')\n"
        "def boom() -> None:\n"
        "    patient_row = 'SECRET-ROW-4711'\n"
        "    raise KeyError(len(patient_row))\n"
        "app()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", "TMPDIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", script, "boom"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert len(output.strip().splitlines()) == 1 and "unexpected error (KeyError)" in output, output
    logs = list(tmp_path.glob("fedcost-error-*.log"))
    assert len(logs) == 1 and str(logs[0]) in output
    trace = logs[0].read_text()
    assert "Traceback" in trace and "KeyError: 15" in trace and 'File "<string>"' in trace
    assert "SECRET-ROW-4711" not in output + trace
    assert oct(logs[0].stat().st_mode & 0o777) == "0o600"


def test_a_report_written_onto_a_folder_is_one_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "audit").mkdir(parents=True)
    (run / "identities").mkdir()
    coordinator = Identity.generate("coordinator", "coordinator")
    coordinator.public().save(run / "identities")
    log = AuditLog(run / "audit" / "coordinator.jsonl", coordinator)
    log.append(Event.RUN_STARTED, details={"rounds": 1})
    (tmp_path / "here").mkdir()
    assert fedcost("audit", "report", "run", "--out", "report.txt", cwd=tmp_path).returncode == 0
    result = fedcost("audit", "report", "run", "--out", "here", cwd=tmp_path)
    assert_user_error(result, "here, field '--out': cannot write it")


def test_version_and_help_answer_without_loading_torch_flower_or_pandas(tmp_path: Path) -> None:
    assert fedcost("--version", cwd=tmp_path).stdout.strip() == f"fedcost {__version__}"
    probe = (
        "import sys\n"
        "from fedcost.cli import app\n"
        "from fedcost.config import SimulationConfig\n"
        "try:\n"
        "    app(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "SimulationConfig.load(sys.argv[1])\n"
        "print(sorted(m for m in ('torch', 'flwr', 'fedcost.lab') if m in sys.modules))\n"
    )
    (tmp_path / "ok.toml").write_text("[run]\nrounds = 2\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", probe, "ok.toml"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def _commands(command: click.Command, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    if isinstance(command, click.Group):
        return [found for name, sub in command.commands.items() for found in _commands(sub, (*path, name))]
    return [(path, command)]


COMMANDS = _commands(typer.main.get_command(app))


@pytest.mark.parametrize("path,command", COMMANDS, ids=[" ".join(path) for path, _ in COMMANDS])
def test_every_argument_has_help_that_survives_rich_markup(path: tuple[str, ...], command: click.Command) -> None:
    from typer.testing import CliRunner

    shown = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "400"}).output
    flat = re.sub(r"[\s│]+", " ", shown)
    for param in command.params:
        if getattr(param, "hidden", False) or param.name == "help":
            continue
        assert param.help, f"fedcost {' '.join(path)}: {param.name} has no help text (click below 8.5: scripts/setup)"
        assert re.sub(r"\s+", " ", param.help.replace("\\[", "[")) in flat, f"{param.name}'s help is garbled"


def test_dash_f_always_means_the_federation_folder() -> None:
    for path, command in COMMANDS:
        for param in command.params:
            if "-f" in getattr(param, "opts", ()):
                assert "--federation" in param.opts, f"fedcost {' '.join(path)}: -f is {param.opts}"


def test_the_forms_from_before_dash_f_still_name_the_federation(tmp_path: Path) -> None:
    assert fedcost("federation", "init", "fed", cwd=tmp_path).returncode == 0
    for args in (["run", "job.toml", "-f", "fed"], ["run", "fed", "job.toml"]):
        assert_user_error(fedcost(*args, cwd=tmp_path), "job.toml: job file not found")
    assert_user_error(fedcost("run", "fed", "--resume", "r1", cwd=tmp_path), "no such run (no job.toml) to resume")
    assert_user_error(fedcost("coordinator", "start", "elsewhere", cwd=tmp_path), "elsewhere: not a federation folder")
    assert_user_error(fedcost("coordinator", "start", "fed", "more", cwd=tmp_path), "unexpected argument(s): more")
