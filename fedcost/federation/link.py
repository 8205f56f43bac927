"""Flower's SuperLink inside the coordinator's process, and the coordinator's runs beside it.

``flower-superlink`` serves its HTTP APIs (Control, Runtime, Fleet) and, with
``FLWR_INTERNAL_GRPC_FLEET_API=1``, its gRPC Fleet API from one in-memory state; its
SuperExec then starts a ``flwr-serverapp`` process for each submitted run, which imports
Flower, fedcost and torch, installs the run's app bundle (FAB) and drives the run over
the HTTP Runtime API: every message, poll and object through the SuperLink's web
middleware (``benchmarks/RESULTS.md``, "Deployment"). ``Link`` builds the same SuperLink
(Flower's own ``create_app`` and ``SuperLinkLifespan``: TLS, SuperNode authentication,
the gRPC Fleet API with its authentication interceptor) in this process, with no
SuperExec; ``Runs`` claims each submitted run from the state as the SuperExec would,
moves it through Flower's statuses (pending, starting, running, finished) with the
Runtime API's own handlers, and runs fedcost's coordinator for it in a thread on a
``LinkGrid``: the same state, no HTTP. The coordinator runs its installed code for every
run; nothing a FAB names is installed or loaded.

Flower's Fleet API is pull-only: a node learns of its next message when it asks. Asking
every few milliseconds would keep the coordinator's one process busy with polls; asking
less often made each secure-aggregation stage wait for the slowest node's next poll (about
40 of the ~90 ms an exchange took on loopback, ``benchmarks/RESULTS.md``). So a pull that
finds nothing is held here (``HeldPulls``) and answered the moment the coordinator stores a
message (``Doorbell``), or empty after ``PULL_HOLD``; the node then asks again at once.
"""

from __future__ import annotations

import ast
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable

import grpc
import uvicorn
from flwr.common.constant import (
    CONTROL_API_DEFAULT_SERVER_ADDRESS,
    FLWR_INTERNAL_GRPC_FLEET_API,
    ISOLATION_MODE_PROCESS,
    TRANSPORT_TYPE_GRPC_RERE,
    SubStatus,
)
from flwr.common.serde import run_from_proto
from flwr.proto.runtime_pb2 import (  # pylint: disable=no-name-in-module
    AcquireTaskRequest,
    PullTaskInputRequest,
    PushTaskOutputRequest,
)
from flwr.proto.task_pb2 import Task  # pylint: disable=no-name-in-module
from flwr.server.superlink.fleet.grpc_rere.node_auth_server_interceptor import NodeAuthServerInterceptor
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.supercore.constant import TaskType
from flwr.supercore.error import FlowerError
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.logger import FLOWER_LOGGER, console_handler
from flwr.superlink.cli.flower_superlink import SuperLinkLifespan, _run_fleet_api_grpc_rere
from flwr.superlink.config_loader import SuperLinkLifespanConfig, load_control_authn_plugin
from flwr.superlink.main import create_app
from flwr.superlink.servicer.runtime import runtime_handlers

from fedcost.errors import FederationError
from fedcost.federation import coordinator_app
from fedcost.federation.provision import PULL_HOLD, Federation, fleet_address
from fedcost.federation.submission import run_folder
from fedcost.server.link_grid import Doorbell, LinkGrid

IN_MEMORY = ":flwr-in-memory:"  # the SuperLink's state (see processes.run_coordinator)
LOG_FORMAT = "%(levelname)s %(asctime)s %(name)s: %(message)s"
_REFUSED_KEY = re.compile(r"Attempted to register SuperNode with public key: (b'[^']*')")


class Link:
    """The SuperLink's APIs, served from threads of this process until ``stop``."""

    def __init__(self, federation: Federation, write: Callable[[str], None], on_refused: Callable[[bytes], None]):
        self.federation = federation
        self.logs = LogCopy(write, on_refused)
        self.doorbell = Doorbell()
        config = _lifespan_config(federation)
        self.app = create_app(config, _lifespan_holding_pulls(self.doorbell))
        self.server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                host=config.host,
                port=config.port,
                ssl_keyfile=config.ssl_keyfile,
                ssl_certfile=config.ssl_certfile,
                lifespan="on",
                log_config=None,
                access_log=False,
            )
        )
        self.thread = threading.Thread(target=self.server.run, name="superlink", daemon=True)

    @property
    def state_factory(self) -> LinkStateFactory:
        return self.app.state.linkstate_factory

    def start(self) -> None:
        """Serve the operator's port (HTTP) and the nodes' (gRPC); raises ``FederationError``
        if either cannot be served (the reason is in the coordinator's log)."""
        self.logs.attach()
        os.environ[FLWR_INTERNAL_GRPC_FLEET_API] = "1"  # read by SuperLinkLifespan.startup
        self.thread.start()
        while not self.server.started and self.thread.is_alive():
            time.sleep(0.05)
        if not self.server.started:
            self.thread.join()
            raise FederationError(
                f"the SuperLink could not start on {self.federation.config.bind_host}:{self.federation.config.port} "
                f"(or the nodes' port after it); see {self.federation.log_file}"
            )

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.logs.detach()


def _lifespan_config(federation: Federation) -> SuperLinkLifespanConfig:
    """What ``flower-superlink`` would parse from the arguments fedcost gave it: TLS with the
    federation's certificates, SuperNode authentication, state in memory, the gRPC Fleet API
    on the port after the federation's, and no SuperExec (the "process" isolation: runs are
    started by someone else, here ``Runs``, and no one else may claim them)."""
    config, tls = federation.config, federation.coordinator_dir
    files = (federation.ca_cert_file, tls / "tls.cert.pem", tls / "tls.key.pem")
    return SuperLinkLifespanConfig(
        control_address=CONTROL_API_DEFAULT_SERVER_ADDRESS,
        health_server_address=None,
        host=config.bind_host,
        port=config.port,
        insecure=False,
        certificates=(files[0].read_bytes(), files[1].read_bytes(), files[2].read_bytes()),
        # Flower's HTTP Runtime API hands a submitted run to whoever claims it first; this
        # secret, known to no one, refuses every claim made over HTTP (``Runs`` claims in memory).
        superexec_auth_secret=secrets.token_bytes(32),
        authn_plugin=load_control_authn_plugin(),
        event_log_plugin=None,
        fleet_event_log_plugin=None,
        enable_event_log=False,
        artifact_provider=None,
        enable_supernode_auth=True,
        fleet_api_type=TRANSPORT_TYPE_GRPC_RERE,
        fleet_api_address=fleet_address(f"{config.bind_host}:{config.port}"),
        simulation=False,
        ssl_ca_certfile=str(files[0]),
        ssl_certfile=str(files[1]),
        ssl_keyfile=str(files[2]),
        database=IN_MEMORY,
        isolation=ISOLATION_MODE_PROCESS,
        runtime_dependency_install=False,
    )


# The most pulls held at once, of the Fleet API server's 1,000 workers (Flower's default):
# the rest stay free for the nodes' replies and objects, whatever pulls arrive.
MOST_HELD = 250


class HeldPulls(grpc.ServerInterceptor):
    """A node's pull that finds no message waits at the coordinator, up to ``PULL_HOLD``,
    for the ``doorbell`` (rung when messages are stored), then looks again. It runs after
    Flower's SuperNode authentication, so only an authenticated node's pull is held.

    A held pull holds one of the server's workers: one pull per node is held at a time, and
    at most ``most`` in all, so a node that opens many pulls at once (or a federation of
    very many nodes) cannot leave the server no worker for the replies. A pull beyond these
    is answered at once, as Flower answers every pull."""

    def __init__(self, doorbell: Doorbell, most: int = MOST_HELD):
        self.doorbell = doorbell
        self.most = most
        self._held: set[int] = set()
        self._lock = threading.Lock()

    def _hold(self, node_id: int) -> bool:
        """Whether a pull of ``node_id`` may be held now; if so it counts as held until ``_release``."""
        with self._lock:
            if node_id in self._held or len(self._held) >= self.most:
                return False
            self._held.add(node_id)
            return True

    def _release(self, node_id: int) -> None:
        with self._lock:
            self._held.discard(node_id)

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = continuation(handler_call_details)
        if handler is None or not handler_call_details.method.endswith("/PullMessages"):
            return handler
        pull = handler.unary_unary

        def held(request, context):  # type: ignore[no-untyped-def]
            node_id = request.node.node_id
            if not self._hold(node_id):
                return pull(request, context)
            try:
                deadline = time.monotonic() + PULL_HOLD
                while True:
                    seen = self.doorbell.rings
                    response = pull(request, context)
                    left = deadline - time.monotonic()
                    if response.messages_list or left <= 0 or not context.is_active():
                        return response
                    self.doorbell.wait(seen, left)
            finally:
                self._release(node_id)

        return grpc.unary_unary_rpc_method_handler(
            held, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )


def _lifespan_holding_pulls(doorbell: Doorbell) -> type[SuperLinkLifespan]:
    """Flower's SuperLink lifespan whose gRPC Fleet API holds empty pulls (``HeldPulls``).

    Flower builds that server's interceptors inside ``_start_legacy_fleet_grpc_rere`` with no
    way to add one; this is that method with ``HeldPulls`` after its authentication (the
    fleet event log it would add is off in ``_lifespan_config``)."""

    class Lifespan(SuperLinkLifespan):
        def _start_legacy_fleet_grpc_rere(self, fleet_address: str) -> None:
            server = _run_fleet_api_grpc_rere(
                address=fleet_address,
                state_factory=self.state_factory,
                objectstore_factory=self.objectstore_factory,
                enable_supernode_auth=self.config.enable_supernode_auth,
                certificates=self.config.certificates,
                interceptors=[NodeAuthServerInterceptor(self.state_factory), HeldPulls(doorbell)],
            )
            self.grpc_servers.append(server)

    return Lifespan


class _OneLine(logging.Formatter):
    """A record with a traceback (attached, or in its message, as the web server logs a failed
    start) as one line ending in the traceback's last (``SystemExit: Port … is already in
    use``): the reason, not a traceback, in the log an operator reads."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        head, marker, trace = text.partition("Traceback (most recent call last):")
        return head.rstrip() + " " + trace.strip().splitlines()[-1] if marker and trace.strip() else text


class LogCopy(logging.Handler):
    """Flower's and the web server's log records into the coordinator's log (and not to the
    console by Flower's own handler); each refused SuperNode key is handed to ``on_refused``."""

    LOGGERS = (FLOWER_LOGGER, logging.getLogger("uvicorn.error"))

    def __init__(self, write: Callable[[str], None], on_refused: Callable[[bytes], None]):
        super().__init__(logging.INFO)
        self.setFormatter(_OneLine(LOG_FORMAT))
        self.write = write
        self.on_refused = on_refused

    def emit(self, record: logging.LogRecord) -> None:
        self.write(self.format(record))
        key = refused_key(record.getMessage())
        if key is not None:
            self.on_refused(key)

    def attach(self) -> None:
        FLOWER_LOGGER.removeHandler(console_handler)
        for logger in self.LOGGERS:
            logger.addHandler(self)
            logger.propagate = False

    def detach(self) -> None:
        for logger in self.LOGGERS:
            logger.removeHandler(self)
        FLOWER_LOGGER.addHandler(console_handler)


def refused_key(line: str) -> bytes | None:
    """The SuperNode public key (PEM) that Flower's line says it refused to activate, if any."""
    match = _REFUSED_KEY.search(line)
    if match is None:
        return None
    try:
        return ast.literal_eval(match.group(1))
    except (ValueError, SyntaxError):
        return None


class Runs:
    """Each run submitted to the SuperLink, run by fedcost's coordinator in a thread of this
    process, its Flower status kept as Flower's own runtime keeps it."""

    def __init__(
        self,
        federation: Federation,
        state_factory: LinkStateFactory,
        say: Callable[[str], None],
        doorbell: Doorbell,
    ):
        self.federation = federation
        self.state_factory = state_factory
        self.say = say
        self.doorbell = doorbell

    def start_submitted(self) -> None:
        """Claim every run submitted since the last call and start it."""
        state = self.state_factory.state()
        request = AcquireTaskRequest(supported_task_types=[TaskType.SERVER_APP])
        while (claimed := runtime_handlers.acquire_task(request, state)).HasField("task"):
            threading.Thread(
                target=self._run, args=(claimed.task,), name=f"run-{claimed.task.run_id}", daemon=True
            ).start()

    def _run(self, task: Task) -> None:
        """One run, from its start (Flower: running) to its end (finished: completed, or
        failed with the reason), with the task's heartbeats meanwhile."""
        state = self.state_factory.state()
        try:
            started = runtime_handlers.pull_task_input(PullTaskInputRequest(), state, task)
        except FlowerError as error:  # e.g. stopped meanwhile with `flwr stop`
            self.say(f"Flower run {task.run_id} could not start: {error.message}")
            return
        beats = HeartbeatSender(lambda: state.acknowledge_task_heartbeat(task.task_id))
        beats.start()
        outcome, details = SubStatus.FAILED, ""
        try:
            run = run_from_proto(started.run)
            folder = run_folder(self.federation, run.override_config)
            self.say(f"run {folder.name} (Flower run {run.run_id}) started")
            grid = LinkGrid(self.state_factory, task, self.doorbell)
            grid.set_run(run)
            coordinator_app.serve(grid, self.federation, folder)
            outcome = SubStatus.COMPLETED
        except Exception as error:  # the run's own log and error.txt have the details
            details = f"{type(error).__name__}: {error}"
        finally:
            beats.stop()
            runtime_handlers.push_task_output(PushTaskOutputRequest(sub_status=outcome, details=details), state, task)
        self.say(f"Flower run {task.run_id} finished: {outcome}{f' ({details})' if details else ''}")
