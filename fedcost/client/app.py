"""The node's Flower ClientApp: a thin binding of ``Node`` to the Message API.

query    → the node's statistics vector (for federation-wide features)
train    → new weights after local epochs, with the example count for weighting
evaluate → additive evaluation sums over the node's held-out rows

Every reply names the node (a ConfigRecord with its name and role) so the coordinator
can report per-site progress; no reply carries rows or per-record values.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcost import job as keys
from fedcost.client.node import Node, NodeSetup
from fedcost.job import TrainingJob

SetupResolver = Callable[[Context], NodeSetup]


def make_client_app(resolve_setup: SetupResolver) -> ClientApp:
    """A ClientApp whose node is found by ``resolve_setup`` from Flower's node context."""
    app = ClientApp()

    @app.query()
    def statistics(message: Message, context: Context) -> Message:
        node = _node(resolve_setup, context)
        vector = node.statistics()
        content = RecordDict(
            {
                keys.STATISTICS: ArrayRecord({keys.STATISTICS: Array(vector)}),
                keys.METRICS: MetricRecord({keys.EXAMPLES: len(node.data.train)}),
                keys.NODE: _identity(node),
            }
        )
        return Message(content, reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        node = _node(resolve_setup, context)
        job, weights, server_round = _unpack(message)
        new_weights, result = node.train(job, weights, server_round)
        content = RecordDict(
            {
                keys.ARRAYS: ArrayRecord({k: Array(v) for k, v in new_weights.items()}),
                keys.METRICS: MetricRecord({keys.EXAMPLES: result.examples, "train-loss": result.loss}),
                keys.NODE: _identity(node),
            }
        )
        return Message(content, reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        node = _node(resolve_setup, context)
        job, weights, _ = _unpack(message)
        sums = node.evaluate(job, weights)
        content = RecordDict(
            {
                keys.ARRAYS: ArrayRecord({name: Array(vector) for name, vector in sums.items()}),
                keys.METRICS: MetricRecord({keys.EXAMPLES: len(node.data.test)}),
                keys.NODE: _identity(node),
            }
        )
        return Message(content, reply_to=message)

    return app


def _node(resolve_setup: SetupResolver, context: Context) -> Node:
    torch.set_num_threads(1)
    return Node(resolve_setup(context))


def _identity(node: Node) -> ConfigRecord:
    return ConfigRecord({"name": node.name, "role": node.role})


def _unpack(message: Message) -> tuple[TrainingJob, dict[str, np.ndarray], int]:
    config = message.content[keys.CONFIG]
    job = TrainingJob.from_json(str(config[keys.JOB]))
    arrays = message.content[keys.ARRAYS]
    weights = {name: array.numpy() for name, array in arrays.items()}
    return job, weights, int(config["server-round"])
