"""The ready scenarios in simulations/: every config is valid and named in the folder's
README with its command, and each one runs end to end with smaller node sizes and fewer
rounds (the same nodes, dropouts and privacy settings), as `fedcost simulate` runs it."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import tomli_w

from fedcost.config import SimulationConfig
from simulations import simulate

FOLDER = Path(__file__).resolve().parents[1] / "simulations"
SCENARIOS = sorted(path.stem for path in FOLDER.glob("*.toml"))
# The scenarios the default suite runs small; the others (the same engine on other sizes)
# are marked slow.
QUICK = {"dropouts", "dp-epsilon-1"}


def test_the_scenarios_are_there() -> None:
    expected = {"default", "heterogeneous", "dropouts", "many-small-sites", "large-n"}
    assert expected <= set(SCENARIOS)
    assert len([name for name in SCENARIOS if name.startswith("dp-epsilon-")]) >= 3, "a DP sweep over a few epsilons"


@pytest.mark.parametrize("name", SCENARIOS)
def test_every_scenario_is_a_valid_config_named_in_the_readme(name: str) -> None:
    SimulationConfig.load(FOLDER / f"{name}.toml")
    readme = (FOLDER / "README.md").read_text()
    assert f"`{name}.toml`" in readme, f"say what {name}.toml shows in simulations/README.md"
    command = f"fedcost simulate simulations/{name}.toml"
    sweep = "fedcost simulate simulations/dp-epsilon-$eps.toml" if name.startswith("dp-epsilon-") else command
    assert sweep in readme, f"give the command that runs {name}.toml"


def small(raw: dict) -> dict:
    """The scenario with every node kept but fewer rows and rounds: enough rounds for its
    dropouts to happen."""
    sizes = raw.get("ecosystem", {}).get("sizes", {})
    drops = raw.get("simulation", {}).get("drop_nodes", {})
    rounds = max([3, *(max(listed) for listed in drops.values())])
    sizes = {role: [min(size, 300 + size // 100) for size in listed] for role, listed in sizes.items()}
    return raw | {
        "run": raw.get("run", {}) | {"rounds": rounds},
        "ecosystem": raw.get("ecosystem", {}) | {"sizes": sizes},
    }


def _run_small(name: str, folder: Path) -> tuple[SimulationConfig, dict]:
    raw = small(tomllib.loads((FOLDER / f"{name}.toml").read_text()))
    config = SimulationConfig.from_dict(raw)
    result, run = simulate(folder, tomli_w.dumps(raw), name)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return config, json.loads((run / "summary.json").read_text())


def _scenario_params() -> list:
    return [name if name in QUICK else pytest.param(name, marks=pytest.mark.slow) for name in SCENARIOS]


@pytest.mark.parametrize("name", _scenario_params())
def test_each_scenario_runs_small(name: str, tmp_path: Path) -> None:
    config, summary = _run_small(name, tmp_path)
    assert len(summary["nodes"]) == sum(len(sizes) for sizes in config.ecosystem.sizes.values())
    for node, rounds in config.simulation.drop_nodes.items():
        for round_ in rounds:
            assert node in summary["dropouts"][str(round_)], f"{node} dropped in round {round_}"
    if config.statistics_privacy.enabled:
        noise = summary["statistics_privacy"]
        assert noise["epsilon"] == config.statistics_privacy.epsilon and noise["noise_sd"] > 0
    else:
        assert "statistics_privacy" not in summary
    assert set(summary["tasks"]) == {"readmission", "cost"}
    assert 0 <= summary["readmission"]["federated"]["auroc"] <= 1
