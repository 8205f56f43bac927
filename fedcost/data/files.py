"""Write a data set as the files a federation reads: one Parquet file per node and the
mapping file that names each node's role. Columns already carry schema names, so the
mapping needs no column section."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import tomli_w

from fedcost import schema

MAPPING_FILE = "mapping.toml"


def write_node_files(nodes: Iterable[tuple[str, str, pd.DataFrame]], folder: Path) -> Path:
    """Write ``(name, role, rows)`` per node into ``folder``; returns the mapping file."""
    folder.mkdir(parents=True, exist_ok=True)
    mapping: dict = {"targets": {}, "nodes": {}}
    for name, role, rows in nodes:
        rows.to_parquet(folder / f"{name}.parquet", index=False)
        mapping["nodes"][name] = {"role": role, "file": f"{name}.parquet"}
        for target in (schema.READMISSION, schema.COST):
            if target in rows:
                mapping["targets"][target] = {}
    path = folder / MAPPING_FILE
    path.write_bytes(tomli_w.dumps(mapping).encode())
    return path
