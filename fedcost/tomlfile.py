"""Reading the TOML files users write (configs, mappings, site policies)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from fedcost.errors import ConfigError


def read_toml(path: Path, what: str, error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """The file's tables, or ``error`` naming the file: missing, not UTF-8, or not TOML."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{what} not found", path=str(path)) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as decode_error:
        raise error(f"not valid TOML: {decode_error}", path=str(path)) from None
