"""bench/run.py's "Targets of issue 27" summary parses the target-line convention of the
sections (pure functions: no benchmark runs)."""

from __future__ import annotations

from bench.run import ISSUE_TARGETS, parse_targets, previous_sections, render, targets_summary, wrap

SNAPSHOT = ("- Target (issue 27): `churn score` end to end >= 0.8x raw `inplace_predict` when materialize "
            "left a snapshot for the date: 0.85x -> **met** (median of 2, interleaved).")
KS = ("- target (issue 27): `drift.ks` for 20 columns x 200,000 >= 3x faster than scipy with identical D "
      "and p: not met (1.5x wall, 1.8x CPU; identical on 20/20)")
OTHER = "- Target (issue 7): one-customer POST /predict p99 <= 15 ms on one connection: 7.60 ms -> **met**."


def test_parse_target_lines() -> None:
    body = f"## Scoring\n\nsome text: met\n| a | met |\n{SNAPSHOT}\n- not a target: met\n{KS}\n{OTHER}\n"
    got = parse_targets("bench_x", body)
    assert [(t.issue, t.status) for t in got] == [(27, "met"), (27, "not met"), (7, "met")]
    snap = got[0]
    assert snap.text.startswith("`churn score` end to end >= 0.8x") and snap.text.endswith("for the date")
    assert snap.figures == "0.85x; median of 2, interleaved" and snap.section == "bench_x"
    assert got[1].figures == "1.5x wall, 1.8x CPU; identical on 20/20"
    assert parse_targets("s", "- target (issue 27): no status here (1 s)") == []


def test_summary_lists_every_issue_target_and_rebuilds_from_results() -> None:
    sections = {"bench_scoring": f"## S\n\n{SNAPSHOT}\n", "bench_drift": f"## D\n\n{KS}\n{OTHER}\n",
                "manual_x": "- target (issue 27): something the issue does not list: met (3 s)\n"}
    table = targets_summary(sections)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(ISSUE_TARGETS[27]) + 1  # each listed target once, plus the unlisted line
    assert "| **met** | 0.85x; median of 2, interleaved | `bench_scoring` |" in rows[0]
    assert any("**not met** | 1.5x wall" in r and "`bench_drift`" in r for r in rows)
    assert sum("not measured" in r for r in rows) == len(ISSUE_TARGETS[27]) - 2
    assert rows[-1].startswith("| something the issue does not list | **met** | 3 s | `manual_x` |")
    assert "issue 7" not in table and "2 of 3 stated targets met" in table
    # the summary is rebuilt from a written RESULTS.md alone (what --summary-only does)
    text = render(sections)
    assert text.index("## Targets of issue 27") < text.index("## Machine") < text.index("<!-- bench:")
    assert previous_sections(text) == {k: v.strip("\n") for k, v in sections.items()}
    assert wrap("bench_drift", sections["bench_drift"]) in text
