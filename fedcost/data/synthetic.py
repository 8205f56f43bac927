"""A seeded synthetic health-care ecosystem whose generative truth is known.

Real federations never tell you the answer; this one does, so that every estimate
fedcost makes (risk models, observed/expected ratios, cost benchmarks) can be checked
against the parameters that produced the data.

The generative model
--------------------
*One latent patient generator for everyone.* Each row is an index episode drawn as:

- ``age`` ~ N(66 + site shift, 15) in whole years, clipped to 18..100; ``sex`` 52% female;
  an unobserved *frailty* ~ N(site shift, 1) + 0.25 per decade over 65, which ties the
  clinical picture together (sicker patients have more of everything).
- ``diagnosis_group`` multinomial, older patients more often heart failure, COPD, stroke;
  ``admission_type`` depends on the diagnosis (joint replacements are elective).
- ``comorbidity_index`` Poisson in age, frailty and diagnosis; ``payer`` mostly medicare
  from 65 on, commercial or medicaid before; ``prior_admissions_12m`` Poisson and
  ``ed_visits_12m`` gamma-Poisson (over-dispersed, more for medicaid and self-pay).
- ``length_of_stay`` log-normal in diagnosis, comorbidity, frailty and emergency
  admission; ``icu_stay``, ``num_procedures`` and ``abnormal_labs`` follow diagnosis and
  severity; ``discharge_disposition`` moves to skilled nursing with age, frailty and
  long stays, to rehab after stroke and joint replacement, and against advice more
  for medicaid and self-pay; ``medication_adherence`` (PDC) is beta, lower for frail
  patients on many drugs and for self-pay; ``follow_up_7d`` is rarer after leaving
  against advice and for self-pay, commoner with home health and good adherence.

*Site case mix.* Each region draws a case-mix shift (mean age, mean frailty, diagnosis
logits, admission-type logits), and each hospital adds its own shift on top; both are
scaled by ``case_mix_shift``. Insurers and pharma nodes see the patients of their whole
region, so they take the regional shift only.

*Readmission.* ``readmitted_30d`` ~ Bernoulli(sigmoid(x'b + q)), with ``x'b`` the linear
predictor of ``READMISSION`` (LACE/HOSPITAL-score-like effects: length of stay, acuity,
comorbidity, ED visits, prior admissions, disposition, leaving against advice, low
adherence, no follow-up, diagnosis group, abnormal labs) and ``q`` the site quality effect,
drawn N(0, ``quality_effect_sd``) for hospitals and 0 for everyone else. The *expected*
risk of a row is sigmoid(x'b): what its case mix alone explains.
Hospitals whose ``q`` exceeds +1 sd are listed in ``truth["worse_hospitals"]``, those
below -1 sd in ``truth["better_hospitals"]``.

*Cost.* ``total_cost`` = price level of the region x (index-stay cost + readmission
cost if readmitted), with the index-stay cost log-normal around the log-linear mean of
``INDEX_STAY_COST`` (log length of stay, log procedures, ICU, diagnosis group,
comorbidity) and the readmission cost log-normal per ``READMISSION_COST``. Cost grows
about in proportion to the stay (a per-diem world), not exponentially in its days, so
a 90-day stay is expensive but not absurd. A share ``ZERO_COST_SHARE`` of episodes
costs exactly 0 (written off or bundled into another episode). Regional price levels
are exp(N(0, ``price_level_sd``)).

*Payment.* ``payment`` = ``DRG_BASE_RATE`` x the diagnosis group's ``DRG_WEIGHTS`` x the
region's price level: what a DRG-style payer reimburses for the episode, the same for
every episode of a group in a region, whatever it cost. The weights are set off the
groups' true costs on purpose, so margins (payment - cost) differ by group (some groups
lose money) and by site (case mix and quality within a group). Payments take no random
draw, so every other column is what it was without them. Hospitals and insurers carry
them; pharma nodes do not.

*Randomness.* ``np.random.SeedSequence(seed).spawn`` gives one stream to the ecosystem
(regional case mix, price levels) and one to each node by its position, so a node's
rows depend on the seed, its position and its own spec only.

A node's ``frame`` holds its role's schema features (``schema.ROLES[role].features``),
its accounting columns and both targets; ``latent_frames`` gives the full rows behind it (every feature, the
true risk with and without the site effect) for recovery checks.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedcost import schema

REGIONS = schema.COLUMNS["region"].levels
DIAGNOSES = schema.DIAGNOSIS_GROUPS
ADMISSIONS = schema.COLUMNS["admission_type"].levels
DISPOSITIONS = schema.COLUMNS["discharge_disposition"].levels
PAYERS = schema.COLUMNS["payer"].levels

RISK = "risk"
EXPECTED_RISK = "expected_risk"

# A model is an intercept plus coefficients on terms: "column" (as is),
# "log1p(column)", or "column=level" (indicator).
READMISSION: dict = {
    "intercept": -3.05,
    "coefficients": {
        "age": 0.006,
        "admission_type=emergency": 0.35,
        "admission_type=urgent": 0.15,
        "comorbidity_index": 0.09,
        "log1p(prior_admissions_12m)": 0.45,
        "log1p(ed_visits_12m)": 0.3,
        "log1p(length_of_stay)": 0.3,
        "discharge_disposition=home_health": 0.15,
        "discharge_disposition=skilled_nursing": 0.35,
        "discharge_disposition=rehab": 0.1,
        "discharge_disposition=against_advice": 0.9,
        "payer=medicaid": 0.2,
        "payer=self_pay": 0.1,
        "medication_adherence": -0.9,
        "follow_up_7d": -0.35,
        "abnormal_labs": 0.08,
        "icu_stay": 0.15,
        "diagnosis_group=heart_failure": 0.4,
        "diagnosis_group=copd": 0.35,
        "diagnosis_group=renal_failure": 0.35,
        "diagnosis_group=sepsis": 0.25,
        "diagnosis_group=pneumonia": 0.15,
        "diagnosis_group=acute_mi": 0.15,
        "diagnosis_group=diabetes": 0.15,
        "diagnosis_group=stroke": 0.05,
        "diagnosis_group=hip_knee_replacement": -0.6,
    },
}
INDEX_STAY_COST: dict = {
    "intercept": 6.6,
    "coefficients": {
        "log1p(length_of_stay)": 1.0,
        "log1p(num_procedures)": 0.4,
        "icu_stay": 1.0,
        "comorbidity_index": 0.04,
        "diagnosis_group=hip_knee_replacement": 1.0,
        "diagnosis_group=acute_mi": 0.6,
        "diagnosis_group=sepsis": 0.4,
        "diagnosis_group=stroke": 0.3,
        "diagnosis_group=renal_failure": 0.2,
        "diagnosis_group=heart_failure": 0.1,
    },
    "sigma": 0.6,
}
READMISSION_COST: dict = {
    "intercept": math.log(9000.0),
    "coefficients": {"comorbidity_index": 0.05},
    "sigma": 0.8,
}
ZERO_COST_SHARE = 0.03
DRG_BASE_RATE = 12000.0
DRG_WEIGHTS: dict[str, float] = {
    "heart_failure": 1.1,
    "copd": 0.95,
    "pneumonia": 0.95,
    "acute_mi": 2.2,
    "stroke": 1.6,
    "diabetes": 0.8,
    "sepsis": 2.0,
    "renal_failure": 1.3,
    "hip_knee_replacement": 1.9,
    "other": 0.8,
}

# Per diagnosis: shifts of (log comorbidity rate, log length of stay, ICU log-odds,
# log procedure rate) and the slope of its own logit per decade of age over 65.
_DIAGNOSIS_EFFECTS = {
    "heart_failure": (0.35, 0.15, -0.2, -0.3, 0.3),
    "copd": (0.3, 0.05, -0.3, -0.5, 0.2),
    "pneumonia": (0.15, 0.05, 0.0, -0.4, 0.1),
    "acute_mi": (0.2, 0.0, 1.0, 0.9, 0.1),
    "stroke": (0.2, 0.35, 0.6, -0.1, 0.2),
    "diabetes": (0.3, -0.1, -0.5, -0.4, -0.1),
    "sepsis": (0.25, 0.45, 1.3, 0.0, 0.1),
    "renal_failure": (0.45, 0.15, 0.2, 0.1, 0.1),
    "hip_knee_replacement": (-0.2, -0.2, -1.5, 0.9, 0.0),
    "other": (0.0, 0.0, 0.0, 0.0, -0.1),
}
_DX_CCI, _DX_LOS, _DX_ICU, _DX_PROCEDURES, _DX_AGE_SLOPE = np.array([_DIAGNOSIS_EFFECTS[dx] for dx in DIAGNOSES]).T
_DX_BASE_LOGITS = np.log([0.12, 0.08, 0.10, 0.06, 0.06, 0.07, 0.08, 0.05, 0.08, 0.30])
_ADMISSION_LOGITS = np.array(
    [[-1.5, -0.5, 2.0] if dx == "hip_knee_replacement" else [1.2, 0.0, -0.6] for dx in DIAGNOSES]
)
# Payer logits (medicare, medicaid, commercial, self_pay) before and from age 65.
_PAYER_UNDER_65 = np.array([-2.0, -0.3, 0.6, -1.4])
_PAYER_FROM_65 = np.array([2.5, -0.8, -0.6, -3.5])

# Case-mix shift per unit of ``case_mix_shift``: age (years), frailty, diagnosis logits,
# admission logits.
_CASE_MIX_SCALES = np.concatenate([[5.0, 0.3], np.full(len(DIAGNOSES), 0.5), np.full(len(ADMISSIONS), 0.5)])


@dataclass(frozen=True)
class NodeSpec:
    """One ecosystem member to simulate: its role, how many rows it holds, where it is."""

    name: str
    role: str
    rows: int
    region: str

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("A node needs a non-empty name.")
        if self.role not in schema.ROLES:
            raise ValueError(
                f"Node '{self.name}' has unknown role '{self.role}'; known roles: {', '.join(schema.ROLES)}."
            )
        if isinstance(self.rows, bool) or not isinstance(self.rows, int | np.integer) or self.rows < 1:
            raise ValueError(f"Node '{self.name}' needs a whole number of rows of at least 1, got {self.rows!r}.")
        if self.region not in REGIONS:
            raise ValueError(
                f"Node '{self.name}' has unknown region '{self.region}'; known regions: {', '.join(REGIONS)}."
            )


@dataclass(frozen=True)
class EcosystemSpec:
    """The members of a synthetic ecosystem and how much sites and regions differ."""

    nodes: tuple[NodeSpec, ...]
    quality_effect_sd: float = 0.35
    price_level_sd: float = 0.15
    case_mix_shift: float = 0.5

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ValueError("An ecosystem needs at least one node.")
        names = [node.name for node in self.nodes]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"Node names must be unique; repeated: {', '.join(duplicates)}.")
        for knob in ("quality_effect_sd", "price_level_sd", "case_mix_shift"):
            value = getattr(self, knob)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{knob} must be a finite number of at least 0, got {value!r}.")

    @classmethod
    def from_sizes(cls, sizes: Mapping[str, Sequence[int]], **knobs: float) -> EcosystemSpec:
        """Nodes named ``<role>-<i>``; the i-th node of each role sits in region i (round-robin)."""
        nodes = tuple(
            NodeSpec(f"{role}-{index + 1}", role, rows, REGIONS[index % len(REGIONS)])
            for role, counts in sizes.items()
            for index, rows in enumerate(counts)
        )
        return cls(nodes, **knobs)


@dataclass(frozen=True)
class SyntheticNode:
    """One member's data as it would hold it: its role's features and both targets."""

    name: str
    role: str
    region: str
    frame: pd.DataFrame


@dataclass(frozen=True)
class Ecosystem:
    """The nodes' data and the JSON-serialisable truth that generated it."""

    nodes: tuple[SyntheticNode, ...]
    truth: dict


@dataclass(frozen=True)
class _CaseMix:
    """Shifts of one site's patient population away from the common generator."""

    age: float
    frailty: float
    diagnosis: np.ndarray
    admission: np.ndarray

    @classmethod
    def from_normals(cls, normals: np.ndarray, shift: float) -> _CaseMix:
        scaled = normals * _CASE_MIX_SCALES * shift
        return cls(float(scaled[0]), float(scaled[1]), scaled[2 : 2 + len(DIAGNOSES)], scaled[2 + len(DIAGNOSES) :])

    def as_truth(self) -> dict:
        return {
            "age": self.age,
            "frailty": self.frailty,
            "diagnosis_logits": dict(zip(DIAGNOSES, self.diagnosis.tolist())),
            "admission_logits": dict(zip(ADMISSIONS, self.admission.tolist())),
        }


@dataclass(frozen=True)
class _World:
    """Everything drawn for one spec and seed, before projecting onto roles."""

    frames: tuple[pd.DataFrame, ...]
    case_mix: tuple[_CaseMix, ...]
    quality_effects: tuple[float, ...]
    price_levels: dict[str, float]


def linear_predictor(frame: pd.DataFrame, model: Mapping) -> np.ndarray:
    """``intercept + sum(coefficient * term)`` of a model in the form of ``READMISSION``."""
    result = np.full(len(frame), float(model["intercept"]))
    for term, coefficient in model["coefficients"].items():
        result += coefficient * _term(frame, term)
    return result


def _term(frame: pd.DataFrame, term: str) -> np.ndarray:
    if "=" in term:
        column, level = term.split("=")
        return (frame[column] == level).to_numpy(float)
    if term.startswith("log1p("):
        return np.log1p(frame[term[len("log1p(") : -1]].to_numpy(float))
    return frame[term].to_numpy(float)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _choose(rng: np.random.Generator, logits: np.ndarray) -> np.ndarray:
    """One category index per row of ``logits`` (Gumbel-max: a softmax draw, vectorised)."""
    return np.argmax(logits + rng.gumbel(size=logits.shape), axis=1)


def _poisson(rng: np.random.Generator, log_rate: np.ndarray, column: str) -> np.ndarray:
    return np.minimum(rng.poisson(np.exp(log_rate)), schema.COLUMNS[column].maximum).astype(np.int64)


def _patients(rng: np.random.Generator, n: int, case_mix: _CaseMix) -> dict[str, np.ndarray]:
    """Who is admitted: demographics, diagnosis, comorbidity, payer and prior use (as codes)."""
    age = np.clip(np.rint(rng.normal(66.0 + case_mix.age, 15.0, n)), 18, 100)
    decades = (age - 65.0) / 10.0
    frailty = rng.normal(case_mix.frailty, 1.0, n) + 0.25 * decades
    sex = (rng.random(n) < 0.48).astype(np.int64)
    dx = _choose(rng, _DX_BASE_LOGITS + case_mix.diagnosis + np.outer(decades, _DX_AGE_SLOPE))
    admission = _choose(rng, _ADMISSION_LOGITS[dx] + case_mix.admission)
    comorbidity = _poisson(rng, np.log(1.6) + 0.15 * decades + 0.35 * frailty + _DX_CCI[dx], "comorbidity_index")
    payer = _choose(rng, np.where((age >= 65)[:, None], _PAYER_FROM_65, _PAYER_UNDER_65))
    social_risk = 0.5 * (payer == PAYERS.index("medicaid")) + 0.3 * (payer == PAYERS.index("self_pay"))
    prior = _poisson(rng, -1.1 + 0.08 * comorbidity + 0.5 * frailty, "prior_admissions_12m")
    ed_rate = -0.5 + 0.06 * comorbidity + 0.45 * frailty + social_risk + np.log(rng.gamma(1.5, 1 / 1.5, n))
    return {
        "age": age,
        "sex": sex,
        "frailty": frailty,
        "diagnosis_group": dx,
        "admission_type": admission,
        "comorbidity_index": comorbidity,
        "payer": payer,
        "prior_admissions_12m": prior,
        "ed_visits_12m": _poisson(rng, ed_rate, "ed_visits_12m"),
    }


def _stays(rng: np.random.Generator, p: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What happens in and after the index stay, given the patient (``_patients``)."""
    n = len(p["age"])
    dx, cci, frailty, payer = p["diagnosis_group"], p["comorbidity_index"], p["frailty"], p["payer"]
    decades = (p["age"] - 65.0) / 10.0
    emergency = p["admission_type"] == ADMISSIONS.index("emergency")
    log_los = np.log(3.5) + _DX_LOS[dx] + 0.03 * cci + 0.15 * frailty + 0.05 * decades + 0.15 * emergency
    los = np.clip(np.rint(np.exp(log_los + rng.normal(0.0, 0.5, n))), 1, schema.COLUMNS["length_of_stay"].maximum)
    icu = (rng.random(n) < _sigmoid(-2.6 + _DX_ICU[dx] + 0.4 * frailty + 0.3 * emergency)).astype(np.int64)
    procedures = _poisson(rng, 0.1 + _DX_PROCEDURES[dx] + 0.6 * icu + 0.2 * np.log(los), "num_procedures")
    medicaid_or_self_pay = np.isin(payer, [PAYERS.index("medicaid"), PAYERS.index("self_pay")])
    disposition = _choose(
        rng,
        np.column_stack(
            [
                np.zeros(n),
                -1.2 + 0.35 * decades + 0.3 * frailty + 0.05 * cci,
                -2.6 + 0.6 * decades + 0.5 * frailty + 0.06 * cci + 0.4 * np.log(los),
                -3.0 + 1.8 * (dx == DIAGNOSES.index("stroke")) + 1.6 * (dx == DIAGNOSES.index("hip_knee_replacement")),
                -4.0 + 0.9 * medicaid_or_self_pay - 0.25 * decades,
            ]
        ),
    )
    medications = _poisson(rng, np.log(6.0) + 0.06 * cci + 0.05 * decades + 0.1 * frailty, "num_medications")
    payer_adherence = np.array([0.15, -0.2, 0.3, -0.6])[payer]
    mean_adherence = _sigmoid(1.4 - 0.35 * frailty - 0.03 * (medications - 6) + payer_adherence)
    adherence = np.round(rng.beta(6.0 * mean_adherence, 6.0 * (1.0 - mean_adherence)), 3)
    labs = _poisson(rng, -0.1 + 0.3 * frailty + 0.05 * cci + 0.6 * icu, "abnormal_labs")
    follow_up_logit = (
        np.array([0.2, 0.0, 0.3, -0.9])[payer]
        - 1.2 * (disposition == DISPOSITIONS.index("against_advice"))
        + 0.4 * (disposition == DISPOSITIONS.index("home_health"))
        + 1.0 * (adherence - 0.7)
        - 0.15 * frailty
    )
    return {
        "length_of_stay": los,
        "icu_stay": icu,
        "num_procedures": procedures,
        "discharge_disposition": disposition,
        "num_medications": medications,
        "medication_adherence": adherence,
        "abnormal_labs": labs,
        "follow_up_7d": (rng.random(n) < _sigmoid(follow_up_logit)).astype(np.int64),
    }


def _latent_frame(draws: dict[str, np.ndarray], region: str) -> pd.DataFrame:
    """Every schema feature, in schema order, with categorical codes turned into strings."""
    columns = {}
    for column in schema.FEATURES:
        if column.name == "region":
            columns[column.name] = np.full(len(draws["age"]), region, dtype=object)
        elif column.kind == "categorical":
            columns[column.name] = np.asarray(column.levels, dtype=object)[draws[column.name]]
        else:
            columns[column.name] = draws[column.name]
    return pd.DataFrame(columns)


def _outcomes(rng: np.random.Generator, frame: pd.DataFrame, quality_effect: float, price_level: float) -> None:
    """Add the true risks and both targets to ``frame`` (in place)."""
    n = len(frame)
    case_mix_logit = linear_predictor(frame, READMISSION)
    frame[EXPECTED_RISK] = _sigmoid(case_mix_logit)
    frame[RISK] = _sigmoid(case_mix_logit + quality_effect)
    readmitted = (rng.random(n) < frame[RISK].to_numpy()).astype(np.int64)
    index_cost = np.exp(linear_predictor(frame, INDEX_STAY_COST) + rng.normal(0.0, INDEX_STAY_COST["sigma"], n))
    readmission_cost = np.exp(linear_predictor(frame, READMISSION_COST) + rng.normal(0.0, READMISSION_COST["sigma"], n))
    cost = price_level * (index_cost + readmitted * readmission_cost) * (rng.random(n) >= ZERO_COST_SHARE)
    frame[schema.READMISSION] = readmitted
    frame[schema.COST] = np.round(cost, 2)
    weights = frame[schema.DISEASE_GROUP].map(DRG_WEIGHTS).to_numpy(dtype="float64")
    frame[schema.PAYMENT] = np.round(DRG_BASE_RATE * weights * price_level, 2)


def _simulate(spec: EcosystemSpec, seed: int) -> _World:
    ecosystem_seed, *node_seeds = np.random.SeedSequence(seed).spawn(1 + len(spec.nodes))
    ecosystem_rng = np.random.default_rng(ecosystem_seed)
    regional_normals = dict(zip(REGIONS, ecosystem_rng.standard_normal((len(REGIONS), len(_CASE_MIX_SCALES)))))
    price_levels = dict(
        zip(REGIONS, np.exp(spec.price_level_sd * ecosystem_rng.standard_normal(len(REGIONS))).tolist())
    )
    frames, case_mixes, quality_effects = [], [], []
    for node, node_seed in zip(spec.nodes, node_seeds):
        rng = np.random.default_rng(node_seed)
        normals, quality_effect = regional_normals[node.region], 0.0
        if node.role == "hospital":
            normals = normals + rng.standard_normal(len(_CASE_MIX_SCALES))
            quality_effect = spec.quality_effect_sd * float(rng.standard_normal())
        case_mix = _CaseMix.from_normals(normals, spec.case_mix_shift)
        patients = _patients(rng, node.rows, case_mix)
        frame = _latent_frame(patients | _stays(rng, patients), node.region)
        _outcomes(rng, frame, quality_effect, price_levels[node.region])
        frames.append(frame)
        case_mixes.append(case_mix)
        quality_effects.append(quality_effect)
    return _World(tuple(frames), tuple(case_mixes), tuple(quality_effects), price_levels)


def latent_frames(spec: EcosystemSpec, seed: int) -> dict[str, pd.DataFrame]:
    """The full rows behind each node of ``generate_ecosystem(spec, seed)``, by node name.

    Every schema feature, both targets, and the true readmission risk with (``risk``) and
    without (``expected_risk``) the site quality effect; no real node has these.
    """
    return {node.name: frame for node, frame in zip(spec.nodes, _simulate(spec, seed).frames)}


def generate_ecosystem(spec: EcosystemSpec, seed: int) -> Ecosystem:
    """Simulate every node of ``spec`` from ``seed``; each node keeps only its role's features."""
    world = _simulate(spec, seed)
    nodes = tuple(
        SyntheticNode(node.name, node.role, node.region, _project(frame, node.role))
        for node, frame in zip(spec.nodes, world.frames)
    )
    return Ecosystem(nodes, _truth(spec, seed, world))


def _project(frame: pd.DataFrame, role: str) -> pd.DataFrame:
    return frame[[*schema.ROLES[role].features, *schema.ROLES[role].accounting, schema.READMISSION, schema.COST]].copy()


def _spec_truth(spec: EcosystemSpec) -> dict:
    return {
        "nodes": [{"name": n.name, "role": n.role, "rows": int(n.rows), "region": n.region} for n in spec.nodes],
        "quality_effect_sd": float(spec.quality_effect_sd),
        "price_level_sd": float(spec.price_level_sd),
        "case_mix_shift": float(spec.case_mix_shift),
    }


def _truth(spec: EcosystemSpec, seed: int, world: _World) -> dict:
    quality = {node.name: effect for node, effect in zip(spec.nodes, world.quality_effects) if node.role == "hospital"}
    return {
        "seed": int(seed),
        "spec": _spec_truth(spec),
        "readmission": copy.deepcopy(READMISSION),
        "quality_effects": quality,
        "worse_hospitals": [name for name, q in quality.items() if q > spec.quality_effect_sd],
        "better_hospitals": [name for name, q in quality.items() if q < -spec.quality_effect_sd],
        "price_levels": world.price_levels,
        "cost": {
            "index_stay": copy.deepcopy(INDEX_STAY_COST),
            "readmission": copy.deepcopy(READMISSION_COST),
            "zero_share": ZERO_COST_SHARE,
        },
        "payment": {
            "formula": "base_rate * group_weights[diagnosis_group] * price_levels[region]",
            "base_rate": DRG_BASE_RATE,
            "group_weights": dict(DRG_WEIGHTS),
            "roles": [role.name for role in schema.ROLES.values() if schema.PAYMENT in role.accounting],
        },
        "nodes": {
            node.name: {
                "role": node.role,
                "region": node.region,
                "rows": int(node.rows),
                "readmission_rate": float(frame[schema.READMISSION].mean()),
                "expected_readmission_rate": float(frame[EXPECTED_RISK].mean()),
                "mean_cost": float(frame[schema.COST].mean()),
                "case_mix": case_mix.as_truth(),
            }
            for node, frame, case_mix in zip(spec.nodes, world.frames, world.case_mix)
        },
    }
