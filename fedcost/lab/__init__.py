"""What ``fedcost simulate`` adds around a federation: the run folder staged and renamed into
place (``simulation``), the pooled and local-only baselines (``baselines``) and the summary
that scores them side by side (``summary``).

Importing it loads torch and Flower: the CLI imports it inside the command that runs.
"""

from fedcost.lab.simulation import RunResult, simulate

__all__ = ["RunResult", "simulate"]
