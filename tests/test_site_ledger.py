"""A site operator's actions on its ledger: close a run that will not come back, start a
ledger anew, and never while a node serves from the same state folder. Real kits, real
signed ledgers, the real CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedcost.cli import app
from fedcost.client import budget
from fedcost.errors import LedgerError
from fedcost.federation import site_ledger
from fedcost.federation.provision import Federation, FederationConfig, Kit
from fedcost.identity.federation_ca import utc_now
from fedcost.models.spec import TrainConfig
from fedcost.privacy import ledger as ledger_module
from fedcost.privacy.ledger import ReleaseLedger
from fedcost.privacy.policy import PrivacySettings

PRIVACY = PrivacySettings(epsilon=4.0, delta=1e-5, max_grad_norm=1.0)


@pytest.fixture
def site(tmp_path: Path) -> tuple[Path, Path]:
    """A kit and its state folder whose ledger holds three rounds for open run 'run-a'."""
    federation = Federation.init(tmp_path / "f", FederationConfig("f", "127.0.0.1:9093"), at=utc_now())
    federation.add_node("h1", "hospital", at=utc_now())
    kit_dir = federation.kit_dir("h1")
    state = kit_dir / "state"
    state.mkdir()
    with ReleaseLedger.open(state / "h1.ledger", Kit.load(kit_dir).identity) as ledger:
        ledger.accept_plan("run-a", "plan-digest")
        training = TrainConfig(epochs=1, batch_size=64)
        budget.pay_for_round(ledger, PRIVACY, examples=500, training=training, rounds_left=4, run_id="run-a", round=1)
    ledger_module._CACHE.clear()
    return kit_dir, state


def cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(arg) for arg in args], env={"COLUMNS": "300"})
    return result.exit_code, result.output


def held(kit_dir: Path, state: Path) -> dict[str, int]:
    with ReleaseLedger.open(state / "h1.ledger", Kit.load(kit_dir).identity) as ledger:
        return {run: rounds for run, (_, rounds) in ledger.held(besides="other").items()}


def test_closing_a_run_frees_its_held_rounds_and_the_site_refuses_it_after(site: tuple[Path, Path]) -> None:
    kit_dir, state = site
    assert held(kit_dir, state) == {"run-a": 3}
    code, output = cli("node", "close-run", kit_dir, "run-a", "--reason", "its coordinator was retired")
    assert code == 0 and "run-a closed at this site" in output, output
    assert held(kit_dir, state) == {}
    with ReleaseLedger.open(state / "h1.ledger", Kit.load(kit_dir).identity) as ledger:
        assert ledger.runs() == {"run-a": True}
        with pytest.raises(Exception, match="closed at this site"):
            ledger.check_run_open("run-a")
    code, output = cli("node", "close-run", kit_dir, "run-a", "--reason", "again")
    assert code == 0 and "already closed" in output, output


def test_closing_a_run_the_site_never_accepted_names_its_open_runs(site: tuple[Path, Path]) -> None:
    kit_dir, state = site
    before = (state / "h1.ledger").read_bytes()
    code, output = cli("node", "close-run", kit_dir, "run-z", "--reason", "typo")
    assert code == 2 and "never accepted run 'run-z'" in output and "open runs: run-a" in output, output
    assert "Traceback" not in output
    assert (state / "h1.ledger").read_bytes() == before
    code, output = cli("node", "close-run", kit_dir, "run-a", "--reason", "  ")
    assert code == 2 and "--reason" in output and (state / "h1.ledger").read_bytes() == before, output
    code, output = cli("node", "close-run", kit_dir, "run-a", "--reason", "gone", "--state", state / "nowhere")
    assert code == 2 and "no such state folder" in output and not (state / "nowhere").exists(), output


def test_nothing_touches_the_ledger_while_a_node_serves_from_the_folder(site: tuple[Path, Path], tmp_path) -> None:
    """The lock ``node start`` holds: the operator's actions and a second node are refused."""
    kit_dir, state = site
    before = (state / "h1.ledger").read_bytes()
    with site_ledger.holding(state):
        code, output = cli("node", "close-run", kit_dir, "run-a", "--reason", "gone")
        assert code == 2 and "a node is serving from this state folder" in output, output
        code, output = cli("node", "ledger-reset", kit_dir, "--reason", "gone")
        assert code == 2 and "a node is serving from this state folder" in output, output
        code, output = cli("node", "start", kit_dir, "--data", tmp_path / "x.csv", "--mapping", tmp_path / "m.toml")
        assert code == 2 and "a node is serving from this state folder" in output, output
    assert (state / "h1.ledger").read_bytes() == before
    assert held(kit_dir, state) == {"run-a": 3}


def test_a_ledger_that_failed_its_check_starts_anew_with_the_reason_signed(site: tuple[Path, Path]) -> None:
    kit_dir, state = site
    path = state / "h1.ledger"
    edited = path.read_bytes().replace(b'"run-a"', b'"run-b"', 1)
    path.write_bytes(edited)
    ledger_module._CACHE.clear()
    with pytest.raises(LedgerError, match="ledger-reset"):
        ReleaseLedger.open(path, Kit.load(kit_dir).identity)
    code, output = cli("node", "ledger-reset", kit_dir, "--reason", "restored the site after a disk failure")
    assert code == 0 and "started a new release ledger" in output, output
    kept = [p for p in state.iterdir() if p.name.startswith("h1.ledger.replaced-")]
    assert len(kept) == 1 and kept[0].read_bytes() == edited
    with ReleaseLedger.open(path, Kit.load(kit_dir).identity) as ledger:
        assert ledger.spending == () and ledger.runs() == {}
