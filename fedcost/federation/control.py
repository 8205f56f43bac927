"""Talking to a SuperLink's Control API over TLS: admitting nodes and submitting runs.

Thin wrappers of Flower's own HTTP client (the one `flwr` uses), so fedcost needs no
``flwr`` connection profile: the federation folder says where the coordinator is and
which CA vouches for it.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

import httpx
from flwr.cli.build import build_fab_from_disk
from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
from flwr.common.serde import fab_to_proto, user_config_to_proto
from flwr.proto.control_pb2 import (  # pylint: disable=no-name-in-module
    ListNodesRequest,
    ListRunsRequest,
    RegisterNodeRequest,
    StartRunRequest,
    UnregisterNodeRequest,
)
from flwr.supercore.constant import NodeStatus
from flwr.supercore.control import ControlHttpClient
from flwr.supercore.error import ApiErrorCode, FlowerError
from flwr.supercore.fab import Fab
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

from fedcost.errors import CoordinatorUnreachableError, FederationError

APP_FOLDER = "flwr_app"  # fedcost's Flower app (FAB source), shipped in this package


class Control:
    """A Control API session with the coordinator at ``address``, trusting only ``ca_file``."""

    def __init__(self, address: str, ca_file: Path):
        self.address = address
        self.client = ControlHttpClient.from_server_address(
            server_address=address,
            insecure=False,
            root_certificates=ca_file.read_bytes(),
            interceptors=[CliClientHttpInterceptor(), RuntimeVersionHttpInterceptor(component_name="fedcost")],
        )

    def __enter__(self) -> Control:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()

    def registered(self) -> dict[bytes, int]:
        """Node id per registered SuperNode auth key (PEM); an unregistered node (Flower keeps
        its row, status ``unregistered``) is not."""
        response = self._call(self.client.ListNodes, ListNodesRequest())
        return {
            info.public_key.encode() if isinstance(info.public_key, str) else info.public_key: info.node_id
            for info in response.nodes_info
            if info.status != NodeStatus.UNREGISTERED
        }

    def register(self, public_key_pem: bytes, name: str) -> int:
        return int(
            self._call(self.client.RegisterNode, RegisterNodeRequest(public_key=public_key_pem, name=name)).node_id
        )

    def unregister(self, node_id: int) -> None:
        self._call(self.client.UnregisterNode, UnregisterNodeRequest(node_id=node_id))

    def start_run(self, config: dict[str, str]) -> int:
        """Submit fedcost's Flower app with ``config`` as its run config; returns Flower's run id."""
        with resources.as_file(resources.files("fedcost.federation") / APP_FOLDER) as folder:
            fab = build_fab_from_disk(Path(folder))
        request = StartRunRequest(
            fab=fab_to_proto(Fab(hashlib.sha256(fab).hexdigest(), fab, {})),
            override_config=user_config_to_proto(config),
            federation="",
        )
        response = self._call(self.client.StartRun, request)
        if not response.HasField("run_id"):
            raise FederationError("the coordinator did not start the run; see its log")
        return int(response.run_id)

    def run_status(self, run_id: int) -> tuple[str, str] | None:
        """Flower's (status, sub-status) of a run, e.g. ("finished", "completed"); None for a run
        this coordinator does not know (it was restarted since: its state lives in memory)."""
        try:
            runs = self.client.ListRuns(ListRunsRequest(run_id=run_id)).run_dict
        except (httpx.HTTPStatusError, httpx.TransportError) as error:
            if isinstance(error, httpx.HTTPStatusError):
                flower = FlowerError.from_json(error.response.text)
                if flower is not None and flower.code == ApiErrorCode.RUN_ID_NOT_FOUND:
                    return None
            raise self._translated(error) from None
        if run_id not in runs:
            return None
        return runs[run_id].status.status, runs[run_id].status.sub_status

    def _call(self, method, request):  # type: ignore[no-untyped-def]
        try:
            return method(request)
        except (httpx.HTTPStatusError, httpx.TransportError) as error:
            raise self._translated(error) from None

    def _translated(self, error: httpx.HTTPError) -> FederationError:
        """An HTTP failure as the fedcost error that says what to do."""
        if isinstance(error, httpx.HTTPStatusError):
            flower = FlowerError.from_json(error.response.text)
            detail = f"{error.response.status_code}: {flower.message}" if flower else str(error.response.status_code)
            return FederationError(f"the coordinator refused the request ({detail}); see its log")
        return CoordinatorUnreachableError(
            f"cannot reach the coordinator at {self.address} ({error}); is `fedcost coordinator start` running?"
        )
