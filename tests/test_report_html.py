"""report.html explains itself: the currency on every cost figure, a privacy section,
intervals on O/E, ERR and value index, the statistics folded away with withheld cells
flagged, and every image present.

No headless browser is installed on this machine (no chromium, chrome, firefox or
playwright browsers), so the page is checked structurally with the standard library's
HTML parser: the sections it must hold, and every <img> a PNG data URI that decodes.
"""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from fedcost.analytics.benchmarking import benchmark, calibration, site_totals, standardised
from fedcost.config import AnalyticsSection, SimulationConfig
from fedcost.errors import ConfigError
from fedcost.report import write_report
from fedcost.report.tables import save_benchmark

PNG = b"\x89PNG\r\n\x1a\n"


class Page(HTMLParser):
    """The parts of a page the checks read: headings, images, folded sections, table cells."""

    def __init__(self) -> None:
        super().__init__()
        self.headings: list[str] = []
        self.images: list[str] = []
        self.summaries: list[str] = []
        self.withheld_cells = 0
        self.details = 0
        self._open: list[str] = []
        self._text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "img":
            self.images.append(values.get("src") or "")
        if tag == "details":
            self.details += 1
        if tag == "td" and values.get("class") == "withheld":
            self.withheld_cells += 1
        self._open.append(tag)
        self._text = ""

    def handle_data(self, data: str) -> None:
        self._text += data

    def handle_endtag(self, tag: str) -> None:
        if tag in ("h2", "summary"):
            (self.headings if tag == "h2" else self.summaries).append(self._text.strip())
        if self._open and self._open[-1] == tag:
            self._open.pop()


def _summary(folder: Path, currency: str) -> dict:
    rng = np.random.default_rng(4)
    totals = {}
    for k, n in enumerate([80, 400, 1500, 4000]):
        risk = rng.uniform(0.05, 0.25, n)
        expected_cost = rng.lognormal(8, 0.5, n)
        totals[f"hospital-{k + 1}"] = site_totals(
            rng.random(n) < risk * (1.5 if k == 3 else 1),
            risk * 0.9,
            expected_cost * rng.lognormal(0, 0.3, n),
            expected_cost,
        )
    result = benchmark(standardised(totals), calibration=calibration(totals))
    cell = {
        "diagnosis_group": "copd",
        "payer": "medicare",
        "suppressed": False,
        "n": 400,
        "total_cost_mean": 9000.0,
        "cost_median": 7000.0,
        "cost_p90": 21000.0,
        "readmission_rate": 0.2,
    }
    statistics = {
        "group_by": ["diagnosis_group", "payer"],
        "measures": ["total_cost", "readmitted_30d"],
        "min_cohort": 11,
        "note": "1 of 3 cells suppressed.",
        "cells": [
            cell,
            {**cell, "payer": "private", "n": None, "suppressed": True},
            {**cell, "payer": "medicaid", "n": 30, "cost_p90": None, "readmission_rate": None},
        ],
    }
    return {
        "run_id": "test-run",
        "task": "analyze",
        "secure_aggregation": True,
        "min_cohort": 11,
        "currency": currency,
        "nodes": [{"name": name, "role": "hospital", "train_rows": 1, "test_rows": 1} for name in totals],
        "privacy": {
            "hospital-1": {"dp": True, "epsilon_budget": 8.0, "epsilon_spent": 2.5, "delta": 1e-5},
            **{name: {"dp": False} for name in list(totals)[1:]},
        },
        "analytics": {"benchmark": save_benchmark(folder, result, list(totals)[:3]), "statistics": statistics},
    }


def test_the_report_states_currency_privacy_intervals_and_withheld_cells(tmp_path: Path) -> None:
    path = write_report(tmp_path, _summary(tmp_path, "EUR"), [])
    text = path.read_text()
    page = Page()
    page.feed(text)
    assert {"Privacy", "Risk-adjusted benchmarking", "Plots"} <= set(page.headings)
    assert page.details == 1 and page.summaries == ["Federated statistics: 3 cells (1 suppressed, 1 partly withheld)"]
    assert page.withheld_cells == 3, "the suppressed cell and the two figures held back of the partly withheld one"
    assert len(page.images) == 2, "funnel and excess readmission plots"
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG
    for head in ("mean cost (EUR)", "median cost (EUR)", "p90 cost (EUR)"):
        assert head in text
    assert "Costs in EUR" in text and "per EUR" in text
    assert "2.50 / 8 (1e-05)" in text and text.count("no DP") == 3
    assert "no benchmark totals from hospital-4" in text and "(min cohort): 11 rows" in text
    intervals = re.findall(r"<td>(\d+\.\d\d) \((\d+\.\d\d)–(\d+\.\d\d)\)</td>", text)
    assert len(intervals) == 4 * 4, "O/E, ERR, cost O/E and value index, each with its interval, per site"
    assert all(float(low) <= float(centre) <= float(high) for centre, low, high in intervals)
    assert "standardised so that the federation as a whole has O/E, cost O/E and value index 1" in text


def test_a_report_without_a_currency_says_so(tmp_path: Path) -> None:
    text = write_report(tmp_path, _summary(tmp_path, ""), []).read_text()
    assert "mean cost (currency units)" in text and "the config names no currency" in text


def test_the_federation_is_1_on_every_ratio_after_standardising() -> None:
    rng = np.random.default_rng(9)
    totals = {
        f"s{k}": site_totals(rng.random(500) < 0.3, np.full(500, 0.1), rng.lognormal(8, 1, 500), np.full(500, 900.0))
        for k in range(3)
    }
    result = benchmark(standardised(totals), calibration=calibration(totals))
    federation = np.sum([totals_row for totals_row in standardised(totals).values()], axis=0)
    assert federation[1] == pytest.approx(federation[2]) and federation[3] == pytest.approx(federation[4])
    assert result.calibration["readmission"] > 2.5, "a model that expected a third of the readmissions"
    weights = np.array([s.expected for s in result.sites])
    assert np.average([s.oe for s in result.sites], weights=weights) == pytest.approx(1.0)


@pytest.mark.parametrize("raw", [{"currency": "euro"}, {"currency": "eur"}, {"peer_groups": {"h1": ""}}])
def test_a_bad_currency_or_peer_group_is_refused_with_its_field(raw: dict) -> None:
    with pytest.raises(ConfigError, match="field 'analytics'"):
        SimulationConfig.from_dict({"analytics": raw})
    assert AnalyticsSection(currency="EUR").currency == "EUR"


def test_the_episode_section_names_each_payers_part_and_flags_what_was_withheld(tmp_path: Path) -> None:
    from fedcost.linkage import EpisodeWindow
    from fedcost.linkage.episodes import EpisodeCosts, HospitalEpisodes

    hospitals = (
        HospitalEpisodes(
            "hospital-1",
            400,
            7_000_000.0,
            {"insurer-1": 300_000.0, "pharma-1": None},
            7_300_000.0,
            18_250.0,
            0.17,
            0.97,
            withheld="the part paid by pharma-1 is withheld",
        ),
        HospitalEpisodes(
            "hospital-2", None, None, {}, None, None, None, None, withheld="fewer stays than the small-cell rule"
        ),
    )
    summary = _summary(tmp_path, "EUR")
    summary["analytics"]["episodes"] = EpisodeCosts(EpisodeWindow(), 11, hospitals).to_json()
    text = write_report(tmp_path, summary, []).read_text()
    page = Page()
    page.feed(text)
    assert "Episode cost per hospital" in page.headings
    assert "paid by insurer-1 (EUR)" in text and "episode cost (EUR)" in text and "7,300,000" in text
    assert page.withheld_cells == 3 + 2, "the statistics' three, pharma-1's part and hospital-2's row"
    assert "3 days before admission to 30 days after discharge" in text
