"""A data set's files: read one (CSV or Parquet) as a frame, or write a data set as the
files a federation reads: one Parquet file per node and the mapping file that names each
node's role. Columns already carry schema names, so the mapping needs no column section."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd
import tomli_w

from fedcost import schema
from fedcost.errors import DataValidationError

MAPPING_FILE = "mapping.toml"
# Delimited text (the delimiter read from the header row) and Parquet: the files a node may bring.
TEXT_SUFFIXES = (".csv", ".tsv", ".txt")
TABLE_SUFFIXES = (*TEXT_SUFFIXES, ".parquet", ".pq")


def write_node_files(
    nodes: Iterable[tuple[str, str, pd.DataFrame]], folder: Path, episodes: Mapping[str, pd.DataFrame] | None = None
) -> Path:
    """Write ``(name, role, rows)`` per node into ``folder``, and each node's episode extract
    that ``episodes`` holds (``<name>.episodes.csv``); returns the mapping file."""
    folder.mkdir(parents=True, exist_ok=True)
    mapping: dict = {"targets": {}, "nodes": {}}
    for name, role, rows in nodes:
        rows.to_parquet(folder / f"{name}.parquet", index=False)
        mapping["nodes"][name] = {"role": role, "file": f"{name}.parquet"}
        if episodes is not None and name in episodes:
            episodes[name].to_csv(folder / f"{name}.episodes.csv", index=False)
            mapping["nodes"][name]["episodes"] = f"{name}.episodes.csv"
        for target in (schema.READMISSION, schema.COST):
            if target in rows:
                mapping["targets"][target] = {}
    path = folder / MAPPING_FILE
    path.write_bytes(tomli_w.dumps(mapping).encode())
    return path


_DELIMITERS = (",", ";", "\t", "|")


def _delimiter(path: Path) -> str:
    """The delimiter the header row uses most, outside quotes: a spreadsheet saved in a
    locale whose decimal mark is a comma writes ";", and databases often write tabs or "|"."""
    with path.open(encoding="utf-8-sig", errors="replace", newline="") as file:
        header = re.sub(r'"[^"]*"', "", file.readline())
    return max(_DELIMITERS, key=header.count) if any(d in header for d in _DELIMITERS) else ","


def read_frame(path: Path) -> pd.DataFrame:
    """A delimited text file (every cell as text, for cell-by-cell checks) or a Parquet file, or
    an error naming it."""
    try:
        if path.suffix.lower() in TEXT_SUFFIXES:
            return pd.read_csv(path, sep=_delimiter(path), dtype=str, keep_default_na=False, skipinitialspace=True)
        return pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        raise DataValidationError("file is empty; it needs a header and at least one row", path=str(path)) from None
    except UnicodeDecodeError as error:
        raise DataValidationError(
            f"is not UTF-8 text (it holds the byte {error.object[error.start]:#04x}): save it "
            'again as "CSV UTF-8" (or convert it, e.g. iconv -f latin1 -t utf-8)',
            path=str(path),
        ) from None
    except (pd.errors.ParserError, OSError, ValueError) as error:
        raise DataValidationError(
            f"cannot be read as {path.suffix.lstrip('.').upper()}: {error}; export the node's rows again "
            "(CSV: UTF-8 with a header row and every quote closed) or point the mapping at the right file",
            path=str(path),
        ) from None
