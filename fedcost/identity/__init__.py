"""Party identities (name, role, Ed25519 key) and their files."""

from fedcost.identity.party import ROLES, Identity, PublicIdentity

__all__ = ["ROLES", "Identity", "PublicIdentity"]
