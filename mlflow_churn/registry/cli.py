"""``churn registry history|keygen|approve|verify``: which version held an alias when, the
signing key, approvals, and whether the registry's protected aliases verify."""

from __future__ import annotations

from typing import Any

import typer

from mlflow_churn.cli_common import console, get_config, opt_str, print_json

registry_app = typer.Typer(help="The model registry: alias history, signing keys, approvals, verification.",
                            no_args_is_help=True)


@registry_app.command("history")
def history_cmd(
    ctx: typer.Context,
    alias: str = typer.Option(None, "--alias", help="Only this alias, e.g. champion (default: every alias)."),
    at: str = typer.Option(None, "--at", help="Which version held the alias at this time (ISO UTC, e.g. "
                           "2026-06-01T00:00Z); with --alias, else for every alias (default: list the "
                           "moves)."),
    model: str = typer.Option(None, "--model", help="Registered model (default: training.model_name)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Every recorded move of the model's aliases, in order (# = the model's sequence number,
    pos = the move's position in its alias's history), with who, when, why, the evidence run
    and each version's identity (<version> (<identity prefix>)); "(claimed)" marks an actor
    the client named and no server authenticated. With --at: which version each alias
    pointed at, at that time."""

    from rich.table import Table

    from mlflow_churn.cli_common import parse_datetime
    from mlflow_churn.registry.history import read_moves, version_at

    when = parse_datetime(at, "--at") if opt_str(at) else None  # bad input first
    cfg, client, name = _registry(ctx, model)
    moves = read_moves(client, name, opt_str(alias))
    if when is not None:
        aliases = [alias] if opt_str(alias) else sorted({m.alias for m in moves})
        answers = [version_at(moves, name, a, when) for a in aliases]
        if as_json:
            print_json({"model": name, "at": when.isoformat(),
                                   "aliases": [a.to_dict() for a in answers]})
            return
        if not answers:
            console.print(f"no recorded alias moves of '{name}'")
        for a in answers:
            since = f" (since {a.move.moved_at.isoformat()}, by {a.move.actor})" if a.move else ""
            note = " [uncertain: a move noticed later may already have happened]" if a.uncertain else ""
            console.print(f"{name}@{a.alias} at {when.isoformat()}: "
                          f"{'version ' + a.version if a.version else 'not set'}{since}{note}")
        return
    if as_json:
        print_json({"model": name, "moves": [m.to_dict() for m in moves]})
        return
    table = Table(title=f"alias history of '{name}'" + (f" ({alias})" if opt_str(alias) else ""))
    for col in ("#", "moved at (UTC)", "alias", "pos", "from", "to", "actor", "reason", "evidence run",
                "source"):
        table.add_column(col)
    for m in moves:
        table.add_row(str(m.seq or "-"), m.moved_at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3], m.alias,
                      str(m.position or "-"), _version_cell(m.from_version, m.from_ref),
                      _version_cell(m.to_version, m.to_ref), m.actor, m.reason[:60], m.evidence_run_id or "-",
                      m.source)
    console.print(table)
    if not moves:
        console.print(f"no recorded alias moves of '{name}'")


def _version_cell(version: str | None, ref: str) -> str:
    """``3 (1a2b3c4d)``: the version and the start of its identity (``-`` for none)."""
    if not version:
        return "-"
    identity = ref.split(":", 1)[1] if ":" in ref else ""
    return f"{version} ({identity[:8]})" if identity else version


@registry_app.command("keygen")
def keygen_cmd(
    ctx: typer.Context,
    rotate: bool = typer.Option(False, "--rotate", help="Replace an existing signing key; its public key "
                                "stays in the verify file, so decisions it signed keep verifying."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Make the Ed25519 key pair decisions are signed with: the private key (mode 0600) at
    registry.signing_key_file, its public key appended to registry.verify_key_file (give only
    that file to the guard, `churn serve` and `churn registry verify`). Never prints the
    private key."""
    from mlflow_churn.registry.signing import keygen, signing_key_path, verify_key_path

    cfg = get_config(ctx)
    res = keygen(signing_key_path(cfg), verify_key_path(cfg), rotate)
    if as_json:
        print_json(res.to_dict())
        return
    rotated = f" (replaces {res.rotated_from})" if res.rotated_from else ""
    console.print(f"signing key {res.key_id}{rotated}")
    console.print(f"  private key (keep it, mode 0600): {res.signing_key_file}")
    console.print(f"  verify keys (public):             {res.verify_key_file}")
    console.print(f"  verify key ids: {', '.join(res.verify_key_ids)}")


@registry_app.command("approve")
def approve_cmd(
    ctx: typer.Context,
    version: str = typer.Option(..., "--version", help="The registered version approved for promotion."),
    approver: str = typer.Option(..., "--approver", help="Who approves (must not be the one who promotes: "
                                 "four eyes, checked at promotion)."),
    reason: str = typer.Option("", "--reason", help="Why (recorded in the signed approval; default: none)."),
    model: str = typer.Option(None, "--model", help="Registered model (default: training.model_name)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Sign an approval of a version (registry.require_approval): an audit run in
    registry.audit_experiment and the version tag churn.sig.approval. The promotion that
    follows must be made by someone else than the approver."""

    from mlflow_churn.cli_common import parse_version
    from mlflow_churn.errors import ChurnError
    from mlflow_churn.registry.aliases import CHAMPION, alias_version
    from mlflow_churn.registry.signing import record_signed
    from mlflow_churn.registry.vocab import SignedKind
    from mlflow_churn.tracking import client_run, ensure_experiment, fail_fast

    number = parse_version(version, "--version")
    who = approver.strip()
    if not who:
        raise ChurnError("--approver must name the approver")
    cfg, client, name = _registry(ctx, model)
    with fail_fast(cfg, f"approving version {number} of '{name}'"):
        _existing_version(client, name, number)
        champion = alias_version(client, name, CHAMPION)
        exp_id = ensure_experiment(client, cfg, cfg.registry.audit_experiment)
        tags = {"kind": "approval", "decision": "approved", "model_name": name, "version": number,
                "actor": who[:500], "mlflow.user": who[:500],
                "champion_version": str(champion.version) if champion else ""}
        with client_run(client, cfg, f"approve v{number}", experiment_id=exp_id, tags=tags) as run_id:
            if reason:
                client.log_param(run_id, "reason", reason[:500])
            signed = record_signed(client, cfg, name, number, SignedKind.APPROVAL, "approved",
                                   champion=champion, run_id=run_id, reason=reason, actor=who)
    out = {"model": name, "version": number, "approver": signed.actor, "run_id": run_id,
           "champion": signed.champion, "issued_at": signed.issued_at, "key_id": signed.key_id}
    if as_json:
        print_json(out)
        return
    console.print(f"version {number} of '{name}' approved by {signed.actor} (signed, key {signed.key_id}, "
                  f"audit run {run_id}); someone else must promote it")


def _existing_version(client: Any, name: str, version: str) -> Any:
    from mlflow.exceptions import MlflowException

    from mlflow_churn.errors import NotFound, is_missing

    try:
        return client.get_model_version(name, version)
    except MlflowException as exc:
        if not is_missing(exc):
            raise
        raise NotFound(f"version {version} of model '{name}' does not exist; see `churn canary status`") \
            from None


@registry_app.command("verify")
def verify_cmd(
    ctx: typer.Context,
    model: str = typer.Option(None, "--model", help="Registered model (default: training.model_name)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Check the model's protected aliases (champion, previous-champion, canary, ...) and the
    versions behind them: every signed decision verifies, the model files are the ones the
    signed gate decision names, and each alias is where the lifecycle can have put it.
    Exit 0 when everything verifies, 1 when anything does not, 2 on errors (an unreachable
    server is an error, never "verified")."""
    from rich.table import Table

    from mlflow_churn.registry.verify import verify_model
    from mlflow_churn.tracking import fail_fast

    cfg, client, name = _registry(ctx, model)
    with fail_fast(cfg, f"verifying '{name}'"):
        report = verify_model(client, cfg, name)
    if as_json:
        print_json(report.to_dict())
    else:
        table = Table(title=f"verify '{name}' (keys: {', '.join(report.verify_keys) or 'none'})")
        for col in ("alias", "version", "check", "ok", "message"):
            table.add_column(col)
        for f in report.findings:
            table.add_row(f.alias, f.version or "-", f.check, "ok" if f.ok else "FAIL", f.message)
        console.print(table)
        if not report.findings:
            console.print(f"'{name}' has no protected alias set; nothing to verify")
        console.print("verified" if report.ok else f"{len(report.failed)} check(s) do not verify")
    if not report.ok:
        raise typer.Exit(1)


def _registry(ctx: typer.Context, model: str | None) -> tuple[Any, Any, str]:
    """(config, client of its tracking store, model name) of a registry command; the server
    probed first, so a dead one fails in seconds."""
    from mlflow.tracking import MlflowClient

    from mlflow_churn.tracking import probe_server, sqlite_store_ready

    cfg = get_config(ctx, {"training.model_name": opt_str(model)})
    uri = cfg.mlflow_tracking_uri
    probe_server(uri)
    sqlite_store_ready(uri)
    return cfg, MlflowClient(uri, uri), cfg.training.model_name


def register(app: typer.Typer) -> None:
    """Add ``churn registry`` to the root command."""
    app.add_typer(registry_app, name="registry")
