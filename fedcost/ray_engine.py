"""Where a simulation's sites run: a private Ray on this machine, or a Ray cluster the
researcher already has, within the run's share of it.

Flower's Simulation Engine runs each site's work in Ray actors that hold ``[simulation]
cpus_per_node`` CPUs for the whole run, and makes as many of them as the *whole cluster's*
CPUs allow (``flwr.simulation.ray_transport.ray_actor.pool_size_from_resources``): on a
shared cluster one run would take every CPU. So fedcost connects to Ray itself, before
Flower does (an address that does not answer fails here, with the reason), and holds the
engine to a ``Placement``: no more actors than sites, no more CPUs than ``max_cpus``, and
each actor reserving its share of ``max_memory_gb``. The run's actors end with the run;
the cluster itself is never stopped.
"""

from __future__ import annotations

import math
import os
import socket
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import ray
from flwr.clientapp import ClientApp
from flwr.server.superlink.fleet.vce.backend import raybackend
from flwr.simulation.ray_transport.ray_actor import BasicActorPool, ClientAppActor

from fedcost.config import SimulationSection
from fedcost.errors import RayClusterError

GIB = 2**30
PRIVATE = "local"  # Ray's name for an instance of its own: never one a `ray start` left running
CONNECT_SECONDS = 5.0


@dataclass(frozen=True)
class Placement:
    """The Ray actors a run holds: how many (each runs one site's work at a time), the CPUs
    and memory (bytes, 0 for no reservation) each reserves, and the cluster's CPUs."""

    address: str
    actors: int
    cpus: float
    memory: int
    cluster_cpus: float

    def client_resources(self) -> dict[str, float | int]:
        """Each actor's reservation, as Flower's backend config states it."""
        return {"num_cpus": self.cpus, "num_gpus": 0.0, **({"memory": self.memory} if self.memory else {})}

    def to_dict(self) -> dict[str, object]:
        return {
            "ray_address": self.address or "private",
            "actors": self.actors,
            "cpus_per_actor": self.cpus,
            "memory_gb_per_actor": round(self.memory / GIB, 3),
            "cluster_cpus": self.cluster_cpus,
        }


def actors_that_fit(nodes: Iterable[Mapping[str, float]], cpus: float, memory: int) -> int:
    """How many actors of ``cpus`` CPUs and ``memory`` bytes the cluster's nodes hold, node
    by node (an actor never spans two): the count Flower makes, held to the memory too."""
    total = 0
    for resources in nodes:
        fit = int(resources.get("CPU", 0) / cpus)
        if memory:
            fit = min(fit, int(resources.get("memory", 0) // memory))
        total += fit
    return total


def place(section: SimulationSection, sites: int, nodes: list[Mapping[str, float]]) -> Placement:
    """The run's actors on a cluster whose nodes have ``nodes``' resources: as many as the
    sites, the CPU cap and the cluster allow; raises ``RayClusterError`` where not one fits."""
    wanted = sites if math.isinf(section.max_cpus) else min(sites, int(section.max_cpus / section.cpus_per_node))
    memory = 0 if math.isinf(section.max_memory_gb) else int(section.max_memory_gb * GIB / wanted)
    fit = actors_that_fit(nodes, section.cpus_per_node, memory)
    if fit == 0:
        share = f" and {memory / GIB:.2f} GB of memory ([simulation] max_memory_gb / {wanted} actors)" if memory else ""
        raise RayClusterError(
            f"no node of the Ray cluster{_at(section.ray_address)} has {section.cpus_per_node:g} CPUs{share} for one "
            "site: lower [simulation] cpus_per_node, raise max_memory_gb, or add nodes to the cluster"
        )
    cluster_cpus = sum(resources.get("CPU", 0) for resources in nodes)
    return Placement(section.ray_address, min(wanted, fit), section.cpus_per_node, memory, cluster_cpus)


@contextmanager
def ray_engine(section: SimulationSection, sites: int) -> Iterator[Placement]:
    """Ray connected for one run, with Flower's engine held to the run's placement; the run's
    actors end and this process disconnects afterwards, the cluster keeps running."""
    _check_answers(section.ray_address)
    # Workers import fedcost as this process does (Flower passes its path on the same way).
    path = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    try:
        ray.init(
            address=section.ray_address or PRIVATE,
            runtime_env={"env_vars": {"PYTHONPATH": path}},
            logging_level="ERROR",
            log_to_driver=True,
            **({} if section.ray_address else {"include_dashboard": False}),
        )
    except ConnectionError as error:
        raise RayClusterError(
            f"cannot join the Ray cluster{_at(section.ray_address)}: {error}; start it with "
            "`ray start --head`, or fix [simulation] ray_address"
        ) from None
    try:
        placement = place(section, sites, [node["Resources"] for node in ray.nodes() if node["Alive"]])
        original = raybackend.RayBackend
        raybackend.RayBackend = _placed_backend(placement.actors)
        try:
            yield placement
        finally:
            raybackend.RayBackend = original
    finally:
        ray.shutdown()


def _placed_backend(actors: int) -> type[raybackend.RayBackend]:
    """Flower's Ray backend with a pool of ``actors`` actors instead of one per CPU of the
    cluster. Flower 1.42 builds its backend by this module attribute's name and offers no
    setting for the pool's size; ``ray_engine`` puts this class there for one run."""

    class PlacedRayBackend(raybackend.RayBackend):
        def build(self, app_fn: Callable[[], ClientApp]) -> None:
            self.pool = BasicActorPool(
                actor_type=ClientAppActor, client_resources=self.client_resources, actor_kwargs=self.actor_kwargs
            )
            self.pool.add_actors_to_pool(actors)
            self.app_fn = app_fn

    return PlacedRayBackend


def _check_answers(address: str) -> None:
    """An address with a port must accept a connection now: Ray itself retries one that does
    not for minutes before it gives up."""
    if address in ("", "auto"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as error:
        raise RayClusterError(
            f"nothing answers at {address} ({error.strerror or error}): start the cluster's head there "
            f"(`ray start --head --port={port}`), or fix [simulation] ray_address"
        ) from None


def _at(address: str) -> str:
    return {"": " on this machine", "auto": " this machine joined (auto)"}.get(address, f" at {address}")
