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


def test_api_page_documents_the_top_level_api() -> None:
    """docs/api.md (mkdocstrings) names every verb and result of ``mlflow_churn.__all__`` and
    renders the function each one is."""
    import mlflow_churn

    page = (ROOT / "docs" / "api.md").read_text()
    for name in mlflow_churn.__all__:
        obj = getattr(mlflow_churn, name)
        rendered = f"::: {obj.__module__}.{obj.__name__}\n" in page or f"::: {obj.__module__}\n" in page
        assert rendered, f"docs/api.md renders mlflow_churn.{name}"
    assert "api.md" in (ROOT / "mkdocs.yml").read_text()


def test_configuration_reference_is_generated_from_the_model() -> None:
    """docs/configuration.md's key reference is the one the configuration model generates
    (``python -m mlflow_churn.config_reference --write docs/configuration.md`` after a change)."""
    from mlflow_churn.config import ChurnConfig
    from mlflow_churn.config_reference import BEGIN, END, reference_markdown

    page = (ROOT / "docs" / "configuration.md").read_text()
    block = page[page.index(BEGIN) + len(BEGIN) + 1: page.index(END)]
    assert block == reference_markdown(), "stale: run python -m mlflow_churn.config_reference --write " \
                                          "docs/configuration.md"

    def keys(model: type, prefix: str) -> list[str]:  # every leaf key of the model, walked here
        out = []
        for name, field in model.model_fields.items():
            sub = field.annotation
            if isinstance(sub, type) and hasattr(sub, "model_fields"):
                out += keys(sub, f"{prefix}{name}.")
            else:
                out.append(f"{prefix}{name}")
        return out

    every = keys(ChurnConfig, "")
    assert len(every) > 100
    missing = [k for k in every if f"| `{k}` |" not in block]
    assert missing == []
    undescribed = [line.split("`")[1] for line in block.splitlines() if line.endswith("|  |")]
    assert undescribed == [], "give these keys a description= in mlflow_churn/config.py"


def test_configuration_reference_check_flags_a_stale_page(tmp_path: Path) -> None:
    from mlflow_churn.config_reference import BEGIN, END

    page = tmp_path / "configuration.md"
    page.write_text(f"# Configuration\n\n{BEGIN}\n| `workspace` | old |\n{END}\n")
    cmd = [sys.executable, "-m", "mlflow_churn.config_reference"]
    res = subprocess.run([*cmd, "--check", str(page)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "stale" in res.stderr
    assert subprocess.run([*cmd, "--write", str(page)], timeout=120).returncode == 0
    assert subprocess.run([*cmd, "--check", str(page)], timeout=120).returncode == 0
    assert page.read_text().startswith("# Configuration\n\n") and "`simulation.customers`" in page.read_text()


#: a module path a page names: ``mlflow_churn.x.y`` (a module, or a name in one) or ``mlflow_churn/x/y.py``
_DOTTED = re.compile(r"\bmlflow_churn(?:\.[A-Za-z_]\w*)+")
_SLASHED = re.compile(r"\bmlflow_churn(?:/[A-Za-z_]\w*)+(?:\.py)?")


def _resolves(dotted: str) -> bool:
    """``dotted`` is a module, or a module and attributes of it."""
    import importlib
    import warnings

    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # mlflow_churn.evaluate, named as such
            for attr in parts[i:]:
                obj = getattr(obj, attr, None)
                if obj is None:
                    return False
        return True
    return False


def test_every_module_path_the_docs_name_exists() -> None:
    """A module that moved (``monitoring/`` to ``stats/``, ``data/``, ``training/``) leaves no page
    naming the old path."""
    missing = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text()
        missing += [f"{page.name}: {m}" for m in sorted(set(_SLASHED.findall(text)))
                    if not ((ROOT / m).exists() or (ROOT / f"{m}.py").exists())]
        missing += [f"{page.name}: {m}" for m in sorted(set(_DOTTED.findall(text))) if not _resolves(m)]
    assert missing == []
    assert _resolves("mlflow_churn.stats.drift.psi") and not _resolves("mlflow_churn.monitoring.drift")
