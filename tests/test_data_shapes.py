"""Real data that does not look like the synthetic ecosystem (issue 16): how spreadsheets,
R, Stata and databases write their files, and values of any magnitude. Each shape is read
as it means or refused naming file, row and column with what to write instead; sums of
very large and very small values survive the shared sum's fixed point."""

from __future__ import annotations

import json
import secrets
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedcost.data.features import StatisticsLayout, join_sum, split_sum
from fedcost.data.loader import load_node, load_rows
from fedcost.data.mapping import DataMapping
from fedcost.errors import DataValidationError
from fedcost.secagg.quantize import Quantizer
from fedcost.server.shared_sum import SUMS_CLIP, SUMS_LEVELS
from simulations import fedcost

MAPPING = """
[targets.died]
kind = "binary"
{tokens}
[targets.stay]
kind = "non-negative"

[features]
numeric = ["x"]
categorical = {{ grade = {levels} }}

[nodes.ward]
file = "ward.csv"
"""
YES_NO = 'positive = ["yes"]\nnegative = ["no"]'


def read(folder: Path, text: str | bytes, *, tokens: str = YES_NO, levels: str = '["a", "b"]') -> pd.DataFrame:
    (folder / "mapping.toml").write_text(MAPPING.format(tokens=tokens, levels=levels))
    (folder / "ward.csv").write_bytes(text if isinstance(text, bytes) else text.encode())
    mapping = DataMapping.load(folder / "mapping.toml")
    return load_rows(mapping, mapping.node("ward"), folder / "ward.csv")


def refusal(folder: Path, text: str | bytes, **options: str) -> DataValidationError:
    with pytest.raises(DataValidationError) as caught:
        read(folder, text, **options)
    assert caught.value.path.endswith("ward.csv")
    return caught.value


GOOD = "x,grade,died,stay\n1.5,a,yes,2\n2,b,no,3\n"
READ = {
    # a CSV written from a column with a gap writes its 0/1 codes as 0.0/1.0
    "0/1 outcome written as floats": ("x,grade,died,stay\n1.5,a,1.0,2\n2,b,0.0,3\n", ""),
    "true/false outcome, no tokens declared": ("x,grade,died,stay\n1.5,a,TRUE,2\n2,b,False,3\n", ""),
    "semicolons (a spreadsheet in a decimal-comma locale)": ("x;grade;died;stay\n1.5;a;yes;2\n2;b;no;3\n", YES_NO),
    "tabs": ("x\tgrade\tdied\tstay\n1.5\ta\tyes\t2\n2\tb\tno\t3\n", YES_NO),
    "Windows line ends, BOM, quotes": (
        '\ufeff"x","grade","died","stay"\r\n"1.5","a","yes","2"\r\n2,b,no,3\r\n',
        YES_NO,
    ),
}


@pytest.mark.parametrize("case", READ, ids=list(READ))
def test_a_file_of_another_dialect_reads_as_it_means(tmp_path: Path, case: str) -> None:
    text, tokens = READ[case]
    rows = read(tmp_path, text, tokens=tokens)
    assert rows["x"].tolist() == [1.5, 2.0] and rows["grade"].tolist() == ["a", "b"]
    assert rows["readmitted_30d"].tolist() == [1.0, 0.0] and rows["total_cost"].tolist() == [2.0, 3.0]


def test_a_tab_separated_file_named_tsv_reads(tmp_path: Path) -> None:
    (tmp_path / "mapping.toml").write_text(MAPPING.format(tokens=YES_NO, levels='["a", "b"]').replace(".csv", ".tsv"))
    (tmp_path / "ward.tsv").write_text(GOOD.replace(",", "\t"))
    mapping = DataMapping.load(tmp_path / "mapping.toml")
    assert load_rows(mapping, mapping.node("ward"), tmp_path / "ward.tsv")["x"].tolist() == [1.5, 2.0]


@pytest.mark.parametrize("marker", ["NA", "N/A", "NaN", "NULL", ".", "?", "#N/A", ""])
def test_missing_value_markers_are_missing_features(tmp_path: Path, marker: str) -> None:
    """R, pandas, SQL, Stata/SAS, Excel and UCI write a missing value so: imputed and flagged
    like an empty cell, where refusing it lost every R export."""
    rows = read(tmp_path, f"x,grade,died,stay\n{marker},{marker},yes,2\n2,b,no,3\n")
    assert np.isnan(rows["x"][0]) and pd.isna(rows["grade"][0]) and rows["x"][1] == 2.0


def test_a_declared_level_that_looks_like_a_missing_marker_is_a_level(tmp_path: Path) -> None:
    rows = read(tmp_path, "x,grade,died,stay\n1,NA,yes,2\n2,EU,no,3\n", levels='["EU", "NA"]')
    assert rows["grade"].tolist() == ["na", "eu"], "North America is no missing value"


def test_integer_coded_levels_read_whether_written_1_or_1_0(tmp_path: Path) -> None:
    rows = read(tmp_path, "x,grade,died,stay\n1,1.0,yes,2\n2,2,no,3\n3,3.00,no,1\n", levels="[1, 2, 3]")
    assert rows["grade"].tolist() == ["1", "2", "3"]


def test_a_recoding_keyed_1_0_reads_cells_written_1(tmp_path: Path) -> None:
    """Cells and the mapping's recoding keys are read alike, so "1.0" and "1" are one code."""
    (tmp_path / "mapping.toml").write_text(
        MAPPING.format(tokens=YES_NO, levels='["a", "b"]') + '[values.grade]\n"1.0" = "a"\n" 2 " = "b"\n'
    )
    (tmp_path / "ward.csv").write_text("x,grade,died,stay\n1,1,yes,2\n2,2.0,no,3\n")
    mapping = DataMapping.load(tmp_path / "mapping.toml")
    assert load_rows(mapping, mapping.node("ward"), tmp_path / "ward.csv")["grade"].tolist() == ["a", "b"]


def test_true_false_in_a_numeric_column_reads_as_1_and_0(tmp_path: Path) -> None:
    assert read(tmp_path, "x,grade,died,stay\nTrue,a,yes,2\nfalse,b,no,3\n")["x"].tolist() == [1.0, 0.0]


REFUSED = {
    # "1,500" is 1500 or 1.5 depending on the locale: neither is guessed
    "thousands separator": ('x,grade,died,stay\n1.5,a,yes,2\n"1,500",b,no,3\n', 2, "x", "no thousands separators"),
    "decimal comma": ("x;grade;died;stay\n1.5;a;yes;2\n1,5;b;no;3\n", 2, "x", "with a decimal point"),
    "a unit in the cell": ("x,grade,died,stay\n1.5,a,yes,2\n5%,b,no,3\n", 2, "x", "no units, currency"),
    "an outcome written NA": ("x,grade,died,stay\n1.5,a,yes,2\n2,b,NA,3\n", 2, "died", "every row needs its outcome"),
    "an empty outcome": ("x,grade,died,stay\n1.5,a,,2\n2,b,no,3\n", 1, "died", "died is empty"),
    "a missing stay": ("x,grade,died,stay\n1.5,a,yes,2\n2,b,no,.\n", 2, "stay", "leave rows without one out"),
    # 1/2 is no 0/1 coding: which one is positive is the data set's to say
    "an outcome coded 1/2": ("x,grade,died,stay\n1.5,a,1,2\n2,b,2,3\n", 2, "died", "set [targets.died] positive"),
    "an identifier as a number": ("x,grade,died,stay\n1.5,a,yes,2\n4.2e15,b,no,3\n", 2, "x", "declare the column"),
}


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_a_cell_that_cannot_be_read_safely_is_refused_saying_what_to_write(tmp_path: Path, case: str) -> None:
    text, row, column, words = REFUSED[case]
    error = refusal(tmp_path, text, tokens="" if case == "an outcome coded 1/2" else YES_NO)
    assert (error.row, error.column) == (row, column) and words in str(error)


@pytest.mark.parametrize(
    ("header", "words"),
    [
        ("X,grade,died,stay", "the file has 'X' (names are case-sensitive)"),
        ("x grade died stay", "header is one column, 'x grade died stay': separate its columns with commas"),
    ],
)
def test_a_header_that_almost_names_the_column_says_what_it_has(tmp_path: Path, header: str, words: str) -> None:
    error = refusal(tmp_path, f"{header}\n1.5,a,yes,2\n")
    assert error.column == "x" and words in str(error)


def test_a_file_that_is_not_utf8_is_refused_saying_how_to_save_it(tmp_path: Path) -> None:
    error = refusal(tmp_path, "x,grade,died,stay\n1.5,Zürich,yes,2\n".encode("latin-1"))
    assert "not UTF-8" in str(error) and "CSV UTF-8" in str(error) and "Traceback" not in str(error)


@pytest.mark.parametrize("total", [0.0, 2400.0, -3.7, 7 / 90, 1.2345e-7, 3e-12, 1e21 + 12345.678, -5e30])
def test_a_sum_split_into_digits_joins_back_exactly(total: float) -> None:
    digits = split_sum(total)
    assert join_sum(digits) == total
    assert all(d == round(d) and abs(d) < 2**20 for d in digits[1:-1]), "middle digits are whole and small"


def _secure_total(vectors: list[np.ndarray]) -> np.ndarray:
    """What a secure sum of ``vectors`` decodes to: each node's fixed point (clipped to
    ±2**30, steps of 2**-10, stochastic rounding), added mod 2**bits."""
    quantizer = Quantizer(SUMS_CLIP, SUMS_LEVELS, max_nodes=len(vectors))
    encoded = [quantizer.encode([vector], seed=secrets.token_bytes(32)) for vector in vectors]
    total = np.bitwise_and(np.sum(encoded, axis=0, dtype=np.uint64), np.uint64(2**quantizer.bits - 1))
    return quantizer.decode(total.astype(encoded[0].dtype), [vectors[0].shape])[0][0]


def test_values_of_any_magnitude_standardise_as_pooled_through_the_secure_sum(tmp_path: Path) -> None:
    """An income of 10**7 (its squares overflowed the fixed point's ±2**30), a date written
    20210315 (mean far above the spread) and a concentration of 10**-6 (below its 2**-10 step)
    get the pooled mean and scale; so does a cost total of 10**10."""
    rng = np.random.default_rng(16)
    mapping = DataMapping.load(_write_magnitudes(tmp_path))
    declared = tuple(column for column in mapping.feature_columns if column.name in mapping.declared_features)
    layout = StatisticsLayout(declared, tuple(mapping.targets))
    nodes = [
        pd.DataFrame(
            {
                "income": np.exp(rng.normal(np.log(1e7), 1.0, n)).round(),
                "date": 20210000.0 + rng.integers(0, 1300, n),
                "conc": rng.normal(3e-6, 1e-6, n),
                "readmitted_30d": rng.integers(0, 2, n).astype(float),
                "total_cost": rng.gamma(2.0, 5e6, n),
            }
        )
        for n in (40, 600, 3000)
    ]
    spec = layout.feature_spec(_secure_total([layout.local_statistics(rows) for rows in nodes]))
    pooled = pd.concat(nodes, ignore_index=True)
    for column in ("income", "date", "conc"):
        mean, scale = spec.numeric[column]
        assert mean == pytest.approx(pooled[column].mean(), rel=1e-9)
        assert scale == pytest.approx(pooled[column].std(ddof=0), rel=1e-6)
    assert spec.cost_scale == pytest.approx(pooled["total_cost"].mean(), rel=1e-9)


def _write_magnitudes(folder: Path) -> Path:
    path = folder / "mapping.toml"
    path.write_text(
        '[targets.readmitted_30d]\n[targets.total_cost]\n[features]\nnumeric = ["income", "date", "conc"]\n'
        '[nodes.a]\nfile = "a.csv"\n'
    )
    return path


@pytest.mark.slow
def test_a_federation_of_real_looking_files_standardises_as_pooled(tmp_path: Path) -> None:
    """`fedcost simulate --data-dir` on four sites' files as real extracts write them: an income
    of 10**7, a date written 20210315, a concentration of 10**-6, a lab value with "NA" cells, one site's file
    with semicolons and an outcome written "Died"/"alive". The run must stop with no error and
    standardise every column with the pooled training rows' mean and spread (before, the
    squares of the first two overflowed the secure sum and the run stopped)."""
    rng = np.random.default_rng(7)
    for site in range(4):
        n = 150
        income = np.exp(rng.normal(np.log(1e7), 0.8, n)).round()
        conc = rng.normal(3e-6, 1e-6, n)
        risk = 0.7 * (np.log(income) - np.log(1e7)) + 0.6 * (conc - 3e-6) / 1e-6
        rows = pd.DataFrame(
            {
                "income": income,
                "date": 20210000 + rng.integers(0, 1300, n),
                "conc": conc,
                "died": np.where(rng.random(n) < 1 / (1 + np.exp(1 - risk)), "Died", "alive"),
                "stay": rng.gamma(2.0, np.exp(1 + 0.3 * risk) / 2).round(1),
                "lab": rng.normal(1.0, 0.2, n).round(2).astype(str),
            }
        )
        rows.loc[rng.choice(n, 4, replace=False), "lab"] = "NA"
        rows.to_csv(tmp_path / f"site-{site}.csv", index=False, sep=";" if site == 3 else ",")
    nodes = "".join(f'[nodes.site-{site}]\nfile = "site-{site}.csv"\n' for site in range(4))
    (tmp_path / "mapping.toml").write_text(
        '[targets.died]\nkind = "binary"\npositive = ["died"]\nnegative = ["alive"]\n'
        '[targets.stay]\nkind = "non-negative"\n[features]\nnumeric = ["income", "date", "conc", "lab"]\n' + nodes
    )
    result = fedcost("simulate", "--data-dir", str(tmp_path), "--out", "run", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    config = tomllib.loads((tmp_path / "run" / "config.toml").read_text())["run"]
    mapping = DataMapping.load(tmp_path / "mapping.toml")
    train = pd.concat(
        load_node(mapping, node.name, split_seed=config["seed"], test_fraction=config["test_fraction"]).train
        for node in mapping.nodes
    )
    spec = json.loads((tmp_path / "run" / "model.json").read_text())["features"]
    for column in ("income", "date", "conc"):
        mean, scale = spec["numeric"][column]
        assert mean == pytest.approx(train[column].mean(), rel=1e-9)
        assert scale == pytest.approx(train[column].std(ddof=0), rel=1e-6)
