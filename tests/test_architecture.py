"""The import graph of the package, computed from the source (AST, function-level imports
included): no cycles between modules or packages, every import points down the layers of
docs/architecture.md, and only the shells import the CLI / presentation libraries; a broad
``except`` either re-raises or says why it may swallow."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "mlflow_churn"

#: bottom first; a module may import its own package and any package listed before it
LAYERS: tuple[str, ...] = (
    "errors", "tags", "times", "jsonable", "lazy", "background", "interrupt", "config",
    "config_reference", "stats", "progress", "spark",
    "web",
    "alerts",
    "tracking", "tracking_server",
    "data", "features", "registry", "training", "evaluation", "serving", "monitoring", "scheduler",
)
#: the shells: on top of everything, nothing below imports them
SHELL_PACKAGES = {"cli", "cli_common", "demo", "demo_server", "hooks", "mlflow_plugin"}
PRESENTATION = ("rich", "typer", "click")


def _is_shell(module: str) -> bool:
    parts = module.split(".")[1:]
    if not parts:
        return True
    return parts[0] in SHELL_PACKAGES or parts[-1] == "cli" or parts[-1].endswith("_cli")


def _modules() -> dict[str, Path]:
    mods = {}
    for f in ROOT.rglob("*.py"):
        rel = f.relative_to(ROOT.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        mods[".".join(parts)] = f
    return mods


def _imports(module: str, path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """(our modules imported, third-party top-level names imported) by ``module``."""
    ours, other = set(), set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_pkg else 0)]
            targets = [".".join(base + ([node.module] if node.module else []))]
            targets += [f"{targets[0]}.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            targets = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for target in targets:
            if not target.startswith("mlflow_churn"):
                other.add(target.split(".")[0])
                continue
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != module and not module.startswith(target + "."):
                ours.add(target)
    return ours, other


@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    mods = _modules()
    edges, third = {}, {}
    for name, path in mods.items():
        edges[name], third[name] = _imports(name, path, set(mods))
    return edges, third


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def test_no_module_cycles(graph) -> None:
    edges, _ = graph
    assert _cycles(edges) == []


def test_no_package_cycles(graph) -> None:
    edges, _ = graph
    packages: dict[str, set[str]] = {}
    for a, targets in edges.items():
        for b in targets:
            if _package(a) != _package(b):
                packages.setdefault(_package(a), set()).add(_package(b))
    assert _cycles(packages) == []


def test_imports_point_down_the_layers(graph) -> None:
    edges, _ = graph
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = []
    for module, targets in edges.items():
        if _is_shell(module):
            continue
        top = module.split(".")[1] if "." in module else ""
        assert top in rank, f"{module}: package {top!r} is in no layer; add it to LAYERS and the docs"
        for target in targets:
            if _is_shell(target):
                upward.append(f"{module} -> {target} (a shell)")
                continue
            other = target.split(".")[1] if "." in target else ""
            if rank.get(other, -1) > rank[top]:
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_only_shells_import_presentation(graph) -> None:
    _, third = graph
    offenders = sorted(f"{m} imports {lib}" for m, libs in third.items() if not _is_shell(m)
                       for lib in libs if lib in PRESENTATION)
    assert offenders == []


def test_stats_is_a_leaf(graph) -> None:
    edges, _ = graph
    leaks = sorted(f"{m} -> {t}" for m, ts in edges.items() if m.startswith("mlflow_churn.stats")
                   for t in ts if not t.startswith(("mlflow_churn.stats", "mlflow_churn.errors",
                                                    "mlflow_churn.lazy")))
    assert leaks == []


PACKAGES = sorted(m for m, p in _modules().items() if p.name == "__init__.py")


@pytest.mark.parametrize("package", PACKAGES)
def test_public_api_resolves(package: str) -> None:
    """Every package's ``__all__`` is its public API, and every name in it imports."""
    import importlib

    mod = importlib.import_module(package)
    assert mod.__all__, f"{package} declares no public API"
    for name in mod.__all__:
        assert getattr(mod, name) is not None, f"{package}.{name}"


#: the one deferred import of our own code below the shells: Spark starts only when asked for
DEFERRED = {"mlflow_churn.serving.batch_spark"}


def test_core_imports_our_code_at_module_level() -> None:
    """Below the shells, our own modules are imported at the top of the file: a function-level
    import hides an edge from a reader (the shells defer imports to keep ``churn --help`` fast)."""
    hidden = []
    for module, path in _modules().items():
        if _is_shell(module):
            continue
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(
                        "mlflow_churn")) and node.module not in DEFERRED:
                    hidden.append(f"{module}:{node.lineno} imports {node.module}")
    assert hidden == []


#: a string constant that names one of our MLflow tags (``churn.sig.``, ``churn.rollout.weight``):
#: a dotted name under ``churn.``, not a file name such as ``churn.yaml``
_TAG_LITERAL = re.compile(r"churn\.[a-z_]+(\.[a-z_]+)*\.?")
_FILE_SUFFIXES = (".yaml", ".yml", ".json", ".toml", ".db", ".log", ".lock", ".py")


def test_tag_names_live_in_one_module() -> None:
    """Every ``churn.<...>`` MLflow tag name is defined in :mod:`mlflow_churn.tags` and imported
    from there: a literal elsewhere (an f-string's ``"churn.sig."`` part included) is a second
    definition that a rename would miss."""
    literals = []
    for module, path in _modules().items():
        if module == "mlflow_churn.tags":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and _TAG_LITERAL.fullmatch(node.value) and not node.value.endswith(_FILE_SUFFIXES)):
                literals.append(f"{module}:{node.lineno} {node.value!r}")
    assert literals == []



def _broad(node: ast.expr | None) -> bool:
    """``except:``, ``except Exception`` / ``BaseException``, or a tuple holding one."""
    if node is None:
        return True
    if isinstance(node, ast.Name):
        return node.id in ("Exception", "BaseException")
    return isinstance(node, ast.Tuple) and any(_broad(e) for e in node.elts)


def test_a_broad_except_re_raises_or_says_why() -> None:
    """An ``except Exception`` (bare ``except:``, ``except BaseException``) whose body raises
    nothing must carry a comment on its ``except`` line (the header, if it spans lines)
    saying why swallowing is right there: an outage or a bug silently taken for an answer is
    how a decision changes without a failure (issue 26)."""
    silent = []
    for module, path in _modules().items():
        source = path.read_text()
        comments = {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                    if tok.type == tokenize.COMMENT}
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.ExceptHandler) or not _broad(node.type):
                continue
            raises = any(isinstance(n, ast.Raise) for stmt in node.body for n in ast.walk(stmt))
            if not raises and not comments.intersection(range(node.lineno, node.body[0].lineno)):
                silent.append(f"{module}:{node.lineno}")
    assert silent == [], "a broad except that neither re-raises nor says why in a comment"


#: the one place that decides on an exception's text, because neither library offers a type
#: or a code for it (DuckDB's interrupt come back through pyarrow as a plain OSError)
TEXT_HELPERS = {"mlflow_churn.features.sandbox": {"_is_arrow_interrupt"}}


def _exception_text(node: ast.expr, caught: set[str]) -> bool:
    """``str(exc)`` (or ``str(exc).upper()`` / ``.lower()``) of a name in ``caught``."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and not node.args:
        node = node.func.value  # str(exc).upper()
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "str":
        return len(node.args) == 1 and isinstance(node.args[0], ast.Name) and node.args[0].id in caught
    return False


def test_control_flow_never_reads_exception_text() -> None:
    """``if "..." in str(exc)`` decides on a message a library may reword any release: decide by
    the exception's type or error code instead (issue 26). The helpers of
    :data:`TEXT_HELPERS` are the named exceptions, each saying why."""
    offenders = []
    for module, path in _modules().items():
        tree = ast.parse(path.read_text())
        allowed = TEXT_HELPERS.get(module, set())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) or fn.name in allowed:
                continue
            caught = {h.name for h in ast.walk(fn) if isinstance(h, ast.ExceptHandler) and h.name}
            for node in ast.walk(fn):
                if not isinstance(node, ast.Compare):
                    continue
                if any(isinstance(op, ast.In | ast.NotIn) for op in node.ops) and any(
                        _exception_text(c, caught) for c in node.comparators):
                    offenders.append(f"{module}:{node.lineno}")
    assert sorted(set(offenders)) == []
