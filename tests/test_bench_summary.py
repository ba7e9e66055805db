"""bench/run.py's "Targets of issue N" summaries parses the target-line convention of the
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
    heads = ("## Targets of issue 27", "## Targets of issue 28", "## Machine", "<!-- bench:")
    order = [text.index(h) for h in heads]
    assert order == sorted(order)
    assert previous_sections(text) == {k: v.strip("\n") for k, v in sections.items()}
    assert wrap("bench_drift", sections["bench_drift"]) in text


def test_each_issue_28_target_line_matches_its_own_target_only() -> None:
    lines = {
        "materialize within 3x": "- target (issue 28): Spark materialize within 3x of DuckDB at 1,000,000 "
                                 "customers on local[2]: met (86.8 s vs 36.5 s = 2.38x)",
        "materialize linear": "- target (issue 28): Spark materialize linear from 1,000,000 to 4,000,000 "
                              "customers: not measured (load)",
        "drift within 3x": "- target (issue 28): Spark drift within 3x of the local engine at 1,000,000 "
                           "customers on local[2]: not met (7.5 s vs 1.6 s = 4.70x)",
        "drift linear": "- target (issue 28): Spark drift linear from 1,000,000 to 4,000,000 customers: "
                        "met (4x rows took 3.00x the time)",
    }
    table = targets_summary({"bench_spark": "\n".join(lines.values())}, 28)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(ISSUE_TARGETS[28]) == 4  # each line under its own target, none unlisted
    assert "2 of 3 stated targets met" in table  # "not measured" is no statement
