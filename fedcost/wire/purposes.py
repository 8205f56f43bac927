"""What each exchange between coordinator and node is for: one row per purpose.

Every request a coordinator sends after its hello has one purpose, and a purpose fixes
everything the two sides must agree on: the Flower message type it travels as, what the
reply may carry (the outputs a hello states and a site policy rules on), which of the
site's rows the reply describes (its cohort), when in a job it is asked (before
training, every round, or after the last), whether the request carries the global
model, and what the node is releasing, for its release ledger. Adding an exchange adds a
row here and a handler at each end. Pure: no Flower, so the privacy core reads it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Always shared with a model update or sum: the FedAvg weight. Never a policy metric.
EXAMPLES = "num-examples"

Cohort = Literal["train", "test", "all"]
When = Literal["before", "each", "after"]


@dataclass(frozen=True)
class Purpose:
    """One kind of exchange.

    ``message_type`` is Flower's (query, train, evaluate). ``outputs`` is what a reply
    may carry besides the site's whitelisted metrics. ``cohort``: the rows a reply
    describes (training rows, held-out rows, all rows). ``when``: ``before`` training at
    round 0, ``each`` training round 1..R, or ``after`` the last round (round R).
    ``carries_model``: the request holds the global weights and the training job.
    ``fixed_data``: the reply is a function of the site's rows alone (not of a model the
    coordinator chose), so the same release recurs in every job over the same rows.
    ``trains``: the reply is what the model is fitted from (an update, or a GLM's Newton
    sums); every other sum is a statistic, which a job may make noisy.
    """

    name: str
    message_type: str
    outputs: tuple[str, ...]
    cohort: Cohort
    when: When
    carries_model: bool
    fixed_data: bool
    trains: bool = False

    def rounds(self, job_rounds: int) -> range:
        """The rounds in which a job of ``job_rounds`` rounds may ask for this purpose."""
        if self.when == "before":
            return range(0, 1)
        if self.when == "after":
            return range(job_rounds, job_rounds + 1)
        return range(1, job_rounds + 1)


# The episode linkage: a hospital's stays' totals and, per payer, one private intersection-sum
# (each reply one step of it: blinded items, sealed shares, matched positions).
EPISODES = Purpose("episodes", "query", ("episode-sums",), "all", "before", False, True)
STATISTICS = Purpose("statistics", "query", ("sums",), "train", "before", False, True)
ANALYTICS = Purpose("analytics", "query", ("sums",), "all", "before", False, True)
TRAIN = Purpose("train", "train", ("weights", EXAMPLES), "train", "each", True, False, trains=True)
# An exact GLM's round: the score and information sums at the coordinator's coefficients.
NEWTON = Purpose("newton", "train", ("sums",), "train", "each", True, False, trains=True)
EVALUATE = Purpose("evaluate", "evaluate", ("sums",), "test", "each", True, False)
BENCHMARK = Purpose("benchmark", "evaluate", ("sums",), "all", "after", True, False)

# How a site's refusal for too few rows of a purpose's cohort begins: the coordinator
# leaves that site out of every later sum over the same cohort (its rows will not grow).
WITHHOLDS = "the site withholds this sum"

# In the order a job asks for them.
PURPOSES: dict[str, Purpose] = {
    p.name: p for p in (EPISODES, STATISTICS, ANALYTICS, TRAIN, NEWTON, EVALUATE, BENCHMARK)
}
