"""Site control at the node: the job a coordinator asks for, checked against the site policy.

The coordinator states the whole job in its hello (rounds, secure aggregation, model
size, the outputs of each kind of request, the smallest cohort, its own key id). The
node checks that job against its policy before it reads any data and keeps the accepted
job in its Flower context; every later request must stay inside it (its round, its
transport, its model) and is checked against the policy again. Everything here raises
``PolicyViolationError`` with a reason that is safe to send: it names rules, never data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message

from fedcost.wire import records as rec
from fedcost.errors import PolicyViolationError
from fedcost.privacy import MIN_COHORT, JobRequest, PrivacySettings, SitePolicy, check_job

# The hello's job fields (besides transport and run id); ``outputs.<kind>`` lists what
# each kind of request (statistics, train, evaluate) sends back.
HELLO_FIELDS = ("run_id", "coordinator", "secure_aggregation", "rounds", "min_cohort", "model_parameters")
OUTPUTS = "outputs."
PURPOSES = ("statistics", "train", "evaluate", "analytics", "benchmark")
# Requests that come before any training, at round 0; the others name a training round.
BEFORE_TRAINING = ("statistics", "analytics")
ACCEPTED_JOB = "site-job"  # where the accepted job lives in the node's Flower context state
DEFAULT_MAX_ROUNDS = 10_000


@dataclass(frozen=True)
class AcceptedJob:
    """The job of a hello, as the node accepted it; later requests must stay inside it."""

    coordinator: str
    secure_aggregation: bool
    rounds: int
    min_cohort: int
    model_parameters: int
    outputs: Mapping[str, tuple[str, ...]]

    def requests(self) -> list[JobRequest]:
        """One ``check_job`` request per kind of request the job will send."""
        return [self.request(kind) for kind in self.outputs]

    def request(self, kind: str, *, rounds: int | None = None, secure: bool | None = None,
                model_parameters: int | None = None) -> JobRequest:
        return JobRequest(
            kind=kind,
            coordinator=self.coordinator,
            rounds=self.rounds if rounds is None else rounds,
            secure_aggregation=self.secure_aggregation if secure is None else secure,
            min_cohort=self.min_cohort,
            outputs=self.outputs[kind],
            model_parameters=self.model_parameters if model_parameters is None else model_parameters,
        )

    def to_record(self) -> ConfigRecord:
        fields = {
            "coordinator": self.coordinator,
            "secure_aggregation": self.secure_aggregation,
            "rounds": self.rounds,
            "min_cohort": self.min_cohort,
            "model_parameters": self.model_parameters,
        }
        return ConfigRecord({**fields, **{OUTPUTS + kind: list(outputs) for kind, outputs in self.outputs.items()}})


def hello_job(config: ConfigRecord) -> AcceptedJob:
    """The job a hello states; a hello that hides part of it, or adds anything, is refused.

    The node reads only fields it knows: an unknown field (a subgroup filter, a query)
    is a request the site never agreed to answer.
    """
    known = {rec.TRANSPORT, *HELLO_FIELDS}
    for key in config:
        if key not in known and not key.startswith(OUTPUTS):
            raise _refusal(f"the hello asks for {key!r}, which this node does not know")
    missing = [key for key in HELLO_FIELDS if key not in config]
    if missing:
        raise _refusal(f"the hello does not state the job's {', '.join(missing)}; a site accepts only a stated job")
    outputs = {key.removeprefix(OUTPUTS): config[key] for key in config if key.startswith(OUTPUTS)}
    if not outputs:
        raise _refusal("the hello states no outputs; a site accepts only a stated job")
    for kind, names in outputs.items():
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise _refusal(f"the hello's outputs of {kind!r} must be a list of output names")
    return AcceptedJob(
        coordinator=str(config["coordinator"]),
        secure_aggregation=config["secure_aggregation"] is True,
        rounds=config["rounds"],  # type: ignore[arg-type]  # check_job refuses a non-integer
        min_cohort=config["min_cohort"],  # type: ignore[arg-type]
        model_parameters=config["model_parameters"],  # type: ignore[arg-type]
        outputs={kind: tuple(names) for kind, names in outputs.items()},  # type: ignore[arg-type]
    )


def accepted_job(record: ConfigRecord | None) -> AcceptedJob:
    """The job this node accepted at its hello; a request before an accepted hello is refused."""
    if record is None:
        raise _refusal("no accepted job; a coordinator starts with a hello the site accepts")
    outputs = {key.removeprefix(OUTPUTS): tuple(record[key]) for key in record if key.startswith(OUTPUTS)}
    return AcceptedJob(
        coordinator=str(record["coordinator"]),
        secure_aggregation=bool(record["secure_aggregation"]),
        rounds=int(record["rounds"]),  # type: ignore[arg-type]
        min_cohort=int(record["min_cohort"]),  # type: ignore[arg-type]
        model_parameters=int(record["model_parameters"]),  # type: ignore[arg-type]
        outputs=outputs,  # type: ignore[arg-type]
    )


def site_policy(path: Path | None, job: AcceptedJob) -> SitePolicy:
    """The site's policy file, or the permissive default for a site that has none.

    The default trusts the coordinator that sent the job, allows any number of rounds
    and no DP, but still never lets a statistic describe fewer than ``MIN_COHORT`` rows,
    shares no metric but the training loss, and holds the job to secure aggregation if
    the job turned it on (a later plain request is refused).
    """
    if path is not None:
        return SitePolicy.load(path)
    return SitePolicy(
        coordinator=job.coordinator,
        privacy=PrivacySettings(epsilon=math.inf),
        max_rounds=DEFAULT_MAX_ROUNDS,
        require_secure_aggregation=job.secure_aggregation,
        min_cohort=MIN_COHORT,
        metrics={"train-loss": 6},
    )


def check_hello(policy: SitePolicy, job: AcceptedJob) -> None:
    """Every kind of request the job states must pass the site policy."""
    for request in job.requests():
        check_job(policy, request)


def check_request(policy: SitePolicy, job: AcceptedJob, message: Message) -> None:
    """A request after the hello: inside the accepted job, and still within the policy."""
    config = message.content[rec.CONFIG]
    transport = config.get(rec.TRANSPORT)
    if transport not in (rec.PLAIN, rec.SECURE):
        raise _refusal(f"unknown request type {str(transport)!r:.40}; a node answers hello, plain, secagg and close")
    purpose = config.get(rec.PURPOSE)
    if purpose not in PURPOSES or purpose not in job.outputs:
        raise _refusal(f"the request's purpose {str(purpose)!r:.40} is not part of the accepted job")
    round_ = config.get(rec.ROUND)
    first = 0 if purpose in BEFORE_TRAINING else 1
    if isinstance(round_, bool) or not isinstance(round_, int) or not first <= round_ <= job.rounds:
        raise _refusal(f"it asks for round {round_!r:.20} of a job of {job.rounds} rounds")
    parameters = _check_weights(message)
    if parameters > job.model_parameters:
        raise _refusal(f"its model has {parameters} parameters; the accepted job stated {job.model_parameters}")
    secure = transport == rec.SECURE
    if job.secure_aggregation and not secure:
        raise _refusal("it switches secure aggregation off after a job that had it on")
    check_job(policy, job.request(purpose, secure=secure, model_parameters=parameters))


def _check_weights(message: Message) -> int:
    """The number of model parameters a request carries; NaN or infinite weights are refused."""
    if rec.ARRAYS not in message.content:
        return 0
    arrays = [array.numpy() for array in message.content[rec.ARRAYS].values()]
    for array in arrays:
        if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
            raise _refusal("its model weights are not finite floating-point numbers")
    return sum(array.size for array in arrays)


def _refusal(reason: str) -> PolicyViolationError:
    return PolicyViolationError(f"the site policy refuses this job: {reason}")
