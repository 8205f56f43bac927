"""One SecAgg+ round in memory: every node and the coordinator in this process.

The loop in ``simulate_round`` is the one a binding runs over the network, every message
through its plain dict and back as a binding sends it; simulations, tests and benchmarks
use it as it is.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedcost.secagg.messages import RoundConfig, Stage, reply_from_dict, request_from_dict
from fedcost.secagg.protocol import Aggregate, Coordinator, Node


def simulate_round(
    config: RoundConfig,
    inputs: Mapping[int, np.ndarray],
    *,
    dropouts: Mapping[int, Stage] | None = None,
) -> Aggregate:
    """Run one round; ``dropouts`` maps a node to the stage whose reply it never sends.

    Raises ProtocolAbort when the dropouts exceed what the threshold tolerates, and when
    a node drops out in the consistency stage (the others have signed the survivor set).
    """
    dropouts = dropouts or {}
    identity_keys = {node: Ed25519PrivateKey.generate() for node in config.node_ids}
    identities = {node: key.public_key() for node, key in identity_keys.items()}
    nodes = {node: Node(node, identity_keys[node], identities) for node in config.node_ids}
    coordinator = Coordinator(config, identities)
    requests = coordinator.start()
    while not coordinator.done:
        replies = []
        for node, request in requests.items():
            request = request_from_dict(request.to_dict())
            vector = inputs[node] if request.stage is Stage.MASKED_INPUT else None
            reply = nodes[node].handle(request, vector=vector)
            if dropouts.get(node) is not reply.stage:
                replies.append(reply_from_dict(reply.to_dict()))
        requests = coordinator.handle(replies)
    return coordinator.result
