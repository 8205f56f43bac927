"""fedcost: privacy-preserving multi-party cost analysis for health-care ecosystems."""

__version__ = "0.1.0"
