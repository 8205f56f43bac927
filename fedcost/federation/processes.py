"""The coordinator and node processes: Flower's SuperLink, and the site's own worker.

``run_coordinator`` starts a SuperLink with the federation's TLS material and SuperNode
authentication on, then keeps Flower's list of admitted SuperNode keys equal to the
federation's enrolled, unrevoked, unexpired nodes (re-checked every few seconds, so a
revocation or an expiry takes effect while it runs). Flower refuses an unknown key
without saying why; the coordinator's log (``logs/coordinator.log``) gets a fedcost line
with the reason: never enrolled, revoked, or expired. No answer of Flower's Control API
stops the coordinator: a failed admission step is logged and tried again.

``run_node`` checks everything a site can get wrong before it connects: the kit, the
policy, the data (file, row and column named), and that the coordinator answers with the
federation's certificate. Then the site's worker (``fedcost.federation.worker``) serves
the node in this one process for as long as it runs.
"""

from __future__ import annotations

import hashlib
import logging
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING

import tomli_w

from fedcost.data.loader import load_node
from fedcost.data.mapping import DataMapping
from fedcost.errors import ConfigError, CoordinatorUnreachableError, FederationError, MappingError
from fedcost.federation import node_app
from fedcost.federation.control import Control
from fedcost.federation.provision import Federation, Kit, fleet_address
from fedcost.federation.site_report import SiteReports
from fedcost.federation.worker import NodeWorker
from fedcost.identity.federation_ca import utc_now
from fedcost.privacy import SitePolicy
from fedcost.tomlfile import read_toml

if TYPE_CHECKING:
    from fedcost.federation import link as link_module

ADMISSION_REFRESH_SECONDS = 3.0
STARTUP_SECONDS = 60.0
# A submitted run is looked for every this many seconds (a lookup in memory; Flower's
# SuperExec asks every 1 s, then starts a process for it).
RUN_POLL_SECONDS = 0.1


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


def run_coordinator(
    federation: Federation, *, echo: IO[str] | None = None, on_ready: Callable[[], None] = lambda: None
) -> int:
    """Serve the coordinator until this process is told to stop (SIGTERM, SIGINT); returns 0,
    or 1 if its SuperLink stopped by itself.

    The SuperLink (``fedcost.federation.link``) runs in this process and keeps its state in
    memory: a restarted coordinator rebuilds what it needs from the federation folder (the
    admitted nodes, re-registered within seconds; each node's worker reconnects by itself)
    and from the run folders (an interrupted run resumes from its checkpoint when
    ``fedcost run`` submits it again). Flower's SQLite state was both the slower (every
    message is several transactions) and the one that could keep a restarted coordinator
    from starting; fedcost needs nothing of it.
    """
    from fedcost.federation.link import Link, Runs  # the SuperLink's web stack: not for a node

    log = CoordinatorLog(federation.log_file, echo)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    bind = f"{federation.config.bind_host}:{federation.config.port}"
    log.fedcost(
        f"starting the coordinator of federation {federation.config.name!r} on {bind} (the operator's "
        f"port) and {fleet_address(bind)} (the nodes'), TLS, SuperNode authentication on"
    )
    admission = Admission(federation, log)
    link = Link(
        federation, log.write, lambda key: log.fedcost(f"refused a SuperNode: {admission.explain_refusal(key)}")
    )
    link.start()
    runs = Runs(federation, link.state_factory, log.fedcost, link.doorbell)
    try:
        _serve_until_stopped(federation, link, admission, runs, stop, on_ready)
    finally:
        link.stop()
        log.fedcost("coordinator stopped")
    return 0 if stop.is_set() else 1


def _serve_until_stopped(
    federation: Federation,
    link: link_module.Link,
    admission: Admission,
    runs: link_module.Runs,
    stop: threading.Event,
    on_ready: Callable[[], None],
) -> None:
    """Start each submitted run, and keep admission in step with the federation folder
    (every few seconds), until stopped or the SuperLink stops."""
    address = f"127.0.0.1:{federation.config.port}"
    deadline = time.monotonic() + STARTUP_SECONDS
    ready, admitted_at = False, -ADMISSION_REFRESH_SECONDS
    while not stop.is_set() and link.alive():
        runs.start_submitted()
        if time.monotonic() - admitted_at >= ADMISSION_REFRESH_SECONDS:
            try:
                with Control(address, federation.ca_cert_file) as control:
                    admission.sync(control, at=utc_now())
                admitted_at = time.monotonic()
            except CoordinatorUnreachableError:
                if not ready and time.monotonic() > deadline:
                    raise
            else:
                if not ready:
                    ready = True
                    on_ready()
        stop.wait(RUN_POLL_SECONDS)
    if not stop.is_set():
        admission.log.fedcost(
            "the SuperLink stopped unexpectedly; start the coordinator again: it rebuilds its state from the "
            "federation folder"
        )


class Admission:
    """Keeps the SuperLink's registered keys equal to the federation's admitted nodes.

    A step Flower's Control API refuses is logged (once per node and reason) and tried
    again at the next sync: no answer of the SuperLink's stops the coordinator.
    """

    def __init__(self, federation: Federation, log: CoordinatorLog):
        self.federation = federation
        self.log = log
        self.reported: set[tuple[str, str]] = set()

    def sync(self, control: Control, *, at: datetime) -> None:
        try:
            registered = control.registered()
        except CoordinatorUnreachableError:
            raise
        except FederationError as error:
            self._once("*", f"could not list the admitted nodes: {error}")
            return
        for name, (node, reason) in self.federation.admission(at=at).items():
            key = node.auth_key_pem()
            try:
                if reason is None and key not in registered:
                    control.register(key, name)
                    self.log.fedcost(
                        f"admitted node {name!r} (certificate valid until "
                        f"{node.certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC)"
                    )
                elif reason is not None:
                    if key in registered:
                        control.unregister(registered[key])
                        self.log.fedcost(f"dropped node {name!r}: {reason}")
                    self._once(name, f"not admitted: node {name!r}: {reason}")
            except CoordinatorUnreachableError:
                raise
            except FederationError as error:
                self._once(name, f"could not update the admission of node {name!r}: {error}; trying again")

    def _once(self, name: str, line: str) -> None:
        if (name, line) not in self.reported:
            self.reported.add((name, line))
            self.log.fedcost(line)

    def explain_refusal(self, public_key_pem: bytes) -> str:
        """Why the SuperLink refused this SuperNode key, from the federation's records."""
        for name, (node, reason) in self.federation.admission(at=utc_now()).items():
            if node.auth_key_pem() == public_key_pem:
                return f"node {name!r}: {reason or 'enrolled, but not registered yet; it may retry'}"
        fingerprint = hashlib.sha256(public_key_pem).hexdigest()[:16]
        return f"unknown SuperNode key {fingerprint}: it was never enrolled in this federation"


# -- node -------------------------------------------------------------------------------
def prepare_node(
    kit_dir: Path,
    *,
    data: Path,
    mapping: Path,
    policy: Path | None,
    state: Path,
    split_seed: int,
    test_fraction: float,
    at: datetime,
) -> Kit:
    """Every check a site can fail before its node connects; returns the checked kit.

    Writes the site's mapping, resolved to ``data``, into the state folder: the node's
    ClientApp reads exactly the file that was checked here.
    """
    kit = Kit.load(kit_dir)
    kit.check_valid(at=at)
    if policy is not None:
        site_policy = SitePolicy.load(policy)
        if site_policy.coordinator != kit.coordinator.key_id:
            raise ConfigError(
                f"names coordinator {site_policy.coordinator!r}, but this federation's coordinator is "
                f"{kit.coordinator.key_id!r} (kit.toml): put that key id in the policy",
                path=str(policy),
                field="coordinator",
            )
    (state / "audit").mkdir(parents=True, exist_ok=True)
    resolved = state / node_app.MAPPING_FILE
    resolved.write_bytes(tomli_w.dumps(_site_mapping(mapping, kit.name, data)).encode())
    checked = DataMapping.load(resolved)
    if checked.node(kit.name).role != kit.role:
        raise MappingError(
            f"gives node {kit.name!r} the role {checked.node(kit.name).role!r}; its kit says {kit.role!r}",
            path=str(mapping),
            field=f"nodes.{kit.name}.role",
        )
    try:
        load_node(checked, kit.name, split_seed=split_seed, test_fraction=test_fraction)
    except ValueError as error:
        raise ConfigError(str(error), path=str(data)) from None
    return kit


def _site_mapping(path: Path, name: str, data: Path) -> dict:
    """The mapping with only this site's node, its file (or OMOP extract's folder) set to
    ``data``, its other files' paths (test rows, episode extract) made absolute."""
    raw = read_toml(path, "mapping file", MappingError)
    nodes = raw.get("nodes")
    if not isinstance(nodes, dict) or not isinstance(nodes.get(name), dict):
        raise MappingError(
            f"has no [nodes.{name}] table for this site (the name in its startup kit)",
            path=str(path),
            field=f"nodes.{name}",
        )
    node = dict(nodes[name])
    node["omop" if "omop" in node else "file"] = str(data.resolve())
    for beside in ("test_file", "episodes"):  # files the mapping names beside itself
        if beside in node:
            node[beside] = str((path.parent / str(node[beside])).resolve())
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


def run_node(
    kit: Kit,
    *,
    state: Path,
    policy: Path | None,
    split_seed: int,
    test_fraction: float,
    say: Callable[[str], None] = print,
) -> int:
    """Serve the site's node in this process until it is told to stop (SIGINT, SIGTERM).

    The worker (``fedcost.federation.worker``) holds the connection to the coordinator and
    answers every message with the node's ClientApp in-process; its log, with any
    traceback, is ``<state>/node.log``. A lost coordinator is retried with back-off; a
    refused key raises ``KitError`` (the kit was revoked, expired or never enrolled).
    """
    probe_coordinator(fleet_address(kit.address), kit.ca_file)
    node_config: dict[str, bool | bytes | float | int | str] = {
        node_app.KIT: str(kit.folder.resolve()),
        node_app.STATE: str(state.resolve()),
        node_app.POLICY: str(policy.resolve()) if policy else "",
        node_app.SPLIT_SEED: split_seed,
        node_app.TEST_FRACTION: test_fraction,
    }
    reports = SiteReports(state, kit.identity.public(), kit.role, policy, node_app.resolve_setup, node_app.run_name)
    worker = NodeWorker(kit, node_app.app, node_config, reports, say=say)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: worker.stop.set())
    with _logging_to(state / "node.log"):
        worker.serve()
    say(f"node {kit.name} stopped")
    return 0


@contextmanager
def _logging_to(path: Path) -> Iterator[None]:
    """fedcost's and Flower's log records, tracebacks included, into the node's log file only."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    loggers = [logging.getLogger(name) for name in ("fedcost", "flwr")]
    saved = [(logger.level, logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    flower_console = [h for h in logging.getLogger("flwr").handlers if h is not handler]
    for console in flower_console:
        logging.getLogger("flwr").removeHandler(console)
    try:
        yield
    finally:
        for logger, (level, propagate) in zip(loggers, saved):
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate
        for console in flower_console:
            logging.getLogger("flwr").addHandler(console)
        handler.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, nor on the next one (a
    coordinator's two ports: see ``provision.fleet_address``)."""
    while True:
        with socket.socket() as probe, socket.socket() as after:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
            try:
                after.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
