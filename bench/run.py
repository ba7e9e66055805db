"""`make bench`: run every bench/bench_*.py in its own process and write bench/RESULTS.md.

Each benchmark prints a Markdown section (medians, ratios, and for each target named in
the issues a line saying met / not met) on stdout. This runner adds the machine
description and collects the sections in one file. Nothing here is a test: wall-clock
numbers are reported, never asserted.

Target lines: a benchmark (or a hand-written ``manual_*`` section) states each target of an
issue on one line of its own::

    - target (issue 27): <the target>: met (<figures>)
    - target (issue 27): <the target>: <figures> -> not met (<more figures>)

("Target", ``**met**`` in bold and figures before ``->`` are accepted). :func:`targets_summary`
collects them from every section, old and new, into a "Targets of issue N" table per issue of
:data:`ISSUE_TARGETS` (27 and 28) at the top of RESULTS.md, beside the issue's list of targets
(one without a line shows "not measured"). ``python -m bench.run --summary-only`` rebuilds the
tables from the sections
already in RESULTS.md without running anything.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGES = ("mlflow", "xgboost", "optuna", "evidently", "duckdb", "pandas", "numpy", "pyarrow",
            "fastapi", "uvicorn", "redis")


def machine() -> str:
    """A Markdown description of this machine and the package versions."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "unknown"
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024**2:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return (
        f"- CPU: {cpu}, {os.cpu_count()} cores; memory {mem}\n"
        f"- {platform.platform()}; Python {platform.python_version()}\n"
        f"- {', '.join(versions)}\n"
    )


MARK = "<!-- bench:{} -->"
#: pymdownx.snippets section markers around each section, so a docs page includes one section
#: (``--8<-- "bench/RESULTS.md:bench_canary_judge"``) instead of copying its figures
SNIPPET_START, SNIPPET_END = "<!-- --8<-- [start:{}] -->", "<!-- --8<-- [end:{}] -->"


def wrap(name: str, body: str) -> str:
    """A section as RESULTS.md holds it: the bench marker, then the body between snippet markers."""
    start, end = SNIPPET_START.format(name), SNIPPET_END.format(name)
    return f"{MARK.format(name)}\n{start}\n{body.strip(chr(10))}\n{end}\n"


def previous_sections(text: str) -> dict[str, str]:
    """The sections of an earlier RESULTS.md, by benchmark name (from their markers)."""
    out: dict[str, str] = {}
    parts = text.split("<!-- bench:")
    for part in parts[1:]:
        name, _, body = part.partition(" -->")
        name = name.strip()
        body = body.replace(SNIPPET_START.format(name), "").replace(SNIPPET_END.format(name), "")
        out[name] = body.strip("\n")
    return out


TARGET_LINE = re.compile(r"^\s*[-*]\s+target\s*\(issue\s+(?P<issue>\d+)[^)]*\)\s*:\s*(?P<rest>.+)$",
                         re.IGNORECASE)
STATUS = re.compile(r"\*{0,2}\b(?P<status>not met|met)\b\*{0,2}", re.IGNORECASE)
#: the targets of issue 27 as the issue lists them, each with a pattern that finds its line(s)
ISSUE_TARGETS: dict[int, list[tuple[str, str]]] = {27: [
    ("`churn score` end to end >= 0.8x raw `inplace_predict` when a snapshot exists",
     r"churn score.*snapshot"),
    ("10M simulated customers end to end <= 2 min on 2 cores, peak RSS <= 2.5 GB", r"\b10M\b|10,000,000"),
    ("`POST /predict` one customer, sync durable log: p50 <= 2x `GET /health`", r"p50"),
    ("`POST /predict` p99 <= 5 ms on one connection", r"p99\s*<=\s*5\b"),
    (">= 800 req/s on 4 connections with p99 <= 15 ms", r"\b800\b"),
    ("still >= 3x `mlflow models serve`", r"mlflow models serve"),
    ("HTTP requests per Optuna trial <= 5 against a real server", r"per (optuna )?trial"),
    ("`make demo` <= 2 min on an idle machine", r"make demo"),
    ("profile build for 200k x 21 <= the window drift time", r"profile"),
    ("`drift.ks` for 20 columns x 200k >= 3x faster than scipy, identical D and p", r"\bks\b|ks_many"),
    ("compiled predictor: one-row predict and 1M-row batch vs xgboost", r"compiled"),
], 28: [
    ("Spark materialize within 3x of DuckDB at 1M customers on local[2]", r"materialize within 3x"),
    ("Spark materialize linear in rows from 1M to 4M customers", r"materialize linear"),
    ("Spark drift within 3x of the local engine at 1M customers on local[2]", r"drift within 3x"),
    ("Spark drift linear in rows from 1M to 4M customers", r"drift linear"),
]}


@dataclass(frozen=True)
class Target:
    """One target line of a section: its issue, what it asks, met or not, the figures."""

    issue: int
    text: str
    status: str  # "met" or "not met"
    figures: str
    section: str


def parse_targets(section: str, body: str) -> list[Target]:
    """The target lines (module doc) of one section's body."""
    out = []
    for line in body.splitlines():
        m = TARGET_LINE.match(line)
        if not m:
            continue
        rest = m["rest"]
        for st in STATUS.finditer(rest):
            head = rest[: st.start()]
            if ":" not in head:
                continue
            text, _, before = head.rpartition(":")
            after = rest[st.end():].strip().rstrip(".").strip()
            if after.startswith("(") and after.endswith(")"):
                after = after[1:-1]
            before = before.strip().removesuffix("->").strip()
            figures = "; ".join(f for f in (before, after) if f)
            out.append(Target(int(m["issue"]), text.strip(), st["status"].lower(), figures, section))
            break
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|") or "-"


def targets_summary(sections: dict[str, str], issue: int = 27) -> str:
    """The "Targets of issue N" Markdown table: each of the issue's targets (ISSUE_TARGETS) with
    the lines that state it, then lines no listed target matched; "not measured" for a target
    without a line."""
    found = [t for name in sorted(sections) for t in parse_targets(name, sections[name]) if t.issue == issue]

    def row(t: Target) -> str:
        return f"| {_cell(t.text)} | **{t.status}** | {_cell(t.figures)} | `{t.section}` |"

    rows, used = [], set()
    for label, pattern in ISSUE_TARGETS.get(issue, []):
        mine = [i for i, t in enumerate(found) if i not in used and re.search(pattern, t.text, re.IGNORECASE)]
        used.update(mine)
        rows += [row(found[i]) for i in mine] or [f"| {_cell(label)} | not measured | - | - |"]
    rows += [row(t) for i, t in enumerate(found) if i not in used]
    met = sum(1 for t in found if t.status == "met")
    return (f"## Targets of issue {issue}\n\nGenerated by `python -m bench.run` from the target lines of the "
            f"sections below (each ran when its section says; `--summary-only` rebuilds this table): "
            f"{met} of {len(found)} stated targets met.\n\n| target | status | figures | section |\n"
            f"|---|---|---|---|\n" + "\n".join(rows) + "\n")


def render(sections: dict[str, str]) -> str:
    """RESULTS.md: header, the summary of each issue of ISSUE_TARGETS, the machine, every
    section (by name)."""
    summaries = "\n".join(targets_summary(sections, issue) for issue in sorted(ISSUE_TARGETS))
    header = (f"# Benchmark results\n\nWritten by `make bench` (`python -m bench.run [names]`); last "
              f"written {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.\n\n{summaries}\n"
              f"## Machine\n\n{machine()}\n")
    return header + "\n".join(wrap(name, sections[name]) for name in sorted(sections))


def main(argv: list[str]) -> int:
    """Run the benchmarks named in ``argv`` (default: all) and write RESULTS.md. With names,
    the other benchmarks' sections of the existing RESULTS.md are kept as they were (each
    says when it ran); ``manual_*`` sections (wall times measured by hand) are always kept."""
    path = HERE / "RESULTS.md"
    if "--summary-only" in argv:
        path.write_text(render(previous_sections(path.read_text())))
        print(f"rebuilt the summary of {path}")
        return 0
    wanted = set(argv)
    scripts = sorted(p for p in HERE.glob("bench_*.py") if not wanted or p.stem in wanted)
    previous = previous_sections(path.read_text()) if path.exists() else {}
    # measured by hand (README timings: install, `make demo`, `make test`), kept by every run
    sections = {k: v for k, v in previous.items() if wanted or k.startswith("manual_")}
    failed = 0
    for script in scripts:
        print(f"== {script.stem}", flush=True)
        start = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", f"bench.{script.stem}"], cwd=HERE.parent,
                             capture_output=True, text=True, timeout=3600)
        took = time.perf_counter() - start
        print(res.stdout[-3000:], flush=True)
        stamp = f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
        if res.returncode != 0:
            failed += 1
            sections[script.stem] = (f"## {script.stem}\n\nFAILED (exit {res.returncode}, {stamp}):\n\n"
                                     f"```\n{res.stderr[-2000:]}\n```\n")
        else:
            sections[script.stem] = res.stdout.strip() + f"\n\n_(benchmark took {took:.0f} s, ran {stamp})_\n"
    path.write_text(render(sections))
    print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
