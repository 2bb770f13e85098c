"""experiments/fashion_mnist/report.py against the committed results of the full study.

The table in docs/results.md is generated; these tests recompute its numbers from the driver's
results JSON with numpy (float64, sample std) and check the page says the same, that the issue's
check is decided by the rule it states, and that a smoke-scale JSON is flagged as such; and
that every report writes only its own marked section of the page.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from experiments.fashion_mnist import report
from experiments.fashion_mnist_2 import report as report2
from experiments.results import write_section

REPO = Path(__file__).resolve().parent.parent
STUDY = REPO / "experiments" / "fashion_mnist"
RESULTS = STUDY / "results" / "full.json"

pytestmark = pytest.mark.skipif(not RESULTS.exists(), reason="no full.json committed")


def _report():
    return report


def _row_top1(data: dict, row: dict) -> list[float]:
    return [data["steps"][name]["result"]["top1"] for name in row["eval_steps"]
            if data["steps"].get(name, {}).get("done")]


def _table(md: str) -> dict[str, list[str]]:
    """The Top-1 table's cells by row label."""
    rows = {}
    section = md.split("## Top-1 on V", 1)[1].split("## Checks", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and cells[0].isdigit():
            rows[cells[1]] = cells
    return rows


def test_table_and_check_match_an_independent_computation(tmp_path):
    data = json.loads(RESULTS.read_text())
    md_path, png = tmp_path / "results.md", tmp_path / "top1.png"
    findings = tmp_path / "findings.md"
    findings.write_text("## Findings\n\nA sentence the page must carry.\n")
    assert _report().main(["--results", str(RESULTS), "--md", str(md_path), "--png", str(png),
                           "--findings", str(findings)]) == 0
    md = md_path.read_text()
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert "A sentence the page must carry." in md and "SMOKE" not in md
    table = _table(md)
    assert len(table) == len(data["rows"])
    stats = {}
    for row in data["rows"]:
        top1 = np.array(_row_top1(data, row), dtype=np.float64) * 100
        cell = table[row["label"]][4]
        if len(top1) == 0:
            assert cell == "-"
            continue
        mean = top1.mean()
        std = top1.std(ddof=1) if len(top1) > 1 else None
        stats[row["group"]] = (mean, std)
        expected = f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")
        assert cell == expected, (row["label"], cell, expected)

    k = data["scale_config"]["k_main"]
    (main, main_std), (base, base_std) = stats[f"ssld_L+U_top{k}"], stats["label_only"]
    bar = 2 * max(main_std, base_std)
    line = next(x for x in md.splitlines() if x.startswith(f"- SSLD on L + top-{k}/class"))
    assert f"{main - base:+.2f} points" in line and f"{bar:.2f} points" in line
    assert line.endswith("**yes**.") == (main - base > bar)

    # a one-seed row is compared with the other row's seed-0 run (paired), not with its mean
    steps = data["steps"]
    if steps.get("eval_finetune_s0", {}).get("done"):
        paired = 100 * (steps["eval_finetune_s0"]["result"]["top1"]
                        - steps[f"eval_ssld_L+U_top{k}_s0"]["result"]["top1"])
        line = next(x for x in md.splitlines() if x.startswith("- fine-tune on L vs before"))
        assert f"{paired:+.2f} points (seed 0 vs seed 0" in line


def test_smoke_results_are_flagged_and_carry_no_findings(tmp_path):
    data = json.loads(RESULTS.read_text())
    data["scale"] = "smoke"
    smoke = tmp_path / "smoke.json"
    smoke.write_text(json.dumps(data))
    findings = tmp_path / "findings.md"
    findings.write_text("## Findings\n\nonly for the full run\n")
    md_path = tmp_path / "results.md"
    _report().main(["--results", str(smoke), "--md", str(md_path),
                    "--png", str(tmp_path / "top1.png"), "--findings", str(findings)])
    md = md_path.read_text()
    assert re.match(r"<!-- study1:start -->\n\n> \*\*SMOKE RUN", md)
    assert "only for the full run" not in md


def test_a_report_replaces_only_its_own_section(tmp_path):
    page = tmp_path / "page.md"
    write_section(page, "s", "first\n")
    assert page.read_text() == "<!-- s:start -->\n\nfirst\n<!-- s:end -->\n"
    page.write_text("# Title\nhand-written\n\n" + page.read_text() + "\nafter, by hand\n")
    write_section(page, "s", "second")
    write_section(page, "s", "second")   # idempotent
    assert page.read_text() == ("# Title\nhand-written\n\n<!-- s:start -->\n\nsecond\n"
                                "<!-- s:end -->\n\nafter, by hand\n")
    for text in ("no markers here\n", "<!-- s:end -->\n<!-- s:start -->\n",
                 "<!-- s:start -->\n<!-- s:start -->\n<!-- s:end -->\n"):
        page.write_text(text)
        with pytest.raises(ValueError, match="s:start"):
            write_section(page, "s", "x")
        assert page.read_text() == text


def test_a_page_without_the_markers_is_refused_untouched(tmp_path, capsys):
    page = tmp_path / "notes.md"
    page.write_text("a page someone wrote\n")
    for main in (report.main, report2.main):
        with pytest.raises(SystemExit) as exc:
            main(["--md", str(page)])   # each study's committed results
        assert exc.value.code == 2
        assert page.read_text() == "a page someone wrote\n"
        assert "error:" in capsys.readouterr().err


def test_the_results_page_holds_what_the_reports_write(tmp_path):
    """docs/results.md's generated sections are the reports' output from the committed results
    files, byte for byte; everything around them (summary, readings) is kept."""
    page = tmp_path / "results.md"
    page.write_text((REPO / "docs" / "results.md").read_text())
    assert report.main(["--md", str(page), "--png", str(tmp_path / "results_top1.png")]) == 0
    assert report2.main(["--md", str(page), "--png", str(tmp_path / "results2_top1.png")]) == 0
    assert page.read_text() == (REPO / "docs" / "results.md").read_text()
