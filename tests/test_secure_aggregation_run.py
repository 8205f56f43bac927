"""Secure aggregation in a real simulation: on by default, exact under dropouts within
tolerance, a clear stop beyond it, and the same model quality as plaintext; and the
coordinator's reply polling."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedcost.server.shared_sum import PollingGrid
from simulations import SMALL_FEDERATION, exchanges, simulate

BASE = SMALL_FEDERATION


def rounds(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("secagg")


def test_secure_aggregation_is_on_by_default_and_matches_plaintext(folder: Path) -> None:
    secure, secure_run = simulate(folder, BASE, "secure")
    plain, plain_run = simulate(folder, BASE + "\n[secure_aggregation]\nenabled = false\n", "plain")
    assert secure.returncode == 0, secure.stdout + secure.stderr
    assert plain.returncode == 0, plain.stdout + plain.stderr
    secure_summary = json.loads((secure_run / "summary.json").read_text())
    plain_summary = json.loads((plain_run / "summary.json").read_text())
    assert secure_summary["secure_aggregation"] is True
    assert plain_summary["secure_aggregation"] is False
    assert all(r["secure_aggregation"] for r in rounds(secure_run))
    assert "secure aggregation is OFF ([secure_aggregation] enabled = false)" in plain.stdout
    # Quantisation is the only difference: steps of 8 / 2**20 per update entry.
    assert (
        abs(secure_summary["readmission"]["federated"]["auroc"] - plain_summary["readmission"]["federated"]["auroc"])
        < 0.002
    )
    assert abs(secure_summary["cost"]["federated"]["r2"] - plain_summary["cost"]["federated"]["r2"]) < 0.005
    # Each sum's setup rides on the consistency of the sum before it (``shared_sum.NextSum``): only
    # the run's first sum and its first Newton sum (whose size the statistics fix) set up alone.
    setups = [kinds for _, kinds in exchanges(secure_run) if any(kind.endswith(":setup") for kind in kinds)]
    assert setups == [{"secagg:analytics:setup"}, {"secagg:newton:setup"}]
    purposes = {kind.split(":")[1] for _, kinds in exchanges(secure_run) for kind in kinds if ":" in kind}
    assert {"analytics", "statistics", "newton", "evaluate", "benchmark"} <= purposes


def test_a_node_lost_after_sharing_keys_is_recovered(folder: Path) -> None:
    config = BASE + '\n[simulation]\ndrop_stage = "masked-input"\n[simulation.drop_nodes]\nhospital-2 = [2]\n'
    result, run = simulate(folder, config, "dropout")
    assert result.returncode == 0, result.stdout + result.stderr
    by_round = {r["round"]: r for r in rounds(run)}
    assert by_round[2]["nodes_included"] == 4
    assert "hospital-2" in by_round[2]["dropouts"]
    assert by_round[1]["nodes_included"] == by_round[3]["nodes_included"] == 5
    summary = json.loads((run / "summary.json").read_text())
    assert "hospital-2" in summary["dropouts"]["2"]


def test_too_many_dropouts_stop_the_run_with_a_clear_message(folder: Path) -> None:
    config = BASE.replace(
        "hospital = [1500, 900, 600]\ninsurer = [1200]\npharma = [500]", "hospital = [1500, 900, 600]"
    )
    config += '\n[secure_aggregation]\non_abort = "stop"\n[simulation.drop_nodes]\nhospital-3 = [2]\n'
    result, run = simulate(folder, config, "abort")
    assert result.returncode != 0
    assert "secure aggregation aborted" in result.stdout
    assert not run.exists(), "a stopped run leaves no folder that claims success"
    failed = run.with_name("abort.failed")
    assert "secure aggregation aborted" in (failed / "error.txt").read_text()
    assert {p.stem for p in (failed / "audit").glob("*.jsonl")} >= {"coordinator", "hospital-3"}, "the logs are kept"
    assert "is in abort.failed" in result.stdout
    assert "raise [secure_aggregation] dropout_tolerance" in result.stdout, "TOML table names survive the terminal"


class _OneReplyPerPull:
    """A grid that answers one pending request per pull, as a busy engine would."""

    def __init__(self) -> None:
        self.pulls = 0

    def push_messages(self, messages: list[str]) -> list[str]:
        return [f"id-{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, pending: set[str]) -> list[SimpleNamespace]:
        self.pulls += 1
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=min(pending)))]


def test_polling_grid_waits_for_every_reply_and_no_longer() -> None:
    grid = _OneReplyPerPull()
    replies = PollingGrid(grid).send_and_receive(["a", "b", "c"])  # type: ignore[arg-type]
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["id-0", "id-1", "id-2"]
    assert grid.pulls == 3
