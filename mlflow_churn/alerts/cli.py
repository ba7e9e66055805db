"""``churn alerts list|test|flush|resolve``: the alert outbox, seen and driven by a person."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import typer

from mlflow_churn.cli_common import JSON_OPTION, check_number, console, get_config, print_json
from mlflow_churn.errors import ChurnError

alerts_app = typer.Typer(help="Alerts: conditions in the outbox, their deliveries and attempts.",
                         no_args_is_help=True)

#: the condition `churn alerts test` fires and resolves
TEST_KEY = "churn-alerts-test"
TEST_LABELS = {"alertname": "ChurnAlertTest", "severity": "info", "source": "churn alerts test"}


def _when(ts: float | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _delivery_text(d: Any, status: str) -> str:
    if d.gave_up:
        state = f"GAVE UP ({d.last_error})"
    elif d.told == status:
        state = f"{status} delivered"
    else:
        owed = "firing" if not d.told else "resolved"
        state = f"{owed} owed"
        if d.failures:
            state += f", {d.failures} failure(s), next {_when(d.next_at)}, last: {d.last_error}"
    return f"{d.outlet}: {state} ({d.attempts} attempt(s))"


def _outbox(ctx: typer.Context, create: bool = True):
    from mlflow_churn.alerts import Outbox, outbox_path

    cfg = get_config(ctx)
    path = outbox_path(cfg)
    return cfg, (Outbox(path) if create or path.exists() else None), path


@alerts_app.command("list")
def list_cmd(
    ctx: typer.Context,
    all_episodes: bool = typer.Option(False, "--all", help="Every episode of each condition (default: the "
                                      "latest one)."),
    key: str = typer.Option(None, "--key", help="Only this condition (its dedup key), with its attempts "
                                                "(default: every condition)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Conditions in the outbox (newest change first): key, alert name, status, since when,
    and what each outlet has been told, with the attempts; --json adds labels, annotations and
    every attempt."""
    from rich.table import Table

    cfg, box, path = _outbox(ctx, create=False)
    conditions = box.conditions(now=time.time(), all_episodes=all_episodes, key=key) if box else []
    if key and not conditions:
        raise ChurnError(f"no condition with key '{key}' in the outbox {path}; see `churn alerts list`")
    attempts = box.attempts(key) if box else []
    if as_json:
        print_json({"outbox": str(path), "conditions": [
            {**c.to_dict(), "attempts": [a.to_dict() for a in attempts
                                         if a.key == c.key and a.episode == c.episode]}
            for c in conditions]})
        return
    if not conditions:
        console.print(f"no alerts recorded in {path}")
        return
    table = Table(title=f"alerts in {path}")
    for col in ("key", "episode", "alertname", "status", "since (UTC)", "ended (UTC)", "fired", "outlets"):
        table.add_column(col)
    for c in conditions:
        outlets = "; ".join(_delivery_text(d, c.status) for d in c.deliveries) or "(no outlet configured)"
        table.add_row(c.key, str(c.episode), c.labels.get("alertname", ""), c.status, _when(c.starts_at),
                      _when(c.ends_at), str(c.fired), outlets)
    console.print(table)
    if key:
        for a in attempts:
            outcome = f"ok {a.http_status}" if a.ok else (a.error or f"HTTP {a.http_status}")
            console.print(f"{_when(a.at)}  episode {a.episode}  {a.outlet:<12} {a.step:<8} {outcome} "
                          f"({a.seconds:.2f} s)")


def _report(box: Any, key: str, episode: int) -> list[str]:
    (cond,) = [c for c in box.conditions(all_episodes=True, key=key) if c.episode == episode]
    return [_delivery_text(d, cond.status) for d in cond.deliveries]


@alerts_app.command("test")
def test_cmd(
    ctx: typer.Context,
    wait: float = typer.Option(30.0, "--wait", help="Seconds to wait for each message to be delivered."),
    hold: float = typer.Option(0.0, "--hold", help="Seconds between firing and resolving (through "
                               "Alertmanager: longer than its group_wait, or it never notifies the firing)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Fire a test alert (ChurnAlertTest) through the configured outlets, wait until it is
    delivered, then resolve it and wait again. Exit 1 when a message is still undelivered after
    --wait (it stays in the outbox: `churn alerts list`)."""
    from mlflow_churn.alerts import fire, flush, outlets, resolve, stop_sender

    check_number(wait, "--wait", 0, 3600)
    check_number(hold, "--hold", 0, 3600)
    cfg, box, path = _outbox(ctx)
    configured = outlets(cfg)
    if not configured:
        raise ChurnError("no alert outlet is configured: set alerts.alertmanager_url and/or "
                         "alerts.webhook_url (e.g. CHURN_ALERTS__WEBHOOK_URL=http://127.0.0.1:9000/hook)")
    resolve(cfg, TEST_KEY)  # a test left firing by an interrupted run ends first
    notes = {"summary": "test alert from `churn alerts test`; it is resolved right after",
             "outlets": ", ".join(configured)}
    fired = fire(cfg, TEST_KEY, TEST_LABELS, notes)
    if fired is None:
        raise ChurnError(f"the test alert could not be recorded in the outbox {path} (see the log above)")
    left = flush(cfg, wait, mine_only=True)
    if not left:
        time.sleep(hold)
        resolve(cfg, TEST_KEY)
        left = flush(cfg, wait, mine_only=True)
    stop_sender(cfg, wait=0)  # --wait was the wait: no second one at exit
    lines = _report(box, fired.key, fired.episode)
    if as_json:
        print_json({"key": fired.key, "episode": fired.episode, "delivered": not left, "outlets": lines})
    else:
        for line in lines:
            console.print(line)
        console.print("delivered: fired and resolved" if not left else
                      f"{left} message(s) not delivered within {wait:g} s; they stay in the outbox {path} "
                      "(`churn alerts list`, `churn alerts flush`)")
    if left:
        raise typer.Exit(1)


@alerts_app.command("flush")
def flush_cmd(
    ctx: typer.Context,
    wait: float = typer.Option(None, "--wait", help="Seconds to wait (default: alerts.flush_wait_seconds)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Deliver what the outbox still owes (left by earlier processes or a receiver that was
    down), retrying with back-off for up to --wait seconds. Exit 1 when something is still owed."""
    from mlflow_churn.alerts import flush, stop_sender

    check_number(wait, "--wait", 0, 86_400)
    cfg, _box, path = _outbox(ctx)
    left = flush(cfg, wait)
    stop_sender(cfg, wait=0)
    if as_json:
        print_json({"outbox": str(path), "owed": left})
    else:
        console.print("nothing owed: every message delivered" if not left else
                      f"{left} message(s) still owed in {path} (`churn alerts list`)")
    if left:
        raise typer.Exit(1)


@alerts_app.command("resolve")
def resolve_cmd(
    ctx: typer.Context,
    key: str = typer.Argument(..., help="Dedup key of the condition (see `churn alerts list`)."),
    wait: float = typer.Option(None, "--wait", help="Seconds to wait for the resolved message to be "
                               "delivered (default: alerts.flush_wait_seconds)."),
) -> None:
    """Clear a firing condition by hand (the outlets get its resolved message)."""
    from mlflow_churn.alerts import flush, resolve, stop_sender

    check_number(wait, "--wait", 0, 86_400)
    cfg, box, path = _outbox(ctx, create=False)
    firing = [c for c in box.conditions(now=time.time(), key=key) if c.status == "firing"] if box else []
    if not firing:
        raise ChurnError(f"no firing condition with key '{key}' in the outbox {path}; see "
                         "`churn alerts list`")
    episode = resolve(cfg, key)
    if episode is None:
        raise ChurnError(f"condition '{key}' could not be resolved in {path} (see the log above)")
    left = flush(cfg, wait, mine_only=True)
    stop_sender(cfg, wait=0)
    console.print(f"resolved '{key}' (episode {episode})" + (f"; {left} message(s) still owed" if left else
                                                             "; delivered"))


def register(app: typer.Typer) -> None:
    app.add_typer(alerts_app, name="alerts")
