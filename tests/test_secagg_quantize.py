"""Quantisation: clip, stochastic rounding, weights, headroom and decoding."""

from __future__ import annotations

import secrets

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from fedcost.secagg import Quantizer, RoundConfig, simulate_round
from fedcost.secagg.prg import word


@settings(max_examples=80, deadline=None)
@given(
    data=st.data(),
    n=st.integers(1, 12),
    clip=st.floats(0.01, 100.0),
    levels=st.integers(1, 2**16) | st.integers(2**20, 2**28),  # the larger ones need scaling to fit 32 bits
    max_weight=st.integers(1, 1000),
    known_total=st.booleans(),
)
def test_decoded_sum_is_within_one_grid_unit_per_node(data, n, clip, levels, max_weight, known_total):
    weights = data.draw(st.lists(st.integers(1, max_weight), min_size=n, max_size=n), label="weights")
    slack = data.draw(st.integers(0, sum(weights)), label="total weight - summed weights")
    total_weight = sum(weights) + slack if known_total else None
    quantizer = Quantizer(clip=clip, levels=levels, max_nodes=n, max_weight=max_weight, total_weight=total_weight)
    event(f"{word(quantizer.bits)} words, scale {'1' if quantizer.scale == 1 else '> 1'}")
    shapes = data.draw(st.lists(array_shapes(max_dims=2, max_side=5), min_size=1, max_size=3))
    floats = st.floats(-3 * clip, 3 * clip, allow_nan=False)  # a third of them out of clip
    total = np.zeros(quantizer.length(shapes), dtype=word(quantizer.bits))
    expected = [np.zeros(shape) for shape in shapes]
    for weight in weights:
        update = [data.draw(arrays(np.float64, shape, elements=floats)) for shape in shapes]
        total += quantizer.encode(update, seed=secrets.token_bytes(32), weight=weight)
        for acc, part in zip(expected, update):
            acc += weight * np.clip(part, -clip, clip)
    sums, summed_weight = quantizer.decode(total, shapes)
    assert summed_weight == sum(weights)
    bound = quantizer.step * quantizer.scale * n  # n * (c / levels) unscaled
    assert bound <= quantizer.step * quantizer.weight_bound * (1 + 1e-12)
    for got, want in zip(sums, expected):
        assert got.shape == want.shape
        assert np.all(np.abs(got - want) <= bound * (1 + 1e-9) + 1e-9 * np.abs(want))


def test_a_known_total_weight_brings_a_training_sum_into_32_bit_words():
    # The default training sum: 2**20 levels, up to 2**20 examples a node, 100 nodes.
    unknown = Quantizer(clip=8.0, levels=2**20, max_nodes=100, max_weight=2**20)
    assert (unknown.bits, unknown.scale, word(unknown.bits)) == (48, 1, np.uint64)
    known = Quantizer(clip=8.0, levels=2**20, max_nodes=100, max_weight=2**20, total_weight=60_000)
    assert known.bits <= 32 and word(known.bits) == np.uint32
    assert 1 < known.scale and known.scale * 100 <= 60_000
    small = Quantizer(clip=8.0, levels=2**20, max_nodes=100, max_weight=2**20, total_weight=1_100)
    assert small.scale == 1 and small.bits <= 32  # fits without scaling
    # scaling so far would cost more than a step on the mean: 64-bit words instead
    coarse = Quantizer(clip=8.0, levels=2**30, max_nodes=100, max_weight=2**20, total_weight=60_000)
    assert coarse.scale == 1 and word(coarse.bits) == np.uint64


@pytest.mark.parametrize("total_weight", [1_100, 60_000, 2**26])
def test_nodes_at_plus_clip_whose_weights_reach_the_total_do_not_wrap(total_weight):
    n = 100
    quantizer = Quantizer(clip=8.0, levels=2**20, max_nodes=n, max_weight=2**20, total_weight=total_weight)
    weights = [total_weight // n + (i < total_weight % n) for i in range(n)]
    total = np.zeros(quantizer.length([(3,)]), dtype=word(quantizer.bits))
    for weight in weights:
        total += quantizer.encode([np.full(3, 99.0)], seed=secrets.token_bytes(32), weight=weight)
    sums, summed_weight = quantizer.decode(total, [(3,)])
    assert summed_weight == total_weight
    np.testing.assert_allclose(sums[0] / total_weight, 8.0, atol=quantizer.step)


def test_a_weight_above_the_total_is_refused():
    quantizer = Quantizer(clip=1.0, levels=8, max_nodes=3, max_weight=100, total_weight=50)
    with pytest.raises(ValueError, match="more than the round's total weight 50"):
        quantizer.encode([np.zeros(2)], seed=secrets.token_bytes(32), weight=51)


@pytest.mark.parametrize("n,levels,max_weight", [(1, 1, 1), (12, 2**16, 1), (1000, 2**20, 2**20), (7, 3, 5)])
def test_n_inputs_at_plus_clip_with_max_weight_do_not_wrap(n, levels, max_weight):
    quantizer = Quantizer(clip=0.5, levels=levels, max_nodes=n, max_weight=max_weight)
    encoded = quantizer.encode([np.full(3, 10.0)], seed=secrets.token_bytes(32), weight=max_weight)
    largest = sum(int(v) for v in encoded[:-1]) // 3 * n
    assert largest == n * max_weight * 2 * levels < 2**quantizer.bits
    total = ((encoded.astype(np.uint64) * np.uint64(n)) % np.uint64(2**quantizer.bits)).astype(encoded.dtype)
    sums, weight = quantizer.decode(total, [(3,)])
    assert weight == n * max_weight
    np.testing.assert_allclose(sums[0], n * max_weight * 0.5)


def test_inputs_at_plus_clip_survive_a_full_round_unwrapped():
    n = 5
    quantizer = Quantizer(clip=1.0, levels=2**10, max_nodes=n, max_weight=9)
    ids = list(range(1, n + 1))
    inputs = {u: quantizer.encode([np.full(4, 99.0)], seed=secrets.token_bytes(32), weight=9) for u in ids}
    config = RoundConfig.create(run_id="r", round=0, node_ids=ids, dim=5, bits=quantizer.bits)
    aggregate = simulate_round(config, inputs)
    sums, weight = quantizer.decode(aggregate.total, [(4,)])
    assert weight == 45
    np.testing.assert_allclose(sums[0] / weight, 1.0)


def test_stochastic_rounding_is_unbiased_and_follows_its_seed():
    quantizer = Quantizer(clip=1.0, levels=4, max_nodes=4000)
    x = [np.full(1000, 0.1)]  # 0.1 lies between the grid points 0 and 0.25
    seed = secrets.token_bytes(32)
    assert np.array_equal(quantizer.encode(x, seed=seed), quantizer.encode(x, seed=seed))
    first = quantizer.encode(x, seed=seed)
    assert set(first[:-1].tolist()) == {4, 5}
    total = sum(quantizer.encode(x, seed=secrets.token_bytes(32)) for _ in range(4))
    sums, weight = quantizer.decode(total, [(1000,)])
    assert abs(sums[0].mean() / weight - 0.1) < 0.01


def test_modulus_grows_with_nodes_levels_and_weight():
    assert Quantizer(clip=1, levels=2**15, max_nodes=1).bits == 17
    assert Quantizer(clip=1, levels=2**15, max_nodes=1000).bits == 26
    assert Quantizer(clip=1, levels=2**15, max_nodes=1000, max_weight=2**20).bits == 46


@pytest.mark.parametrize(
    "kwargs,why",
    [
        (dict(clip=0.0, levels=1, max_nodes=1), "clip"),
        (dict(clip=float("inf"), levels=1, max_nodes=1), "clip"),
        (dict(clip=1.0, levels=0, max_nodes=1), "levels"),
        (dict(clip=1.0, levels=1, max_nodes=True), "max_nodes"),
        (dict(clip=1.0, levels=2**40, max_nodes=2**20, max_weight=4), "bits"),
        (dict(clip=1.0, levels=1, max_nodes=1, total_weight=0), "total_weight"),
        (dict(clip=1.0, levels=1, max_nodes=1, total_weight=2.5), "total_weight"),
    ],
)
def test_quantizer_refuses_bad_parameters(kwargs, why):
    with pytest.raises(ValueError, match=why):
        Quantizer(**kwargs)


def test_encode_refuses_nan_bad_weights_and_short_seeds():
    quantizer = Quantizer(clip=1.0, levels=8, max_nodes=3, max_weight=10)
    seed = secrets.token_bytes(32)
    with pytest.raises(ValueError, match="NaN"):
        quantizer.encode([np.array([np.nan])], seed=seed)
    for weight in (0, 11, 2.0, True):
        with pytest.raises(ValueError, match="weight"):
            quantizer.encode([np.zeros(2)], seed=seed, weight=weight)
    with pytest.raises(ValueError, match="seed"):
        quantizer.encode([np.zeros(2)], seed=seed[:16])


def test_decode_refuses_a_sum_that_wrapped_or_has_the_wrong_length():
    quantizer = Quantizer(clip=1.0, levels=8, max_nodes=3)
    with pytest.raises(ValueError, match="wrapped"):
        quantizer.decode(np.full(3, 2**quantizer.bits, dtype=np.uint32), [(2,)])
    with pytest.raises(ValueError, match="3 entries"):
        quantizer.decode(np.zeros(4, dtype=np.uint32), [(2,)])
    with pytest.raises(ValueError, match="uint32 vector"):
        quantizer.decode(np.zeros(3, dtype=np.uint64), [(2,)])
