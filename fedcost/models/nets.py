"""Torch models for the two targets: 30-day readmission (a logit) and episode cost (log of the mean).

Every model maps features to one output per task, so the node, the coordinator and the pooled
and local-only baselines treat GLMs, per-task MLPs and the shared-trunk multi-task net alike.
Models hold float32 parameters only (no buffers), so FedAvg can average state dicts key by key.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fedcost.models.spec import ModelSpec


class SeededDropout(nn.Module):
    """Dropout that draws masks from ``generator``, not torch's global RNG.

    Training sets the generator, so a run is reproducible from its seed and never disturbs the
    random state of other code in the process (other nodes of a simulation share it).
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        if self.generator is None:
            raise RuntimeError("SeededDropout needs a generator in training mode; train with train_local")
        keep = torch.rand(x.shape, generator=self.generator, dtype=x.dtype) >= self.p
        return x * keep / (1.0 - self.p)


class FedcostNet(nn.Module):
    """A trunk (identity for glm and mlp) feeding one head per task.

    ``forward`` returns ``{"readmission": logit, "cost": log expected cost in scale units}``,
    each of shape ``(n,)``, for the tasks in ``spec.tasks``.
    """

    def __init__(self, spec: ModelSpec, n_features: int, trunk: nn.Module, heads: nn.ModuleDict):
        super().__init__()
        self.spec = spec
        self.n_features = n_features
        self.trunk = trunk
        self.heads = heads

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {task: self.heads[task](z).squeeze(-1) for task in self.spec.tasks}

    def task_parameters(self, tasks: tuple[str, ...] | list[str]) -> dict[str, nn.Parameter]:
        """The parameters that ``tasks`` depend on: the trunk and their heads, by state-dict key."""
        prefixes = ("trunk.", *(f"heads.{task}." for task in tasks))
        return {name: p for name, p in self.named_parameters() if name.startswith(prefixes)}


def _linear(n_in: int, n_out: int, gen: torch.Generator, *, bias: float | None = None) -> nn.Linear:
    """A linear layer initialised from ``gen`` only.

    Built on the meta device so that torch's default initialisation never draws from the global
    RNG. Hidden layers get He-uniform weights (ReLU follows). Output layers (``bias`` given) get
    zero weights, so every model starts at the calibrated base rate and the federation mean cost.
    """
    layer = nn.Linear(n_in, n_out, device="meta").to_empty(device="cpu")
    with torch.no_grad():
        if bias is None:
            bound = math.sqrt(6.0 / n_in)
            nn.init.uniform_(layer.weight, -bound, bound, generator=gen)
            layer.bias.zero_()
        else:
            layer.weight.zero_()
            layer.bias.fill_(bias)
    return layer


def _mlp(n_in: int, hidden: tuple[int, ...], dropout: float, gen: torch.Generator) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [_linear(n_in, width, gen), nn.ReLU()]
        if dropout > 0:
            layers.append(SeededDropout(dropout))
        n_in = width
    return layers


def build_model(spec: ModelSpec, n_features: int, *, seed: int, readmission_rate: float | None = None) -> FedcostNet:
    """Build ``spec`` for ``n_features`` inputs, deterministically from ``seed``.

    ``readmission_rate`` (the federation's base rate) sets the readmission bias to its logit, so
    the first round starts calibrated; the cost bias is 0, i.e. one scale unit, the mean cost.
    The model is returned in eval mode: only ``train_local`` trains, with its own generator.
    """
    if isinstance(n_features, bool) or not isinstance(n_features, int) or n_features < 1:
        raise ValueError(f"n_features={n_features!r}: expected a positive integer")
    if readmission_rate is not None and not 0.0 < readmission_rate < 1.0:
        raise ValueError(f"readmission_rate={readmission_rate!r}: expected 0 < rate < 1")
    biases = {
        "readmission": 0.0 if readmission_rate is None else math.log(readmission_rate / (1.0 - readmission_rate)),
        "cost": 0.0,
    }
    gen = torch.Generator().manual_seed(seed)
    trunk: nn.Module = nn.Identity()
    width = n_features
    if spec.kind == "multitask":
        trunk = nn.Sequential(*_mlp(n_features, spec.hidden, spec.dropout, gen))
        width = spec.hidden[-1]
    heads = nn.ModuleDict()
    for task in spec.tasks:
        if spec.kind == "mlp":
            tower = _mlp(n_features, spec.hidden, spec.dropout, gen)
            heads[task] = nn.Sequential(*tower, _linear(spec.hidden[-1], 1, gen, bias=biases[task]))
        else:
            heads[task] = _linear(width, 1, gen, bias=biases[task])
    return FedcostNet(spec, n_features, trunk, heads).eval()
