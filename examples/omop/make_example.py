"""Writes this example: three hospitals' OMOP CDM extracts (made-up patients) and nothing else.

Each site's folder holds the OMOP tables fedcost reads, as CSV: person, visit_occurrence
(inpatient stays, readmissions, ED and outpatient visits), condition_occurrence (the
principal diagnosis, SNOMED standard concepts), drug_exposure, cost (one Visit row per
visit) and payer_plan_period (payer concept ids this data set's own: mapping.toml says
which is which). Sites differ in size, case mix, readmission rate and prices.
Run from this folder: ``python make_example.py`` (seeded: the same files every time).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

# Site: persons, readmission log-odds shift, price level.
SITES = {"riverside": (190, 0.0, 1.0), "hillcrest": (120, 0.4, 1.25), "lakeside": (80, -0.3, 0.85)}
DIAGNOSES = {316139: 1.0, 255573: 0.7, 255848: 0.3, 4329847: 0.6, 443454: 0.5, 201826: 0.2, 132797: 0.8, 80180: -0.8}
PAYERS = (5001, 5002, 5003, 5004)  # this data set's medicare, medicaid, commercial, self-pay concept ids
DISCHARGES = (8536, 8536, 8536, 38004519, 8863, 8920)
FIRST_DAY, LAST_DAY = pd.Timestamp("2020-01-01"), pd.Timestamp("2022-12-31")


class Extract:
    """The tables of one site's extract, filled visit by visit."""

    def __init__(self, rng: np.random.Generator, price: float):
        self.rng, self.price = rng, price
        self.tables: dict[str, list[dict]] = {
            name: []
            for name in (
                "person",
                "visit_occurrence",
                "condition_occurrence",
                "drug_exposure",
                "cost",
                "payer_plan_period",
            )
        }

    def visit(self, person: int, concept: int, start: pd.Timestamp, days: int, cost: float, **extra: object) -> int:
        visit_id = len(self.tables["visit_occurrence"]) + 1
        end = start + pd.Timedelta(days=days)
        self.tables["visit_occurrence"].append(
            {
                "visit_occurrence_id": visit_id,
                "person_id": person,
                "visit_concept_id": concept,
                "visit_start_date": f"{start:%Y-%m-%d}",
                "visit_end_date": f"{end:%Y-%m-%d}",
                "admitted_from_concept_id": extra.get("admitted_from", ""),
                "discharged_to_concept_id": extra.get("discharged_to", ""),
            }
        )
        charge = round(cost * self.price * self.rng.uniform(1.6, 2.4), 2)
        self.tables["cost"].append(
            {
                "cost_id": len(self.tables["cost"]) + 1,
                "cost_event_id": visit_id,
                "cost_domain_id": "Visit",
                "total_charge": charge,
                "total_cost": round(cost * self.price, 2),
                "total_paid": round(cost * self.price * self.rng.uniform(0.7, 0.95), 2),
            }
        )
        return visit_id

    def stay(self, person: int, start: pd.Timestamp, diagnosis: int, age: float) -> pd.Timestamp:
        """An inpatient stay with its diagnosis, drugs and cost; returns the discharge date."""
        rng = self.rng
        days = int(min(rng.gamma(2.0, 2.2 + 0.03 * max(age - 60, 0)), 60))
        emergency = rng.random() < 0.6
        visit_id = self.visit(
            person,
            262 if emergency and rng.random() < 0.5 else 9201,
            start,
            days,
            rng.gamma(4.0, (2500 + 1200 * days) / 4.0),
            admitted_from=8870 if emergency else "",
            discharged_to=rng.choice(DISCHARGES),
        )
        conditions = self.tables["condition_occurrence"]
        conditions.append(
            {
                "condition_occurrence_id": len(conditions) + 1,
                "person_id": person,
                "condition_concept_id": diagnosis,
                "visit_occurrence_id": visit_id,
                "condition_status_concept_id": 32902,
            }
        )
        for drug in rng.choice(np.arange(1100, 1160), rng.integers(0, 9), replace=False):
            drugs = self.tables["drug_exposure"]
            drugs.append(
                {
                    "drug_exposure_id": len(drugs) + 1,
                    "person_id": person,
                    "drug_concept_id": int(drug),
                    "drug_exposure_start_date": f"{start + pd.Timedelta(days=int(rng.integers(0, days + 1))):%Y-%m-%d}",
                }
            )
        return start + pd.Timedelta(days=days)

    def person(self, person: int, site_shift: float) -> None:
        rng = self.rng
        birth = int(rng.integers(1925, 1985))
        self.tables["person"].append(
            {"person_id": person, "gender_concept_id": int(rng.choice([8507, 8532])), "year_of_birth": birth}
        )
        self.tables["payer_plan_period"].append(
            {
                "payer_plan_period_id": person,
                "person_id": person,
                "payer_plan_period_start_date": "2019-01-01",
                "payer_plan_period_end_date": "2022-12-31",
                "payer_concept_id": int(PAYERS[0] if 2021 - birth >= 65 else rng.choice(PAYERS[1:], p=[0.3, 0.6, 0.1])),
            }
        )
        for _ in range(int(rng.integers(0, 3))):
            self.visit(person, 9203, FIRST_DAY + pd.Timedelta(days=int(rng.integers(0, 1000))), 0, rng.gamma(2, 400))
        day = FIRST_DAY + pd.Timedelta(days=int(rng.integers(0, 300)))
        for _ in range(int(rng.integers(1, 4))):
            if day > LAST_DAY - pd.Timedelta(days=40):
                break
            diagnosis = int(rng.choice(list(DIAGNOSES)))
            age = day.year - birth
            discharge = self.stay(person, day, diagnosis, age)
            if rng.random() < 0.5:
                self.visit(person, 9202, discharge + pd.Timedelta(days=int(rng.integers(1, 10))), 0, rng.gamma(2, 90))
            risk = -1.9 + 0.02 * (age - 65) + 0.5 * DIAGNOSES[diagnosis] + site_shift
            if rng.random() < 1 / (1 + np.exp(-risk)):
                discharge = self.stay(person, discharge + pd.Timedelta(days=int(rng.integers(2, 29))), diagnosis, age)
            day = discharge + pd.Timedelta(days=int(rng.integers(45, 400)))

    def write(self, folder: Path) -> None:
        folder.mkdir(exist_ok=True)
        for name, rows in self.tables.items():
            pd.DataFrame(rows).to_csv(folder / f"{name}.csv", index=False)


def main() -> None:
    rng = np.random.default_rng(2026)
    for site, (persons, shift, price) in SITES.items():
        extract = Extract(rng, price)
        for person in range(1, persons + 1):
            extract.person(person, shift)
        extract.visit(1, 9202, LAST_DAY, 0, 80.0)  # the extract's last day
        extract.write(Path(site))


if __name__ == "__main__":
    main()
