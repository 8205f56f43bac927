"""Party identities: key files, strict loaders, signatures."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from fedcost.errors import ConfigError, InvalidSignatureError
from fedcost.identity import Identity, PublicIdentity


def test_identity_round_trips_through_its_files(tmp_path: Path) -> None:
    identity = Identity.generate("hospital-1", "hospital")
    key_path, public_path = identity.save(tmp_path)

    assert key_path.name == "hospital-1.key.pem" and public_path.name == "hospital-1.pub.json"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    loaded = Identity.load(tmp_path, "hospital-1")
    assert loaded.public() == identity.public() == PublicIdentity.load(public_path)
    assert json.loads(public_path.read_text())["key_id"] == identity.public().key_id


def test_saving_never_overwrites_a_private_key(tmp_path: Path) -> None:
    Identity.generate("hospital-1", "hospital").save(tmp_path)
    with pytest.raises(FileExistsError):
        Identity.generate("hospital-1", "hospital").save(tmp_path)


def test_signature_checks_fail_opaquely() -> None:
    identity = Identity.generate("coordinator", "coordinator")
    signature = identity.sign(b"message")
    identity.public().verify(signature, b"message")
    for forged, message in ((signature, b"other"), (bytes(64), b"message"), (b"short", b"message")):
        with pytest.raises(InvalidSignatureError, match="^signature check failed$"):
            identity.public().verify(forged, message)


@pytest.mark.parametrize("name, role", [("../etc", "hospital"), ("", "hospital"), ("h1", "doctor")])
def test_bad_names_and_roles_are_refused(name: str, role: str) -> None:
    with pytest.raises(ValueError):
        Identity.generate(name, role)


def _public_file(tmp_path: Path, **changes: object) -> Path:
    data = Identity.generate("insurer-1", "insurer").public().to_dict()
    data.update(changes)
    data = {k: v for k, v in data.items() if v is not None}
    path = tmp_path / "insurer-1.pub.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"key_id": "00" * 32}, "key_id"),
        ({"public_key": "not base64!"}, "public_key"),
        ({"public_key": "AAAA"}, "public_key"),
        ({"role": "regulator"}, "role"),
        ({"name": None}, "name"),
        ({"comment": "hi"}, "comment"),
    ],
    ids=["key id of another key", "not base64", "short key", "unknown role", "missing name", "unexpected field"],
)
def test_public_identity_loader_names_file_and_field(tmp_path: Path, changes: dict, field: str) -> None:
    path = _public_file(tmp_path, **changes)
    with pytest.raises(ConfigError) as caught:
        PublicIdentity.load(path)
    assert caught.value.path == str(path) and caught.value.field == field


def test_public_identity_loader_refuses_non_json(tmp_path: Path) -> None:
    path = tmp_path / "x.pub.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="x.pub.json"):
        PublicIdentity.load(path)


def test_private_key_of_another_party_is_refused(tmp_path: Path) -> None:
    Identity.generate("pharma-1", "pharma").save(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    Identity.generate("pharma-1", "pharma").save(other)
    (tmp_path / "pharma-1.key.pem").unlink()
    (other / "pharma-1.key.pem").rename(tmp_path / "pharma-1.key.pem")
    with pytest.raises(ConfigError, match="does not match pharma-1.pub.json"):
        Identity.load(tmp_path, "pharma-1")


@pytest.mark.parametrize("missing", ["hospital-1.key.pem", "hospital-1.pub.json"])
def test_a_missing_identity_file_is_named_with_what_to_do(tmp_path: Path, missing: str) -> None:
    Identity.generate("hospital-1", "hospital").save(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(ConfigError, match=f"{missing}: cannot be read .*restore it"):
        Identity.load(tmp_path, "hospital-1")
