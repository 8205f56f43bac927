"""Simulation configs: the shipped ones load; a bad [run] value names the file, field and rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcost.config import SimulationConfig
from fedcost.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

BAD_RUN = {
    "no rounds": ("rounds = 0", "rounds must be at least 1"),
    "test share of 1": ("test_fraction = 1.0", "test_fraction must lie in"),
    "cohort of one": ("min_cohort = 1", "min_cohort must be at least 2"),
    "negative adaptation": ("adaptation_epochs = -1", "adaptation_epochs must be 0"),
    "adaptation as text": ('adaptation_epochs = "five"', "run.adaptation_epochs"),
    "unknown key": ("adaption_epochs = 5", "unknown key"),
}


@pytest.mark.parametrize("name", ["default", "heterogeneous"])
def test_the_shipped_configs_load_and_adapt_at_each_site(name: str) -> None:
    config = SimulationConfig.load(CONFIGS / f"{name}.toml")
    assert config.run.adaptation_epochs == 5


@pytest.mark.parametrize("line, message", BAD_RUN.values(), ids=BAD_RUN.keys())
def test_a_bad_run_setting_is_refused_naming_the_file_and_field(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f"[run]\n{line}\n")
    with pytest.raises(ConfigError, match=message) as raised:
        SimulationConfig.load(path)
    assert str(path) in str(raised.value) and "run" in str(raised.value)


def test_adaptation_can_be_turned_off(tmp_path: Path) -> None:
    path = tmp_path / "off.toml"
    path.write_text("[run]\nadaptation_epochs = 0\n")
    assert SimulationConfig.load(path).run.adaptation_epochs == 0


def test_every_mistake_of_every_policy_a_config_names_is_reported(tmp_path: Path) -> None:
    (tmp_path / "h1.toml").write_text(f'coordinator = "{"ab" * 32}"\nmax_rounds = 0\nmin_cohort = "11"\n')
    path = tmp_path / "run.toml"
    path.write_text('[simulation]\npolicies = { h1 = "h1.toml", h2 = "none.toml" }\n')
    with pytest.raises(ConfigError) as raised:
        SimulationConfig.load(path)
    lines = str(raised.value).splitlines()
    assert [error.field for error in raised.value.errors] == ["simulation.policies.h1"] * 2 + ["simulation.policies.h2"]
    assert "h1.toml, field 'privacy': required" in lines[0] and "h1.toml, field 'min_cohort'" in lines[1]
    assert "none.toml: policy file not found" in lines[2]
