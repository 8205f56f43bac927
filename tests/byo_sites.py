"""Generated data brought through `fedcost simulate --data-dir`: one CSV per site and the
mapping that reads them, for the scenario tests and benchmarks of odd-shaped federations."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import tomli_w

from fedcost import schema

ROLE = "pharma"  # the role with the fewest columns: every other schema field is missing by design
EXTRA = ("bmi", "systolic_bp")  # extra numeric features every site carries


def sites_frames(sizes: Sequence[int], *, seed: int) -> dict[str, pd.DataFrame]:
    """Rows for sites ``site-1``… of ``sizes`` rows: the pharma role's columns, two extra
    numeric features, a readmission drawn from a logistic model of them and a zero-heavy cost."""
    rng = np.random.default_rng(seed)
    frames = {}
    for k, size in enumerate(sizes, start=1):
        age = rng.integers(18, 95, size)
        bmi = rng.normal(27.0 + 0.3 * k, 4.0, size).round(1)
        pressure = rng.normal(130.0, 15.0, size).round(0)
        comorbidity = rng.poisson(2.0, size)
        medications = rng.poisson(5.0, size)
        eta = -1.6 + 0.02 * (age - 60) + 0.25 * comorbidity + 0.03 * (bmi - 27) + 0.1 * (k % 3)
        readmitted = (rng.random(size) < 1.0 / (1.0 + np.exp(-eta))).astype(int)
        cost = np.where(rng.random(size) < 0.15, 0.0, rng.gamma(2.0, 2000.0 * np.exp(0.1 * comorbidity), size)).round(2)
        frames[f"site-{k}"] = pd.DataFrame(
            {
                "age": age,
                "sex": rng.choice(["female", "male"], size),
                "region": rng.choice(["north", "south", "east", "west"], size),
                "diagnosis_group": rng.choice(["heart_failure", "copd", "pneumonia", "other"], size),
                "comorbidity_index": comorbidity,
                "payer": rng.choice(["medicare", "commercial"], size),
                "num_medications": medications,
                "medication_adherence": rng.uniform(0.2, 1.0, size).round(3),
                "bmi": bmi,
                "systolic_bp": pressure,
                schema.READMISSION: readmitted,
                schema.COST: cost,
            }
        )
    return frames


def write_sites(folder: Path, frames: Mapping[str, pd.DataFrame], *, extra: Sequence[str] = EXTRA) -> Path:
    """One CSV per site and ``mapping.toml`` in ``folder`` (created); returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    targets = {target: {} for target in (schema.READMISSION, schema.COST) if all(target in f for f in frames.values())}
    mapping = {"targets": targets, "features": {"numeric": list(extra)}, "nodes": {}}
    for name, rows in frames.items():
        rows.to_csv(folder / f"{name}.csv", index=False)
        mapping["nodes"][name] = {"role": ROLE, "file": f"{name}.csv"}
    (folder / "mapping.toml").write_bytes(tomli_w.dumps(mapping).encode())
    return folder
