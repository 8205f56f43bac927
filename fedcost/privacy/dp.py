"""Record-level DP-SGD for fedcost models: per-example clipping and Gaussian noise.

Abadi et al. 2016, "Deep Learning with Differential Privacy" (Algorithm 1): each step
draws a Poisson sample (every row independently with probability ``q``), clips every
example's gradient to L2 norm ``C`` (``max_grad_norm``), adds N(0, (σC)²) to the sum
and divides by the *expected* batch size ``qn`` (the actual size is private). The
accountant (:mod:`fedcost.privacy.accounting`) then prices the round as ``steps``
compositions of the sampled Gaussian mechanism at ``q`` and σ.

Per-example gradients come from ``torch.func`` (``vmap`` of ``grad`` over
``functional_call``), so any ``FedcostNet`` works without hooks. Everything after the
noisy gradient (momentum, Adam, weight decay, the FedProx pull) is post-processing and
costs no privacy.

Randomness: Poisson sampling and noise both draw from one ``torch.Generator``. Tests
and simulations pass a seed for reproducibility. In a deployment pass ``seed=None``:
the generator is then seeded from ``secrets.randbits(63)``, so nobody can predict the
noise from the run seed. torch's generator (Mersenne Twister) is still not a CSPRNG:
its state can be recovered from enough of its outputs. Here those outputs are never
seen alone (the noise is added to gradients, and the update is masked), but a
deployment that wants the textbook guarantee needs a generator backed by the OS CSPRNG.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import functional_call, grad_and_value, vmap

from fedcost.models.nets import FedcostNet, SeededDropout
from fedcost.models.training import TaskData, TrainConfig, TrainResult, loss_terms, prepare_training
from fedcost.privacy.accounting import PrivacyLedger
from fedcost.privacy.policy import PrivacySettings

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class DPConfig:
    """DP-SGD settings of one round: clipping norm C and noise multiplier σ (noise std = σC)."""

    max_grad_norm: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"DPConfig.max_grad_norm={self.max_grad_norm!r}: expected a positive number")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"DPConfig.noise_multiplier={self.noise_multiplier!r}: expected a number >= 0")


def dp_sampling(n_examples: int, config: TrainConfig) -> tuple[float, int]:
    """(sample rate, steps) of one ``train_local_dp`` call: what the accountant must price.

    ``q = batch_size / n`` (at most 1), ``ceil(n / batch_size)`` steps per epoch, so an
    epoch visits every row once in expectation, like ``train_local``.
    """
    if n_examples < 1:
        raise ValueError("no training examples: the data set is empty")
    sample_rate = min(1.0, config.batch_size / n_examples)
    return sample_rate, config.epochs * math.ceil(n_examples / config.batch_size)


def dp_config_for(
    privacy: PrivacySettings, ledger: PrivacyLedger, *, sample_rate: float, steps: int, rounds_left: int
) -> DPConfig:
    """The DP settings of the next round under the site's ``privacy`` policy.

    With the policy's own noise multiplier, that one. Without, the smallest σ with which
    ``rounds_left`` rounds (this one included) of ``steps`` steps fit the budget the
    ledger has left: asked afresh each round, the job's rounds exactly fit the budget.
    Spend the round with ``ledger.spend`` before training it.
    """
    if not privacy.enabled:
        raise ValueError("the site policy has epsilon = inf: train with train_local, without DP")
    if isinstance(rounds_left, bool) or not isinstance(rounds_left, int) or rounds_left < 1:
        raise ValueError(f"rounds_left={rounds_left!r}: expected a positive integer (this round included)")
    assert privacy.max_grad_norm is not None  # required by PrivacySettings when DP is on
    sigma = privacy.noise_multiplier or ledger.noise_multiplier_for(sample_rate=sample_rate, steps=steps * rounds_left)
    return DPConfig(max_grad_norm=privacy.max_grad_norm, noise_multiplier=sigma)


def distributed_noise_std(*, central_std: float, n_nodes: int) -> float:
    """Each node's noise std so that the secure sum of ``n_nodes`` inputs carries N(0, central_std²).

    Each node adds N(0, σ²/n) before masking; the sum of n independent shares is N(0, σ²),
    and secure aggregation shows the coordinator only that sum. Account the aggregate as
    one Gaussian mechanism of std σ. Pass the fewest nodes whose inputs can make up the sum
    (the survivors secure aggregation guarantees), not the nodes invited: with dropouts
    fewer shares arrive and the sum carries less noise than accounted. A single node's
    input alone is protected only by σ/√n.
    """
    if not (math.isfinite(central_std) and central_std >= 0):
        raise ValueError(f"central_std={central_std!r}: expected a finite number >= 0")
    if isinstance(n_nodes, bool) or not isinstance(n_nodes, int) or n_nodes < 1:
        raise ValueError(f"n_nodes={n_nodes!r}: expected a positive integer")
    return central_std / math.sqrt(n_nodes)


def train_local_dp(
    model: FedcostNet,
    data: TaskData,
    config: TrainConfig,
    *,
    seed: int | None,
    dp: DPConfig,
    global_params: list[np.ndarray] | None = None,
) -> TrainResult:
    """``train_local`` with DP-SGD: same tasks, losses, optimizers, FedProx and result.

    Trains in place for ``dp_sampling(n, config)[1]`` steps. ``seed=None`` seeds the
    generator from ``secrets`` (use it in deployments). ``TrainResult.loss`` is the mean
    per-example loss of the last epoch's samples: it is *not* privatised, so it leaves the
    site only if the site policy lists it as a metric. Models with dropout are refused:
    dropout masks inside ``vmap`` would need per-example generators.
    """
    if any(isinstance(m, SeededDropout) for m in model.modules()):
        raise ValueError("DP-SGD does not support dropout; build the model with dropout = 0")
    setup = prepare_training(model, data, config, global_params)
    targets, params, anchors, optimizer, x = setup.targets, setup.params, setup.anchors, setup.optimizer, setup.features
    n = len(x)
    sample_rate, steps = dp_sampling(n, config)
    gen = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
    per_example = vmap(grad_and_value(_example_loss(model, config)), in_dims=(None, 0, 0))
    expected_batch = sample_rate * n
    noise_std = dp.noise_multiplier * dp.max_grad_norm
    steps_per_epoch = steps // config.epochs
    total, seen = 0.0, 0
    for step in range(steps):
        if step % steps_per_epoch == 0:
            total, seen = 0.0, 0
        idx = torch.nonzero(torch.rand(n, generator=gen) < sample_rate).squeeze(1)
        current = {name: p.detach() for name, p in params.items()}
        clipped, losses = _clipped_sum(per_example, current, x[idx], {t: y[idx] for t, y in targets.items()}, dp)
        if not torch.isfinite(losses).all():
            raise FloatingPointError(
                f"training loss became non-finite at step {step + 1}; "
                f"lower the learning rate (now {config.learning_rate})"
            )
        for name, p in params.items():
            noisy = (clipped[name] + noise_std * torch.randn(p.shape, generator=gen)) / expected_batch
            if anchors:
                noisy = noisy + config.proximal_mu * (current[name] - anchors[name])
            p.grad = noisy
        optimizer.step()
        total += losses.sum().item()
        seen += len(idx)
    return TrainResult(loss=total / max(seen, 1), examples=n, steps=steps)


def _example_loss(model: FedcostNet, config: TrainConfig) -> Callable[[Tensors, torch.Tensor, Tensors], torch.Tensor]:
    """The weighted task loss of one example, as a function of the trained parameters."""

    def loss(params: Tensors, x: torch.Tensor, targets: Tensors) -> torch.Tensor:
        outputs = functional_call(model, params, (x.unsqueeze(0),))
        terms = loss_terms(
            outputs, {t: y.unsqueeze(0) for t, y in targets.items()}, tweedie_power=model.spec.tweedie_power
        )
        return sum(term * (config.cost_weight if task == "cost" else 1.0) for task, term in terms.items())

    return loss


def _clipped_sum(
    per_example: Callable[[Tensors, torch.Tensor, Tensors], tuple[Tensors, torch.Tensor]],
    params: Tensors,
    x: torch.Tensor,
    targets: Tensors,
    dp: DPConfig,
) -> tuple[Tensors, torch.Tensor]:
    """Σ_i g_i · min(1, C/‖g_i‖) over the batch (‖g_i‖ over all parameters), and the losses."""
    if len(x) == 0:
        return {name: torch.zeros_like(p) for name, p in params.items()}, torch.zeros(0)
    grads, losses = per_example(params, x, targets)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
    scale = (dp.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    return {name: torch.einsum("i,i...->...", scale, g) for name, g in grads.items()}, losses.detach()
