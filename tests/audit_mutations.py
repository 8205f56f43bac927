"""Forgeries of audit logs, shared by the attack tests on built and on real runs.

Each mutation is one thing an attacker might do to a party's log file; every one must
make ``verify_folder`` fail with a problem naming that party and a line.
"""

from __future__ import annotations

import base64
import json
import random
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import rfc8785

from fedcost.audit import GENESIS_HASH, verify_folder
from fedcost.audit.entry import CHECKPOINT_EVENTS, checkpoint_message, entry_hash
from fedcost.identity import Identity


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def encode(data: dict) -> bytes:
    """Lay an entry dict out as the writer does: canonical body, then sig as last member."""
    line = rfc8785.dumps({k: v for k, v in data.items() if k != "sig"})
    return line if "sig" not in data else line[:-1] + b',"sig":' + json.dumps(data["sig"]).encode() + b"}"


def hash_of(line: bytes) -> str:
    return entry_hash(rfc8785.dumps({k: v for k, v in json.loads(line).items() if k != "sig"}))


def rechain(lines: list[bytes], start: int, sign: Callable[[bytes], bytes] | None = None) -> list[bytes]:
    """Renumber and relink from ``start`` on, as a forger would; re-sign only if given a key."""
    out = lines[:start]
    prev = hash_of(out[-1]) if out else GENESIS_HASH
    for seq, line in enumerate(lines[start:], start):
        data = {**json.loads(line), "seq": seq, "prev": prev}
        sig = data.pop("sig", None)
        canonical = rfc8785.dumps(data)
        prev = entry_hash(canonical)
        if data["event"] in CHECKPOINT_EVENTS:
            if sign is not None:
                sig = base64.b64encode(sign(checkpoint_message(data["actor"], seq, prev))).decode()
            data["sig"] = sig
        out.append(encode(data) if "sig" in data else canonical)
    return out


def changed(value: object, rng: random.Random) -> object:
    """A different value of a plausible type (never one that canonicalises to the same bytes)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + rng.randint(1, 9)
    if isinstance(value, dict):
        return {**value, "injected": rng.randint(0, 9)}
    if isinstance(value, list):
        return [*value, "injected"]
    if value is None:
        return rng.randbytes(32).hex()
    if re.fullmatch(r"[0-9a-f]{64}", value):
        return rng.randbytes(32).hex()
    if len(value) == 88:  # a signature: change one base64 character
        i = rng.randrange(86)
        return value[:i] + ("B" if value[i] == "A" else "A") + value[i + 1 :]
    return value + "x"


def mutate(lines: list[bytes], rng: random.Random, impostor: Identity) -> tuple[str, list[bytes] | bytes]:
    n = len(lines)
    kind = rng.choice(
        [
            "edit",
            "edit+relink",
            "delete",
            "insert",
            "insert+relink",
            "duplicate",
            "swap",
            "truncate lines",
            "truncate bytes",
            "re-signed by impostor",
        ]
    )
    i = rng.randrange(n)
    if kind.startswith("edit"):
        data = json.loads(lines[i])
        keys = [k for k in data] + [f"details.{k}" for k in data["details"]]
        key = rng.choice(keys)
        if key.startswith("details."):
            data["details"][key[8:]] = changed(data["details"][key[8:]], rng)
        else:
            data[key] = changed(data[key], rng)
        lines = lines[:i] + [encode(data)] + lines[i + 1 :]
        return kind, rechain(lines, i + 1) if kind == "edit+relink" else lines
    if kind.startswith("insert"):
        forged = {
            **json.loads(lines[i]),
            "event": "message_sent",
            "digest": rng.randbytes(32).hex(),
            "details": {"recipient": "coordinator", "kind": "masked_update", "bytes": 10},
        }
        forged.pop("sig", None)
        lines = lines[:i] + [encode(forged)] + lines[i:]
        return kind, rechain(lines, i) if kind == "insert+relink" else lines
    if kind == "delete":
        return kind, lines[:i] + lines[i + 1 :]
    if kind == "duplicate":
        return kind, lines[: i + 1] + lines[i:]
    if kind == "swap":
        j = rng.choice([j for j in range(n) if j != i])
        lines = list(lines)
        lines[i], lines[j] = lines[j], lines[i]
        return kind, lines
    if kind == "truncate lines":
        return kind, lines[:i]
    if kind == "truncate bytes":
        whole = b"".join(line + b"\n" for line in lines)
        return kind, whole[: rng.randrange(len(whole) - 1)]
    return kind, rechain(lines, 0, sign=impostor.sign)


def assert_mutations_detected(run: Path, roles: Mapping[str, str], *, count: int, seed: int) -> dict[str, int]:
    """Apply ``count`` random single mutations to the logs under ``run/audit``, one at a
    time, and check each is caught naming its party and a line; returns kinds tried."""
    rng = random.Random(seed)
    parties = sorted(roles)
    paths = {party: run / "audit" / f"{party}.jsonl" for party in parties}
    originals = {party: path.read_bytes() for party, path in paths.items()}
    impostors = {party: Identity.generate(party, role) for party, role in roles.items()}
    kinds: dict[str, int] = {}
    for _ in range(count):
        party = rng.choice(parties)
        kind, mutated = mutate(originals[party].splitlines(), rng, impostors[party])
        path = paths[party]
        if isinstance(mutated, bytes):
            path.write_bytes(mutated)
        else:
            write_lines(path, mutated)
        assert path.read_bytes() != originals[party], kind
        found = [str(p) for p in verify_folder(run).problems if p.party == party]
        assert any(re.search(r"line \d+", p) for p in found), (kind, found)
        path.write_bytes(originals[party])
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds
