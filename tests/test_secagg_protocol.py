"""SecAgg+ rounds: exact sums under dropouts, clean aborts beyond them, stage order, wire format."""

from __future__ import annotations

import itertools
import re
import secrets

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from fedcost.errors import ProtocolAbort
from fedcost.secagg import (
    ConsistencyReply,
    ConsistencyRequest,
    Coordinator,
    KeyAdvertisement,
    Node,
    Quantizer,
    RoundConfig,
    ShareKeysReply,
    ShareKeysRequest,
    Stage,
    UnmaskRequest,
    neighbours,
    reply_from_dict,
    request_from_dict,
    simulate_round,
)
from fedcost.secagg.prg import WORDS, word

DROP_STAGES = [Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.CONSISTENCY, Stage.UNMASK]


def _expected_outcome(config: RoundConfig, dropouts: dict[int, Stage]) -> set[int] | None:
    """Who is summed under the documented rule, or None when the round must abort.

    The round survives while every node still counted keeps t live neighbours: each
    node that advertised among those that advertised, and each node that shared its
    keys among those that answer the unmask stage; and while every node whose masked
    input is summed signs the survivor set (no dropout in the consistency stage).
    """
    graph = neighbours(config.node_ids, config.graph_seed, config.degree)

    def left_after(stage: Stage) -> set[int]:
        gone = {u for u, s in dropouts.items() if DROP_STAGES.index(s) <= DROP_STAGES.index(stage)}
        return set(config.node_ids) - gone

    advertised, shared = left_after(Stage.ADVERTISE_KEYS), left_after(Stage.SHARE_KEYS)
    masked, answered = left_after(Stage.MASKED_INPUT), left_after(Stage.UNMASK)
    t = config.threshold
    if not shared:
        return None
    if any(len(graph[u] & advertised) < t for u in advertised):
        return None
    if any(len(graph[u] & answered) < t for u in shared):
        return None
    if Stage.CONSISTENCY in dropouts.values():
        return None
    return masked


def _exact_sum(inputs: dict[int, np.ndarray], included: set[int]) -> list[int]:
    return [sum(int(inputs[u][i]) for u in included) for i in range(len(next(iter(inputs.values()))))]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_round_gives_the_exact_sum_of_survivors_or_aborts(data):
    n = data.draw(st.integers(3, 12), label="n")
    first = data.draw(st.integers(1, 2**62), label="first id")
    gaps = data.draw(st.lists(st.integers(1, 2**40), min_size=n - 1, max_size=n - 1), label="id gaps")
    ids = list(itertools.accumulate(gaps, initial=first))  # distinct, up to 63 bits
    degree = data.draw(st.sampled_from([n - 1, *range(2, n - 1, 2)]), label="degree")
    threshold = degree // 2 + 1 + data.draw(st.integers(0, degree - degree // 2 - 1), label="threshold - minimum")
    max_weight = data.draw(st.integers(1, 50), label="max_weight")
    weights = {u: data.draw(st.integers(1, max_weight)) for u in ids}
    known_total = data.draw(st.booleans(), label="total weight known")
    quantizer = Quantizer(
        clip=1.0,
        levels=data.draw(st.integers(1, 2**12) | st.integers(2**20, 2**34), label="levels"),
        max_nodes=n,
        max_weight=max_weight,
        total_weight=sum(weights.values()) if known_total else None,
    )
    shapes = data.draw(st.lists(array_shapes(max_dims=2, max_side=4), min_size=1, max_size=2), label="shapes")
    floats = st.floats(-3.0, 3.0, allow_nan=False)  # values beyond the clip of 1.0 too
    updates = {u: [data.draw(arrays(np.float64, s, elements=floats)) for s in shapes] for u in ids}
    inputs = {u: quantizer.encode(updates[u], seed=secrets.token_bytes(32), weight=weights[u]) for u in ids}
    leaving = data.draw(st.permutations(ids))[: data.draw(st.integers(1, n // 2 + 1), label="dropout count")]
    dropouts = {u: data.draw(st.sampled_from(DROP_STAGES), label=f"stage node {u} drops in") for u in leaving}
    config = RoundConfig(
        run_id="hypothesis",
        round=data.draw(st.integers(0, 10**6)),
        node_ids=tuple(ids),
        graph_seed=data.draw(st.binary(min_size=32, max_size=32)),
        degree=degree,
        threshold=threshold,
        bits=quantizer.bits,
        dim=quantizer.length(shapes),
    )
    included = _expected_outcome(config, dropouts)
    event("aborted" if included is None else f"summed with {len(dropouts)} dropouts")
    event(f"{word(quantizer.bits)} words, scale {'1' if quantizer.scale == 1 else '> 1'}")
    if included is None:
        with pytest.raises(ProtocolAbort, match="round aborted"):
            simulate_round(config, inputs, dropouts=dropouts)
        return
    aggregate = simulate_round(config, inputs, dropouts=dropouts)
    assert set(aggregate.included) == included
    assert aggregate.total.tolist() == _exact_sum(inputs, included)
    sums, summed_weight = quantizer.decode(aggregate.total, shapes)
    assert summed_weight == sum(weights[u] for u in included)
    for i, got in enumerate(sums):
        want = sum(weights[u] * np.clip(updates[u][i], -1.0, 1.0) for u in included)
        assert np.all(np.abs(got - want) <= quantizer.step * quantizer.scale * len(included) * (1 + 1e-9) + 1e-9)


@pytest.mark.parametrize("n,degree,threshold,most", [(5, 4, 3, 5), (6, 4, 3, 2)])
def test_every_dropout_set_after_share_keys_and_after_masked_input(n, degree, threshold, most):
    """Exhaustive: each node survives, drops after share keys, or drops after masked input.

    On the 4-regular graph of 6 nodes every node misses just one other, so any 3
    dropouts leave some node 2 dropped neighbours (beyond t = 3 of 4): checking every
    set of at most 2 dropouts covers every set within tolerance there.
    """
    ids = tuple(range(1, n + 1))
    config = RoundConfig(
        run_id="exhaustive",
        round=0,
        node_ids=ids,
        graph_seed=secrets.token_bytes(32),
        degree=degree,
        threshold=threshold,
        bits=20,
        dim=3,
    )
    inputs = {u: np.array([u, 1000 * u, 2**19 - u], dtype=word(config.bits)) for u in ids}
    outcomes = {"summed": 0, "aborted": 0}
    for choice in itertools.product([None, Stage.MASKED_INPUT, Stage.UNMASK], repeat=n):
        dropouts = {u: stage for u, stage in zip(ids, choice) if stage}
        if len(dropouts) > most:
            continue
        included = _expected_outcome(config, dropouts)
        if included is None:
            with pytest.raises(ProtocolAbort, match="round aborted"):
                simulate_round(config, inputs, dropouts=dropouts)
            outcomes["aborted"] += 1
            continue
        aggregate = simulate_round(config, inputs, dropouts=dropouts)
        assert set(aggregate.included) == included
        expected = [v % 2**20 for v in _exact_sum(inputs, included)]
        assert aggregate.total.tolist() == expected
        outcomes["summed"] += 1
    assert outcomes["summed"] and outcomes["aborted"]


def test_dropouts_are_recorded_with_their_stage():
    ids = tuple(range(1, 8))
    config = RoundConfig.create(run_id="log", round=2, node_ids=ids, dim=2, bits=16)
    inputs = {u: np.array([u, 1], dtype=word(config.bits)) for u in ids}
    identity_keys = {u: Ed25519PrivateKey.generate() for u in ids}
    identities = {u: k.public_key() for u, k in identity_keys.items()}
    nodes = {u: Node(u, identity_keys[u], identities) for u in ids}
    coordinator = Coordinator(config, identities)
    requests = coordinator.start()
    while not coordinator.done:
        replies = [
            nodes[u].handle(r, vector=inputs[u] if r.stage is Stage.MASKED_INPUT else None)
            for u, r in requests.items()
            if (u, r.stage) not in {(3, Stage.SETUP), (5, Stage.MASKED_INPUT)}
        ]
        requests = coordinator.handle(replies)
    assert coordinator.dropouts == {
        3: "no reply in stage advertise-keys",
        5: "no reply in stage masked-input",
    }
    assert coordinator.result.included == (1, 2, 4, 6, 7)
    assert coordinator.result.total.tolist() == [20, 5]


# --- stage order -----------------------------------------------------------------------

NODE_ORDER = [Stage.SETUP, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.CONSISTENCY, Stage.UNMASK, None]
COORDINATOR_ORDER = [
    Stage.SETUP,
    Stage.ADVERTISE_KEYS,
    Stage.SHARE_KEYS,
    Stage.MASKED_INPUT,
    Stage.CONSISTENCY,
    Stage.UNMASK,
    None,
]


class _Round:
    """A small round driven stage by stage, with every node and message in reach."""

    def __init__(self, n: int = 3, *, via_dicts: bool = False, start: bool = True):
        ids = tuple(range(1, n + 1))
        self.config = RoundConfig.create(run_id="stages", round=1, node_ids=ids, dim=4, bits=24)
        self.keys = {u: Ed25519PrivateKey.generate() for u in ids}
        self.identities = {u: key.public_key() for u, key in self.keys.items()}
        self.nodes = {u: Node(u, self.keys[u], self.identities) for u in ids}
        self.coordinator = Coordinator(self.config, self.identities)
        self.inputs = {u: np.array([u, 2 * u, 3 * u, 1], dtype=word(self.config.bits)) for u in ids}
        self.via_dicts = via_dicts
        self.requests = self.coordinator.start() if start else {}
        self.replies: list = []

    def answer(self) -> list:
        replies = []
        for u, request in self.requests.items():
            if self.via_dicts:
                request = request_from_dict(request.to_dict())
            vector = self.inputs[u] if request.stage is Stage.MASKED_INPUT else None
            reply = self.nodes[u].handle(request, vector=vector)
            replies.append(reply_from_dict(reply.to_dict()) if self.via_dicts else reply)
        self.replies = replies
        return replies

    def step(self) -> None:
        self.requests = self.coordinator.handle(self.answer())


def _samples() -> tuple[dict, dict]:
    """One request of each stage a node gets, one reply of each stage the coordinator gets."""
    round_ = _Round()
    requests, replies = {}, {}
    while not round_.coordinator.done:
        request = round_.requests[1]
        requests[request.stage] = request
        round_.step()
        replies[round_.replies[0].stage] = round_.replies[0]
    requests[Stage.ADVERTISE_KEYS] = replies[Stage.ADVERTISE_KEYS]  # a reply sent to a node
    return requests, replies


SAMPLE_REQUESTS, SAMPLE_REPLIES = _samples()


def _node_in_state(done: int) -> tuple[_Round, Node]:
    """A round in which every node has answered ``done`` requests."""
    round_ = _Round()
    for _ in range(done):
        round_.step()
    return round_, round_.nodes[1]


@pytest.mark.parametrize("done,stage", list(itertools.product(range(len(NODE_ORDER)), Stage)))
def test_node_accepts_only_the_next_stage(done, stage):
    round_, node = _node_in_state(done)
    expected = NODE_ORDER[done]
    if stage is expected:
        request = round_.requests[1]
        node.handle(request, vector=round_.inputs[1] if stage is Stage.MASKED_INPUT else None)
        return
    wanted = expected.value if expected else "none (the round is over)"
    with pytest.raises(ProtocolAbort, match=f"^{re.escape(f'expected stage {wanted}, received stage {stage.value}')}$"):
        node.handle(SAMPLE_REQUESTS[stage])


@pytest.mark.parametrize("done,stage", list(itertools.product(range(len(COORDINATOR_ORDER)), Stage)))
def test_coordinator_accepts_only_the_next_stage(done, stage):
    round_ = _Round(start=done > 0)
    for _ in range(done - 1):
        round_.step()
    expected = COORDINATOR_ORDER[done]
    wanted = expected.value if expected else "none (the round is over)"
    if stage is expected:
        if stage is Stage.SETUP:
            round_.coordinator.start()
        else:
            round_.step()
        return
    with pytest.raises(ProtocolAbort, match=f"^{re.escape(f'expected stage {wanted}, received stage {stage.value}')}$"):
        if stage is Stage.SETUP:
            round_.coordinator.start()
        else:
            round_.coordinator.handle([SAMPLE_REPLIES[stage]])


def test_a_message_of_the_right_stage_but_the_wrong_kind_is_refused():
    _, node = _node_in_state(1)
    with pytest.raises(ProtocolAbort, match="needs a ShareKeysRequest, received ShareKeysReply"):
        node.handle(SAMPLE_REPLIES[Stage.SHARE_KEYS])
    round_ = _Round()
    round_.step()
    with pytest.raises(ProtocolAbort, match="needs a ShareKeysReply, received ShareKeysRequest"):
        round_.coordinator.handle([SAMPLE_REQUESTS[Stage.SHARE_KEYS]])


def test_after_an_abort_a_node_refuses_everything():
    round_, node = _node_in_state(1)
    with pytest.raises(ProtocolAbort):
        node.handle(SAMPLE_REQUESTS[Stage.UNMASK])
    with pytest.raises(ProtocolAbort, match="expected stage none"):
        node.handle(round_.requests[1])


def test_coordinator_refuses_repeated_and_unasked_replies():
    round_ = _Round()
    replies = round_.answer()
    with pytest.raises(ProtocolAbort, match="repeated reply from node 1"):
        round_.coordinator.handle([replies[0], replies[0]])
    other = _Round(4)
    stranger = other.answer()[3]
    round_ = _Round()
    with pytest.raises(ProtocolAbort, match="unasked or repeated reply from node 4"):
        round_.coordinator.handle([*round_.answer(), stranger])


def test_the_input_vector_goes_with_the_masked_input_request_only():
    round_, node = _node_in_state(0)
    with pytest.raises(ValueError, match="masked-input request"):
        node.handle(round_.requests[1], vector=round_.inputs[1])
    round_, node = _node_in_state(2)
    with pytest.raises(ValueError, match="4 entries of uint32"):
        node.handle(round_.requests[1], vector=np.zeros(3, dtype=np.uint32))
    round_, node = _node_in_state(2)
    with pytest.raises(ValueError, match="4 entries of uint32"):  # 64-bit words in a 24-bit round
        node.handle(round_.requests[1], vector=np.zeros(4, dtype=np.uint64))


def test_a_node_outside_the_round_refuses_it():
    round_ = _Round()
    outsider = Node(99, Ed25519PrivateKey.generate(), round_.identities)
    with pytest.raises(ProtocolAbort, match="node 99 is not among"):
        outsider.handle(round_.requests[1])


# --- survivor sets and never both shares ---------------------------------------------


def test_a_node_refuses_a_round_smaller_than_its_minimum():
    """A node never takes part in a sum over fewer than min_survivors nodes (at least 3)."""
    keys = {u: Ed25519PrivateKey.generate() for u in (1, 2)}
    identities = {u: key.public_key() for u, key in keys.items()}
    pair = RoundConfig(
        run_id="pair", round=0, node_ids=(1, 2), graph_seed=bytes(32), degree=1, threshold=1, bits=8, dim=1
    )
    request = Coordinator(pair, identities).start()[1]
    with pytest.raises(ProtocolAbort, match="^the round has 2 nodes, fewer than the 3 node 1 needs to take part in"):
        Node(1, keys[1], identities).handle(request)
    round_ = _Round(4)
    strict = Node(1, Ed25519PrivateKey.generate(), round_.identities, min_survivors=5)
    with pytest.raises(ProtocolAbort, match="the round has 4 nodes, fewer than the 5 node 1 needs"):
        strict.handle(round_.requests[1])


@pytest.mark.parametrize("minimum", [2, 0, -3, True, 3.0, "3"])
def test_min_survivors_must_be_an_int_of_at_least_three(minimum):
    with pytest.raises(ValueError, match="min_survivors must be an int of at least 3"):
        Node(1, Ed25519PrivateKey.generate(), {}, min_survivors=minimum)


def test_a_node_needs_the_identity_key_of_every_node_of_the_round():
    """Any node of the round may be in the survivor set whose signatures it verifies."""
    round_ = _Round(4)
    known = {u: key for u, key in round_.identities.items() if u != 4}
    with pytest.raises(ProtocolAbort, match=r"no identity key for node\(s\) \[4\] of the round"):
        Node(1, Ed25519PrivateKey.generate(), known).handle(round_.requests[1])


def _at_unmask(n: int, *, absent: int | None = None) -> _Round:
    """A round whose nodes have all signed the survivor set; ``absent`` skips its masked input."""
    round_ = _Round(n)
    round_.step()
    round_.step()
    round_.requests = round_.coordinator.handle([r for r in round_.answer() if r.node_id != absent])
    round_.step()
    return round_


def test_a_node_reveals_the_seed_share_of_members_and_the_key_share_of_the_others():
    round_ = _at_unmask(6, absent=4)  # node 4 drops out before its masked input
    request = round_.requests[1]
    assert request.survivors == (1, 2, 3, 5, 6) and len(request.signatures) == 5
    graph = neighbours(round_.config.node_ids, round_.config.graph_seed, round_.config.degree)
    replies = round_.answer()
    for reply in replies:
        assert {s.owner for s in reply.seed_shares} == graph[reply.node_id] - {4}
        assert {s.owner for s in reply.key_shares} == {4}
    round_.requests = round_.coordinator.handle(replies)
    assert round_.coordinator.result.included == (1, 2, 3, 5, 6)
    assert round_.coordinator.result.total.tolist() == [17, 34, 51, 5]


def test_a_node_answers_one_unmask_request_only():
    round_ = _at_unmask(5)
    node, request = round_.nodes[1], round_.requests[1]
    node.handle(request)
    with pytest.raises(ProtocolAbort, match="expected stage none"):
        node.handle(request)


def test_a_dropout_in_the_consistency_stage_aborts_the_round():
    """The others have signed S: no result, and no smaller set is offered in its place."""
    round_ = _Round(6)
    for _ in range(3):
        round_.step()
    replies = [r for r in round_.answer() if r.node_id != 4]
    with pytest.raises(
        ProtocolAbort,
        match=re.escape(
            "round aborted in stage consistency: node(s) [4] did not sign the survivor set; "
            "a sum is unmasked only over a set every member signed"
        ),
    ):
        round_.coordinator.handle(replies)
    assert round_.coordinator.dropouts == {4: "no reply in stage consistency"}
    assert not round_.coordinator.done
    with pytest.raises(ValueError, match="has not finished"):
        round_.coordinator.result
    with pytest.raises(ProtocolAbort, match="expected stage none"):
        round_.coordinator.handle(replies)


def test_a_dropout_in_the_consistency_stage_aborts_a_simulated_round():
    config = RoundConfig.create(run_id="consistency", round=3, node_ids=range(1, 8), dim=2, bits=16)
    inputs = {u: np.array([u, 1], dtype=word(config.bits)) for u in config.node_ids}
    with pytest.raises(ProtocolAbort, match=re.escape("node(s) [2, 6] did not sign the survivor set")):
        simulate_round(config, inputs, dropouts={2: Stage.CONSISTENCY, 6: Stage.CONSISTENCY, 5: Stage.SHARE_KEYS})


# --- wire format -------------------------------------------------------------------


def _plain(value) -> bool:
    if isinstance(value, list):
        return len({type(v) for v in value}) <= 1 and all(isinstance(v, (int, str, bytes)) for v in value)
    return isinstance(value, (int, str, bytes)) or (isinstance(value, np.ndarray) and value.dtype in WORDS)


def test_a_round_runs_through_plain_dicts():
    round_ = _Round(4, via_dicts=True)
    messages = []
    while not round_.coordinator.done:
        messages += [r.to_dict() for r in round_.requests.values()]
        round_.step()
        messages += [r.to_dict() for r in round_.replies]
    stages = {message["stage"] for message in messages}
    assert stages == {stage.value for stage in Stage}
    assert all(_plain(value) for message in messages for value in message.values())
    assert round_.coordinator.result.total.tolist() == [10, 20, 30, 4]


@pytest.mark.parametrize(
    "change,why",
    [
        (lambda d: d.pop("signature"), "needs keys"),
        (lambda d: d.update(extra=1), "needs keys"),
        (lambda d: d.update(node_id="1"), "must be an int"),
        (lambda d: d.update(node_id=True), "must be an int"),
        (lambda d: d.update(mask_key=b"short"), "32 bytes"),
    ],
)
def test_malformed_replies_become_protocol_aborts(change, why):
    data = SAMPLE_REPLIES[Stage.ADVERTISE_KEYS].to_dict()
    change(data)
    with pytest.raises(ProtocolAbort, match=f"malformed advertise-keys reply: .*{why}"):
        reply_from_dict(data)


@pytest.mark.parametrize(
    "change,why",
    [
        (lambda d: d.pop("signature"), "needs keys"),
        (lambda d: d.update(survivors=[1, 2, 3]), "needs keys"),
        (lambda d: d.update(signature="ab" * 32), "must be bytes"),
        (lambda d: d.update(node_id=0), "at least 1"),
    ],
)
def test_malformed_consistency_replies_become_protocol_aborts(change, why):
    data = SAMPLE_REPLIES[Stage.CONSISTENCY].to_dict()
    change(data)
    with pytest.raises(ProtocolAbort, match=f"malformed consistency reply: .*{why}"):
        reply_from_dict(data)


@pytest.mark.parametrize(
    "data,why",
    [
        ({"stage": "advertise-keys"}, "no secure-aggregation request has stage 'advertise-keys'"),
        ({"stage": "teardown"}, "no secure-aggregation request"),
        ([1, 2], "no secure-aggregation request"),
        ({**SAMPLE_REQUESTS[Stage.UNMASK].to_dict(), "survivors": [3, 2, 1]}, "sorted and distinct"),
        ({**SAMPLE_REQUESTS[Stage.UNMASK].to_dict(), "dropped": []}, "needs keys"),
        (
            {**SAMPLE_REQUESTS[Stage.UNMASK].to_dict(), "signatures": SAMPLE_REQUESTS[Stage.UNMASK].signatures[1:]},
            "one per survivor, got 2 for 3 survivors",
        ),
        ({**SAMPLE_REQUESTS[Stage.UNMASK].to_dict(), "signatures": ["ab", "cd", "ef"]}, "tuple of bytes"),
        ({**SAMPLE_REQUESTS[Stage.CONSISTENCY].to_dict(), "survivors": [1, 2, 2]}, "sorted and distinct"),
        ({**SAMPLE_REQUESTS[Stage.CONSISTENCY].to_dict(), "survivors": [0, 1, 2]}, "at least 1"),
        ({**SAMPLE_REQUESTS[Stage.CONSISTENCY].to_dict(), "survivors": "123"}, "tuple of int"),
        ({**SAMPLE_REQUESTS[Stage.SETUP].to_dict(), "threshold": 1, "degree": 2}, "strict majority"),
        ({**SAMPLE_REQUESTS[Stage.SETUP].to_dict(), "run_id": "a|b"}, "run id"),
        ({**SAMPLE_REQUESTS[Stage.SETUP].to_dict(), "degree": 1}, "even degree"),
        ({**SAMPLE_REQUESTS[Stage.SETUP].to_dict(), "bits": 63}, "at most 62"),
        ({**SAMPLE_REQUESTS[Stage.MASKED_INPUT].to_dict(), "senders": []}, "differ in length"),
    ],
)
def test_malformed_requests_become_protocol_aborts(data, why):
    with pytest.raises(ProtocolAbort, match=why):
        request_from_dict(data)


def test_messages_survive_their_dict_round_trip():
    for stage, request in SAMPLE_REQUESTS.items():
        if stage is not Stage.ADVERTISE_KEYS:
            assert request_from_dict(request.to_dict()) == request
    for stage, reply in SAMPLE_REPLIES.items():
        again = reply_from_dict(reply.to_dict())
        if stage is Stage.MASKED_INPUT:
            assert again.node_id == reply.node_id and np.array_equal(again.masked, reply.masked)
        else:
            assert again == reply
    assert isinstance(SAMPLE_REQUESTS[Stage.SHARE_KEYS], ShareKeysRequest)
    assert isinstance(SAMPLE_REPLIES[Stage.ADVERTISE_KEYS], KeyAdvertisement)
    assert isinstance(SAMPLE_REPLIES[Stage.SHARE_KEYS], ShareKeysReply)
    assert isinstance(SAMPLE_REQUESTS[Stage.CONSISTENCY], ConsistencyRequest)
    assert isinstance(SAMPLE_REPLIES[Stage.CONSISTENCY], ConsistencyReply)


def test_a_node_restored_from_its_exported_state_finishes_the_round() -> None:
    """Flower may deliver each stage to another worker process: state must survive export."""
    import numpy as np
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedcost.secagg import Coordinator, Node, RoundConfig, Stage

    config = RoundConfig.create(run_id="restore-test", round=1, node_ids=(1, 2, 3, 4), dim=5, bits=20)
    keys = {n: Ed25519PrivateKey.generate() for n in config.node_ids}
    identities = {n: k.public_key() for n, k in keys.items()}
    states = {n: Node(n, keys[n], identities).export_state() for n in config.node_ids}
    inputs = {n: np.arange(5, dtype=word(config.bits)) * n for n in config.node_ids}
    coordinator = Coordinator(config, identities)
    requests = coordinator.start()
    while not coordinator.done:
        replies = []
        for n, request in requests.items():
            node = Node.restore(states[n], keys[n], identities)
            vector = inputs[n] if request.stage is Stage.MASKED_INPUT else None
            replies.append(node.handle(request, vector=vector))
            states[n] = node.export_state()
        requests = coordinator.handle(replies)
    np.testing.assert_array_equal(coordinator.result.total, sum(inputs.values()))


def test_a_restored_node_keeps_the_survivor_set_it_signed_and_its_minimum():
    round_ = _at_unmask(5)
    state, key, request = round_.nodes[1].export_state(), round_.keys[1], round_.requests[1]
    other = UnmaskRequest(request.survivors[:-1], request.signatures[:-1])
    with pytest.raises(ProtocolAbort, match="survivor set is not the one node 1 signed"):
        Node.restore(state, key, round_.identities).handle(other)
    reply = Node.restore(state, key, round_.identities).handle(request)
    assert {s.owner for s in reply.seed_shares} == {2, 3, 4, 5}
    strict = Node(1, key, round_.identities, min_survivors=7)
    assert Node.restore(strict.export_state(), key, round_.identities).min_survivors == 7
    assert Node.restore(strict.export_state(), key, round_.identities, min_survivors=4).min_survivors == 7
    assert Node.restore(state, key, round_.identities, min_survivors=6).min_survivors == 6  # the site now asks more
    with pytest.raises(ValueError, match="min_survivors must be an int of at least 3"):
        Node.restore(state, key, round_.identities, min_survivors=2)
