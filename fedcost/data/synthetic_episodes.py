"""Linked episode extracts for a synthetic ecosystem: the same patients at hospitals and payers.

Every hospital row becomes a stay of a pseudonymous patient (about one patient in eight
comes back for a second stay at the same hospital, sometimes within the first stay's
window), admitted in 2024 and discharged after its ``length_of_stay``; its cost and
readmission are the row's. Insurers cover the patients of hospitals in their region,
pharma companies patients anywhere, each patient with a fixed chance; a covered patient
has claims from ten days before admission to 45 (insurer) or 60 (pharma) days after
discharge, so some fall outside any window, and some share a day. Every payer also has
members who never stayed at a hospital of the ecosystem.

Everything is drawn from its own stream (``SeedSequence(seed, spawn_key=(LINKAGE_STREAM,))``)
after the rows exist, so every existing figure of the ecosystem is what it was. The
truth is the pooled join: per hospital, its stays' cost and what each payer paid within
the windows, computed in the clear, which the federated linkage must equal exactly.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedcost import schema
from fedcost.data.synthetic import Ecosystem
from fedcost.linkage.episodes import HOSPITAL, PAYER_ROLES
from fedcost.linkage.windows import (
    ADMISSION,
    CLAIM_COST,
    DISCHARGE,
    KEY,
    SERVICE,
    Claims,
    EpisodeWindow,
    Stays,
)

LINKAGE_STREAM = 2**20  # far above any node's position among the ecosystem's own streams
RETURNING_SHARE = 0.12
COVERAGE = {"insurer": 0.7, "pharma": 0.45}
CLAIMS_PER_PATIENT = {"insurer": 4.0, "pharma": 3.0}
CLAIM_LOG_COST = {"insurer": (6.5, 1.0), "pharma": (4.5, 0.8)}
CLAIM_DAYS_AFTER = {"insurer": 45, "pharma": 60}
OUTSIDERS_SHARE = 0.5  # a payer's members who never stayed at a hospital here, per covered patient
_YEAR = dt.date(2024, 1, 1)


@dataclass(frozen=True)
class LinkedExtracts:
    """Each node's episode extract by name (hospital: stays; payer: claims), and the truth."""

    extracts: dict[str, pd.DataFrame]
    truth: dict


def generate_linked_extracts(ecosystem: Ecosystem, seed: int, window: EpisodeWindow) -> LinkedExtracts:
    """The linked stays and claims behind ``ecosystem`` (made with ``seed``) and the true
    episode costs over ``window``."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(LINKAGE_STREAM,)))
    stays = {n.name: _stays(rng, n.frame, n.name) for n in ecosystem.nodes if n.role == HOSPITAL}
    regions = {n.name: n.region for n in ecosystem.nodes}
    extracts: dict[str, pd.DataFrame] = dict(stays)
    for node in (n for n in ecosystem.nodes if n.role in PAYER_ROLES):
        covered = [
            frame for hospital, frame in stays.items() if node.role == "pharma" or regions[hospital] == node.region
        ]
        extracts[node.name] = _claims(rng, node.role, node.name, covered)
    return LinkedExtracts(extracts, _truth(extracts, ecosystem, window))


def _stays(rng: np.random.Generator, rows: pd.DataFrame, hospital: str) -> pd.DataFrame:
    n = len(rows)
    los = rows["length_of_stay"].to_numpy(np.int64)
    keys = np.array([f"{hospital}-{rng.bytes(6).hex()}" for _ in range(n)], dtype=object)
    admitted = rng.integers(0, 365, n)
    returning = np.flatnonzero(rng.random(n) < RETURNING_SHARE)[1:]
    earlier = rng.integers(0, returning, len(returning)) if len(returning) else np.array([], dtype=np.int64)
    for later, first in zip(returning.tolist(), earlier.tolist()):  # in row order: a first stay is settled
        keys[later] = keys[first]
        admitted[later] = admitted[first] + los[first] + int(rng.integers(1, 60))
    start = np.datetime64(_YEAR)
    return pd.DataFrame(
        {
            KEY: keys,
            ADMISSION: (start + admitted.astype("timedelta64[D]")).astype(str),
            DISCHARGE: (start + (admitted + los).astype("timedelta64[D]")).astype(str),
            schema.COST: rows[schema.COST].to_numpy(),
            schema.READMISSION: rows[schema.READMISSION].to_numpy(),
        }
    )


def _claims(rng: np.random.Generator, role: str, payer: str, covered: list[pd.DataFrame]) -> pd.DataFrame:
    """Claims of the covered hospitals' patients around their stays, and of other members."""
    stays = pd.concat(covered, ignore_index=True) if covered else pd.DataFrame(columns=[KEY, ADMISSION, DISCHARGE])
    patients = stays[KEY].drop_duplicates()
    members = set(patients[rng.random(len(patients)) < COVERAGE[role]])
    stays = stays[stays[KEY].isin(members)]
    start = pd.to_datetime(stays[ADMISSION]).to_numpy("datetime64[D]") - np.timedelta64(10, "D")
    span = (pd.to_datetime(stays[DISCHARGE]).to_numpy("datetime64[D]") - start).astype(np.int64)
    span += CLAIM_DAYS_AFTER[role]
    counts = rng.poisson(CLAIMS_PER_PATIENT[role], len(stays))
    keys = np.repeat(stays[KEY].to_numpy(), counts)
    days = np.repeat(start, counts) + (rng.random(counts.sum()) * np.repeat(span + 1, counts)).astype("timedelta64[D]")
    outsiders = int(OUTSIDERS_SHARE * len(members))
    outsider_keys = np.array([f"{payer}-member-{rng.bytes(6).hex()}" for _ in range(outsiders)], dtype=object)
    outsider_days = np.datetime64(_YEAR) + rng.integers(0, 420, outsiders).astype("timedelta64[D]")
    keys = np.concatenate([keys, outsider_keys])
    days = np.concatenate([days, outsider_days])
    mean, sd = CLAIM_LOG_COST[role]
    costs = np.round(np.exp(rng.normal(mean, sd, len(keys))), 2)
    order = rng.permutation(len(keys))
    return pd.DataFrame({KEY: keys[order], SERVICE: days[order].astype(str), CLAIM_COST: costs[order]})


def pooled_episode_costs(extracts: dict[str, pd.DataFrame], roles: dict[str, str], window: EpisodeWindow) -> dict:
    """Per hospital, the pooled join in the clear: stays, their cost and readmissions, and
    what each payer paid on a (key, day) within one of the hospital's windows, in cents."""
    items = {
        name: Stays.from_frame(frame, _nowhere(name)).items(window)
        for name, frame in extracts.items()
        if roles[name] == HOSPITAL
    }
    paid = {
        name: Claims.from_frame(frame, _nowhere(name)).items()
        for name, frame in extracts.items()
        if roles[name] in PAYER_ROLES
    }
    out = {}
    for hospital, listed in items.items():
        stays = Stays.from_frame(extracts[hospital], _nowhere(hospital))
        out[hospital] = {
            "stays": len(stays.keys),
            "stay_cost_cents": int(stays.cost_cents.sum()),
            "readmitted": int(stays.readmitted.sum()),
            "paid_cents": {
                payer: sum(cents for item, cents in claims.items() if item in listed) for payer, claims in paid.items()
            },
            "patients": {
                payer: len({key for key, day in claims if (key, day) in listed}) for payer, claims in paid.items()
            },
        }
    return out


def _nowhere(name: str) -> Path:
    """The name a synthetic extract goes by in an error (it has no file)."""
    return Path(f"<synthetic {name}>")


def _truth(extracts: dict[str, pd.DataFrame], ecosystem: Ecosystem, window: EpisodeWindow) -> dict:
    roles = {n.name: n.role for n in ecosystem.nodes}
    pooled = pooled_episode_costs(extracts, roles, window)
    return {
        "before_days": window.before_days,
        "after_days": window.after_days,
        "hospitals": {
            hospital: {
                "stays": figures["stays"],
                "stay_cost": figures["stay_cost_cents"] / 100,
                "paid_by": {payer: cents / 100 for payer, cents in figures["paid_cents"].items()},
                "episode_cost": (figures["stay_cost_cents"] + sum(figures["paid_cents"].values())) / 100,
                "patients_with_claims": figures["patients"],
            }
            for hospital, figures in pooled.items()
        },
    }
