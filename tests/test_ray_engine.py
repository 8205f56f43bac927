"""A simulation on a Ray cluster: the address and the run's cap are checked before anything
runs, the cap holds node by node, and a real multi-process cluster on 127.0.0.1 runs a small
federation within its cap and keeps running after it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedcost.config import SimulationConfig, SimulationSection
from fedcost.errors import ConfigError, RayClusterError
from fedcost.federation.processes import free_port
from fedcost.ray_engine import GIB, place, ray_engine
from simulations import fedcost

RAY = str(Path(sys.executable).with_name("ray"))
NODE = {"CPU": 4.0, "memory": 8.0 * GIB}

BAD_SIMULATION = {
    "address without a port": ('ray_address = "head.example"', "ray_address must be"),
    "port out of range": ('ray_address = "ray://head:70000"', "ray_address must be"),
    "address with a path": ('ray_address = "http://head:6379"', "ray_address must be"),
    "a cap under one site": ("cpus_per_node = 2\nmax_cpus = 1", r"max_cpus \(1\) must be at least cpus_per_node \(2\)"),
    "no memory": ("max_memory_gb = 0", "max_memory_gb must be positive"),
    "cap as text": ('max_cpus = "four"', "simulation.max_cpus"),
}


@pytest.mark.parametrize("lines, message", BAD_SIMULATION.values(), ids=BAD_SIMULATION.keys())
def test_a_bad_engine_setting_is_refused_naming_the_file_and_field(tmp_path: Path, lines: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f"[simulation]\n{lines}\n")
    with pytest.raises(ConfigError, match=message) as raised:
        SimulationConfig.load(path)
    assert str(path) in str(raised.value) and "simulation" in str(raised.value)


@pytest.mark.parametrize("address", ["", "auto", "10.0.0.5:6379", "ray://head.cluster.local:10001", "[::1]:6379"])
def test_the_cluster_addresses_ray_takes_are_accepted(address: str) -> None:
    assert SimulationSection(ray_address=address).ray_address == address


def test_a_run_takes_no_more_actors_than_its_sites_its_cpus_and_the_cluster_allow() -> None:
    assert place(SimulationSection(), 3, [NODE, NODE]).actors == 3  # the sites
    assert place(SimulationSection(max_cpus=5), 8, [NODE, NODE]).actors == 5  # the cap
    assert place(SimulationSection(), 20, [NODE, NODE]).actors == 8  # the cluster
    halves = place(SimulationSection(cpus_per_node=0.5, max_cpus=3), 20, [NODE])
    assert (halves.actors, halves.cpus) == (6, 0.5)


def test_the_memory_cap_is_shared_by_the_actors_and_an_actor_never_spans_two_nodes() -> None:
    placement = place(SimulationSection(max_cpus=4, max_memory_gb=2), 10, [NODE, NODE])
    assert placement.actors == 4 and placement.memory == GIB // 2
    assert placement.client_resources() == {"num_cpus": 1.0, "num_gpus": 0.0, "memory": GIB // 2}
    # Three CPUs on each of two nodes: actors of two CPUs fit one per node, not three in all.
    assert place(SimulationSection(cpus_per_node=2), 5, [{"CPU": 3.0}, {"CPU": 3.0}]).actors == 2
    small = {"CPU": 8.0, "memory": 1.5 * GIB}
    assert place(SimulationSection(max_cpus=2, max_memory_gb=2), 5, [small]).actors == 1


def test_a_cluster_that_cannot_hold_one_site_is_refused_with_what_to_change() -> None:
    with pytest.raises(RayClusterError, match="has 8 CPUs for one site: lower \\[simulation\\] cpus_per_node"):
        place(SimulationSection(cpus_per_node=8, ray_address="head:6379"), 3, [NODE, NODE])
    with pytest.raises(RayClusterError, match="max_memory_gb"):
        place(SimulationSection(max_cpus=1, max_memory_gb=64), 3, [NODE])


def test_an_address_where_nothing_answers_is_refused_at_once_with_the_command_to_start_a_head() -> None:
    port = free_port()
    started = time.monotonic()
    refused = f"nothing answers at ray://127.0.0.1:{port}.*ray start --head --port={port}"
    section = SimulationSection(ray_address=f"ray://127.0.0.1:{port}")
    with pytest.raises(RayClusterError, match=refused), ray_engine(section, 3):
        pass
    assert time.monotonic() - started < 30  # not Ray's minutes of retries


# A cluster of three CPUs on two Ray nodes, and a run of four sites capped at two CPUs:
# Flower alone would make three actors (one per CPU of the cluster).
CAPPED_RUN = """
[run]
seed = 3
rounds = 1

[ecosystem.sizes]
hospital = [400, 300, 300]
insurer = [300]

[model]
kind = "glm"

[analytics]
group_by = []
benchmark = false

[simulation]
ray_address = "{address}"
cpus_per_node = 1
max_cpus = 2
max_memory_gb = 1
"""


class LocalCluster:
    """A Ray head and one worker node on 127.0.0.1, each its own `ray start --block`, in a
    temp folder of their own (a `ray.init()` elsewhere on the machine never finds them)."""

    def __init__(self, folder: Path, port: int):
        self.folder, self.port = folder, port
        self.address, self.client_address = f"127.0.0.1:{port}", f"ray://127.0.0.1:{free_port()}"
        env = {**os.environ, "RAY_TMPDIR": str(folder), "RAY_USAGE_STATS_ENABLED": "0"}
        common = ["--block", "--node-ip-address=127.0.0.1", f"--temp-dir={folder}", "--disable-usage-stats"]
        self.head = self._start(
            env,
            "head",
            "--head",
            f"--port={port}",
            "--num-cpus=1",
            "--include-dashboard=false",
            f"--ray-client-server-port={self.client_address.rpartition(':')[2]}",
            *common,
        )
        self._wait_for_port()
        self.worker = self._start(env, "worker", f"--address={self.address}", "--num-cpus=2", *common)

    def _start(self, env: dict[str, str], name: str, *args: str) -> subprocess.Popen:
        with open(self.folder / f"{name}.log", "wb") as log:  # the child keeps its own handle
            return subprocess.Popen([RAY, "start", *args], env=env, stdout=log, stderr=subprocess.STDOUT)

    def _wait_for_port(self) -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=2).close()
                return
            except OSError:
                assert self.head.poll() is None, (self.folder / "head.log").read_text()
                time.sleep(1)
        raise AssertionError("the Ray head did not come up: " + (self.folder / "head.log").read_text())

    def state(self, probe: str) -> dict:
        """What ``probe`` (Python over ``ray``, ending in a dict ``found``) finds on the cluster,
        asked from a driver process of its own."""
        script = (
            f"import json, time, ray, ray._private.state as state\nray.init(address={self.address!r}, "
            f"logging_level='ERROR')\n{probe}\nprint('FOUND' + json.dumps(found))\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=180,
            env={**os.environ, "RAY_TMPDIR": str(self.folder)},
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout.split("FOUND", 1)[1])

    def stop(self) -> None:
        for process in (self.worker, self.head):
            process.terminate()
        for process in (self.worker, self.head):
            process.wait(timeout=60)


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    folder = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths live under it
    running = LocalCluster(folder, free_port())
    try:
        yield running
    finally:
        running.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("client", [False, True], ids=["the head's GCS address", "ray:// (Ray Client)"])
def test_a_simulation_runs_on_an_existing_ray_cluster_within_its_cap_and_leaves_it_running(
    tmp_path: Path, cluster: LocalCluster, client: bool
) -> None:
    nodes = (
        "found = {'cpus': 0}\nwhile found['cpus'] < 3:\n"
        "    time.sleep(1)\n    found = {'cpus': ray.cluster_resources().get('CPU', 0)}"
    )
    assert cluster.state(nodes) == {"cpus": 3.0}

    address = cluster.client_address if client else cluster.address
    (tmp_path / "capped.toml").write_text(CAPPED_RUN.format(address=address))
    done = fedcost("simulate", "capped.toml", "--out", "run", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["engine"] == {
        "ray_address": address,
        "actors": 2,
        "cpus_per_actor": 1.0,
        "memory_gb_per_actor": 0.5,
        "cluster_cpus": 3.0,
    }
    assert summary["audit"]["verified"] and len(summary["nodes"]) == 4

    # The cluster's own records: the sites ran in two actors of one job of this cluster, which
    # ended with the run (a Ray Client session's job ends soon after); its nodes are still there.
    found = cluster.state(
        "actors = [a for a in state.actors().values() if a['ActorClassName'].endswith('ClientAppActor')]\n"
        "jobs = {a['JobID'] for a in actors}\n"
        "for _ in range(60):\n"
        "    ended = [j['IsDead'] for j in state.jobs() if j['JobID'] in jobs]\n"
        "    if all(ended):\n        break\n"
        "    time.sleep(1)\n"
        "found = {'jobs': len(jobs), 'ended': ended, 'actors': sorted(a['State'] for a in actors),\n"
        "         'alive_nodes': sum(n['Alive'] for n in ray.nodes())}"
    )
    assert found == {"jobs": 1, "ended": [True], "actors": ["DEAD", "DEAD"], "alive_nodes": 2}
