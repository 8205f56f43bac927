"""One benchmark cell of ``secagg_bench.py``: one system, N nodes, D parameters, in Flower's
Simulation Engine, on a no-training workload.

Kept apart from the CLI because Ray's actor processes must import it by name (the cell's
parent puts ``benchmarks/`` on ``PYTHONPATH``): functions defined in ``__main__`` would be
pickled by value along with whatever they close over.

Every node contributes the same fixed float32 vector every round (``node_vector``: uniform
in [-1, 1), seeded by the node's partition id) with weight BENCH_ROWS, and every system sends the
D-entry global model down with the request for the contribution, as a training round would.
fedcost's nodes pass their real site checks: the hello states a training job of R + 1 rounds,
and every request carries a real training job (``bench_job``: a one-feature, one-task net of
exactly D parameters) whose model the weights must fit; a node cuts its vector to the
model's shapes instead of training.
fedcost's sum is told the total weight (BENCH_ROWS * N), as a training round is told the
federation's training rows, so its masked vector is 32-bit words as in training.

Measurements (per round; the first round is a warm-up and is not reported):

* wall: ``time.perf_counter`` in the ServerApp thread around one round — Ray start-up,
  node registration and fedcost's hello exchange are outside it;
* coordinator thread CPU: ``time.thread_time`` of the ServerApp thread (the coordinator's
  own logic: SharedSums / SecAggPlusWorkflow, quantisation, unmasking, record building);
* driver process CPU: ``time.process_time`` of the driver process, which adds the
  simulation engine's threads (message routing through the in-memory link state, pickling
  messages into Ray's object store) and Ray's driver threads;
* node CPU: a client mod outermost on every ClientApp takes ``time.process_time`` deltas
  around each message inside the Ray actor process (so it includes Flower's record
  handling in the app and secaggplus_mod, not Ray's transport), summed per round and
  divided by N;
* bytes sent per node: the same mod sizes each reply's records (``reply_bytes``), summed
  per round and divided by N.

The mod appends one line per message to a log file; the cell assigns lines to rounds by
their wall-clock end time, which lies inside the round's [start, end] window.

Flower's engine pickles the ClientApp with every message it hands to a Ray actor (the
app rides in the closure of the engine's app loader). A ClientApp whose handlers are
closures is pickled by value, and cloudpickle then scans ``sys.modules`` for every
function: about 15 ms of driver CPU per message, whatever the system. Every system's
ClientApp here is therefore a ``ClientAppByRecipe``, which pickles as the module-level
function and small arguments that build it; each actor builds it once. This is a
harness fix applied to all three systems alike.
"""

from __future__ import annotations

import cProfile
import json
import logging
import os
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedcost.identity import Identity

SYSTEMS = ("plain", "fedcost", "flower")
NODE_WAIT_SECONDS = 600.0


@cache
def node_vector(partition_id: int, dim: int) -> np.ndarray:
    """The node's fixed contribution; cached so that only the warm-up round pays for it."""
    return np.random.default_rng(partition_id).uniform(-1.0, 1.0, dim).astype(np.float32)


def expected_sum(nodes: int, dim: int) -> np.ndarray:
    """The exact float64 sum of every node's vector, to check each system's result."""
    total = np.zeros(dim)
    for pid in range(nodes):
        total += np.random.default_rng(pid).uniform(-1.0, 1.0, dim).astype(np.float32)
    return total


def site_name(partition_id: int) -> str:
    return f"site-{partition_id:04d}"


# --------------------------------------------------------------------------- measurement


def _value_bytes(value: Any) -> int:
    """Bytes of one record value: bytes/str by length, numbers 8, lists element by element."""
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, (list, tuple)):
        return sum(_value_bytes(v) for v in value)
    return 8


def reply_bytes(content: Any) -> int:
    """Payload bytes of a reply's RecordDict: array data, config and metric values.

    Keys, record names and protobuf framing are not counted; they are tens of bytes
    per message, the same order for every system.
    """
    from flwr.app import ArrayRecord

    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(array.data) for array in record.values())
        else:
            total += sum(_value_bytes(v) for v in record.values())
    return total


def make_measure_mod(log_path: str) -> Callable:
    """A client mod, outermost, that logs CPU seconds and reply bytes of each message."""

    def measure_mod(message: Any, context: Any, call_next: Callable) -> Any:
        cpu = time.process_time()
        reply = call_next(message, context)
        cpu = time.process_time() - cpu
        size = reply_bytes(reply.content) if reply.has_content() else 0
        with open(log_path, "a") as out:
            out.write(f"{time.time():.6f} {context.node_id} {cpu:.6f} {size}\n")
        return reply

    return measure_mod


@dataclass
class RoundClock:
    """Clocks around each round, read in the ServerApp thread."""

    rounds: list[dict[str, float]] = field(default_factory=list)
    max_abs_error: float = float("nan")

    def timed(self, run: Callable[[], object]) -> object:
        started, wall0 = time.time(), time.perf_counter()
        thread0, process0, machine0 = time.thread_time(), time.process_time(), machine_busy_seconds()
        result = run()
        self.rounds.append(
            {
                "start": started,
                "end": time.time(),
                "wall": time.perf_counter() - wall0,
                "thread_cpu": time.thread_time() - thread0,
                "process_cpu": time.process_time() - process0,
                "machine_cpu": machine_busy_seconds() - machine0,
            }
        )
        return result


def machine_busy_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot (Linux ``/proc/stat``; NaN elsewhere).

    Every process counts: the driver, the Ray actors and Ray's own daemons, which the
    per-process clocks miss. A round's difference against wall × cores says whether
    the round is bound by the machine's CPU or waits on something else.
    """
    try:
        ticks = [int(field) for field in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return float("nan")
    user, nice, system, idle, iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class MaybeProfile:
    """cProfile of the ServerApp thread over the measured rounds, when a path is given."""

    def __init__(self, path: str | None):
        self.path = path
        self.profile = cProfile.Profile() if path else None

    def measure(self, run: Callable[[], object], warm_up: bool) -> object:
        if self.profile is None or warm_up:
            return run()
        self.profile.enable()
        try:
            return run()
        finally:
            self.profile.disable()

    def dump(self) -> None:
        if self.profile is not None and self.path:
            self.profile.dump_stats(self.path)


# --------------------------------------------------------------------------- fedcost


# Rows each benchmark node claims: the smallest cohort a site's egress guard lets a
# contribution describe; the contribution's weight is this count, as a training node's is.
BENCH_ROWS = 11
# The one feature column the benchmark's model reads (a schema numeric, so every node's
# layout has it and the site accepts a job that uses it).
BENCH_FEATURE = "age"


def bench_hidden(dim: int) -> tuple[int, ...]:
    """Hidden widths of a one-feature, one-task multitask net with exactly ``dim`` parameters.

    One hidden layer of h units has 3h + 1; (1, h) has 3h + 3; (1, 1, h) has 3h + 5: one
    of the three fits any D >= 5.
    """
    if dim < 5:
        raise ValueError(f"--dims {dim}: the benchmark's model needs at least 5 parameters")
    extra = {1: (), 0: (1,), 2: (1, 1)}[dim % 3]
    return (*extra, (dim - 1 - 2 * len(extra)) // 3)


def bench_job(nodes: int, dim: int) -> Any:
    """The training job every round asks for: a real job whose model has exactly ``dim``
    parameters, so each node's site checks its features and the weights' shapes as in training."""
    from fedcost.data.features import FeatureSpec
    from fedcost.models.nets import ModelSpec
    from fedcost.models.training import TrainConfig
    from fedcost.models.training_job import TrainingJob

    spec = ModelSpec(kind="multitask", hidden=bench_hidden(dim), tasks=("cost",), fit="fedavg")
    features = FeatureSpec(
        numeric={BENCH_FEATURE: (0.0, 1.0)},
        vocabularies={},
        flagged=(),
        log_scaled=(),
        readmission_rate=None,
        cost_scale=1.0,
        rows=BENCH_ROWS * nodes,
    )
    return TrainingJob(spec, TrainConfig(), features, 0)


def bench_weights(job: Any) -> dict[str, np.ndarray]:
    """The job's initial global model, as a training run's coordinator sends it."""
    from fedcost.models.nets import build_model

    model = build_model(job.model, job.features.n_features, seed=job.seed)
    return {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}


@dataclass(frozen=True)
class _BenchRows:
    """Stands in for ``NodeData``: the node binding reports row counts (hello, egress guard)."""

    train: tuple = (None,) * BENCH_ROWS
    test: tuple = (None,) * BENCH_ROWS


@cache
def _bench_layout(mapping: Path) -> Any:
    """The feature layout of the benchmark's mapping, as a real node derives it."""
    from fedcost.data.features import StatisticsLayout
    from fedcost.data.mapping import DataMapping

    loaded = DataMapping.load(mapping)
    return StatisticsLayout(loaded.feature_columns, tuple(loaded.targets))


@dataclass(frozen=True)
class BenchNode:
    """fedcost's node side for the benchmark: no rows, no training, a fixed vector.

    ``layout`` is the mapping's real one (the site checks the job's features against it);
    ``data``, ``data_digest`` and ``schema_digest`` stand in for the rows in the hello's
    audit entries and the release ledger's keys.
    """

    name: str
    dim: int
    layout: Any
    role: str = "hospital"
    data: _BenchRows = _BenchRows()
    data_digest: str = "benchmark"
    schema_digest: str = "benchmark"

    def contribution(self, ask: Any, dp: object = None) -> Any:
        """The node's vector cut to the shapes of the model the request carries, then the
        one-entry loss slot: a training contribution's shape."""
        from fedcost.client.node import Contribution

        vector = node_vector(int(self.name.split("-")[1]), self.dim)
        sizes = np.cumsum([array.size for array in ask.weights.values()])[:-1]
        pieces = np.split(vector, sizes)
        update = [piece.reshape(array.shape) for piece, array in zip(pieces, ask.weights.values(), strict=True)]
        return Contribution([*update, np.zeros(1)], BENCH_ROWS)


class ClientAppByRecipe:
    """A ClientApp that pickles as ``build_client_app(*recipe)`` (see the module docstring)."""

    def __init__(self, recipe: tuple):
        self.recipe = recipe
        self._app = build_client_app(*recipe)

    def __call__(self, message: Any, context: Any) -> Any:
        return self._app(message, context)

    def __reduce__(self) -> tuple:
        return (_client_app_by_recipe, (self.recipe,))


@lru_cache(maxsize=4)
def _client_app_by_recipe(recipe: tuple) -> ClientAppByRecipe:
    return ClientAppByRecipe(recipe)


@lru_cache(maxsize=4)
def build_client_app(system: str, nodes: int, dim: int, scratch: str, log_path: str) -> Any:
    """The ClientApp of ``system`` for one cell; built once per process."""
    if system == "flower":
        return _flower_client_app(nodes, dim, log_path)
    return _fedcost_client_app(nodes, dim, Path(scratch), log_path)


def _write_identity_keys(scratch: Path, nodes: int) -> None:
    """Every site's raw Ed25519 private key, for the driver and the actors to read alike."""
    keys = b"".join(Identity.generate(site_name(i), "hospital").raw_private_key for i in range(nodes))
    (scratch / "keys.bin").write_bytes(keys)


def _identity_keys(scratch: Path, nodes: int) -> dict[str, Identity]:
    raw = (scratch / "keys.bin").read_bytes()
    keys = (Ed25519PrivateKey.from_private_bytes(raw[32 * i : 32 * (i + 1)]) for i in range(nodes))
    return {site_name(i): Identity(site_name(i), "hospital", key) for i, key in enumerate(keys)}


def _roster(identities: dict[str, Identity]) -> tuple[tuple[str, bytes], ...]:
    return tuple(sorted((name, identity.public().raw_key) for name, identity in identities.items()))


def _fedcost_client_app(nodes: int, dim: int, scratch: Path, log_path: str) -> Any:
    """fedcost's ClientApp as ``fedcost.lab.simulation._federate`` builds it, behind the measuring mod."""
    from flwr.clientapp import ClientApp

    from fedcost.client.app import make_client_app
    from fedcost.client.node import NodeSetup

    keys = _identity_keys(scratch, nodes)
    roster = _roster(keys)
    mapping, policy = scratch / "mapping.toml", scratch / "policy.toml"
    setups = [
        NodeSetup(
            mapping,
            site_name(i),
            0,
            identity_key=keys[site_name(i)].raw_private_key,
            roster=roster,
            audit_dir=scratch,
            policy=policy,
        )
        for i in range(nodes)
    ]
    inner = make_client_app(
        lambda context: setups[int(context.node_config["partition-id"])],
        lambda s: BenchNode(s.name, dim, _bench_layout(s.mapping)),
    )
    client = ClientApp(mods=[make_measure_mod(log_path)])
    for register in (client.query, client.train, client.evaluate):
        register()(lambda message, context: inner(message, context))
    return client


def fedcost_apps(
    system: str, nodes: int, dim: int, rounds: int, clock: RoundClock, profile: MaybeProfile, log_path: str
):
    """fedcost's ServerApp (SharedSums, plain or SecAgg+) and its ClientApp."""
    from flwr.app import Array, ArrayRecord
    from flwr.serverapp import ServerApp

    from fedcost.config import SecureAggregationSection
    from fedcost.server.app import say_hello
    from fedcost.server.shared_sum import PollingGrid, SharedSums
    from fedcost.wire.hello import Hello
    from fedcost.wire.purposes import PURPOSES

    # Nodes keep signed audit logs; a throwaway folder per cell holds them, the mapping and the keys.
    scratch = Path(tempfile.mkdtemp(prefix="secagg_bench_"))
    _bench_mapping(scratch, nodes)
    _write_identity_keys(scratch, nodes)
    roster = _roster(_identity_keys(scratch, nodes))
    settings = SecureAggregationSection(enabled=system == "fedcost")
    coordinator_key_id = Identity.generate("coordinator", "coordinator").public().key_id
    _bench_policy(scratch, coordinator_key_id, dim, settings.enabled)
    server = ServerApp()

    @server.main()
    def main(grid, context) -> None:  # noqa: ANN001 - Flower's signature
        node_ids = _wait_for_nodes(grid, nodes)
        hello = Hello(
            run_id="bench",
            coordinator=coordinator_key_id,
            secure_aggregation=settings.enabled,
            rounds=rounds + 1,
            min_cohort=BENCH_ROWS,
            model_parameters=dim,
            outputs={"train": PURPOSES["train"].outputs},
        )
        sites = say_hello(grid, node_ids, hello.to_record(), {site_name(i) for i in range(nodes)})
        sums = SharedSums(PollingGrid(grid), sites, settings, "bench", roster)
        job = bench_job(nodes, dim)
        model = bench_weights(job)
        weights = ArrayRecord({name: Array(array) for name, array in model.items()})
        shapes = [array.shape for array in model.values()] + [(1,)]
        result = None
        for server_round in range(rounds + 1):
            run = lambda r=server_round: sums.run(  # noqa: E731
                "train",
                r + 1,
                shapes,
                sorted(sites),
                arrays=weights,
                job=job.to_json(),
                total_weight=BENCH_ROWS * nodes,
            )
            result = profile.measure(lambda: clock.timed(run), warm_up=server_round == 0)
        assert result is not None and len(result.included) == nodes, "a node dropped out"
        total = np.concatenate([array.ravel() for array in result.arrays[:-1]])
        clock.max_abs_error = float(np.max(np.abs(total / BENCH_ROWS - expected_sum(nodes, dim))))

    return server, ClientAppByRecipe((system, nodes, dim, str(scratch), log_path))


def _wait_for_nodes(grid: Any, expected: int) -> list[int]:
    deadline = time.monotonic() + NODE_WAIT_SECONDS
    while len(node_ids := sorted(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(node_ids)} of {expected} nodes registered")
        time.sleep(0.2)
    return node_ids


def _bench_policy(folder: Path, coordinator_key_id: str, dim: int, secure: bool) -> Path:
    """The permissive default site policy (``site.site_policy``), with room for a D-entry model.

    The default allows 1M model parameters; a D = 1M update plus its loss slot and weight
    is 2 entries more, and its masked vector 8 MB, so the limits grow with D.
    """
    path = folder / "policy.toml"
    path.write_text(
        f'coordinator = "{coordinator_key_id}"\n'
        f"require_secure_aggregation = {str(secure).lower()}\n"
        f"max_rounds = 1000\nmin_cohort = {BENCH_ROWS}\n"
        f"max_model_parameters = {dim + 2}\nmax_message_bytes = {max(16 * 2**20, 10 * (dim + 2))}\n"
        '[metrics]\n"train-loss" = 6\n[privacy]\nepsilon = inf\n'
    )
    return path


def _bench_mapping(folder: Path, nodes: int) -> Path:
    """A mapping that names every benchmark site (the node binding reads each site's role
    from it); the data files it names are never read."""
    path = folder / "mapping.toml"
    sites = "".join(f'[nodes.{site_name(i)}]\nrole = "hospital"\nfile = "unused.csv"\n' for i in range(nodes))
    path.write_text("[targets.total_cost]\n" + sites)
    return path


# --------------------------------------------------------------------------- Flower


def flower_secagg_parameters(nodes: int) -> tuple[int, int]:
    """Flower's (num_shares, reconstruction_threshold) matched to fedcost's neighbourhood.

    fedcost gives each node ``choose_degree(N)`` neighbours and needs ``choose_threshold``
    of their shares; Flower's ``num_shares`` counts the node's own share too, so it is the
    degree plus one (at most N), with the same threshold.
    """
    from fedcost.secagg import choose_degree, choose_threshold

    degree = choose_degree(nodes)
    return min(degree + 1, nodes), choose_threshold(degree)


def _flower_client_app(nodes: int, dim: int, log_path: str) -> Any:
    """A NumPyClient that returns the node's vector, with secaggplus_mod behind the measuring mod."""
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp

    class BenchClient(NumPyClient):
        def __init__(self, partition_id: int):
            self.partition_id = partition_id

        def fit(self, parameters, config):  # noqa: ANN001 - Flower's signature
            return [node_vector(self.partition_id, dim)], 1, {}

    def client_fn(context) -> Any:  # noqa: ANN001
        return BenchClient(int(context.node_config["partition-id"])).to_client()

    return ClientApp(client_fn=client_fn, mods=[make_measure_mod(log_path), secaggplus_mod])


def flower_apps(nodes: int, dim: int, rounds: int, clock: RoundClock, profile: MaybeProfile, log_path: str):
    """Flower's SecAggPlusWorkflow (legacy DefaultWorkflow + FedAvg) and its ClientApp."""
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_PARAMS_RECORD

    num_shares, threshold = flower_secagg_parameters(nodes)
    secagg = SecAggPlusWorkflow(num_shares=num_shares, reconstruction_threshold=threshold)
    server = ServerApp()

    @server.main()
    def main(grid, context) -> None:  # noqa: ANN001
        strategy = FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=nodes,
            min_available_clients=nodes,
            initial_parameters=ndarrays_to_parameters([np.zeros(dim, np.float32)]),
        )
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds + 1), strategy=strategy)

        def fit_workflow(grid, context) -> None:  # noqa: ANN001
            warm_up = not clock.rounds
            profile.measure(lambda: clock.timed(lambda: secagg(grid, context)), warm_up=warm_up)

        DefaultWorkflow(fit_workflow=fit_workflow, evaluate_workflow=lambda grid, context: None)(grid, legacy)
        average = legacy.state.array_records[MAIN_PARAMS_RECORD]
        mean = next(iter(average.values())).numpy()
        clock.max_abs_error = float(np.max(np.abs(mean * nodes - expected_sum(nodes, dim))))

    return server, ClientAppByRecipe(("flower", nodes, dim, "", log_path))


# --------------------------------------------------------------------------- one cell


def _node_totals(log_path: str, clock: RoundClock, nodes: int) -> list[tuple[float, float]]:
    """Per measured round: (node CPU seconds per node, bytes sent per node)."""
    lines = [line.split() for line in Path(log_path).read_text().splitlines()] if Path(log_path).exists() else []
    totals = []
    for window in clock.rounds[1:]:
        inside = [(float(cpu), int(size)) for t, _, cpu, size in lines if window["start"] <= float(t) <= window["end"]]
        totals.append((sum(c for c, _ in inside) / nodes, sum(s for _, s in inside) / nodes))
    return totals


def run_cell(system: str, nodes: int, dim: int, rounds: int, profile_path: str | None = None) -> dict[str, Any]:
    """Run one cell in this process (a fresh one per cell) and return its medians."""
    from flwr.simulation import run_simulation

    logging.getLogger("flwr").setLevel(logging.ERROR)
    os.environ["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = "0"
    log_path = f"/tmp/secagg_bench_{os.getpid()}_{time.time_ns()}.log"
    clock, profile = RoundClock(), MaybeProfile(profile_path)
    if system == "flower":
        server, client = flower_apps(nodes, dim, rounds, clock, profile, log_path)
    else:
        server, client = fedcost_apps(system, nodes, dim, rounds, clock, profile, log_path)
    started = time.perf_counter()
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=nodes,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"logging_level": "ERROR", "log_to_driver": False, "include_dashboard": False},
        },
    )
    total = time.perf_counter() - started
    profile.dump()
    measured = clock.rounds[1:]
    if len(measured) < rounds:
        raise RuntimeError(f"{system}: only {len(clock.rounds)} rounds ran (a round failed; see stderr)")
    per_node = _node_totals(log_path, clock, nodes)
    Path(log_path).unlink(missing_ok=True)
    return asdict(
        CellResult(
            system=system,
            nodes=nodes,
            dim=dim,
            rounds=len(measured),
            wall=statistics.median(r["wall"] for r in measured),
            thread_cpu=statistics.median(r["thread_cpu"] for r in measured),
            process_cpu=statistics.median(r["process_cpu"] for r in measured),
            machine_cpu=statistics.median(r["machine_cpu"] for r in measured),
            node_cpu=statistics.median(c for c, _ in per_node),
            node_bytes=statistics.median(b for _, b in per_node),
            warm_up=clock.rounds[0]["wall"],
            total=total,
            max_abs_error=clock.max_abs_error,
        )
    )


@dataclass(frozen=True)
class CellResult:
    """Medians over the measured rounds of one (system, N, D) cell; seconds and bytes."""

    system: str
    nodes: int
    dim: int
    rounds: int
    wall: float
    thread_cpu: float
    process_cpu: float
    machine_cpu: float
    node_cpu: float
    node_bytes: float
    warm_up: float
    total: float
    max_abs_error: float


def print_profile(path: str, top: int = 10) -> None:
    """The top functions of a ServerApp-thread profile, by own time and by cumulative time."""
    for key in ("tottime", "cumulative"):
        pstats.Stats(path).sort_stats(key).print_stats(top)


def dump_json(result: dict[str, Any]) -> str:
    return json.dumps(result)
