"""No module of fedcost.secagg may touch ``random`` or ``numpy.random`` (flwrlabs/flower#7522)."""

from __future__ import annotations

import ast
import random
import secrets
from pathlib import Path

import numpy as np
import pytest

import fedcost.secagg
from fedcost.secagg import Quantizer, RoundConfig, Stage, simulate_round

MODULES = sorted(Path(fedcost.secagg.__file__).parent.glob("*.py"))
NUMPY_NAMES = {"np", "numpy"}


def _weak_randomness(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name == "random" or a.name.startswith("numpy.random")]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module == "random" or module.startswith("numpy.random"):
                found.append(f"from {module}")
            if module == "numpy" and any(a.name == "random" for a in node.names):
                found.append("from numpy import random")
        elif isinstance(node, ast.Attribute) and node.attr == "random":
            if isinstance(node.value, ast.Name) and node.value.id in NUMPY_NAMES:
                found.append(f"{node.value.id}.random")
        elif isinstance(node, ast.Name) and node.id == "random":
            found.append("random")
    return found


def test_the_package_has_modules_to_check():
    assert {p.name for p in MODULES} >= {"crypto.py", "prg.py", "shamir.py", "quantize.py", "protocol.py"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_module_imports_or_calls_weak_randomness(path):
    assert _weak_randomness(ast.parse(path.read_text(), filename=str(path))) == []


def test_the_checker_catches_every_spelling():
    for source in [
        "import random",
        "from random import randint",
        "import numpy.random",
        "from numpy import random",
        "from numpy.random import default_rng",
        "import numpy as np\nnp.random.default_rng()",
        "numpy.random.seed(1)",
    ]:
        assert _weak_randomness(ast.parse(source)), source


def _refuse(*args, **kwargs):
    raise AssertionError("weak randomness used in secure aggregation")


def test_a_round_runs_with_weak_randomness_disabled(monkeypatch):
    for name in (
        "seed",
        "random",
        "randint",
        "randbytes",
        "getrandbits",
        "shuffle",
        "choice",
        "sample",
        "uniform",
    ):
        monkeypatch.setattr(random, name, _refuse)
    for name in (
        "seed",
        "default_rng",
        "random",
        "randint",
        "rand",
        "bytes",
        "shuffle",
        "permutation",
        "RandomState",
    ):
        monkeypatch.setattr(np.random, name, _refuse)
    quantizer = Quantizer(clip=1.0, levels=64, max_nodes=7, max_weight=3)
    ids = list(range(1, 8))
    inputs = {u: quantizer.encode([np.linspace(-2, 2, 5)], seed=secrets.token_bytes(32), weight=1 + u % 3) for u in ids}
    config = RoundConfig.create(run_id="no-weak-rng", round=0, node_ids=ids, dim=6, bits=quantizer.bits)
    aggregate = simulate_round(config, inputs, dropouts={2: Stage.MASKED_INPUT, 5: Stage.UNMASK})
    assert aggregate.total.tolist() == [sum(int(inputs[u][i]) for u in aggregate.included) for i in range(6)]
