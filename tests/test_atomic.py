"""A file replaced atomically is either the old one or the new one, never a mix."""

import os

import pytest

from fedcost.atomic import replace_atomically


def test_replace_atomically_writes_new_content_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_bytes(b"old")
    replace_atomically(path, b"new")
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json"]


def test_replace_atomically_creates_a_missing_file(tmp_path):
    replace_atomically(tmp_path / "checkpoint.npz", b"\x00\x01")
    assert (tmp_path / "checkpoint.npz").read_bytes() == b"\x00\x01"


def test_a_failed_write_keeps_the_old_file_and_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "crl.pem"
    path.write_bytes(b"old")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        replace_atomically(path, b"new")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crl.pem"]
