"""Writes this example: five ICUs' stays as CSV files and the mapping that reads them.

Made-up rows shaped like a public ICU cohort (not the synthetic ecosystem): no roles, a
binary outcome called ``died``, a non-negative one called ``length_of_stay`` with zero-day
stays, ``age`` and ``sex`` as the data set codes them, and laboratory values.
Run from this folder: ``python make_example.py`` (seeded: the same files every time).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

SIZES = {"north-icu": 900, "south-icu": 420, "east-icu": 260, "west-icu": 90, "harbour-icu": 28}


def icu_stays(rng: np.random.Generator, n: int, site_effect: float) -> pd.DataFrame:
    age = np.clip(rng.normal(64, 15, n), 18, 99).round()
    sex = rng.choice(["F", "M"], n)
    source = rng.choice(["emergency", "ward", "theatre"], n, p=[0.5, 0.3, 0.2])
    lactate = rng.lognormal(0.6, 0.5, n).round(1)
    creatinine = rng.lognormal(0.1, 0.45, n).round(2)
    ventilated = (rng.random(n) < 0.35).astype(int)
    risk = (
        -3.2
        + 0.035 * (age - 64)
        + 0.45 * np.log(lactate)
        + 0.6 * np.log(creatinine)
        + 0.9 * ventilated
        + 0.4 * (source == "emergency")
        + site_effect
    )
    died = rng.random(n) < 1 / (1 + np.exp(-risk))
    mean_stay = np.exp(0.9 + 0.4 * ventilated + 0.2 * np.log(lactate) + 0.3 * (source == "theatre"))
    stay = np.where(rng.random(n) < 0.12, 0.0, rng.gamma(1.5, mean_stay / 1.5)).round(1)
    return pd.DataFrame(
        {
            "age": age.astype(int),
            "sex": sex,
            "admission_source": source,
            "lactate": lactate,
            "creatinine": creatinine,
            "ventilated": ventilated,
            "died": np.where(died, "yes", "no"),
            "length_of_stay": stay,
        }
    )


def main() -> None:
    rng = np.random.default_rng(2026)
    for site, n in SIZES.items():
        icu_stays(rng, n, rng.normal(0, 0.25)).to_csv(f"{site}.csv", index=False)


if __name__ == "__main__":
    main()
