"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """Bit-identical training assumes a fixed thread count; one thread is also fastest here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def inside_a_server_app(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower builds a coordinator's messages only inside a ServerApp's run; this is one."""
    for name in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
