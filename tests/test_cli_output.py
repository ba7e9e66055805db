"""Output a script can read: ``--json`` on listings, tables that are not cut when piped, and
every option's help with its default; the monitor's decision in one line per trigger."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import pytest
import typer

from mlflow_churn.cli import app
from mlflow_churn.config import load_config
from mlflow_churn.monitoring.cli import decision_lines
from mlflow_churn.monitoring.policy import WindowStats, decide

CHURN = [sys.executable, "-m", "mlflow_churn.cli"]


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("CHURN_") and k != "COLUMNS"}
    full.update(env)
    return subprocess.run(CHURN + args, cwd=cwd, env=full, capture_output=True, text=True, timeout=120)


def _commands(group, prefix: str = "churn"):
    """(path, command) of every leaf command (duck-typed: newer typers vendor their own Click)."""
    for name, cmd in group.commands.items():
        path = f"{prefix} {name}"
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, path)
        else:
            yield path, cmd


def test_every_option_has_help_and_shows_its_default() -> None:
    root = typer.main.get_command(app)
    missing = []
    for path, cmd in _commands(root):
        for p in cmd.params:
            if p.param_type_name != "option" or p.hidden or p.name == "help":
                continue
            text = p.help or ""
            if not text.strip():
                missing.append(f"{path} {p.opts[0]}: no help")
                continue
            off_flag = p.is_flag and not p.secondary_opts and p.default in (False, None)
            shown = p.default not in (None, "") or "default" in text.lower() or p.required or off_flag
            if not shown:
                missing.append(f"{path} {p.opts[0]}: default not shown ({text!r})")
            if re.search(r"(?<!\\)\[[a-z#/@]", text):  # rich markup eats "[serving.host]"
                missing.append(f"{path} {p.opts[0]}: unescaped '[' in help ({text!r})")
    assert not missing, "\n".join(missing)


def test_serve_help_names_bind_address_port_and_canary_defaults(tmp_path: Path) -> None:
    res = _run(["serve", "--help"], tmp_path, COLUMNS="200")
    assert res.returncode == 0, res.stderr
    out = " ".join(res.stdout.split())
    assert "Bind address. [default: 127.0.0.1, config serving.host]" in out, out
    assert "Port. [default: 8080, config serving.port]" in out
    assert "routed to the canary" in out and "[default: 0.1, config serving.canary_fraction]" in out


def test_piped_tables_keep_whole_names_and_json_lists(tmp_path: Path) -> None:
    """`churn features list | grep monthly_usage_v2` finds it (stdout is a pipe, no COLUMNS)."""
    res = _run(["features", "list"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert any(line.split("│")[1:2] == [" monthly_usage_v2 "] or "monthly_usage_v2 " in line
               for line in res.stdout.splitlines()), res.stdout
    assert "…" not in res.stdout
    res = _run(["features", "list", "--json"], tmp_path)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    names = {f["served_name"] for f in data["features"]}
    assert {"monthly_usage", "monthly_usage_v2"} <= names
    assert {"churn_default", "churn_v2"} <= {s["name"] for s in data["feature_sets"]}
    res = _run(["features", "describe", "monthly_usage", "--json"], tmp_path)
    versions = json.loads(res.stdout)["versions"]
    assert [v["version"] for v in versions] == [1, 2] and versions[1]["served_name"] == "monthly_usage_v2"
    res = _run(["features", "describe", "churn_v2", "--json"], tmp_path)
    assert json.loads(res.stdout)["feature_set"]["name"] == "churn_v2"


def test_history_json(tmp_path: Path, small_data: Path) -> None:
    from mlflow_churn.features.materialize import materialize

    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "data").symlink_to(small_data, target_is_directory=True)
    batch = materialize(load_config(workspace=ws, environ={}), datetime(2026, 3, 25, tzinfo=UTC),
                        progress=False)
    res = _run(["--workspace", str(ws), "features", "history", "--json"], tmp_path)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert [b["batch_id"] for b in data["batches"]] == [batch.batch_id]
    assert data["batches"][0]["rows"] == batch.rows


def _window(day: int, **values) -> WindowStats:
    base = dict(as_of=datetime(2026, 6, day, tzinfo=UTC), psi={"monthly_usage": 0.01, "tenure_days": 0.01},
                psi_threshold={"monthly_usage": 0.05, "tenure_days": 0.05})
    base.update(values)
    return WindowStats(**base)


def test_monitor_lines_say_what_fired_what_is_pending_and_why() -> None:
    policy = load_config(environ={}).monitoring.policy
    segs = {f"plan=p{i}": 0.5 + i / 100 for i in range(17)}
    thr = {k: 0.05 for k in segs}
    first = _window(1)
    drifted = _window(8, psi={"monthly_usage": 0.626, "tenure_days": 0.01},
                      segment_psi=segs, segment_threshold=thr)
    d = decide([first, drifted], policy, drifted.as_of)
    assert d.action == "ok"
    # the 17 pending segments are one reason, not 17 clauses
    assert sum("segment" in r for r in d.reasons) == 1, d.reasons
    assert "17 segment(s) moved but only in 1 of the last 2 windows (need 2)" in d.reasons[-1]
    assert "and 12 more" in d.reasons[-1]
    lines = decision_lines(d, segs)
    psi_line = next(line for line in lines if line.startswith("psi[*] > 0.2"))
    assert "pending" in psi_line and "needs 2" in psi_line and "monthly_usage 0.626" in psi_line
    assert any(line.startswith("auc_drop > 0.05: quiet") for line in lines), lines
    seg_line = next(line for line in lines if line.startswith("segment drift (PSI, context):"))
    assert "17 pending" in seg_line and "plan=p16 0.660" in seg_line and seg_line.count("plan=") == 5
    assert lines[-1].startswith("decision: ok, because nothing fired; pending: psi[*] > 0.2"), lines[-1]
    assert len(lines) == len(policy.triggers) + 2

    again = _window(15, psi={"monthly_usage": 0.6, "tenure_days": 0.01}, segment_psi=segs,
                    segment_threshold=thr)
    d2 = decide([first, drifted, again], policy, again.as_of)
    lines = decision_lines(d2, segs)
    assert d2.action == "investigate"
    assert any(line.startswith("psi[*] > 0.2: FIRED") for line in lines), lines
    assert lines[-1].startswith("decision: investigate, because drift trigger(s) fired"), lines[-1]


def test_monitor_lines_name_the_segment_its_drop_and_se() -> None:
    from mlflow_churn.monitoring.cli import segment_table
    from mlflow_churn.stats.performance import SegmentPerformance

    policy = load_config(environ={}).monitoring.policy
    perf = SegmentPerformance("region=pacific", churners=61, auc=0.61, auc_se=0.02, source="realised",
                              baseline_auc=0.76, baseline_auc_se=0.0224, baseline_source="first window",
                              reference=0.76, reference_source="first window", training_auc=0.74,
                              training_auc_se=0.025, drop=0.15, drop_se=0.03, z=3.0, threshold=0.09)
    quiet = SegmentPerformance("plan=basic",
                               reason="too few churners: 12 < 20 (monitoring.segment_min_churners)",
                               estimate_reason="too few expected churners: 9.5 < 20 "
                                               "(monitoring.segment_min_churners)")

    def window(day: int) -> WindowStats:
        w = _window(day, segment_auc_drop={"region=pacific": 0.15},
                    segment_auc_drop_threshold={"region=pacific": 0.09})
        w.segment_performance = {"region=pacific": asdict(perf), "plan=basic": asdict(quiet)}
        return w

    hist = [window(1), window(8)]
    d = decide(hist, policy, hist[-1].as_of)
    lines = decision_lines(d, {}, segment_drop=hist[-1].segment_auc_drop)
    rule = next(line for line in lines if line.startswith("segment rule: region=pacific NAMED"))
    assert "realised AUC 0.610 vs 0.760 (first window), drop 0.150, SE 0.030 > limit 0.090" in rule
    assert "in 2 of the last 2 windows" in rule
    assert lines[-1].startswith("decision: retrain, because performance trigger(s) fired: "
                                "segment_auc_drop[region=pacific] > 0.05"), lines[-1]
    once = decide(hist[:1], policy, hist[0].as_of)
    assert any(line.startswith("segment rule: pending") and "region=pacific drop 0.150" in line
               for line in decision_lines(once, {}))
    quiet_lines = decision_lines(decide([_window(1)], policy, _window(1).as_of), {}, segment_drop={})
    assert any(line.startswith("segment rule: no segment compared") for line in quiet_lines)
    from rich.console import Console

    out = Console(width=250, record=True)
    out.print(segment_table({"plan=basic": quiet, "region=pacific": perf}, d, policy.segment_min_drop))
    text = out.export_text()
    assert "0.610 +- 0.020" in text and "NAMED" in text and "too few churners: 12 < 20" in text
    assert "0.740 +- 0.025" in text


@pytest.mark.parametrize("width", [None, "60"])
def test_console_is_wide_when_piped(width: str | None, tmp_path: Path) -> None:
    code = ("from mlflow_churn.cli_common import console; from rich.table import Table; "
            "t = Table(); t.add_column('n'); t.add_row('x' * 150); console.print(t)")
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    if width:
        env["COLUMNS"] = width
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert "x" * 150 in out.stdout, out.stdout
