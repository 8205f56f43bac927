"""Site control at the node: the job a coordinator states, checked against the site policy.

The coordinator states the whole job in its hello (``fedcost.wire.hello.Hello``): its key
id, rounds, secure aggregation, model size, the smallest cohort, each purpose with what
its replies carry, and every statistics table. The node checks that plan against its
policy before it reads any data and keeps the accepted plan in its Flower context;
every later request must be part of it (purpose, round, transport, model, table) and is
checked against the policy again. Everything here raises ``PolicyViolationError`` with a
reason that is safe to send: it names rules, never data.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord

from fedcost.analytics import GroupedStatisticsLayout
from fedcost.analytics.statistics import SITE
from fedcost.data.features import StatisticsLayout
from fedcost.data.mapping import DataMapping
from fedcost.errors import ConfigError, DataMismatchError, PolicyViolationError
from fedcost.linkage.episodes import HOSPITAL, EpisodePlan
from fedcost.privacy import MIN_COHORT, JobRequest, PrivacySettings, SitePolicy, check_job
from fedcost.privacy.accounting import PrivacyLedger
from fedcost.privacy.distributed import plan_epsilon
from fedcost.wire import records as rec
from fedcost.wire.hello import Hello
from fedcost.wire.purposes import WITHHOLDS, Purpose
from fedcost.wire.requests import Request

_refusal = PolicyViolationError.job_refused

ACCEPTED_JOB = "site-job"  # where the accepted hello lives in the node's Flower context state
DEFAULT_MAX_ROUNDS = 10_000
# The largest model weight a node trains or scores with: a global model of larger weights
# is not one a federation trained, and it would overflow a site's arithmetic.
MAX_ABS_WEIGHT = 1e4


def site_policy(path: Path | None, hello: Hello) -> SitePolicy:
    """The site's policy file, or the permissive default for a site that has none.

    The default trusts the coordinator that sent the job, allows any number of rounds,
    no DP and the episode linkage when the job asks for it (a site with a policy file
    takes part only where its file says so), but still never lets a statistic describe
    fewer than ``MIN_COHORT`` rows, shares no metric but the training loss, and holds the
    job to secure aggregation if the job turned it on (a later plain request is refused).
    """
    if path is not None:
        return SitePolicy.load(path)
    return SitePolicy(
        coordinator=hello.coordinator,
        privacy=PrivacySettings(epsilon=math.inf),
        max_rounds=DEFAULT_MAX_ROUNDS,
        require_secure_aggregation=hello.secure_aggregation,
        min_cohort=MIN_COHORT,
        metrics={"train-loss": 6},
        share_episodes="episodes" in hello.outputs,
    )


def job_request(hello: Hello, purpose: str, *, secure: bool | None = None, parameters: int | None = None) -> JobRequest:
    """What the site policy rules on for one purpose of the plan."""
    return JobRequest(
        kind=purpose,
        coordinator=hello.coordinator,
        rounds=hello.rounds,
        secure_aggregation=hello.secure_aggregation if secure is None else secure,
        min_cohort=hello.min_cohort,
        outputs=hello.outputs[purpose],
        model_parameters=hello.model_parameters if parameters is None else parameters,
    )


def check_plan(policy: SitePolicy, hello: Hello, name: str) -> list[GroupedStatisticsLayout]:
    """Every purpose of the plan must pass the site policy, and every table must be one the
    node (called ``name``) can compute; returns the plan's tables.

    A table by site shows each site's cells beside the others' (secure aggregation hides
    nothing of them): only a site whose policy shares such tables answers it, and only one
    that names this node once."""
    linked = episode_plan(hello) if "episodes" in hello.outputs else None
    if linked is not None and name in (*linked.hospitals, *linked.payers):
        check_job(policy, job_request(hello, "episodes"))
        if policy.privacy.statistics is not None:
            raise _refusal(
                "the episode linkage releases exact sums, and this site releases sums other than training "
                "updates only with distributed DP noise ([privacy.statistics]): leave episodes out of the job"
            )
    for purpose in (p for p in hello.purposes if p != "episodes"):
        check_job(policy, job_request(hello, purpose))
    if len(set(hello.tables)) != len(hello.tables):
        raise _refusal("the plan states one statistics table twice")
    tables = plan_tables(hello)
    for table in (t for t in tables if SITE in t.group_by):
        if not policy.share_site_tables:
            raise _refusal(
                f"its table by {', '.join(table.group_by)} would show this site's own cells beside the "
                "other sites'; this site does not share such tables (share_site_tables = false)"
            )
        if name not in table.sites:
            raise _refusal("its table by site does not name this site among its sites")
    return tables


def check_data(hello: Hello, mapping: DataMapping) -> None:
    """The job's ``[data]`` must be this site's data: the same targets, and the same extra
    columns (levels, order) as the site's mapping declares, or no shared sum lines up.
    Refused at the hello, naming the field, before the site reads a row."""
    if not hello.data:
        return
    ours = StatisticsLayout(mapping.feature_columns, tuple(mapping.targets)).data_section()
    try:
        job = json.loads(hello.data)
    except ValueError:
        job = None
    if not isinstance(job, dict) or set(job) != set(ours):
        raise _refusal(f"the hello's data section is not one of {', '.join(ours)}")
    for field, theirs in job.items():
        if theirs != ours[field]:
            raise DataMismatchError(
                f"the site refuses this job: its [data] {field} {_difference(theirs, ours[field])} "
                f"({_MAPPED[field]} in {mapping.path.name}); every site's mapping must declare what the job's [data] "
                "says: fix the job, or this site's mapping and restart its node"
            )


_MAPPED = {
    "targets": "[targets.*]",
    "extra_numeric": "[features] numeric",
    "extra_categorical": "[features] categorical",
}


def _difference(job: object, site: object) -> str:
    """What the job's value of a ``[data]`` field says that the site's mapping does not."""
    if isinstance(job, dict) and isinstance(site, dict):
        for name in sorted(job.keys() | site.keys()):
            if job.get(name) != site.get(name):
                return (
                    f"gives {name!r} the levels {_listed(job[name])}, this site's mapping {_listed(site[name])}"
                    if name in job and name in site
                    else _difference(list(job), list(site))
                )
    if isinstance(job, list) and isinstance(site, list):
        missing, extra = [x for x in job if x not in site], [x for x in site if x not in job]
        if missing:
            return f"lists {missing[0]!r}, which this site's mapping does not declare"
        if extra:
            return f"does not list {extra[0]!r}, which this site's mapping declares"
        return f"lists {_listed(job)}, in another order than this site's mapping ({_listed(site)})"
    return f"is {job!r:.60}, not a list of names"


def _listed(values: object) -> str:
    return ", ".join(map(str, values)) if isinstance(values, list) else repr(values)[:60]


def check_noise(policy: SitePolicy, hello: Hello, releases: list[int]) -> None:
    """A site that releases statistics only with distributed DP noise needs a job that adds
    enough: its noisy sums (``releases``: the most slots one row changes in each) together
    spend at most the site's ``[privacy.statistics] epsilon``. Noise travels only under
    secure aggregation, where the sum over the sites carries every site's share."""
    required = policy.privacy.statistics
    if hello.noise is None:
        if required is not None:
            raise _refusal(
                "this site releases sums other than training updates only with distributed DP noise "
                f"([privacy.statistics] epsilon = {required.epsilon:g}); the job adds none: set the job's "
                "[statistics_privacy] epsilon"
            )
        return
    if not hello.secure_aggregation:
        raise _refusal("its noisy sums would travel without secure aggregation, where one site's share is no noise")
    if required is not None:
        assert policy.privacy.delta is not None  # a statistics budget needs DP, hence delta
        spent = plan_epsilon(hello.noise, touched=releases, delta=policy.privacy.delta)
        if spent > required.epsilon:
            raise _refusal(
                f"its noise spends epsilon={spent:.3g} at delta={policy.privacy.delta:g} over its {len(releases)} "
                f"noisy sums; this site allows {required.epsilon:g} ([privacy.statistics] epsilon)"
            )


def episode_plan(hello: Hello) -> EpisodePlan:
    """The accepted job's episode linkage; a plan this node cannot read is refused."""
    try:
        return EpisodePlan.from_json(hello.episodes, hello.run_id, hello.min_cohort)
    except ValueError as error:
        raise _refusal(str(error)) from None


def check_linkage_request(policy: SitePolicy, hello: Hello, request: Request, name: str, role: str) -> EpisodePlan:
    """A step of the episode linkage: part of the accepted plan, for this node's part in it,
    and still within the policy; returns the plan."""
    if "episodes" not in hello.outputs:
        raise _refusal("the request's purpose 'episodes' is not part of the accepted job")
    plan = episode_plan(hello)
    stage, peer = str(request.config[rec.STAGE]), str(request.config[rec.PEER])
    ours, theirs = (
        (plan.hospitals, plan.payers) if stage in ("totals", "offer", "report") else (plan.payers, plan.hospitals)
    )
    if name not in ours or (stage != "totals" and peer not in theirs):
        raise _refusal(f"its {stage} step does not fit this site's part in the accepted episode linkage")
    if (role == HOSPITAL) != (name in plan.hospitals):
        raise _refusal(f"the accepted episode linkage gives this {role} site the part of another role")
    check_job(policy, job_request(hello, "episodes"))
    return plan


def check_newton_noise(policy: SitePolicy, hello: Hello, spent: PrivacyLedger | None, releases: list[int]) -> None:
    """A site with a DP budget answers an exact GLM's Newton rounds only with distributed DP
    noise on their sums, and only if its budget left (``spent``: its ledger so far, and the
    rounds other open runs hold) pays for every round the plan states, after the plan's
    noisy statistics (``releases``: the most slots one row changes in each). A site without
    a budget adds its share and pays nothing."""
    noise = hello.newton_noise
    if "newton" not in hello.outputs or (noise is None and spent is None):
        return
    if noise is None:
        assert spent is not None
        raise _refusal(
            f"an exact GLM's Newton sums would carry no noise, and this site releases only with DP ([privacy] "
            f"epsilon = {spent.epsilon_budget:g}, of which {spent.epsilon:.3g} is spent): set the job's "
            '[glm_privacy] epsilon to at most what is left, or fit the glm with [model] fit = "fedavg"'
        )
    if not hello.secure_aggregation:
        raise _refusal(
            "its noisy Newton sums would travel without secure aggregation, where one site's share is no noise"
        )
    if spent is None:
        return
    statistics = [hello.noise.release(t) for t in releases] if hello.noise is not None else []
    after = spent.epsilon_after_releases([*statistics, *[noise.release()] * hello.rounds])
    if after > spent.epsilon_budget:
        what = f"its {hello.rounds} Newton rounds (noise of sd {noise.sd:.3g} bounds per slot)"
        raise _refusal(
            f"{what}{' and noisy statistics' if statistics else ''} would bring this site's spend to epsilon="
            f"{after:.3g} at delta={spent.delta:g}; its budget is {spent.epsilon_budget:g}, of which "
            f"{spent.epsilon:.3g} is spent or held for other open runs' rounds: lower the job's [glm_privacy] "
            "epsilon below what is left, or its rounds"
        )


def plan_tables(hello: Hello) -> list[GroupedStatisticsLayout]:
    """The statistics tables of an accepted plan, in its order."""
    return [_layout(table) for table in hello.tables]


def accepted_hello(context_state: object) -> Hello:
    """The plan this node accepted at its hello; a request before an accepted hello is refused."""
    record = context_state[ACCEPTED_JOB] if ACCEPTED_JOB in context_state else None  # type: ignore[operator,index]
    if record is None:
        raise _refusal("no accepted job; a coordinator starts with a hello the site accepts")
    return Hello.from_record(record)


def check_request(policy: SitePolicy, hello: Hello, request: Request) -> None:
    """A request after the hello: part of the accepted plan, and still within the policy."""
    purpose = request.purpose
    assert purpose is not None and request.round is not None  # read_request fixed both for contributions
    if purpose.name not in hello.outputs:
        raise _refusal(f"the request's purpose {purpose.name!r} is not part of the accepted job")
    if request.round not in purpose.rounds(hello.rounds):
        rounds = purpose.rounds(hello.rounds)
        raise _refusal(
            f"it asks for round {request.round} of {purpose.name}; the accepted job of {hello.rounds} rounds asks "
            f"for it in round{'s' if len(rounds) > 1 else ''} {rounds.start}"
            + (f" to {rounds.stop - 1}" if len(rounds) > 1 else "")
        )
    secure = request.transport == rec.SECURE
    if hello.secure_aggregation and not secure:
        raise _refusal("it switches secure aggregation off after a job that had it on")
    parameters = _check_weights(request.weights) if request.weights is not None else 0
    if parameters > hello.model_parameters:
        raise _refusal(f"its model has {parameters} parameters; the accepted job stated {hello.model_parameters}")
    if purpose.name == "analytics" and str(request.config[rec.JOB]) not in hello.tables:
        raise _refusal("it asks for a statistics table the accepted job did not state")
    check_job(policy, job_request(hello, purpose.name, secure=secure, parameters=parameters))


def request_layout(request: Request) -> GroupedStatisticsLayout:
    return _layout(str(request.config[rec.JOB]))


def _layout(table: str) -> GroupedStatisticsLayout:
    """A statistics table the plan states; one this node cannot read is refused."""
    try:
        return GroupedStatisticsLayout.from_json(table)
    except ConfigError as error:
        raise _refusal(f"its statistics layout is invalid: {error}") from None


def _check_weights(weights: ArrayRecord) -> int:
    """The number of model parameters a request carries; weights that are not finite
    floats of at most ``MAX_ABS_WEIGHT`` are refused."""
    total = 0
    for array in (a.numpy() for a in weights.values()):
        if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
            raise _refusal("its model weights are not finite floating-point numbers")
        if array.size and float(np.abs(array).max()) > MAX_ABS_WEIGHT:
            raise _refusal(f"its model weights exceed ±{MAX_ABS_WEIGHT:g}; no federation trains such a model")
        total += array.size
    return total


def purpose_rows(purpose: Purpose, train: int, test: int) -> int:
    """The rows a reply of ``purpose`` describes: its cohort."""
    return {"train": train, "test": test, "all": train + test}[purpose.cohort]


def check_cohort(policy: SitePolicy, cohort: int) -> None:
    """Refuse a sum over fewer rows than the site's ``min_cohort`` before anything else (for a
    secure sum, at its first stage): the egress guard would stop its contribution anyway, and
    a site gone after the keys were shared costs every other site a recovery, or the sum an
    abort and a retry. The reason does not say how many rows (a small count itself)."""
    if cohort < policy.min_cohort:
        raise PolicyViolationError(f"{WITHHOLDS}: a cohort smaller than the site's min_cohort ({policy.min_cohort})")
