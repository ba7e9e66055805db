"""A churn simulator with drift scenarios, writing Feast-compatible Parquet tables.

Tables (under ``<workspace>/data``):

- ``customers.parquet``: one row per customer, static attributes (plan, region, contract,
  payment method, monthly charge, ...), ``event_timestamp`` = ``created`` = signup time.
- ``activity/date=YYYY-MM-DD/part-0.parquet``: one row per live customer and day:
  sessions, minutes_used, data_used_mb, support_calls, failed_payments, dropped_calls.
  A daily aggregate is stamped ``event_timestamp`` = the end of its day (midnight UTC of
  the next day), the instant it became known, so "rows with event_timestamp <= cutoff"
  is point-in-time correct.
- ``churn_events.parquet``: customer_id, churn_date (first day without service),
  ``event_timestamp`` = churn_date at 00:00 UTC.
- ``manifest.json``: the scenario, seed, sizes, onset and the hazard parameters.

The ground-truth hazard
-----------------------
Each customer carries hidden states that evolve daily:

- engagement ``e = e0 * exp(u)``, with ``e0 ~ LogNormal(0, 0.6)`` and ``u`` an AR(1)
  (start N(0, 0.25), phi 0.97, innovation sd 0.06); it drives sessions, minutes and data;
- dissatisfaction ``d``, an AR(1) (start N(0, 0.9), phi 0.98, sd 0.18), seen through
  support calls ~ Poisson(0.12 exp(0.9 d));
- financial stress ``f``, an AR(1) (start N(0, 0.4), phi 0.99, sd 0.06), seen through
  failed payments (daily probability 0.02 exp(1.2 f + payment-method risk));
- a constant frailty ``z ~ N(0, 0.25)`` that nothing observable reveals (it caps the AUC).

The daily churn probability of a live customer is (:class:`HazardParams` holds the numbers)::

    h = min(0.5, h0 * exp(b_mtm mtm + b_new new + b_two two_year + b_d d - b_u u
                          - b_e log(e0) + b_f f + b_p p + z) * (1 + failed_payment_today))

with ``h0 = 2e-4``, ``mtm`` / ``two_year`` the contract, ``new`` tenure under 180 days,
``b_mtm = 1.8``, ``b_new = 1.0``, ``b_two = -1.0``, ``b_d = 1.3``, ``b_u = 1.5``,
``b_e = 1.3``, ``b_f = 1.0``, ``b_p = 0`` and ``p = (monthly_charge - 60) / 25``: about 5%
of customers churn within 30 days; about 10% sign up during the simulated days. A model
sees ``u`` only through recent usage against the customer's own history, and ``d`` / ``f``
only through noisy counts: a good model reaches a ROC AUC of about 0.75-0.80 on customers
it never trained on (0.776 measured with 15,000 customers, a 30-day horizon and a fixed
250-tree XGBoost).

Scenarios (each starts at ``onset_day``):

- ``stable``: nothing changes;
- ``usage_shift``: observed minutes_used is multiplied by ``usage_factor`` (1.42) for
  everyone; the hazard does not change (covariate drift, AUC roughly stable);
- ``segment_shift``: in one segment (default region ``pacific``, ~10%) engagement falls
  by 30%, dissatisfaction rises by 0.8 and the hazard doubles;
- ``concept_drift``: every behavioural and contract / tenure coefficient falls to a fifth
  (``concept_keep``) and price starts to drive churn (``b_p = concept_price = 1.2``): a
  model trained before the onset drops from ~0.78 to ~0.67 AUC, one retrained after it
  reaches ~0.78 again;
- ``gradual``: like ``usage_shift``, but the factor ramps linearly over ``ramp_days`` (42);
- ``data_outage``: data_used_mb turns null for a fixed 30% of customers;
- ``usage_and_segment``: ``usage_shift`` and ``segment_shift`` at the same onset (the demo);
- ``segment_concept``: inside one segment (default region ``pacific``, ~10% of customers)
  the behavioural terms (dissatisfaction, usage, engagement) keep ``segment_concept_keep``
  (0.45) of their weight and price starts to drive churn (``segment_concept_price`` = 1.0 on
  (charge - 60) / 25), the log-hazard shifted each day so that the segment's mean hazard
  stays at its onset level (who churns changes, not how many). The features do not change
  (population PSI ~0.015 against the pre-onset rows, as in ``stable``). With the default
  seed and 40,000 customers, a model trained before the onset on the feature store's
  features loses 0.060 AUC on the segment and 0.0055 on the population (paired with
  ``stable`` at the same seed, equal to it up to the onset): the population moves by about a
  tenth of the segment's drop.

The same arguments give the same bytes: one seeded generator, drawn in a fixed order.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mlflow_churn.config import SCENARIOS, SimulationConfig
from mlflow_churn.data.tables import ACTIVITY_SCHEMA, CHURN_EVENTS_SCHEMA, CUSTOMERS_SCHEMA
from mlflow_churn.errors import ChurnError
from mlflow_churn.progress import ProgressArg, resolve
from mlflow_churn.times import midnight

PLANS = ("basic", "standard", "premium", "unlimited")
PLAN_P = (0.35, 0.35, 0.20, 0.10)
PLAN_CHARGE = (30.0, 55.0, 80.0, 105.0)
PLAN_DATA = (0.5, 1.0, 1.6, 2.5)
REGIONS = (
    "north", "south", "east", "west", "central",
    "mountain", "pacific", "atlantic", "lakes", "plains",
)
REGION_QUALITY = (1.0, 1.1, 0.9, 1.0, 1.2, 1.6, 1.0, 0.9, 1.1, 1.4)
CONTRACTS = ("month-to-month", "one-year", "two-year")
CONTRACT_P = (0.55, 0.25, 0.20)
PAYMENTS = ("credit-card", "bank-transfer", "electronic-check", "mailed-check")
PAYMENT_P = (0.3, 0.3, 0.25, 0.15)
PAYMENT_RISK = (0.0, -0.2, 0.7, 0.3)
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class HazardParams:
    """The hidden hazard and the drift sizes (see the module docstring)."""

    h0: float = 2e-4
    b_mtm: float = 1.8
    b_new: float = 1.0
    b_two_year: float = -1.0
    b_dissatisfaction: float = 1.3
    b_usage: float = 1.5
    b_engagement: float = 1.3
    b_stress: float = 1.0
    b_price: float = 0.0
    frailty_sd: float = 0.25
    usage_factor: float = 1.42
    ramp_days: int = 42
    segment_engagement: float = 0.7
    segment_dissatisfaction: float = 0.8
    segment_hazard: float = 2.0
    concept_keep: float = 0.2
    concept_price: float = 1.2
    outage_fraction: float = 0.3
    new_signup_fraction: float = 0.1
    segment_concept_keep: float = 0.45
    segment_concept_price: float = 1.0


@dataclass(frozen=True)
class SimulationSpec:
    """What to simulate. ``onset_day`` None means ``days // 2``."""

    customers: int
    days: int
    start: date
    scenario: str = "stable"
    seed: int = 42
    onset_day: int | None = None
    segment_column: str = "region"
    segment_value: str = "pacific"
    params: HazardParams = field(default_factory=HazardParams)

    @classmethod
    def from_config(cls, sim: SimulationConfig) -> SimulationSpec:
        """The spec of the ``simulation`` section (``cfg.simulation``): what ``churn simulate``
        runs once its options are merged into the configuration."""
        return cls(customers=sim.customers, days=sim.days, start=sim.start, scenario=sim.scenario,
                   seed=sim.seed, onset_day=sim.onset_day, segment_column=sim.segment_column,
                   segment_value=sim.segment_value)

    @property
    def onset(self) -> int:
        """Day index where drift starts."""
        return self.days // 2 if self.onset_day is None else self.onset_day


@dataclass(frozen=True)
class SimulationResult:
    """What ``simulate`` wrote."""

    data_dir: Path
    customers: int
    activity_rows: int
    churn_events: int
    days: int
    first_day: date
    last_day: date
    onset_day: date
    files: int


def _validate_spec(spec: SimulationSpec) -> None:
    """Raise ChurnError naming the first bad argument of ``spec``."""
    if spec.customers < 1:
        raise ChurnError(f"--customers must be a positive integer, got {spec.customers}")
    if spec.days < 1:
        raise ChurnError(f"--days must be a positive integer, got {spec.days}")
    if spec.scenario not in SCENARIOS:
        raise ChurnError(
            f"unknown scenario '{spec.scenario}'; choose one of: {', '.join(SCENARIOS)}"
        )
    if spec.seed < 0:
        raise ChurnError(f"--seed must be >= 0, got {spec.seed}")
    if spec.onset_day is not None and not 0 <= spec.onset_day <= spec.days:
        raise ChurnError(f"--onset-day must be between 0 and --days ({spec.days}), got {spec.onset_day}")
    allowed = {"region": REGIONS, "plan": PLANS, "contract": CONTRACTS, "payment_method": PAYMENTS}
    if spec.segment_column not in allowed:
        raise ChurnError(
            f"segment column '{spec.segment_column}' cannot shift; choose one of: {', '.join(allowed)}"
        )
    if spec.segment_value not in allowed[spec.segment_column]:
        raise ChurnError(
            f"segment value '{spec.segment_value}' is not a {spec.segment_column}; choose one of: "
            f"{', '.join(allowed[spec.segment_column])}"
        )


class _Population:
    """Static attributes and hidden states of every customer, as numpy vectors."""

    def __init__(self, spec: SimulationSpec, rng: np.random.Generator) -> None:
        n, p = spec.customers, spec.params
        self.n = n
        self.ids = np.arange(1, n + 1, dtype=np.int64)
        tenure = np.minimum(rng.exponential(900.0, n), 2500.0).astype(np.int64)
        late = rng.random(n) < p.new_signup_fraction
        offset = rng.integers(0, max(spec.days, 1), n)
        # signup day index relative to the start (negative = before the simulation)
        self.signup_idx = np.where(late, offset, -tenure)
        self.plan = rng.choice(len(PLANS), n, p=PLAN_P)
        self.region = rng.integers(0, len(REGIONS), n)
        self.contract = rng.choice(len(CONTRACTS), n, p=CONTRACT_P)
        self.payment = rng.choice(len(PAYMENTS), n, p=PAYMENT_P)
        self.paperless = rng.random(n) < 0.6
        self.lines = rng.integers(1, 5, n)
        self.age = rng.integers(18, 86, n)
        charge = np.asarray(PLAN_CHARGE)[self.plan] + 5.0 * (self.lines - 1)
        self.charge = np.round(charge + rng.normal(0, 8.0, n), 2).clip(10.0, None)
        self.e0 = rng.lognormal(0.0, 0.6, n)
        self.frailty = rng.normal(0.0, p.frailty_sd, n)
        self.u = rng.normal(0.0, 0.25, n)
        self.d = rng.normal(0.0, 0.9, n)
        self.f = rng.normal(0.0, 0.4, n)
        self.churned = np.zeros(n, dtype=bool)
        #: segment_concept: the segment's mean daily hazard factor at the onset, held afterwards
        self.concept_level: float | None = None
        self.outage = rng.random(n) < p.outage_fraction
        codes = {"region": self.region, "plan": self.plan, "contract": self.contract,
                 "payment_method": self.payment}
        names = {"region": REGIONS, "plan": PLANS, "contract": CONTRACTS,
                 "payment_method": PAYMENTS}
        col = spec.segment_column
        self.segment = codes[col] == names[col].index(spec.segment_value)

    def customers_table(self, start: date) -> pa.Table:
        signup = np.datetime64(start, "D") + self.signup_idx.astype("timedelta64[D]")
        ts = pa.array(signup.astype("datetime64[us]"), type=pa.timestamp("us", tz="UTC"))
        return pa.table({
            "customer_id": self.ids,
            "signup_date": pa.array(signup.astype("datetime64[D]"), type=pa.date32()),
            "plan": pa.array(np.asarray(PLANS)[self.plan]),
            "region": pa.array(np.asarray(REGIONS)[self.region]),
            "contract": pa.array(np.asarray(CONTRACTS)[self.contract]),
            "payment_method": pa.array(np.asarray(PAYMENTS)[self.payment]),
            "paperless_billing": self.paperless,
            "num_lines": self.lines.astype(np.int16),
            "age": self.age.astype(np.int16),
            "monthly_charge": self.charge,
            "event_timestamp": ts,
            "created": ts,
        }, schema=CUSTOMERS_SCHEMA)


def _usage_factor(spec: SimulationSpec, day: int) -> float:
    p = spec.params
    if day < spec.onset:
        return 1.0
    if spec.scenario in ("usage_shift", "usage_and_segment"):
        return p.usage_factor
    if spec.scenario == "gradual":
        frac = min(1.0, (day - spec.onset + 1) / p.ramp_days)
        return 1.0 + (p.usage_factor - 1.0) * frac
    return 1.0


def _segment_concept_logit(pop: _Population, p: HazardParams, alive: np.ndarray, old: np.ndarray,
                           behaviour: np.ndarray) -> np.ndarray:
    """``segment_concept``: the log-hazard ``old`` with its ``behaviour`` terms weighted by
    ``segment_concept_keep`` and price by ``segment_concept_price`` (``b_price`` is 0 before),
    shifted each day by the constant that keeps the mean hazard of the segment's live
    customers at its level of the onset day: who churns changes, how many does not. (A shift
    fixed at the onset lets the price-driven churners deplete and the churn rate sink; matching
    the old drivers' hazard of each day's survivors makes it climb, since the dissatisfied no
    longer leave first.)"""
    price = (pop.charge - 60.0) / 25.0
    new = old - (1.0 - p.segment_concept_keep) * behaviour + (p.segment_concept_price - p.b_price) * price
    live = pop.segment & alive
    if not live.any():
        return new
    if pop.concept_level is None:
        pop.concept_level = float(np.mean(np.exp(old[live])))
    return new + float(np.log(pop.concept_level) - np.log(np.mean(np.exp(new[live]))))


def _simulate_day(
    spec: SimulationSpec, pop: _Population, rng: np.random.Generator, day: int, current: date
) -> tuple[pa.Table, np.ndarray]:
    """Advance every customer by one day; return that day's activity and who churned."""
    p = spec.params
    n = pop.n
    drifting = day >= spec.onset
    # hidden states: AR(1) steps for everyone (fixed draw order keeps runs reproducible)
    pop.u = 0.97 * pop.u + rng.normal(0.0, 0.06, n)
    pop.d = 0.98 * pop.d + rng.normal(0.0, 0.18, n)
    pop.f = 0.99 * pop.f + rng.normal(0.0, 0.06, n)
    alive = (pop.signup_idx <= day) & ~pop.churned

    seg = pop.segment & (spec.scenario in ("segment_shift", "usage_and_segment")) & drifting
    eng = pop.e0 * np.exp(pop.u) * np.where(seg, p.segment_engagement, 1.0)
    d_eff = pop.d + np.where(seg, p.segment_dissatisfaction, 0.0)
    doy = current.timetuple().tm_yday
    season = (1.0 + 0.15 * math.cos(2 * math.pi * (current.weekday() - 5.5) / 7.0)) * (
        1.0 + 0.08 * math.sin(2 * math.pi * doy / 365.25)
    )

    sessions = rng.poisson(2.5 * eng * season)
    minutes = rng.gamma(2.0, 17.0 * eng * season) * _usage_factor(spec, day)
    data_mb = rng.gamma(1.5, 120.0 * eng * season * np.asarray(PLAN_DATA)[pop.plan])
    support = rng.poisson(0.12 * np.exp(0.9 * d_eff))
    failed = rng.random(n) < 0.02 * np.exp(1.2 * pop.f + np.asarray(PAYMENT_RISK)[pop.payment])
    dropped = rng.poisson(0.15 * np.asarray(REGION_QUALITY)[pop.region])
    u_draw = rng.random(n)

    b_d, b_u, b_e, b_p = p.b_dissatisfaction, p.b_usage, p.b_engagement, p.b_price
    b_mtm, b_new, b_two = p.b_mtm, p.b_new, p.b_two_year
    if spec.scenario == "concept_drift" and drifting:
        keep = p.concept_keep
        b_d, b_u, b_e, b_p = b_d * keep, b_u * keep, b_e * keep, p.concept_price
        b_mtm, b_new, b_two = b_mtm * keep, b_new * keep, b_two * keep
    tenure = day - pop.signup_idx
    logit = (
        b_mtm * (pop.contract == 0)
        + b_new * (tenure < 180)
        + b_two * (pop.contract == 2)
        + b_d * d_eff
        - b_u * (pop.u + np.log(np.where(seg, p.segment_engagement, 1.0)))
        - b_e * np.log(pop.e0)
        + p.b_stress * pop.f
        + b_p * (pop.charge - 60.0) / 25.0
        + pop.frailty
        + np.where(seg, math.log(p.segment_hazard), 0.0)
    )
    if spec.scenario == "segment_concept" and drifting:
        behaviour = b_d * pop.d - b_u * pop.u - b_e * np.log(pop.e0)
        logit = np.where(pop.segment, _segment_concept_logit(pop, p, alive, logit, behaviour), logit)
    hazard = np.minimum(p.h0 * np.exp(logit) * (1.0 + failed), 0.5)
    churn_now = alive & (u_draw < hazard)
    pop.churned |= churn_now

    idx = np.flatnonzero(alive)
    data_col = data_mb[idx].astype(np.float32)
    mask = None
    if spec.scenario == "data_outage" and drifting:
        mask = pop.outage[idx]
    closes = midnight(current + timedelta(days=1))
    ts = pa.array(np.full(idx.size, np.datetime64(closes.replace(tzinfo=None), "us")),
                  type=pa.timestamp("us", tz="UTC"))
    table = pa.table({
        "customer_id": pop.ids[idx],
        "event_timestamp": ts,
        "created": ts,
        "sessions": sessions[idx].astype(np.int32),
        "minutes_used": np.round(minutes[idx], 2).astype(np.float32),
        "data_used_mb": pa.array(np.round(data_col, 1), mask=mask),
        "support_calls": support[idx].astype(np.int32),
        "failed_payments": failed[idx].astype(np.int32),
        "dropped_calls": dropped[idx].astype(np.int32),
    }, schema=ACTIVITY_SCHEMA)
    return table, churn_now


def simulate(
    spec: SimulationSpec,
    data_dir: Path,
    overwrite: bool = False,
    progress: ProgressArg = None,
) -> SimulationResult:
    """Simulate ``spec`` and write its tables to ``data_dir`` atomically.

    The tables go to a temporary sibling directory first and replace ``data_dir`` only
    when complete, so a crash or bad input never leaves a half-written dataset behind.
    ``progress`` ticks once per simulated day (:mod:`mlflow_churn.progress`).
    """
    _validate_spec(spec)
    data_dir = Path(data_dir)
    if data_dir.exists() and not overwrite:
        raise ChurnError(
            f"{data_dir} already holds a dataset; pass --overwrite to replace it "
            "or choose another --workspace"
        )
    parent = data_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".{data_dir.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "activity").mkdir(parents=True)
    except OSError as exc:
        raise ChurnError(f"cannot write to {parent}: {exc.strerror}; choose a writable --workspace") from None

    try:
        with resolve(progress)(f"simulating {spec.customers:,} customers", spec.days) as tick:
            result = _write_all(spec, tmp, tick)
        _swap_in(tmp, data_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SimulationResult(data_dir=data_dir, **result)


def _write_all(spec: SimulationSpec, out: Path, tick: Callable[[int], None]) -> dict:
    rng = np.random.default_rng(spec.seed)
    pop = _Population(spec, rng)
    pq.write_table(pop.customers_table(spec.start), out / "customers.parquet", compression="zstd")
    churn_ids: list[np.ndarray] = []
    churn_days: list[np.ndarray] = []
    rows = 0
    for day in range(spec.days):
        current = spec.start + timedelta(days=day)
        table, churn_now = _simulate_day(spec, pop, rng, day, current)
        part = out / "activity" / f"date={current.isoformat()}"
        part.mkdir()
        pq.write_table(table, part / "part-0.parquet", compression="zstd")
        rows += table.num_rows
        ids = pop.ids[churn_now]
        churn_ids.append(ids)
        churn_days.append(np.full(ids.size, day + 1, dtype=np.int64))
        tick(1)
    ids = np.concatenate(churn_ids) if churn_ids else np.empty(0, np.int64)
    days = np.concatenate(churn_days) if churn_days else np.empty(0, np.int64)
    start64 = np.datetime64(spec.start, "D")
    churn_date = start64 + days.astype("timedelta64[D]")
    churn = pa.table({
        "customer_id": ids,
        "churn_date": pa.array(churn_date, type=pa.date32()),
        "event_timestamp": pa.array(churn_date.astype("datetime64[us]"), type=pa.timestamp("us", tz="UTC")),
        "created": pa.array(churn_date.astype("datetime64[us]"), type=pa.timestamp("us", tz="UTC")),
    }, schema=CHURN_EVENTS_SCHEMA)
    pq.write_table(churn, out / "churn_events.parquet", compression="zstd")
    last = spec.start + timedelta(days=spec.days - 1)
    onset = spec.start + timedelta(days=spec.onset)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "scenario": spec.scenario,
        "seed": spec.seed,
        "customers": spec.customers,
        "days": spec.days,
        "start": spec.start.isoformat(),
        "last_day": last.isoformat(),
        "onset_day_index": spec.onset,
        "onset_date": onset.isoformat(),
        "segment": {"column": spec.segment_column, "value": spec.segment_value},
        "hazard": asdict(spec.params),
        "rows": {"customers": spec.customers, "activity": rows, "churn_events": int(ids.size)},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return {
        "customers": spec.customers,
        "activity_rows": rows,
        "churn_events": int(ids.size),
        "days": spec.days,
        "first_day": spec.start,
        "last_day": last,
        "onset_day": onset,
        "files": spec.days + 3,
    }


def _swap_in(tmp: Path, data_dir: Path) -> None:
    """Replace ``data_dir`` by ``tmp`` with renames only (the old copy goes last)."""
    old = None
    if data_dir.exists():
        old = data_dir.parent / f".{data_dir.name}.old-{os.getpid()}"
        data_dir.rename(old)
    tmp.rename(data_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_manifest(data_dir: Path) -> dict:
    """The manifest of a simulated (or imported) dataset; ChurnError if there is none."""
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise ChurnError(f"no dataset at {data_dir}; run `churn simulate` first or point --workspace at one")
    return json.loads(path.read_text())
