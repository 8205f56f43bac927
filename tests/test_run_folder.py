"""The run folder's layout as the README documents it is the one ``RunFolder`` gives every layer."""

from __future__ import annotations

import re
from pathlib import Path

from fedcost.run_folder import RunFolder

README = Path(__file__).resolve().parents[1] / "README.md"


def _documented() -> set[str]:
    """The names in the first column of the README's run-folder table."""
    lines = README.read_text().splitlines()
    start = lines.index("The run folder:") + 1
    names: set[str] = set()
    for line in lines[start:]:
        if names and not line.startswith("|"):
            break
        if line.startswith("| `"):
            names |= {name.rstrip("/") for name in re.findall(r"`([^`]+)`", line.split("|")[1])}
    return names


def test_every_file_the_readme_documents_is_named_by_run_folder() -> None:
    run = RunFolder(Path("runs/r1"))
    paths = [getattr(run, name) for name, value in vars(RunFolder).items() if isinstance(value, property)]
    named = {path.name for path in paths if isinstance(path, Path)}
    documented = _documented()
    assert {"summary.json", "model.pt", "audit", "identities", "plots", "sites"} <= documented
    assert documented <= named, f"the README documents {sorted(documented - named)}, which RunFolder does not name"


def test_a_sites_files_sit_in_its_folders() -> None:
    run = RunFolder(Path("runs/r1"))
    assert run.site_steps("st-mary") == Path("runs/r1/sites/st-mary.json")
    assert run.policy("st-mary") == Path("runs/r1/policies/st-mary.toml")
    assert run.plot("rounds") == Path("runs/r1/plots/rounds.png")
    assert run.run_id == "r1"
