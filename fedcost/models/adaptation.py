"""Site adaptation: each site fine-tunes the federation's final model on its own rows.

One shared model fits what the sites have in common. A site's own rows also carry what
they do not share: a case mix that meets the features differently, and columns its role
lacks. A pharma site holds no stay details, so the slopes that serve it best are not the
federation's. A local-only model fits all of that, but from a few hundred rows. Starting
from the federated model and training a few more epochs on the site's rows keeps what
the federation learned and adds what the site shows. This is local fine-tuning, the
simplest personalisation of FedAvg (Wang et al. 2019, "Federated evaluation of on-device
personalization"; Yu et al. 2020, "Salvaging federated learning by local adaptation").

The epochs are few on purpose. A convex GLM trained to convergence on the site's rows
forgets where it started and becomes the local-only model again. The number in the
configs (``[run] adaptation_epochs``) was chosen on development seeds, not on the runs
it is reported for (``benchmarks/RESULTS.md``).

The adapted model, like its training, stays at the site; nothing of it is shared.
"""

from __future__ import annotations

import copy
from dataclasses import replace

from fedcost.models.nets import FedcostNet
from fedcost.models.training import TaskData, TrainConfig, train_local


def adapted_to_site(model: FedcostNet, train: TaskData, training: TrainConfig, *, epochs: int, seed: int) -> FedcostNet:
    """A copy of ``model`` trained ``epochs`` more epochs on a site's training rows.

    ``model`` itself is left as it is. The local steps use the run's optimiser, batch
    size and learning rate, without a proximal term: nothing global is averaged afterwards.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs={epochs!r}: expected a positive integer (no adaptation: do not call this)")
    site_model = copy.deepcopy(model)
    train_local(site_model, train, replace(training, epochs=epochs, proximal_mu=0.0), seed=seed)
    return site_model
