"""What the episode linkage's privacy costs: the private intersection-sum of a hospital and an
insurer against the same join in the clear, on synthetic linked extracts of growing size.

Both sides are timed in the same process, alternating, so the ratio holds under load. The
private side is ``link_episodes`` on in-process sites (every X25519 blinding, seal and
signature; no network); the clear side, the pooled join of ``synthetic_episodes`` (the
truth). Also: the bytes of each message, which bound what a site's ``max_message_bytes``
must allow.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/episode_linkage_bench.py --stays 250 1000 4000
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedcost.data.synthetic import EcosystemSpec, generate_ecosystem
from fedcost.data.synthetic_episodes import generate_linked_extracts, pooled_episode_costs
from fedcost.linkage import Claims, EpisodeWindow, Stays, link_episodes
from fedcost.linkage.episodes import EpisodePlan, EpisodeSite

WINDOW = EpisodeWindow()


def _case(stays: int):
    ecosystem = generate_ecosystem(EcosystemSpec.from_sizes({"hospital": [stays], "insurer": [stays]}), seed=1)
    extracts = generate_linked_extracts(ecosystem, 1, WINDOW).extracts
    keys = {name: Ed25519PrivateKey.generate() for name in extracts}
    roster = {name: key.public_key() for name, key in keys.items()}
    roles = {n.name: n.role for n in ecosystem.nodes}
    here = Path("<bench>")
    sites = [
        EpisodeSite(
            name,
            roles[name],
            Stays.from_frame(frame, here) if roles[name] == "hospital" else Claims.from_frame(frame, here),
            keys[name],
            roster,
            shares_episodes=True,
            min_cohort=11,
        )
        for name, frame in extracts.items()
    ]
    plan = EpisodePlan("bench", WINDOW, 11, ("hospital-1",), ("insurer-1",))
    return extracts, roles, sites, roster, plan


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stays", type=int, nargs="+", default=[250, 1000, 4000])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print("| stays | hospital items | payer items | offer | answer | clear join | private | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for stays in args.stays:
        extracts, roles, sites, roster, plan = _case(stays)
        clear, private = [], []
        for _ in range(args.repeat):
            started = time.perf_counter()
            truth = pooled_episode_costs(extracts, roles, WINDOW)
            clear.append(time.perf_counter() - started)
            started = time.perf_counter()
            result = link_episodes(plan, sites, roster)
            private.append(time.perf_counter() - started)
        expected = truth["hospital-1"]["paid_cents"]["insurer-1"]
        assert round(result.hospitals[0].payers["insurer-1"] * 100) == expected, "the linkage must equal the join"
        hospital, payer = sites[0], sites[1]
        offer = hospital.offer("insurer-1")
        answer, shares = payer.answer(offer)
        items, claims = len(offer.items) // 32, len(shares.shares) // 8
        c, p = statistics.median(clear), statistics.median(private)
        print(
            f"| {stays:,} | {items:,} | {claims:,} | {len(offer.items) / 2**20:.2f} MiB | "
            f"{len(answer.sealed) / 2**20:.2f} MiB | {c:.3f} s | {p:.2f} s | {p / c:.0f}× |"
        )


if __name__ == "__main__":
    main()
