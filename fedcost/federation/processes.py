"""The coordinator and node processes: Flower's SuperLink and SuperNode, wrapped.

``run_coordinator`` starts a SuperLink with the federation's TLS material and SuperNode
authentication on, then keeps Flower's list of admitted SuperNode keys equal to the
federation's enrolled, unrevoked, unexpired nodes (re-checked every few seconds, so a
revocation or an expiry takes effect while it runs). Flower refuses an unknown key
without saying why; the coordinator's log (``logs/coordinator.log``) gets a fedcost line
with the reason: never enrolled, revoked, or expired.

``run_node`` checks everything a site can get wrong before it starts a SuperNode: the
kit, the policy, the data (file, row and column named), and that the coordinator
answers with the federation's certificate.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import IO

import tomli_w

from fedcost.client import deploy as node_app
from fedcost.data.loader import load_node
from fedcost.data.mapping import DataMapping
from fedcost.errors import ConfigError, CoordinatorUnreachableError, FederationError, KitError, MappingError
from fedcost.federation.control import Control
from fedcost.federation.provision import Federation, Kit
from fedcost.identity.federation_ca import utc_now
from fedcost.privacy import SitePolicy
from fedcost.tomlfile import read_toml

ADMISSION_REFRESH_SECONDS = 10.0
STARTUP_SECONDS = 60.0
# What flower-supernode logs when the SuperLink refuses to activate its key (the
# process itself exits with 1, as for any error).
SUPERNODE_REFUSED = "Exit Code: 305"
_REFUSED_KEY = re.compile(r"Attempted to register SuperNode with public key: (b'[^']*')")


def _flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment of a Flower process: its own FLWR_HOME, and this interpreter's
    scripts first on PATH (the SuperLink and SuperNode start ``flower-superexec`` by name)."""
    scripts = str(Path(sys.executable).parent)
    return {**os.environ, "FLWR_HOME": str(flwr_home), "PATH": os.pathsep.join([scripts, os.environ.get("PATH", "")])}


# -- coordinator ------------------------------------------------------------------------
class CoordinatorLog:
    """The coordinator's log file: Flower's output, and fedcost's admission decisions."""

    def __init__(self, path: Path, echo: IO[str] | None):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.out = path.open("a", buffering=1, encoding="utf-8")
        self.echo = echo
        self.lock = threading.Lock()

    def write(self, line: str) -> None:
        with self.lock:
            self.out.write(line if line.endswith("\n") else line + "\n")
            if self.echo is not None:
                self.echo.write(line if line.endswith("\n") else line + "\n")
                self.echo.flush()

    def fedcost(self, message: str) -> None:
        self.write(f"{utc_now():%Y-%m-%dT%H:%M:%SZ} fedcost: {message}")


def run_coordinator(federation: Federation, *, echo: IO[str] | None = None, on_ready: Callable[[], None] = lambda: None) -> int:
    """Run the SuperLink until it exits or this process is told to stop; returns its exit code."""
    state = federation.root / "state"
    state.mkdir(exist_ok=True)
    log = CoordinatorLog(federation.log_file, echo)
    config = federation.config
    tls = federation.coordinator_dir
    command = [
        "flower-superlink",
        "--ssl-certfile", str(tls / "tls.cert.pem"),
        "--ssl-keyfile", str(tls / "tls.key.pem"),
        "--ssl-ca-certfile", str(federation.ca_cert_file),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--database", str(state / "superlink.db"),
        "--host", config.bind_host,
        "--port", str(config.port),
    ]
    log.fedcost(f"starting the coordinator of federation {config.name!r} on {config.bind_host}:{config.port} "
                "(TLS, SuperNode authentication on)")
    superlink = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_flower_env(state / "flwr-home"),
    )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    admission = Admission(federation, log)
    reader = threading.Thread(target=_pipe_log, args=(superlink, log, admission), daemon=True)
    reader.start()
    try:
        _admit_until_stopped(federation, superlink, admission, stop, on_ready)
    finally:
        if superlink.poll() is None:
            superlink.terminate()
            try:
                superlink.wait(timeout=15)
            except subprocess.TimeoutExpired:
                superlink.kill()
        reader.join(timeout=5)
        log.fedcost(f"coordinator stopped (SuperLink exit code {superlink.wait()})")
    return 0 if stop.is_set() else superlink.returncode


def _admit_until_stopped(
    federation: Federation, superlink: subprocess.Popen, admission: Admission, stop: threading.Event,
    on_ready: Callable[[], None],
) -> None:
    address = f"127.0.0.1:{federation.config.port}"
    deadline = time.monotonic() + STARTUP_SECONDS
    ready = False
    while not stop.is_set() and superlink.poll() is None:
        try:
            with Control(address, federation.ca_cert_file) as control:
                admission.sync(control, at=utc_now())
        except CoordinatorUnreachableError:
            if not ready and time.monotonic() > deadline:
                raise
            stop.wait(0.5)
            continue
        if not ready:
            ready = True
            on_ready()
        stop.wait(ADMISSION_REFRESH_SECONDS)
    if not ready and not stop.is_set():
        raise FederationError(f"the SuperLink stopped while starting (exit code {superlink.poll()}); "
                              f"see {federation.log_file}")


class Admission:
    """Keeps the SuperLink's registered keys equal to the federation's admitted nodes."""

    def __init__(self, federation: Federation, log: CoordinatorLog):
        self.federation = federation
        self.log = log
        self.reported: set[tuple[str, str]] = set()

    def sync(self, control: Control, *, at: datetime) -> None:
        registered = control.registered()
        for name, (node, reason) in self.federation.admission(at=at).items():
            key = node.auth_key_pem()
            if reason is None and key not in registered:
                control.register(key, name)
                self.log.fedcost(f"admitted node {name!r} (certificate valid until "
                                 f"{node.certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC)")
            elif reason is not None:
                if key in registered:
                    control.unregister(registered[key])
                if (name, reason) not in self.reported:
                    self.reported.add((name, reason))
                    self.log.fedcost(f"not admitted: node {name!r}: {reason}")

    def explain_refusal(self, public_key_pem: bytes) -> str:
        """Why the SuperLink refused this SuperNode key, from the federation's records."""
        for name, (node, reason) in self.federation.admission(at=utc_now()).items():
            if node.auth_key_pem() == public_key_pem:
                return f"node {name!r}: {reason or 'enrolled, but not registered yet; it may retry'}"
        fingerprint = hashlib.sha256(public_key_pem).hexdigest()[:16]
        return f"unknown SuperNode key {fingerprint}: it was never enrolled in this federation"


def _pipe_log(superlink: subprocess.Popen, log: CoordinatorLog, admission: Admission) -> None:
    """Copy Flower's output into the log; after each refused key, say why it was refused."""
    assert superlink.stdout is not None
    for line in superlink.stdout:
        log.write(line)
        match = _REFUSED_KEY.search(line)
        if match:
            try:
                key = ast.literal_eval(match.group(1))
            except (ValueError, SyntaxError):
                continue
            log.fedcost(f"refused a SuperNode: {admission.explain_refusal(key)}")


# -- node -------------------------------------------------------------------------------
def prepare_node(
    kit_dir: Path, *, data: Path, mapping: Path, policy: Path | None, state: Path, split_seed: int,
    test_fraction: float, at: datetime,
) -> Kit:
    """Every check a site can fail before its SuperNode starts; returns the checked kit.

    Writes the site's mapping, resolved to ``data``, into the state folder: the node's
    ClientApp reads exactly the file that was checked here.
    """
    kit = Kit.load(kit_dir)
    kit.check_valid(at=at)
    if policy is not None:
        site_policy = SitePolicy.load(policy)
        if site_policy.coordinator != kit.coordinator.key_id:
            raise ConfigError(f"names coordinator {site_policy.coordinator!r}, but this federation's coordinator is "
                              f"{kit.coordinator.key_id!r} (kit.toml): put that key id in the policy",
                              path=str(policy), field="coordinator")
    (state / "audit").mkdir(parents=True, exist_ok=True)
    resolved = state / node_app.MAPPING_FILE
    resolved.write_bytes(tomli_w.dumps(_site_mapping(mapping, kit.name, data)).encode())
    checked = DataMapping.load(resolved)
    if checked.node(kit.name).role != kit.role:
        raise MappingError(f"gives node {kit.name!r} the role {checked.node(kit.name).role!r}; its kit says {kit.role!r}",
                           path=str(mapping), field=f"nodes.{kit.name}.role")
    try:
        load_node(checked, kit.name, split_seed=split_seed, test_fraction=test_fraction)
    except ValueError as error:
        raise ConfigError(str(error), path=str(data)) from None
    return kit


def _site_mapping(path: Path, name: str, data: Path) -> dict:
    """The mapping with only this site's node, its file set to ``data``, paths made absolute."""
    raw = read_toml(path, "mapping file", MappingError)
    nodes = raw.get("nodes")
    if not isinstance(nodes, dict) or not isinstance(nodes.get(name), dict):
        raise MappingError(f"has no [nodes.{name}] table for this site (the name in its startup kit)",
                           path=str(path), field=f"nodes.{name}")
    node = dict(nodes[name])
    node["file"] = str(data.resolve())
    if "test_file" in node:
        node["test_file"] = str((path.parent / str(node["test_file"])).resolve())
    return {**raw, "nodes": {name: node}}


def probe_coordinator(address: str, ca_file: Path, *, timeout: float = 10.0) -> None:
    """Open a TLS connection to the coordinator that must present the federation's certificate."""
    host, port = address.rsplit(":", 1)
    host = host.strip("[]")
    context = ssl.create_default_context(cafile=str(ca_file))
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=host):
                return
    except ssl.SSLCertVerificationError as error:
        raise CoordinatorUnreachableError(
            f"the server at {address} does not present this federation's certificate ({error.verify_message}); "
            "check the address in the kit's kit.toml with your federation operator"
        ) from None
    except OSError as error:
        raise CoordinatorUnreachableError(
            f"cannot reach the coordinator at {address} ({error}); check that it is running and that this "
            "machine may connect to that address and port (firewall, VPN)"
        ) from None


def run_node(kit: Kit, *, state: Path, policy: Path | None, split_seed: int, test_fraction: float) -> int:
    """Run the site's SuperNode until it exits or this process is told to stop; its output
    goes to ``<state>/node.log``."""
    probe_coordinator(kit.address, kit.ca_file)
    node_config = " ".join([
        f'{node_app.KIT}="{kit.folder.resolve()}"',
        f'{node_app.STATE}="{state.resolve()}"',
        f'{node_app.POLICY}="{policy.resolve() if policy else ""}"',
        f"{node_app.SPLIT_SEED}={split_seed}",
        f"{node_app.TEST_FRACTION}={test_fraction}",
    ])
    command = [
        "flower-supernode",
        "--superlink", kit.address,
        "--root-certificates", str(kit.ca_file),
        "--auth-supernode-private-key", str(kit.auth_key),
        "--node-config", node_config,
        "--port", str(free_port()),
    ]
    # Flower's output goes straight to the file: a pipe would be inherited by the
    # SuperExec the SuperNode starts, and reading it to its end would outlive the SuperNode.
    log_path = state / "node.log"
    start = log_path.stat().st_size if log_path.exists() else 0
    with log_path.open("a", encoding="utf-8") as out:
        supernode = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=_flower_env(state / "flwr-home"))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: supernode.terminate())
    # Reaping the SuperNode at once lets its SuperExec see it gone and exit too.
    code = supernode.wait()
    with log_path.open("rb") as log:
        log.seek(start)
        refused = SUPERNODE_REFUSED in log.read().decode("utf-8", "replace")
    if code != 0 and refused:
        raise KitError(
            f"the coordinator at {kit.address} refused this node's key: the kit was revoked, has expired or was "
            "never enrolled in this federation; ask your federation operator (details in their coordinator log)",
            path=str(kit.folder),
        )
    return code


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
