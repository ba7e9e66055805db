"""`make bench`: run every bench/bench_*.py in its own process and write bench/RESULTS.md.

Each benchmark prints a Markdown section (medians, ratios, and for each target named in
the issues a line saying met / not met) on stdout. This runner adds the machine
description and collects the sections in one file. Nothing here is a test: wall-clock
numbers are reported, never asserted.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
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


def main(argv: list[str]) -> int:
    """Run the benchmarks named in ``argv`` (default: all) and write RESULTS.md. With names,
    the other benchmarks' sections of the existing RESULTS.md are kept as they were (each
    says when it ran); ``manual_*`` sections (wall times measured by hand) are always kept."""
    wanted = set(argv)
    scripts = sorted(p for p in HERE.glob("bench_*.py") if not wanted or p.stem in wanted)
    path = HERE / "RESULTS.md"
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
    header = (f"# Benchmark results\n\nWritten by `make bench` (`python -m bench.run [names]`); last "
              f"written {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.\n\n## Machine\n\n{machine()}\n")
    body = "\n".join(wrap(name, sections[name]) for name in sorted(sections))
    path.write_text(header + body)
    print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
