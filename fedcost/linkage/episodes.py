"""Episode cost and value per hospital: its stays plus every payer's intersection-sum.

Each site is an ``EpisodeSite`` holding its own extract and identity key; the coordinator
(``link_episodes``) only relays what the sites hand it and adds up shares. A site first
accepts the plan (the window, the parties, the smallest cohort) against its own policy
and refuses it with the reason when it does not share episode costs. A hospital then
releases its stays' count, cost and readmissions (only for at least ``min_cohort``
stays), and runs one intersection-sum with every payer, each with fresh keys, shuffles
and shares.

Per hospital: episode cost = stay cost + what each payer paid within the windows; mean per
stay; and value = (1 - readmission rate) / mean episode cost, as a value index against
the federation (the released hospitals pooled), which is therefore 1 for the federation.
The index is not risk-adjusted: it compares case mixes as they are.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import pandas as pd
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedcost.errors import FederationError, PolicyViolationError
from fedcost.linkage.intersection_sum import Answer, HospitalSide, Offer, Report, Session, Shares, add_up, answer_offer
from fedcost.linkage.windows import Claims, EpisodeWindow, Stays

HOSPITAL = "hospital"
PAYER_ROLES = ("insurer", "pharma")


@dataclass(frozen=True)
class EpisodePlan:
    """What every site accepts before it reads its extract."""

    run_id: str
    window: EpisodeWindow
    min_cohort: int
    hospitals: tuple[str, ...]
    payers: tuple[str, ...]

    @classmethod
    def linking(cls, run_id: str, window: EpisodeWindow, min_cohort: int, roles: Mapping[str, str]) -> EpisodePlan:
        """The plan linking every hospital of ``roles`` (site name: role) with every insurer
        and pharma site; ``ValueError`` if either side is empty."""
        hospitals = tuple(sorted(name for name, role in roles.items() if role == HOSPITAL))
        payers = tuple(sorted(name for name, role in roles.items() if role in PAYER_ROLES))
        if not hospitals or not payers:
            raise ValueError("episodes need a hospital's stays and an insurer's or pharma site's claims")
        return cls(run_id, window, min_cohort, hospitals, payers)

    def to_json(self) -> str:
        """The plan as a hello states it (the run id and smallest cohort are the hello's own)."""
        fields = {
            "before_days": self.window.before_days,
            "after_days": self.window.after_days,
            "hospitals": list(self.hospitals),
            "payers": list(self.payers),
        }
        return json.dumps(fields, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, run_id: str, min_cohort: int) -> EpisodePlan:
        """A hello's episode plan, read strictly; ``ValueError`` says what is wrong."""
        try:
            raw = json.loads(text)
        except ValueError:
            raw = None
        keys = {"before_days", "after_days", "hospitals", "payers"}
        if not isinstance(raw, dict) or set(raw) != keys:
            raise ValueError(f"its episode plan must state exactly {', '.join(sorted(keys))}")
        parties = [raw["hospitals"], raw["payers"]]
        if not all(isinstance(names, list) and all(isinstance(n, str) for n in names) for names in parties):
            raise ValueError("its episode plan's hospitals and payers must be lists of site names")
        if set(raw["hospitals"]) & set(raw["payers"]) or not raw["hospitals"] or not raw["payers"]:
            raise ValueError("its episode plan needs hospitals and payers, no site both")
        window = EpisodeWindow(raw["before_days"], raw["after_days"])
        return cls(run_id, window, min_cohort, tuple(raw["hospitals"]), tuple(raw["payers"]))


@dataclass(frozen=True)
class StayTotals:
    """What a hospital releases of its own stays."""

    stays: int
    cost_cents: int
    readmitted: int


@dataclass
class EpisodeSite:
    """One party's side: its extract (``Stays`` for a hospital, ``Claims`` for a payer),
    identity key, the roster's public identity keys, and its policy's rules."""

    name: str
    role: str
    extract: Stays | Claims
    identity: Ed25519PrivateKey
    roster: dict[str, Ed25519PublicKey]
    shares_episodes: bool
    min_cohort: int
    # A hospital's sessions between its offer and its report, by payer (``HospitalSide.export``):
    # a node that answers each message afresh keeps them in its own state between messages.
    sessions: dict[str, bytes] = field(default_factory=dict)
    _plan: EpisodePlan | None = field(default=None, init=False)

    def accept(self, plan: EpisodePlan) -> None:
        """Check the plan against the site's policy; a refusal says which rule."""
        if not self.shares_episodes:
            raise PolicyViolationError(
                f"site {self.name} refuses the episode linkage: its policy does not share episode costs "
                "(set share_episodes = true in its site policy to take part)"
            )
        if self.name not in (*plan.hospitals, *plan.payers):
            raise PolicyViolationError(f"site {self.name} refuses the episode linkage: the plan does not name it")
        unknown = sorted(set(plan.hospitals + plan.payers) - set(self.roster))
        if unknown:
            raise PolicyViolationError(f"site {self.name} refuses the episode linkage: {unknown[0]} is not enrolled")
        self._plan = plan

    @property
    def plan(self) -> EpisodePlan:
        if self._plan is None:
            raise PolicyViolationError(f"site {self.name} answers the episode linkage only after accepting its plan")
        return self._plan

    @property
    def cohort(self) -> int:
        """The smallest cohort this site releases: its own rule or the plan's, the larger."""
        return max(self.min_cohort, self.plan.min_cohort)

    def stay_totals(self) -> StayTotals | None:
        """The hospital's stays, cost and readmissions; None for fewer than the cohort."""
        stays = self._stays()
        if len(stays.keys) < self.cohort:
            return None
        return StayTotals(len(stays.keys), int(stays.cost_cents.sum()), int(stays.readmitted.sum()))

    def offer(self, payer: str) -> Offer:
        """Start the session with ``payer``: fresh keys, the windows' items blinded."""
        if payer not in self.plan.payers:
            raise PolicyViolationError(f"site {self.name} refuses: {payer} is not a payer of the accepted plan")
        if payer in self.sessions:
            raise PolicyViolationError(f"site {self.name} refuses: its intersection-sum with {payer} is under way")
        session = Session(self.plan.run_id, self.name, payer)
        side = HospitalSide(
            session, self.identity, self.roster[payer], self._stays().items(self.plan.window), self.cohort
        )
        offer = side.offer()
        self.sessions[payer] = side.export()
        return offer

    def report(self, answer: Answer) -> Report:
        """The hospital's report on a payer's answer to its offer, once per offer."""
        payer = answer.session.payer
        state = self.sessions.pop(payer, None)
        if state is None:
            raise PolicyViolationError(f"site {self.name} refuses an answer to an offer it did not make")
        session = Session(self.plan.run_id, self.name, payer)
        return HospitalSide.restore(state, session, self.identity, self.roster[payer], self.cohort).report(answer)

    def answer(self, offer: Offer) -> tuple[Answer, Shares]:
        """The payer's half, for a hospital the accepted plan names."""
        if not isinstance(self.extract, Claims):
            raise PolicyViolationError(f"site {self.name} holds no claims; it answers no offer")
        hospital = offer.session.hospital
        if hospital not in self.plan.hospitals:
            raise PolicyViolationError(f"site {self.name} refuses: {hospital} is not a hospital of the accepted plan")
        session = Session(self.plan.run_id, hospital, self.name)
        return answer_offer(offer, session, self.identity, self.roster[hospital], self.extract.items())

    def _stays(self) -> Stays:
        if not isinstance(self.extract, Stays):
            raise PolicyViolationError(f"site {self.name} holds no stays; it has no episodes")
        return self.extract


@dataclass(frozen=True)
class HospitalEpisodes:
    """One hospital's episodes; figures are None where withheld (``withheld`` says why)."""

    hospital: str
    stays: int | None
    stay_cost: float | None
    payers: dict[str, float | None]
    episode_cost: float | None
    mean_per_stay: float | None
    readmission_rate: float | None
    value_index: float | None
    withheld: str = ""


@dataclass(frozen=True)
class EpisodeCosts:
    """Every hospital's episodes over one window."""

    window: EpisodeWindow
    min_cohort: int
    hospitals: tuple[HospitalEpisodes, ...]

    def frame(self) -> pd.DataFrame:
        """One row per hospital; a column per payer's share of the episode cost."""
        payers = sorted({payer for h in self.hospitals for payer in h.payers})
        frame = pd.DataFrame(
            [
                {
                    "hospital": h.hospital,
                    "stays": h.stays,
                    "stay_cost": h.stay_cost,
                    **{f"paid_by_{payer}": h.payers.get(payer) for payer in payers},
                    "episode_cost": h.episode_cost,
                    "mean_episode_cost": h.mean_per_stay,
                    "readmission_rate": h.readmission_rate,
                    "value_index": h.value_index,
                    "withheld": h.withheld,
                }
                for h in self.hospitals
            ]
        )
        return frame.astype({"stays": "Int64"})

    @property
    def note(self) -> str:
        """What the figures are, for the report and the terminal."""
        window = self.window
        return (
            f"An episode runs from {window.before_days} days before admission to {window.after_days} days after "
            "discharge: the hospital's stays plus what each insurer and pharma node paid for the same patients "
            "within it (one payment per patient and day, however many windows cover it), linked by a private "
            "intersection-sum of pseudonymous keys: no party saw another's rows or keys, and the coordinator only "
            "these sums. Value index: readmission-free stays per currency unit of episode cost over the released "
            "hospitals' pooled (1 = the federation); not risk-adjusted. A hospital of fewer than "
            f"{self.min_cohort} stays, and a payer's sum over 1 to {self.min_cohort - 1} of a hospital's "
            "patients, are withheld at the hospital."
        )

    def to_json(self) -> dict:
        return {
            "note": self.note,
            "before_days": self.window.before_days,
            "after_days": self.window.after_days,
            "min_cohort": self.min_cohort,
            "hospitals": {h.hospital: {k: v for k, v in vars(h).items() if k != "hospital"} for h in self.hospitals},
        }


class EpisodeParty(Protocol):
    """A site as the coordinator reaches it: in this process (``EpisodeSite``) or through
    the bindings (``fedcost.server``), every call one request and its reply."""

    name: str

    def accept(self, plan: EpisodePlan) -> None: ...

    def stay_totals(self) -> StayTotals | None: ...

    def offer(self, payer: str) -> Offer: ...

    def answer(self, offer: Offer) -> tuple[Answer, Shares]: ...

    def report(self, answer: Answer) -> Report: ...


def link_episodes(
    plan: EpisodePlan, sites: Sequence[EpisodeParty], roster: dict[str, Ed25519PublicKey]
) -> EpisodeCosts:
    """The coordinator's side, with the ``roster``'s public identity keys: every site accepts
    the plan (a refusal stops the linkage, naming the site and its reason), then one
    intersection-sum per hospital and payer, relayed; the coordinator adds up shares only."""
    by_name = {site.name: site for site in sites}
    for site in sites:
        try:
            site.accept(plan)
        except PolicyViolationError as refusal:
            raise FederationError(
                f"{refusal}. The episode linkage stops: every party it names must accept it; "
                "leave [analytics] episodes out, or ask the site to change its policy"
            ) from None
    rows = []
    for hospital in plan.hospitals:
        site = by_name[hospital]
        totals = site.stay_totals()
        if totals is None:
            rows.append(_withheld(hospital, "fewer stays than the small-cell rule"))
            continue
        paid: dict[str, int | None] = {}
        for payer in plan.payers:
            answer, shares = by_name[payer].answer(site.offer(payer))
            report = site.report(answer)
            paid[payer] = add_up(report.session, shares, report, roster[payer], roster[hospital])
        rows.append((hospital, totals, paid))
    return EpisodeCosts(plan.window, plan.min_cohort, _with_value(rows))


def _withheld(hospital: str, reason: str) -> HospitalEpisodes:
    return HospitalEpisodes(hospital, None, None, {}, None, None, None, None, withheld=reason)


def _with_value(rows: list) -> tuple[HospitalEpisodes, ...]:
    """Each released hospital's episode cost (added in whole cents) and value index against the
    released ones pooled; ``rows``: withheld hospitals, or (hospital, totals, cents per payer)."""
    released = [row for row in rows if not isinstance(row, HospitalEpisodes)]
    costs = {
        hospital: (totals.cost_cents + sum(cents for cents in paid.values() if cents is not None)) / 100
        for hospital, totals, paid in released
    }
    stays = sum(totals.stays for _, totals, _ in released)
    federation = _value(sum(t.readmitted for _, t, _ in released), stays, sum(costs.values())) if released else math.nan
    out = []
    for row in rows:
        if isinstance(row, HospitalEpisodes):
            out.append(row)
            continue
        hospital, totals, paid = row
        missing = sorted(payer for payer, value in paid.items() if value is None)
        note = (
            f"the part paid by {', '.join(missing)} is withheld (fewer patients than the small-cell rule)"
            if missing
            else ""
        )
        value = _value(totals.readmitted, totals.stays, costs[hospital])
        out.append(
            HospitalEpisodes(
                hospital=hospital,
                stays=totals.stays,
                stay_cost=totals.cost_cents / 100,
                payers={payer: None if cents is None else cents / 100 for payer, cents in paid.items()},
                episode_cost=costs[hospital],
                mean_per_stay=round(costs[hospital] / totals.stays, 2),
                readmission_rate=totals.readmitted / totals.stays,
                value_index=value / federation if federation > 0 else None,
                withheld=note,
            )
        )
    return tuple(out)


def _value(readmitted: int, stays: int, cost: float) -> float:
    """Readmission-free stays per currency unit of episode cost."""
    return (stays - readmitted) / cost if cost > 0 else math.nan
