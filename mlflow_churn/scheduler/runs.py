"""The scheduler's runs table (``churn_scheduler_runs``, in the job store's database): one row
per job run with its start, end, status, one-line detail and MLflow run id."""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import sqlalchemy as sa

from mlflow_churn.config import sqlalchemy_url

OK, FAILED, SKIPPED = "ok", "failed", "skipped"
TABLE = "churn_scheduler_runs"

_meta = sa.MetaData()
runs_table = sa.Table(
    TABLE, _meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job", sa.String(64), nullable=False, index=True),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("ended_at", sa.Float, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
    sa.Column("run_id", sa.String(64)),
    sa.Column("pid", sa.Integer),
)

_engines: dict[str, sa.Engine] = {}
_engines_lock = threading.Lock()


def engine(url: str) -> sa.Engine:
    """One engine per job store URL in this process, with the runs table created."""
    with _engines_lock:
        eng = _engines.get(url)
        if eng is None:
            eng = sa.create_engine(sqlalchemy_url(url),
                                   connect_args={"timeout": 30} if url.startswith("sqlite") else {})
            _meta.create_all(eng)
            _engines[url] = eng
        return eng


@dataclass(frozen=True)
class RunRecord:
    job: str
    started_at: datetime
    ended_at: datetime
    status: str
    detail: str
    run_id: str | None = None
    pid: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["started_at"], d["ended_at"] = self.started_at.isoformat(), self.ended_at.isoformat()
        return d


def _ts(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def _row(r: sa.Row) -> RunRecord:
    return RunRecord(job=r.job, started_at=_ts(r.started_at), ended_at=_ts(r.ended_at), status=r.status,
                     detail=r.detail, run_id=r.run_id, pid=r.pid)


def record_run(url: str, rec: RunRecord) -> None:
    with engine(url).begin() as con:
        con.execute(runs_table.insert().values(
            job=rec.job, started_at=rec.started_at.timestamp(), ended_at=rec.ended_at.timestamp(),
            status=rec.status, detail=rec.detail, run_id=rec.run_id, pid=rec.pid))


def list_runs(url: str, job: str | None = None, limit: int = 100) -> list[RunRecord]:
    """The newest ``limit`` runs (of ``job``), oldest first."""
    q = sa.select(runs_table).order_by(runs_table.c.id.desc()).limit(limit)
    if job is not None:
        q = q.where(runs_table.c.job == job)
    with engine(url).connect() as con:
        return [_row(r) for r in reversed(con.execute(q).all())]


def last_run(url: str, job: str) -> RunRecord | None:
    found = list_runs(url, job, 1)
    return found[0] if found else None


__all__ = ["FAILED", "OK", "SKIPPED", "TABLE", "RunRecord", "engine", "last_run", "list_runs", "record_run",
           "runs_table"]
