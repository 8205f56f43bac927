"""Excess readmission ratio (ERR) against raw O/E on the synthetic ecosystem's known truth.

10 seeds of an ecosystem of 12 hospitals of 150 to 8,000 stays (quality effect SD 0.35,
as the funnel benchmark in RESULTS.md), every hospital's expected readmissions from a
fitted case-mix model: scikit-learn's logistic fit of the encoded features, which the
federation's exact GLM converges to (RESULTS.md, "exact federated GLM equals pooled"),
region zeroed at scoring, as a node's ``benchmark_totals`` does. From there it is the
coordinator's own computation on the totals the sites share (n, O, E and the cost totals):
``standardised``, ``calibration`` and ``benchmark``, which fits the random intercepts and
gives ERR. Nothing is simulated between the totals and the figures.

Truth, from the generator's latent rows: a hospital's quality effect q (logit of its true
risk less logit of its risk without the effect, as tests/test_analytics_benchmarking.py
reads it), truly worse when q > 0 (precision), clearly worse when q > 1 SD (the rule of
``truth["worse_hospitals"]``, recall), and its true ratio: the sum of its patients' true
risks over the sum of their risks with q = 0 (what ERR estimates). Three ways to name the worse
hospitals, each applied to O/E and to ERR: ratio above 1 (CMS's rule for ERR), the 95%
interval wholly above 1, and the k highest ratios with k the number of clearly worse
hospitals (where precision and recall coincide). Shrinkage: the four smallest hospitals'
mean |log ratio|, how often ERR is nearer 1 than O/E, and each ratio's mean absolute error
against the true ratio on the log scale.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/err_bench.py
"""

from __future__ import annotations

import math
import time

import numpy as np
from scipy.special import expit, logit
from scipy.stats import spearmanr
from sklearn.linear_model import LogisticRegression

from fedcost import schema
from fedcost.analytics.benchmarking import benchmark, calibration, site_totals, standardised, without_site_level
from fedcost.data.features import StatisticsLayout
from fedcost.data.synthetic import EXPECTED_RISK, RISK, EcosystemSpec, latent_frames

HOSPITAL_SIZES = [150, 250, 400, 600, 900, 1300, 1800, 2500, 3500, 5000, 6500, 8000]
SMALL = 4  # the smallest hospitals, for the shrinkage figures
SEEDS = range(10)
SPEC = EcosystemSpec.from_sizes({"hospital": HOSPITAL_SIZES}, quality_effect_sd=0.35)
RULES = ("ratio > 1", "95% interval above 1", "top k")
# The funnel's flags, on O/E: above the Poisson 99.8% limit (the flag before this change), above
# the overdispersed (DerSimonian-Laird) 99.8% and 95% limits (the report's funnel column).
FUNNEL_RULES = {
    "above Poisson 99.8% limit": lambda s: s.above_998,
    "above overdispersed 99.8% limit": lambda s: s.funnel == "above 99.8% limit",
    "above overdispersed 95% limit": lambda s: s.funnel in ("above 99.8% limit", "above 95% limit"),
}


def shared_totals(seed: int) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, float]]:
    """Every hospital's totals under a fitted case-mix model, its true q and its true ratio."""
    latent = latent_frames(SPEC, seed)
    rows = {
        name: frame[[*schema.ROLES["hospital"].features, schema.READMISSION, schema.COST]]
        for name, frame in latent.items()
    }
    held = next(iter(rows.values())).columns
    layout = StatisticsLayout(tuple(c for c in schema.FEATURES if c.name in held), (schema.READMISSION, schema.COST))
    features = layout.feature_spec(np.sum([layout.local_statistics(r) for r in rows.values()], axis=0))
    encoded = {name: features.encode(r) for name, r in rows.items()}
    fit = LogisticRegression(max_iter=1000).fit(
        np.concatenate(list(encoded.values())), np.concatenate([r[schema.READMISSION] for r in rows.values()])
    )
    totals = {
        name: site_totals(
            r[schema.READMISSION],
            fit.predict_proba(without_site_level(encoded[name], features.feature_names))[:, 1],
            r[schema.COST],
            np.full(len(r), r[schema.COST].mean()),
        )
        for name, r in rows.items()
    }
    quality = {name: float(np.median(logit(f[RISK]) - logit(f[EXPECTED_RISK]))) for name, f in latent.items()}
    ratio = {name: float(f[RISK].sum() / f[EXPECTED_RISK].sum()) for name, f in latent.items()}
    return totals, quality, ratio


def flagged(sites: list, key: str, rule: str, k: int) -> set[str]:
    if rule == "ratio > 1":
        return {s.site for s in sites if getattr(s, key) > 1}
    if rule == "95% interval above 1":
        return {s.site for s in sites if getattr(s, f"{key}_low") > 1}
    return {s.site for s in sorted(sites, key=lambda s: -getattr(s, key))[:k]}


def tally_site_flags(tally: list[int], chosen: set[str], quality: dict[str, float], worse: set[str]) -> None:
    """Add one seed's flags: flagged, flagged with q > 0, clearly worse, clearly worse flagged."""
    tally[0] += len(chosen)
    tally[1] += sum(quality[name] > 0 for name in chosen)
    tally[2] += len(worse)
    tally[3] += len(chosen & worse)


def row(label: str, tally: list[int]) -> str:
    flags, true_flags, worse_total, found = tally
    precision = f"{true_flags / flags:.2f} ({true_flags}/{flags})" if flags else "n/a"
    strict = f"{found / flags:.2f}" if flags else "n/a"
    return f"| {label} | {flags} | {precision} | {found / worse_total:.2f} ({found}/{worse_total}) | {strict} |"


def main() -> None:
    started = time.perf_counter()
    counts = {(key, rule): [0, 0, 0, 0] for key in ("oe", "err") for rule in RULES}  # flags, true flags, worse, found
    counts |= {("funnel", rule): [0, 0, 0, 0] for rule in FUNNEL_RULES}
    small_log: dict[str, list[float]] = {"oe": [], "err": []}
    errors: dict[tuple[str, str], list[float]] = {
        (key, group): [] for key in ("oe", "err") for group in ("small", "all")
    }
    nearer, unshrunken_nearer, correlations = 0, 0, {"oe": [], "err": []}
    fit_seconds = []
    for seed in SEEDS:
        totals, quality, true_ratio = shared_totals(seed)
        tick = time.perf_counter()
        result = benchmark(standardised(totals), calibration=calibration(totals))
        fit_seconds.append(time.perf_counter() - tick)
        worse = {name for name, q in quality.items() if q > SPEC.quality_effect_sd}
        for key in ("oe", "err"):
            for rule in RULES:
                tally_site_flags(counts[key, rule], flagged(list(result.sites), key, rule, len(worse)), quality, worse)
            correlations[key].append(
                spearmanr([getattr(s, key) for s in result.sites], [quality[s.site] for s in result.sites]).statistic
            )
        for rule, test in FUNNEL_RULES.items():
            tally_site_flags(counts["funnel", rule], {s.site for s in result.sites if test(s)}, quality, worse)
        small = sorted(result.sites, key=lambda s: s.n)[:SMALL]
        for key in ("oe", "err"):
            for group, members in (("small", small), ("all", result.sites)):
                errors[key, group] += [abs(math.log(getattr(s, key) / true_ratio[s.site])) for s in members]
        for site in small:
            small_log["oe"].append(abs(math.log(site.oe)))
            small_log["err"].append(abs(math.log(site.err)))
            nearer += abs(math.log(site.err)) < abs(math.log(site.oe))
            unshrunken = (site.observed / site.n) / expit(logit(site.expected / site.n) + result.average_intercept)
            unshrunken_nearer += abs(math.log(site.err)) < abs(math.log(unshrunken))
        print(
            f"seed {seed}: tau {result.between_site_sd:.3f}, mu {result.average_intercept:+.3f}, "
            f"funnel tau2 {result.funnel_tau2:.4f}, worse {sorted(worse)}"
        )
    print(f"\n{len(SEEDS)} seeds, {len(HOSPITAL_SIZES)} hospitals of {min(HOSPITAL_SIZES)}-{max(HOSPITAL_SIZES)} stays")
    print("| rule | ratio | flagged | precision (q > 0) | recall (q > 1 SD) | strict precision (q > 1 SD) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for rule in RULES:
        for key, label in (("oe", "O/E"), ("err", "ERR")):
            print(row(f"{rule} | {label}", counts[key, rule]))
    for rule in FUNNEL_RULES:
        print(row(f"funnel: {rule} | O/E", counts["funnel", rule]))
    print(
        f"\nSpearman correlation of ratio with true q, mean over seeds: O/E {np.mean(correlations['oe']):.3f}, "
        f"ERR {np.mean(correlations['err']):.3f}"
    )
    total = len(small_log["oe"])
    print(
        f"{SMALL} smallest hospitals ({', '.join(map(str, HOSPITAL_SIZES[:SMALL]))} stays) x {len(SEEDS)} seeds: "
        f"mean |log O/E| {np.mean(small_log['oe']):.3f}, mean |log ERR| {np.mean(small_log['err']):.3f}; "
        f"ERR nearer 1 than O/E in {nearer}/{total}, than the unshrunken ratio to the average site "
        f"(O/n over expit(logit(E/n) + mu)) in {unshrunken_nearer}/{total}"
    )
    for group in ("small", "all"):
        print(
            f"mean |log ratio - log true ratio|, {group} hospitals: O/E {np.mean(errors['oe', group]):.3f}, "
            f"ERR {np.mean(errors['err', group]):.3f}"
        )
    print(
        f"coordinator's benchmark (with the random-intercept fit) per seed: median {np.median(fit_seconds) * 1000:.0f} ms; "
        f"whole script {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
