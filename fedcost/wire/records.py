"""Flower records for fedcost's messages, shared by the node and coordinator bindings.

Every exchange between coordinator and node is one of three transports:

* ``hello``: the node names itself (name and role, nothing else);
* ``plain``: the node sends its contribution to a shared sum in the clear (only when a
  run turns secure aggregation off);
* ``secagg``: one stage of a SecAgg+ round whose masked input is that contribution;
* ``linkage``: one step of the episode linkage's private intersection-sum between a
  hospital and a payer, which the coordinator relays (``fedcost.linkage``).

A contribution's purpose is ``statistics``, ``train`` or ``evaluate``; train and
evaluate requests carry the global weights and the job.

The sum that follows a secure sum needs nothing from it until its masked input, so its first
two stages ride on this sum's last two (``CARRIED``): its setup on the consistency request,
its share-keys on the unmask request, each as the next sum's config and SecAgg+ request
(``NEXT_CONFIG`` and ``NEXT_SECAGG``). The reply carries that part's reply (``NEXT_SECAGG``:
a key advertisement, then the encrypted shares) or the reason the node refused it
(``NEXT_REFUSED``), and the next sum starts at masked input.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedcost.secagg import Quantizer, Stage

# Record names inside Flower messages.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
NODE = "node"
SECAGG = "secagg"
CONTRIBUTION = "contribution"
NEXT_CONFIG = "next-config"
NEXT_SECAGG = "next-secagg"
NEXT_REFUSED = "next-refused"
# The next sum's stage that each stage of a secure sum carries (see the module's doc).
CARRIED = {Stage.CONSISTENCY: Stage.SETUP, Stage.UNMASK: Stage.SHARE_KEYS}

# Keys inside the config record.
TRANSPORT = "transport"
PURPOSE = "purpose"
JOB = "job"
ROUND = "round"
WEIGHT = "weight"
REASON = "reason"  # in NEXT_REFUSED: why the node refused the next sum's part

HELLO, PLAIN, SECURE, CLOSE = "hello", "plain", "secagg", "close"
# The episode linkage's transport, and the record its replies carry (``fedcost.linkage``):
# one step of a private intersection-sum, relayed by the coordinator.
LINK = "linkage"
LINKAGE = "linkage"
STAGE = "stage"
PEER = "peer"


# The most of a node's stated reason (a refusal, a failure) a coordinator keeps and logs.
MAX_REASON = 1000


def their_reason(text: object) -> str:
    """A node's stated reason as the coordinator keeps, logs and records it: the node's own
    words, so control characters are shown escaped (a newline would forge a log line) and the
    text is cut at ``MAX_REASON`` characters (the node chooses its length)."""
    words = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in str(text)[: MAX_REASON + 1])
    return words if len(words) <= MAX_REASON else words[:MAX_REASON] + "…"


def split_message_dict(data: dict[str, Any]) -> tuple[ConfigRecord, ArrayRecord]:
    """A protocol message's dict as records: numpy arrays apart from everything else."""
    arrays = {k: Array(v) for k, v in data.items() if isinstance(v, np.ndarray)}
    config = {k: v for k, v in data.items() if not isinstance(v, np.ndarray)}
    return ConfigRecord(config), ArrayRecord(arrays)


def join_message_dict(config: ConfigRecord, arrays: ArrayRecord | None) -> dict[str, Any]:
    """The inverse of ``split_message_dict``."""
    data: dict[str, Any] = dict(config)
    if arrays is not None:
        data.update({k: a.numpy() for k, a in arrays.items()})
    return data


def quantizer_config(quantizer: Quantizer) -> dict[str, int | float]:
    """The quantiser of a secure sum as config entries: every node encodes with the same one."""
    config: dict[str, int | float] = {
        "q_clip": quantizer.clip,
        "q_levels": quantizer.levels,
        "q_max_nodes": quantizer.max_nodes,
        "q_max_weight": quantizer.max_weight,
    }
    if quantizer.total_weight is not None:
        config["q_total_weight"] = quantizer.total_weight
    return config


def quantizer_from_config(config: ConfigRecord) -> Quantizer:
    """The inverse of ``quantizer_config``; a missing or malformed entry raises KeyError or ValueError."""
    total_weight = config.get("q_total_weight")
    return Quantizer(
        float(config["q_clip"]),
        int(config["q_levels"]),
        int(config["q_max_nodes"]),
        int(config["q_max_weight"]),
        None if total_weight is None else int(total_weight),
    )


def update_shapes(weights: ArrayRecord) -> list[tuple[int, ...]]:
    """The shapes of a training contribution: every weight array's, then the one-entry
    training-loss slot. Read from the records' headers, without deserialising the model."""
    return [tuple(array.shape) for array in weights.values()] + [(1,)]


def arrays_record(arrays: list[np.ndarray]) -> ArrayRecord:
    """An ordered list of arrays as a record (keys keep the order)."""
    return ArrayRecord({f"{i:04d}": Array(np.asarray(a)) for i, a in enumerate(arrays)})


def arrays_list(record: ArrayRecord) -> list[np.ndarray]:
    return [record[key].numpy() for key in sorted(record)]


def content_bytes(content: RecordDict) -> bytes:
    """The bytes an audit log digests for a message: a canonical form of its records.

    Flower's envelope (message ids, timestamps) differs between sender and receiver; the
    records do not, so both sides hash this and their log entries reconcile.
    """
    parts: list[bytes] = []
    for name in sorted(content):
        record = content[name]
        parts.append(f"{name}:{type(record).__name__}\n".encode())
        if isinstance(record, ArrayRecord):
            for key in record:
                array = record[key]
                parts.append(f"{key}:{array.dtype}:{list(array.shape)}\n".encode() + array.data)
        else:
            values = {key: _json_value(value) for key, value in record.items()}
            parts.append(json.dumps(values, sort_keys=True).encode())
    return b"".join(parts)


def message_kind(request: RecordDict) -> str:
    """What a request is, e.g. ``secagg:train:masked-input``; its reply's kind adds ``>reply``."""
    config = request[CONFIG]
    stage = str(request[SECAGG]["stage"]) if SECAGG in request else ""
    return ":".join(part for part in (str(config[TRANSPORT]), str(config.get(PURPOSE, "")), stage) if part)


def _json_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list):
        return [_json_value(item) for item in value]
    return value


Roster = tuple[tuple[str, bytes], ...]


def secure_id(roster: Roster, name: str) -> int:
    """A site's SecAgg+ node id: its 1-based place in the roster, the same at every party."""
    return [member for member, _ in roster].index(name) + 1


@lru_cache(maxsize=4)
def roster_identities(roster: Roster) -> dict[int, Ed25519PublicKey]:
    """Every roster member's Ed25519 identity key by SecAgg+ node id (parsed once per roster)."""
    return {i + 1: Ed25519PublicKey.from_public_bytes(key) for i, (_, key) in enumerate(roster)}
