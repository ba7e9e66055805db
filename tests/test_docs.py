"""The docs site builds with ``mkdocs build --strict``; the README stays short and links into it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site"),
         "--config-file", str(ROOT / "mkdocs.yml")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    # bench/RESULTS.md is included (linked), not copied into a page
    assert "Benchmark results" in (tmp_path / "site" / "benchmarks" / "index.html").read_text()
    shutil.rmtree(tmp_path / "site")


def test_readme_is_short_and_links_every_page() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for page in ("quickstart", "concepts", "feature-store", "training", "evaluation-gate", "monitoring",
                 "serving", "batch", "configuration", "development"):
        assert f"(docs/{page}.md)" in readme, page
    assert "bench/RESULTS.md" in readme and "Java 17" in readme


def test_pages_copy_no_benchmark_figures() -> None:
    """Measured figures live in bench/RESULTS.md; pages link there instead of copying them."""
    results = (ROOT / "bench" / "RESULTS.md").read_text()
    figures = set(re.findall(r"\b\d+\.\d+ (?:ms|s)\b|\b\d+(?:\.\d+)?x\b", results))
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        text = page.read_text()
        copied = sorted(f for f in figures if f not in {"1.5x", "2x"}
                        and re.search(rf"(?<![\w.]){re.escape(f)}(?![\w])", text))  # "5x" is not in "5xx"
        assert not copied, f"{page.name} copies {copied} from bench/RESULTS.md: link to it instead"


def test_license_is_apache_2() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
