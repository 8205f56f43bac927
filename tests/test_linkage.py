"""Episode costs across parties: the private intersection-sum equals the pooled join, and
what a coordinator can make a site do is bounded (signatures, sessions, the small-cell rule)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcost import schema
from fedcost.data.synthetic import EcosystemSpec, generate_ecosystem
from fedcost.data.synthetic_episodes import generate_linked_extracts
from fedcost.errors import (
    DataValidationError,
    FederationError,
    InvalidSignatureError,
    PolicyViolationError,
    ProtocolAbort,
)
from fedcost.linkage import Claims, EpisodeWindow, Stays, link_episodes
from fedcost.linkage.episodes import EpisodePlan, EpisodeSite
from fedcost.linkage.intersection_sum import (
    Answer,
    Blinding,
    HospitalSide,
    Offer,
    Session,
    add_up,
    answer_offer,
    hash_to_curve,
)
from fedcost.linkage.windows import ADMISSION, CLAIM_COST, DISCHARGE, KEY, SERVICE

MIN_COHORT = 11
SIZES = {"hospital": [150, 120, 8], "insurer": [100, 100], "pharma": [100]}
SEED = 7
HERE = Path("<test>")
MSPB = EpisodeWindow()  # 3 days before admission to 30 after discharge


@pytest.fixture(scope="module")
def ecosystem():
    return generate_ecosystem(EcosystemSpec.from_sizes(SIZES), seed=SEED)


@pytest.fixture(scope="module")
def keys(ecosystem):
    identities = {node.name: Ed25519PrivateKey.generate() for node in ecosystem.nodes}
    return identities, {name: key.public_key() for name, key in identities.items()}


def _sites(ecosystem, extracts, keys, *, refusing=(), min_cohort=MIN_COHORT) -> list[EpisodeSite]:
    identities, roster = keys
    return [
        EpisodeSite(
            node.name,
            node.role,
            Stays.from_frame(extracts[node.name], HERE)
            if node.role == "hospital"
            else Claims.from_frame(extracts[node.name], HERE),
            identities[node.name],
            roster,
            shares_episodes=node.name not in refusing,
            min_cohort=min_cohort,
        )
        for node in ecosystem.nodes
    ]


def _plan(ecosystem, window=MSPB, run_id="run-1") -> EpisodePlan:
    hospitals = tuple(n.name for n in ecosystem.nodes if n.role == "hospital")
    return EpisodePlan(
        run_id, window, MIN_COHORT, hospitals, tuple(n.name for n in ecosystem.nodes if n.role != "hospital")
    )


def _pandas_join(stays: pd.DataFrame, claims: pd.DataFrame, window: EpisodeWindow) -> int:
    """What a payer paid within a hospital's windows, in cents, joined in the clear with pandas."""
    first = pd.to_datetime(stays[ADMISSION]) - pd.Timedelta(days=window.before_days)
    last = pd.to_datetime(stays[DISCHARGE]) + pd.Timedelta(days=window.after_days)
    days = pd.DataFrame({KEY: stays[KEY], "day": [pd.date_range(a, b) for a, b in zip(first, last)]})
    days = days.explode("day").drop_duplicates([KEY, "day"])
    paid = claims.assign(day=pd.to_datetime(claims[SERVICE]), cents=np.rint(claims[CLAIM_COST] * 100).astype("int64"))
    return int(paid.merge(days, on=[KEY, "day"])["cents"].sum())


@pytest.mark.parametrize("window", [EpisodeWindow(), EpisodeWindow(before_days=0, after_days=7)])
def test_episode_costs_equal_a_pooled_pandas_join_exactly(ecosystem, keys, window) -> None:
    linked = generate_linked_extracts(ecosystem, SEED, window)
    result = link_episodes(_plan(ecosystem, window), _sites(ecosystem, linked.extracts, keys), keys[1])
    by_name = {h.hospital: h for h in result.hospitals}
    payers = [n.name for n in ecosystem.nodes if n.role != "hospital"]
    for hospital in ("hospital-1", "hospital-2"):
        stays = linked.extracts[hospital]
        episode = by_name[hospital]
        assert episode.stays == len(stays) and not episode.withheld
        assert round(episode.stay_cost * 100) == int(np.rint(stays[schema.COST] * 100).sum())
        joined = {payer: _pandas_join(stays, linked.extracts[payer], window) for payer in payers}
        assert {payer: round(value * 100) for payer, value in episode.payers.items()} == joined
        assert round(episode.episode_cost * 100) == round(episode.stay_cost * 100) + sum(joined.values())
        truth = linked.truth["hospitals"][hospital]
        assert episode.episode_cost == pytest.approx(truth["episode_cost"], abs=0.005)
    assert sum(joined.values()) > 0  # the join is not trivially empty
    # A hospital of fewer stays than the small-cell rule releases nothing, and is named.
    assert by_name["hospital-3"].episode_cost is None and "fewer stays" in by_name["hospital-3"].withheld


def test_a_payer_with_no_overlap_adds_zero_and_the_federation_value_index_is_one(ecosystem, keys) -> None:
    linked = generate_linked_extracts(ecosystem, SEED, EpisodeWindow())
    result = link_episodes(_plan(ecosystem), _sites(ecosystem, linked.extracts, keys), keys[1])
    hospital_1 = next(h for h in result.hospitals if h.hospital == "hospital-1")
    # insurer-2 covers region 2 only; hospital-1 is in region 1.
    assert hospital_1.payers["insurer-2"] == 0.0
    assert linked.truth["hospitals"]["hospital-1"]["patients_with_claims"]["insurer-2"] == 0
    released = [h for h in result.hospitals if h.episode_cost is not None]
    stays = sum(h.stays for h in released)
    readmitted = sum(round(h.readmission_rate * h.stays) for h in released)
    cost = sum(h.episode_cost for h in released)
    pooled_value = (stays - readmitted) / cost
    weighted = sum(h.value_index * pooled_value * h.episode_cost for h in released) / (stays - readmitted)
    assert weighted == pytest.approx(1.0)  # the federation, pooled, has value index 1
    frame = result.frame()
    assert list(frame["hospital"]) == ["hospital-1", "hospital-2", "hospital-3"]


def test_a_site_that_does_not_consent_refuses_with_its_reason(ecosystem, keys) -> None:
    linked = generate_linked_extracts(ecosystem, SEED, EpisodeWindow())
    sites = _sites(ecosystem, linked.extracts, keys, refusing=("pharma-1",))
    with pytest.raises(FederationError, match=r"pharma-1 refuses the episode linkage.*share_episodes = true"):
        link_episodes(_plan(ecosystem), sites, keys[1])


def _pair():
    hospital, payer = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    return hospital, payer, Session("run-1", "hospital-1", "insurer-1")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    stays=st.lists(st.tuples(st.sampled_from("abcdef"), st.integers(0, 20), st.integers(0, 4)), max_size=6),
    claims=st.lists(st.tuples(st.sampled_from("abcdefgh"), st.integers(-5, 30), st.integers(0, 10**9)), max_size=12),
    before=st.integers(0, 4),
    after=st.integers(0, 5),
)
def test_the_intersection_sum_equals_the_plain_join(stays, claims, before, after) -> None:
    """Random stays (key, admission, length) and claims (key, day, cents), duplicate days and
    empty intersections included: every claim whose day lies in a window of its patient's
    stays is counted once, and nothing else."""
    window = EpisodeWindow(before, after)
    frame = pd.DataFrame(
        {
            KEY: [k for k, _, _ in stays],
            ADMISSION: [str(pd.Timestamp("2024-01-01") + pd.Timedelta(days=a))[:10] for _, a, _ in stays],
            DISCHARGE: [str(pd.Timestamp("2024-01-01") + pd.Timedelta(days=a + n))[:10] for _, a, n in stays],
            schema.COST: [1.0] * len(stays),
            schema.READMISSION: [0] * len(stays),
        }
    )
    start = (pd.Timestamp("2024-01-01") - pd.Timestamp("1970-01-01")).days
    items = Stays.from_frame(frame, HERE).items(window)
    paid = Claims(
        tuple(k for k, _, _ in claims), np.array([start + d for _, d, _ in claims]), np.array([c for _, _, c in claims])
    )
    expected = sum(
        cents for key, day, cents in claims if any(k == key and a - before <= day <= a + n + after for k, a, n in stays)
    )
    hospital_key, payer_key, session = _pair()
    side = HospitalSide(session, hospital_key, payer_key.public_key(), items, min_cohort=1)
    answer, shares = answer_offer(side.offer(), session, payer_key, hospital_key.public_key(), paid.items())
    report = side.report(answer)
    assert add_up(session, shares, report, payer_key.public_key(), hospital_key.public_key()) == expected


def test_blinding_commutes() -> None:
    a, b = Blinding(), Blinding()
    points = [hash_to_curve(b"test", bytes([i])) for i in range(20)]
    assert a.apply(b.apply(points)) == b.apply(a.apply(points))
    assert len(set(a.apply(points))) == len(points)


def _claims(keys_days_cents) -> dict:
    return {(key, day): cents for key, day, cents in keys_days_cents}


def _hospital(session, hospital_key, payer_key, patients=30, min_cohort=MIN_COHORT) -> HospitalSide:
    items = {(f"p{i}", day) for i in range(patients) for day in range(10)}
    return HospitalSide(session, hospital_key, payer_key.public_key(), items, min_cohort)


def test_a_coordinator_cannot_make_a_hospital_intersect_with_a_set_of_its_own() -> None:
    """The coordinator crafts a payer's answer holding one patient's days, to learn that
    patient's cost at the hospital's say-so: the hospital refuses anything not signed by the
    payer for this very session."""
    hospital_key, payer_key, session = _pair()
    coordinator = Ed25519PrivateKey.generate()
    side = _hospital(session, hospital_key, payer_key)
    offer = side.offer()
    crafted, _ = answer_offer(offer, session, coordinator, hospital_key.public_key(), _claims([("p0", 3, 100)]))
    with pytest.raises(InvalidSignatureError):
        side.report(crafted)
    # ... and the hospital's session is spent: no second answer is taken.
    genuine, _ = answer_offer(offer, session, payer_key, hospital_key.public_key(), _claims([("p0", 3, 100)]))
    with pytest.raises(PolicyViolationError, match="once"):
        side.report(genuine)


def test_a_payers_answer_for_another_hospital_or_run_is_refused() -> None:
    hospital_key, payer_key, session = _pair()
    other = Session("run-1", "hospital-2", "insurer-1")
    side = _hospital(session, hospital_key, payer_key)
    offer = side.offer()
    relabelled = Offer(other, offer.reply_key, offer.items, offer.signature)
    with pytest.raises(InvalidSignatureError):  # the offer's signature binds its session
        answer_offer(relabelled, other, payer_key, hospital_key.public_key(), _claims([("p0", 3, 100)]))
    genuine, _ = answer_offer(offer, session, payer_key, hospital_key.public_key(), _claims([("p0", 3, 100)]))
    replayed = Answer(
        Session("run-0", "hospital-1", "insurer-1"), genuine.sender_key, genuine.sealed, genuine.signature
    )
    with pytest.raises(PolicyViolationError, match="another intersection-sum"):
        side.report(replayed)


def test_a_payer_answers_only_an_offer_the_hospital_signed() -> None:
    """The coordinator crafts an offer of chosen items (a target's days, blinded with its own
    secret) to test the payer's set and read its shares: the payer refuses it."""
    hospital_key, payer_key, session = _pair()
    coordinator = Ed25519PrivateKey.generate()
    forged = HospitalSide(session, coordinator, payer_key.public_key(), {("target", 3)}, 1).offer()
    with pytest.raises(InvalidSignatureError):
        answer_offer(forged, session, payer_key, hospital_key.public_key(), _claims([("target", 3, 100)]))


@pytest.mark.parametrize("patients", [1, MIN_COHORT - 1])
def test_a_sum_over_fewer_patients_than_the_small_cell_rule_is_withheld_at_the_hospital(patients) -> None:
    """Even a genuine payer whose claims meet the hospital's windows for a handful of patients
    (one patient's every day included) gets no sum out of the hospital."""
    hospital_key, payer_key, session = _pair()
    side = _hospital(session, hospital_key, payer_key)
    paid = _claims([(f"p{i}", day, 1000 + day) for i in range(patients) for day in range(10)])
    answer, shares = answer_offer(side.offer(), session, payer_key, hospital_key.public_key(), paid)
    report = side.report(answer)
    assert report.withheld and report.positions == () and report.share_sum == 0
    assert add_up(session, shares, report, payer_key.public_key(), hospital_key.public_key()) is None


def test_the_shares_the_coordinator_holds_say_nothing_of_a_cost() -> None:
    """The coordinator's half of every share is uniformly random: the same costs give other
    shares each time, and no share equals its cost."""
    hospital_key, payer_key, session = _pair()
    paid = _claims([(f"p{i}", 0, 500) for i in range(40)])
    halves = []
    for _ in range(2):
        side = _hospital(session, hospital_key, payer_key)
        _, shares = answer_offer(side.offer(), session, payer_key, hospital_key.public_key(), paid)
        halves.append(np.frombuffer(shares.shares, dtype="<u8"))
    assert not np.isin(halves[0], halves[1]).any() and not (halves[0] == 500).any()


def test_a_point_of_small_order_stops_the_exchange() -> None:
    hospital_key, payer_key, session = _pair()
    side = _hospital(session, hospital_key, payer_key)
    offer = side.offer()
    zero = Offer(session, offer.reply_key, bytes(32) + offer.items[32:], b"")
    signed = Offer(session, zero.reply_key, zero.items, hospital_key.sign(zero.signed_bytes()))
    with pytest.raises(ProtocolAbort, match="small order"):
        answer_offer(signed, session, payer_key, hospital_key.public_key(), _claims([("p0", 3, 100)]))


def _write(tmp_path: Path, rows: list[list[str]]) -> Path:
    path = tmp_path / "claims.csv"
    path.write_text("\n".join(",".join(row) for row in [[KEY, SERVICE, CLAIM_COST], *rows]) + "\n")
    return path


@pytest.mark.parametrize(
    ("bad_row", "column", "message"),
    [
        (["p2", "2024-02-30", "10"], SERVICE, "YYYY-MM-DD"),
        (["p2", "2024-02-03", "-4"], CLAIM_COST, "from 0"),
        (["", "2024-02-03", "4"], KEY, "patient key"),
        (["p2", "2024-02-03", "ten"], CLAIM_COST, "number"),
    ],
)
def test_a_malformed_claims_file_is_refused_naming_file_row_and_column(tmp_path, bad_row, column, message) -> None:
    from fedcost.data.files import read_frame

    path = _write(tmp_path, [["p1", "2024-02-01", "12.50"], bad_row])
    with pytest.raises(DataValidationError, match=message) as caught:
        Claims.from_frame(read_frame(path), path)
    assert (caught.value.path, caught.value.row, caught.value.column) == (str(path), 2, column)


def test_a_claims_file_without_a_key_column_is_refused(tmp_path) -> None:
    from fedcost.data.files import read_frame

    path = tmp_path / "claims.csv"
    path.write_text("member,service_date,cost\np1,2024-02-01,3\n")
    with pytest.raises(DataValidationError, match="no column 'patient_key'") as caught:
        Claims.from_frame(read_frame(path), path)
    assert caught.value.column == KEY


def test_the_linked_extracts_leave_the_ecosystem_as_it_was(ecosystem) -> None:
    again = generate_ecosystem(EcosystemSpec.from_sizes(SIZES), seed=SEED)
    generate_linked_extracts(ecosystem, SEED, EpisodeWindow())
    for before, after in zip(ecosystem.nodes, again.nodes):
        pd.testing.assert_frame_equal(before.frame, after.frame)
    first = generate_linked_extracts(again, SEED, EpisodeWindow()).extracts
    second = generate_linked_extracts(again, SEED, EpisodeWindow()).extracts
    for name in first:
        pd.testing.assert_frame_equal(first[name], second[name])
    stays = first["hospital-1"]
    assert (stays[schema.COST].to_numpy() == ecosystem.nodes[0].frame[schema.COST].to_numpy()).all()
    assert stays[KEY].duplicated().any()  # some patients come back: windows overlap and are deduplicated


def test_a_stay_discharged_before_its_admission_is_refused(tmp_path) -> None:
    from fedcost.data.files import read_frame

    path = tmp_path / "stays.csv"
    header = f"{KEY},{ADMISSION},{DISCHARGE},{schema.COST},{schema.READMISSION}"
    path.write_text(f"{header}\np1,2024-02-01,2024-02-03,100,0\np2,2024-02-05,2024-02-04,100,0\n")
    with pytest.raises(DataValidationError, match="before the admission") as caught:
        Stays.from_frame(read_frame(path), path)
    assert (caught.value.row, caught.value.column) == (2, DISCHARGE)


MAPPING = """
[targets.readmitted_30d]

[nodes.st-mary]
role = "{role}"
file = "st-mary.csv"
{episodes}
"""


@pytest.mark.parametrize(
    ("role", "episodes", "message"),
    [
        ("site", 'episodes = "x.csv"', "only a hospital"),
        ("hospital", "episodes = 3", "must be the path"),
        ("hospital", 'episode = "x.csv"', "unknown key; allowed: .*episodes"),
    ],
)
def test_a_mapping_names_an_episode_extract_only_where_one_makes_sense(tmp_path, role, episodes, message) -> None:
    from fedcost.data.mapping import DataMapping
    from fedcost.errors import MappingError

    (tmp_path / "mapping.toml").write_text(MAPPING.format(role=role, episodes=episodes))
    with pytest.raises(MappingError, match=message):
        DataMapping.load(tmp_path / "mapping.toml")


def test_a_mapping_reads_a_nodes_episode_extract(tmp_path) -> None:
    from fedcost.data.mapping import DataMapping
    from fedcost.linkage.windows import read_extract

    (tmp_path / "mapping.toml").write_text(MAPPING.format(role="insurer", episodes='episodes = "claims.csv"'))
    _write(tmp_path, [["p1", "2024-02-01", "12.50"], ["p1", "2024-02-01", "0.25"]])
    node = DataMapping.load(tmp_path / "mapping.toml").node("st-mary")
    assert node.episodes == tmp_path / "claims.csv"
    claims = read_extract(node.role, node.episodes)
    first = (pd.Timestamp("2024-02-01") - pd.Timestamp("1970-01-01")).days
    assert claims.items() == {("p1", first): 1275}


@pytest.mark.parametrize(
    ("episodes", "message"),
    [
        ({"before_days": -1}, "before_days must be a whole number"),
        ({"after_days": 400}, "after_days must be a whole number"),
        ({"after": 30}, "episodes.after is not a setting"),
    ],
)
def test_a_bad_episode_window_is_refused_naming_the_setting(episodes, message) -> None:
    from fedcost.config import SimulationConfig
    from fedcost.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        SimulationConfig.from_dict({"analytics": {"episodes": episodes}})
    assert SimulationConfig.from_dict({"analytics": {"episodes": {"after_days": 7}}}).analytics.episode_window() == (
        EpisodeWindow(3, 7)
    )


def test_episodes_are_refused_in_a_run_with_statistics_noise() -> None:
    from fedcost.config import SimulationConfig
    from fedcost.errors import ConfigError

    noisy = {"analytics": {"episodes": {"after_days": 30}}, "statistics_privacy": {"epsilon": 1.0}}
    with pytest.raises(ConfigError, match="exact sums and carry no statistics noise"):
        SimulationConfig.from_dict(noisy)
