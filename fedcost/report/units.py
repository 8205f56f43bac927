"""How a report names its cost unit: the config's currency, or plainly none."""

from __future__ import annotations

UNNAMED = "currency units"


def cost_unit(summary: dict) -> str:
    """The ISO 4217 code the run's config states (``[analytics] currency``), or "currency units"."""
    return summary.get("currency") or UNNAMED
