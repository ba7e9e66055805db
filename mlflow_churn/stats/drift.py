"""Drift statistics: PSI, KS, chi-square, Jensen-Shannon; vectorised numpy, streaming.

Conventions
-----------
* **PSI** (population stability index) = sum_i (c_i - r_i) * ln(c_i / r_i) over bins,
  with r_i / c_i the reference / current *shares* (fractions, summing to 1).
  ``binning="quantile"`` (default) takes ``bins`` equal-frequency bins from the
  reference quantiles (interior edges, duplicates removed, so a feature with many ties
  has fewer bins; outer bins are open to +-inf). A value equal to an edge falls in the
  bin on its left (``edges[i-1] < x <= edges[i]``).
  **Empty bins**: a share of 0 on either side is replaced by ``epsilon`` (default
  ``cfg.monitoring.psi_epsilon`` = 1e-4) before the formula, without renormalising;
  one empty bin against a share s therefore contributes (s - eps) * ln(s / eps).
  Missing values (NaN) are left out of PSI and KS; their rate is watched separately
  by the policy's integrity check (``null_rate``).
* ``binning="evidently"`` reproduces Evidently 0.7's ``psi`` stattest exactly
  (``evidently.legacy.calculations.stattests.psi``): for a numeric series with more than
  20 distinct reference values, Sturges equal-width bins over reference + current
  combined (``np.histogram_bin_edges(..., "sturges")``); otherwise one bin per distinct
  value; empty shares become 1e-4, or min(non-zero share) / 1e6 when that minimum is
  <= 1e-4. NaNs are dropped first (as Evidently's drift metrics do).
* **Categorical PSI**: one bin per reference category plus one bucket ``__unseen__``
  for values the reference never had; same epsilon rule.
* **KS**: two-sample Kolmogorov-Smirnov D and p-value, the same floats as
  ``scipy.stats.ks_2samp(method="auto")`` (:func:`ks`; many columns: :func:`ks_many`, each
  side sorted once, one merge per column instead of scipy's two searches). Threshold D
  (``cfg.monitoring.ks_threshold``), not p: at 10^6 rows any p is tiny.
* **Size-aware threshold**: under no drift, PSI with B bins is approximately
  (1/N + 1/M) * chi2(B - 1); :func:`psi_threshold` returns max(configured, that
  quantile), so small segments do not alarm on sampling noise.
* **Streaming**: :func:`stream_drift` reads a Parquet file/directory in record batches
  (pyarrow) and accumulates histogram counts against a stored profile, so memory is
  bounded by the batch size, not the row count.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats

from mlflow_churn.errors import ChurnError

DEFAULT_EPSILON = 1e-4
UNSEEN = "__unseen__"
Binning = Literal["quantile", "evidently"]


class ColumnKind(StrEnum):
    """How a profile entry (:mod:`mlflow_churn.training.profile`) bins its column:
    ``numeric`` (quantile edges, a sample for KS) or ``categorical`` (a category list plus
    ``__unseen__``). A StrEnum: it equals (and is written as) its string."""

    NUMERIC = "numeric"
    CATEGORICAL = "categorical"


# --------------------------------------------------------------------------- helpers
def as_float_array(values: Any) -> np.ndarray:
    """A 1-D float64 array of ``values`` (NaN for missing); categoricals not allowed."""
    if isinstance(values, pd.Series):
        if isinstance(values.dtype, pd.CategoricalDtype) or values.dtype == object:
            values = pd.to_numeric(values, errors="coerce")
        return values.to_numpy(dtype="float64", na_value=np.nan)
    arr = np.asarray(values, dtype="float64")
    return arr.ravel()


def _finite(values: Any) -> np.ndarray:
    arr = as_float_array(values)
    return arr[~np.isnan(arr)]


def _sorted_finite(values: Any) -> np.ndarray:
    """The non-missing values sorted (a new array): one sort, NaNs (sorted last) cut off."""
    arr = np.sort(as_float_array(values))
    return arr[: arr.size - int(np.count_nonzero(np.isnan(arr)))]


def quantile_edges(reference: Any, bins: int = 10) -> np.ndarray:
    """Interior bin edges at the reference's 1/bins .. (bins-1)/bins quantiles (unique).

    Returns at most ``bins - 1`` strictly increasing edges; an empty array (one bin) when
    the reference is constant or empty.
    """
    if bins < 2:
        raise ChurnError(f"bins must be >= 2, got {bins}; use e.g. bins=10")
    ref = _finite(reference)
    if ref.size == 0:
        return np.empty(0)
    qs = np.quantile(ref, np.linspace(0.0, 1.0, bins + 1)[1:-1])
    edges = np.unique(qs)
    # an edge at the maximum would leave the last bin empty by construction
    return edges[edges < ref.max()] if edges.size else edges


def bin_counts(values: Any, edges: np.ndarray) -> np.ndarray:
    """Counts of the non-missing ``values`` in the len(edges)+1 bins (x <= edge: left)."""
    arr = _finite(values)
    idx = np.searchsorted(np.asarray(edges, dtype="float64"), arr, side="left")
    return np.bincount(idx, minlength=len(edges) + 1).astype("int64")


def shares(counts: Any) -> np.ndarray:
    """Counts -> shares (fractions summing to 1); all zeros when the total is 0."""
    c = np.asarray(counts, dtype="float64")
    total = c.sum()
    return c / total if total > 0 else np.zeros_like(c)


def psi_from_shares(reference: Any, current: Any, epsilon: float = DEFAULT_EPSILON) -> float:
    """PSI of two share vectors over the same bins; zero shares become ``epsilon``."""
    r = np.asarray(reference, dtype="float64")
    c = np.asarray(current, dtype="float64")
    if r.shape != c.shape:
        raise ChurnError(f"share vectors differ in length ({r.size} vs {c.size}); use the same bins")
    if epsilon <= 0:
        raise ChurnError(f"epsilon must be > 0, got {epsilon}")
    r = np.where(r > 0, r, epsilon)
    c = np.where(c > 0, c, epsilon)
    return float(np.sum((c - r) * np.log(c / r)))


def _evidently_fill(p: np.ndarray) -> np.ndarray:
    nz = p[p != 0]
    if nz.size == 0:
        return p
    low = nz.min()
    fill = low / 10**6 if low <= 0.0001 else 0.0001
    return np.where(p == 0, fill, p)


def evidently_psi(reference: Any, current: Any, categorical: bool = False) -> float:
    """Evidently 0.7's PSI (stattest ``psi``) of two samples, reproduced exactly.

    See the module docstring; ``categorical=True`` bins by value as Evidently does for a
    categorical column.
    """
    if categorical:
        ref = pd.Series(reference).dropna()
        cur = pd.Series(current).dropna()
    else:
        ref = pd.Series(_finite(reference))
        cur = pd.Series(_finite(current))
    if ref.empty or cur.empty:
        raise ChurnError("evidently PSI needs non-empty reference and current samples")
    if not categorical and ref.nunique() > 20:
        combined = np.concatenate([ref.to_numpy(), cur.to_numpy()])
        edges = np.histogram_bin_edges(combined, bins="sturges")
        rp = np.histogram(ref.to_numpy(), edges)[0] / len(ref)
        cp = np.histogram(cur.to_numpy(), edges)[0] / len(cur)
    else:
        keys = pd.unique(pd.concat([ref, cur], ignore_index=True))
        rc = ref.value_counts()
        cc = cur.value_counts()
        rp = np.array([rc.get(k, 0) for k in keys], dtype="float64") / len(ref)
        cp = np.array([cc.get(k, 0) for k in keys], dtype="float64") / len(cur)
    rp = _evidently_fill(rp)
    cp = _evidently_fill(cp)
    return float(np.sum((rp - cp) * np.log(rp / cp)))


def psi(
    reference: Any,
    current: Any,
    bins: int = 10,
    binning: Binning = "quantile",
    epsilon: float = DEFAULT_EPSILON,
) -> float:
    """PSI of a numeric feature, ``current`` against ``reference`` (dimensionless, >= 0).

    ``binning="quantile"``: ``bins`` reference-quantile bins, empty shares floored at
    ``epsilon``. ``binning="evidently"``: Evidently 0.7's numbers (``bins``/``epsilon``
    ignored). Rules of thumb: < 0.1 stable, 0.1-0.2 moderate, > 0.2 shift (but see
    :func:`psi_threshold` for small samples).
    """
    if binning == "evidently":
        return evidently_psi(reference, current)
    if binning != "quantile":
        raise ChurnError(f"binning must be 'quantile' or 'evidently', got {binning!r}")
    ref = _finite(reference)
    cur = _finite(current)
    if ref.size == 0 or cur.size == 0:
        raise ChurnError("PSI needs at least one non-missing value on each side")
    edges = quantile_edges(ref, bins)
    return psi_from_shares(shares(bin_counts(ref, edges)), shares(bin_counts(cur, edges)), epsilon)


def category_counts(values: Any, categories: Sequence[str]) -> np.ndarray:
    """Counts per category in ``categories`` order plus a last ``__unseen__`` bucket.

    Missing values are not counted.
    """
    s = pd.Series(values)
    s = s[s.notna()].astype(str)
    cat = pd.Categorical(s, categories=list(categories))
    known = np.bincount(cat.codes[cat.codes >= 0], minlength=len(categories))
    unseen = int((cat.codes < 0).sum())
    return np.append(known, unseen).astype("int64")


def categorical_psi(
    reference: Any, current: Any, epsilon: float = DEFAULT_EPSILON
) -> float:
    """PSI of a categorical feature: one bin per reference category + one for unseen ones."""
    ref = pd.Series(reference)
    cats = sorted({str(v) for v in ref[ref.notna()].unique()})
    if not cats:
        raise ChurnError("categorical PSI needs at least one non-missing reference value")
    return psi_from_shares(
        shares(category_counts(ref, cats)), shares(category_counts(current, cats)), epsilon
    )


def _two_counts(reference: Any, current: Any) -> tuple[np.ndarray, np.ndarray]:
    ref = pd.Series(reference)
    cur = pd.Series(current)
    cats = sorted({str(v) for v in pd.concat([ref[ref.notna()], cur[cur.notna()]]).unique()})
    return category_counts(ref, cats)[:-1], category_counts(cur, cats)[:-1]


def chi2_from_counts(ref_counts: Any, cur_counts: Any) -> tuple[float, float]:
    """Chi-square test of homogeneity on a 2 x K table of counts -> (statistic, p-value).

    Categories empty on both sides are dropped; no continuity correction (K >= 2).
    """
    table = np.vstack([np.asarray(ref_counts, float), np.asarray(cur_counts, float)])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2 or (table.sum(axis=1) == 0).any():
        return 0.0, 1.0
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    stat = float(((table - expected) ** 2 / expected).sum())
    return stat, float(stats.chi2.sf(stat, table.shape[1] - 1))


def chi2(reference: Any, current: Any) -> tuple[float, float]:
    """Chi-square homogeneity test of two categorical samples -> (statistic, p-value)."""
    return chi2_from_counts(*_two_counts(reference, current))


def js_from_shares(reference: Any, current: Any) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) of two share vectors."""
    p = shares(reference)
    q = shares(current)
    m = 0.5 * (p + q)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_p = np.where(p > 0, p * np.log2(p / m), 0.0).sum()
        kl_q = np.where(q > 0, q * np.log2(q / m), 0.0).sum()
    return float(math.sqrt(max(0.5 * (kl_p + kl_q), 0.0)))


def js(reference: Any, current: Any) -> float:
    """Jensen-Shannon distance (base 2, 0 = same, 1 = disjoint) of two categorical samples.

    Equals ``scipy.spatial.distance.jensenshannon(p, q, base=2)`` on the category shares.
    """
    return js_from_shares(*_two_counts(reference, current))


# --------------------------------------------------------------------------- KS
#: scipy's ``ks_2samp(method="auto")`` computes an exact p-value up to this many rows per side
KS_EXACT_MAX_N = 10_000


#: above this n1 * n2 two different KS differences k1/n1 - k2/n2 could round to the same float
#: order the other way, so :func:`_ks_extremes_sorted` compares the floats themselves
_KS_INT_EXACT = 10**15


def _ks_extremes_sorted(sorted_reference: np.ndarray, sorted_current: np.ndarray) -> tuple[float, float]:
    """(max, min) of F_ref - F_cur over all values of two sorted, NaN-free, non-empty arrays,
    as the floats scipy's ``ks_2samp`` takes them from (``count / n``, side right).

    One merge instead of scipy's two searches of every value: a stable argsort of the two
    sorted runs (timsort: a linear merge) gives each merged value's side; the walk
    ``k_ref n_cur - k_cur n_ref`` (integers, a cumulative sum of +n_cur / -n_ref steps)
    is looked at only where a run of equal merged values ends, where both ECDFs take their
    value at that point: the differences scipy takes the max / min of, times n_ref n_cur.
    Distinct differences are at least 1 / (n_ref n_cur) apart, far more than a float's
    rounding, so the float max is among the positions of the integer max: only those are
    divided, the same way scipy does.
    """
    n1, n2 = sorted_reference.size, sorted_current.size
    both = np.concatenate([sorted_reference, sorted_current])
    order = np.argsort(both, kind="stable")
    merged = both[order]
    ends = np.empty(merged.size, dtype=bool)
    np.not_equal(merged[1:], merged[:-1], out=ends[:-1])
    ends[-1] = True
    from_ref = order < n1
    if n1 * n2 >= _KS_INT_EXACT:  # float differences at every run end, as scipy forms them
        at = np.flatnonzero(ends)
        k1 = np.cumsum(from_ref)[at]
        diff = k1 / n1 - (at + 1 - k1) / n2
        return float(diff.max()), float(diff.min())
    walk = order  # reused: the argsort's int64 buffer becomes the walk (no new pages)
    np.multiply(from_ref, n1 + n2, out=walk)
    walk -= n1  # +n2 for a reference value, -n1 for a current one
    np.cumsum(walk, out=walk)
    run_ends = None if ends.all() else np.flatnonzero(ends)  # no ties: every position
    at_ends = walk if run_ends is None else walk[run_ends]
    hi_lo = []
    for top in (at_ends.max(), at_ends.min()):
        at = np.flatnonzero(at_ends == top)
        if run_ends is not None:
            at = run_ends[at]
        k1 = (walk[at] + (at + 1) * n1) // (n1 + n2)  # walk = k1 (n1 + n2) - (i + 1) n1
        diff = k1 / n1 - (at + 1 - k1) / n2
        hi_lo.append(float(diff.min() if hi_lo else diff.max()))
    return hi_lo[0], hi_lo[1]


def _ks_statistic_sorted(sorted_reference: np.ndarray, sorted_current: np.ndarray) -> float:
    """KS D of two already sorted, NaN-free float arrays (scipy's definition and floats)."""
    hi, lo = _ks_extremes_sorted(sorted_reference, sorted_current)
    low = float(np.clip(-lo, 0, 1))
    return low if low > hi else hi


def _ks_pvalue(d: float, n1: int, n2: int) -> float:
    """Two-sided KS p-value by Smirnov's distribution, as scipy's ``ks_2samp`` computes it
    when ``method="auto"`` picks ``asymp`` (max(n1, n2) > :data:`KS_EXACT_MAX_N`):
    ``kstwo.sf(d, round(n1 n2 / (n1 + n2)))``. Its cost depends on D: for
    2.2 <= en D^2 < 370 scipy sums Smirnov's series term by term (about 0.1 s at en = 10^5)."""
    m, n = sorted([float(n1), float(n2)], reverse=True)
    en = m * n / (m + n)
    return float(np.clip(stats.kstwo.sf(d, np.round(en)), 0, 1))


def _ks_sorted(ref: np.ndarray, cur: np.ndarray) -> tuple[float, float]:
    """KS (D, p) of two sorted NaN-free non-empty arrays, equal to scipy's ``ks_2samp``
    (``method="auto"``): scipy's own exact path when both sides have at most
    :data:`KS_EXACT_MAX_N` rows (it also rounds D to the lattice of n1 n2), else one merge
    (:func:`_ks_extremes_sorted`) and :func:`_ks_pvalue`."""
    if max(ref.size, cur.size) <= KS_EXACT_MAX_N:
        res = stats.ks_2samp(ref, cur, method="auto")
        return float(res.statistic), float(res.pvalue)
    d = _ks_statistic_sorted(ref, cur)
    return d, _ks_pvalue(d, ref.size, cur.size)


def score_shift(reference: Any, current: Any) -> float:
    """P(a current value > a reference value) - 0.5, ties counted half (the Mann-Whitney U
    statistic over ``n_ref x n_cur``, centred): 0 for the same distribution, +-0.5 for
    distributions that do not overlap. The canary judge's effect on scores."""
    ref, cur = _finite(reference), _finite(current)
    if ref.size == 0 or cur.size == 0:
        return float("nan")
    u = float(stats.mannwhitneyu(cur, ref, alternative="two-sided").statistic)
    return u / (ref.size * cur.size) - 0.5


def ks(reference: Any, current: Any) -> tuple[float, float]:
    """Two-sample KS test -> (D in [0, 1], two-sided p-value), equal (the same floats) to
    ``scipy.stats.ks_2samp(method="auto")`` on the non-missing values.

    Missing values are dropped. Threshold D (``cfg.monitoring.ks_threshold``), since
    p-values at large n flag negligible shifts. Many columns: :func:`ks_many`.
    """
    ref = _sorted_finite(reference)
    cur = _sorted_finite(current)
    if ref.size == 0 or cur.size == 0:
        raise ChurnError("KS needs at least one non-missing value on each side")
    return _ks_sorted(ref, cur)


def _sorted_columns(data: Any, side: str) -> dict[Any, np.ndarray]:
    """Every column of ``data`` sorted with its NaNs cut off: a mapping name -> values
    (DataFrame, dict) or a 2-D array (columns along axis 1, keys 0..k-1), sorted in one
    ``np.sort`` over a transposed copy (the caller's data is never sorted in place)."""
    if isinstance(data, Mapping) or isinstance(data, pd.DataFrame):
        return {name: _sorted_finite(data[name]) for name in data.keys()}
    block = np.asarray(data, dtype="float64")
    if block.ndim != 2:
        raise ChurnError(f"ks_many's {side} must be a 2-D array (rows x columns) or a mapping of "
                         f"columns, got {block.ndim} dimension(s)")
    cols = np.array(block.T, order="C")  # a copy, one row per column: a contiguous sort each
    cols.sort(axis=1)  # NaN sorts last
    valid = block.shape[0] - np.isnan(cols).sum(axis=1)
    return {j: cols[j, : valid[j]] for j in range(cols.shape[0])}


def ks_many(reference: Any, current: Any) -> dict[Any, tuple[float, float]]:
    """:func:`ks` of many columns at once -> {column: (D, p)}, each equal to scipy's
    ``ks_2samp(method="auto")`` on that column's non-missing values.

    ``reference`` / ``current``: 2-D arrays with the same number of columns (keys are the
    column positions) or mappings / DataFrames (keys are the reference's column names, each
    also in ``current``). Each side is sorted once; a column empty (all missing) on either
    side is a ChurnError naming it.
    """
    ref = _sorted_columns(reference, "reference")
    cur = _sorted_columns(current, "current")
    missing = [k for k in ref if k not in cur]
    if missing or len(ref) != len(cur):
        raise ChurnError(f"ks_many needs the same columns on both sides; reference has {list(ref)}, "
                         f"current has {list(cur)}")
    out = {}
    for key, r in ref.items():
        c = cur[key]
        if r.size == 0 or c.size == 0:
            raise ChurnError(f"KS column {key!r} has no non-missing value on the "
                             f"{'reference' if r.size == 0 else 'current'} side; drop the column")
        out[key] = _ks_sorted(r, c)
    return out


def ks_against_sample(sorted_sample: np.ndarray, current: Any) -> float:
    """KS D of ``current`` against a stored sorted reference sample (e.g. a profile's)."""
    cur = np.sort(_finite(current))
    if cur.size == 0 or len(sorted_sample) == 0:
        return float("nan")
    return _ks_statistic_sorted(np.asarray(sorted_sample, float), cur)


# --------------------------------------------------------------------------- thresholds
def psi_noise_quantile(n_ref: int, n_cur: int, n_bins: int, quantile: float = 0.99) -> float:
    """PSI that sampling noise alone exceeds with probability 1 - ``quantile``.

    Under no drift PSI ~ (1/N + 1/M) * chi2(B - 1) for N reference and M current rows.
    """
    if n_ref <= 0 or n_cur <= 0:
        return float("inf")
    dof = max(int(n_bins) - 1, 1)
    return float((1.0 / n_ref + 1.0 / n_cur) * stats.chi2.ppf(quantile, dof))


def psi_threshold(configured: float, n_ref: int, n_cur: int, n_bins: int,
                  quantile: float = 0.99) -> float:
    """Size-aware PSI threshold: max(configured, noise quantile for these sizes)."""
    return max(float(configured), psi_noise_quantile(n_ref, n_cur, n_bins, quantile))


def ks_noise_quantile(n_ref: int, n_cur: int, quantile: float = 0.99) -> float:
    """KS D that sampling noise alone exceeds with probability 1 - ``quantile`` (two samples of
    ``n_ref`` and ``n_cur`` rows; Smirnov's asymptotic c(alpha) sqrt((n + m) / (n m)))."""
    if n_ref <= 0 or n_cur <= 0:
        return float("inf")
    c = math.sqrt(-math.log((1.0 - quantile) / 2.0) / 2.0)
    return float(c * math.sqrt((n_ref + n_cur) / (n_ref * n_cur)))


def null_rise_noise(ref_rate: float, n_ref: int, rate: float, n_cur: int, quantile: float = 0.99) -> float:
    """Rise of a null rate (absolute, current - reference) that sampling noise alone exceeds with
    probability 1 - ``quantile``: z_q * sqrt(p0 (1 - p0) / N + p1 (1 - p1) / M); ``inf`` when
    the current sample is empty (nothing to judge)."""
    if n_cur <= 0:
        return float("inf")
    var = rate * (1.0 - rate) / n_cur + (ref_rate * (1.0 - ref_rate) / n_ref if n_ref > 0 else 0.0)
    return float(stats.norm.ppf(quantile) * math.sqrt(var))


def psi_rows(reference: Any, counts: np.ndarray, epsilon: float = DEFAULT_EPSILON) -> np.ndarray:
    """PSI of every row of a (groups x bins) count matrix against one share vector (or one
    share vector per row); rows without counts give NaN."""
    c = np.atleast_2d(np.asarray(counts, dtype="float64"))
    total = c.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        cur = np.where(total > 0, c / np.where(total > 0, total, 1.0), 0.0)
    r = np.broadcast_to(np.asarray(reference, dtype="float64"), cur.shape)
    r = np.where(r > 0, r, epsilon)
    cur = np.where(cur > 0, cur, epsilon)
    out = np.sum((cur - r) * np.log(cur / r), axis=1)
    return np.where(total[:, 0] > 0, out, np.nan)


# --------------------------------------------------------------------------- profiles
def feature_psi_against_profile(entry: Mapping[str, Any], current: Any,
                                epsilon: float = DEFAULT_EPSILON) -> float:
    """PSI of ``current`` against one stored profile entry (numeric edges or categories)."""
    return psi_from_shares(entry["shares"], _current_shares(entry, current), epsilon)


def current_counts(entry: Mapping[str, Any], current: Any) -> np.ndarray:
    """Counts of ``current`` in the bins of a stored profile entry."""
    if entry["kind"] == ColumnKind.CATEGORICAL:
        return category_counts(current, entry["categories"])
    return bin_counts(current, np.asarray(entry["edges"], dtype="float64"))


def _current_shares(entry: Mapping[str, Any], current: Any) -> np.ndarray:
    """Shares of ``current`` in the bins of a stored profile entry."""
    return shares(current_counts(entry, current))


def null_rate(values: Any) -> float:
    """Share of missing values (0 for an empty input)."""
    s = pd.Series(values) if not isinstance(values, pd.Series) else values
    return float(s.isna().mean()) if len(s) else 0.0


@dataclass
class FeatureDrift:
    """Drift of one column against its profile entry."""

    name: str
    kind: str
    psi: float
    ks: float | None
    js: float
    null_rate: float
    ref_null_rate: float
    n: int
    n_ref: int
    n_bins: int
    threshold: float

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v)
                for k, v in self.__dict__.items()}


def drift_against_entry(name: str, entry: Mapping[str, Any], current: Any, psi_value_threshold: float,
                        epsilon: float = DEFAULT_EPSILON, with_ks: bool = True) -> FeatureDrift:
    """PSI, KS (numeric, against the stored sample), JS and null rate of ``current``."""
    counts = current_counts(entry, current)
    cur_sh = shares(counts)
    n = int(counts.sum())
    value = psi_from_shares(entry["shares"], cur_sh, epsilon) if n else float("nan")
    d = None
    if with_ks and entry["kind"] == ColumnKind.NUMERIC and entry.get("sample"):
        d = ks_against_sample(np.asarray(entry["sample"], float), current)
    n_ref = int(entry.get("count", 0))
    n_bins = len(entry["shares"])
    return FeatureDrift(
        name=name, kind=entry["kind"], psi=value, ks=d, js=js_from_shares(entry["shares"], cur_sh),
        null_rate=null_rate(current), ref_null_rate=float(entry.get("null_rate", 0.0)), n=n,
        n_ref=n_ref, n_bins=n_bins,
        threshold=psi_threshold(psi_value_threshold, n_ref, n, n_bins) if n else float("inf"),
    )


# --------------------------------------------------------------------------- streaming
@dataclass
class StreamAccumulator:
    """Histogram / ECDF counts of many batches against a profile (bounded memory).

    For numeric features it also counts current values <= each reference-sample point,
    giving the KS D between the current stream and the stored reference sample at the
    sample's points (exact for the sample's ECDF; an approximation of the full KS).
    """

    profile: Mapping[str, Any]
    columns: list[str]
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    ecdf: dict[str, np.ndarray] = field(default_factory=dict)
    nulls: dict[str, int] = field(default_factory=dict)
    rows: int = 0

    def __post_init__(self) -> None:
        feats = self.profile["features"]
        for c in self.columns:
            if c not in feats:
                raise ChurnError(f"column '{c}' is not in the profile; profiled: {', '.join(feats)}")
            self.counts[c] = np.zeros(len(feats[c]["shares"]), dtype="int64")
            self.nulls[c] = 0
            if feats[c]["kind"] == ColumnKind.NUMERIC and feats[c].get("sample"):
                self.ecdf[c] = np.zeros(len(feats[c]["sample"]), dtype="int64")
        self._samples = {c: np.asarray(feats[c]["sample"], float) for c in self.ecdf}

    def update(self, batch: Mapping[str, Any]) -> None:
        """Add one batch (DataFrame or mapping column -> array)."""
        feats = self.profile["features"]
        n = None
        for c in self.columns:
            col = batch[c]
            entry = feats[c]
            if entry["kind"] == ColumnKind.CATEGORICAL:
                s = pd.Series(col)
                self.nulls[c] += int(s.isna().sum())
                self.counts[c] += category_counts(s, entry["categories"])
                n = len(s)
            else:
                arr = as_float_array(col)
                miss = np.isnan(arr)
                self.nulls[c] += int(miss.sum())
                vals = arr[~miss]
                self.counts[c] += np.bincount(
                    np.searchsorted(np.asarray(entry["edges"], float), vals, side="left"),
                    minlength=len(entry["shares"]),
                )
                if c in self.ecdf:
                    vals.sort()
                    self.ecdf[c] += np.searchsorted(vals, self._samples[c], side="right")
                n = arr.size
        self.rows += int(n or 0)

    def result(self, psi_value_threshold: float, epsilon: float = DEFAULT_EPSILON) -> dict[str, FeatureDrift]:
        """Per column drift of everything accumulated so far."""
        out = {}
        feats = self.profile["features"]
        for c in self.columns:
            entry = feats[c]
            n = int(self.counts[c].sum())
            cur_sh = shares(self.counts[c])
            d = None
            if c in self.ecdf and n:
                sample = self._samples[c]
                ref_cdf = np.searchsorted(sample, sample, side="right") / sample.size
                d = float(np.abs(ref_cdf - self.ecdf[c] / n).max())
            n_ref = int(entry.get("count", 0))
            out[c] = FeatureDrift(
                name=c,
                kind=entry["kind"],
                psi=psi_from_shares(entry["shares"], cur_sh, epsilon) if n else float("nan"),
                ks=d,
                js=js_from_shares(entry["shares"], cur_sh),
                null_rate=self.nulls[c] / self.rows if self.rows else 0.0,
                ref_null_rate=float(entry.get("null_rate", 0.0)),
                n=n,
                n_ref=n_ref,
                n_bins=len(entry["shares"]),
                threshold=psi_threshold(psi_value_threshold, n_ref, n, len(entry["shares"]))
                if n
                else float("inf"),
            )
        return out


def _iter_parquet_batches(
    path: str | Path, columns: Sequence[str], batch_rows: int = 262_144
) -> Iterable[pd.DataFrame]:
    """Record batches of a Parquet file or directory as small DataFrames (pyarrow).

    Files are read one at a time with ``ParquetFile.iter_batches`` (one row group decoded at
    a time, no read-ahead) and Arrow's pool hands freed memory back after every batch, so
    peak memory stays flat however many files there are (10M rows x 21 columns: ~0.8 GB).
    """
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.exists():
        raise ChurnError(f"Parquet path {p} does not exist; pass a file or a directory of .parquet files")
    dataset = ds.dataset(str(p), format="parquet")
    missing = [c for c in columns if c not in dataset.schema.names]
    if missing:
        raise ChurnError(
            f"{p} lacks column(s) {', '.join(missing)}; it has {', '.join(dataset.schema.names)}"
        )
    cols, pool = list(columns), pa.default_memory_pool()
    for file in dataset.files:
        reader = pq.ParquetFile(file)
        try:
            for batch in reader.iter_batches(batch_size=batch_rows, columns=cols):
                yield batch.to_pandas()
                del batch
                pool.release_unused()
        finally:
            reader.close()


def stream_drift(
    path: str | Path,
    profile: Mapping[str, Any],
    columns: Sequence[str] | None = None,
    psi_value_threshold: float = 0.2,
    epsilon: float = DEFAULT_EPSILON,
    batch_rows: int = 262_144,
) -> dict[str, FeatureDrift]:
    """Drift of a (large) Parquet dataset against a profile, one record batch at a time."""
    cols = list(columns) if columns is not None else list(profile["features"])
    acc = StreamAccumulator(profile, cols)
    for batch in _iter_parquet_batches(path, cols, batch_rows):
        acc.update(batch)
    return acc.result(psi_value_threshold, epsilon)


# --------------------------------------------------------------------------- grouped (fast path)
def bin_index(entry: Mapping[str, Any], values: Any) -> np.ndarray:
    """Bin of every value in a profile entry's bins (int64; -1 = missing).

    Numeric: ``searchsorted`` on the edges. Categorical: the category's position, the
    last bin (``__unseen__``) for unknown ones; pandas categoricals map by their codes
    (no per-row string work).
    """
    if entry["kind"] == ColumnKind.CATEGORICAL:
        cats = [str(c) for c in entry["categories"]]
        unseen = len(cats)
        s = values if isinstance(values, pd.Series) else pd.Series(values)
        if isinstance(s.dtype, pd.CategoricalDtype):
            pos = {c: i for i, c in enumerate(cats)}
            lookup = np.array([pos.get(str(c), unseen) for c in s.cat.categories] + [-1], dtype="int64")
            codes = s.cat.codes.to_numpy().astype("int64")
            return lookup[np.where(codes < 0, len(lookup) - 1, codes)]
        codes, uniques = pd.factorize(s)
        pos = {c: i for i, c in enumerate(cats)}
        lookup = np.array([pos.get(str(u), unseen) for u in uniques] + [-1], dtype="int64")
        return lookup[np.where(codes < 0, len(lookup) - 1, codes)]
    return edge_bins(values, entry["edges"])


def edge_bins(values: Any, edges: Any) -> np.ndarray:
    """Bin of every value among sorted interior ``edges`` (int64; x <= edge: left, as
    ``searchsorted(edges, x, side="left")``; -1 = missing): one vectorised comparison per edge
    summed in a small integer (a profile has about ten), cheaper than a binary search per row."""
    arr = as_float_array(values)
    cuts = np.asarray(edges, dtype="float64")
    if cuts.size > 120:
        idx = np.searchsorted(cuts, arr, side="left").astype("int64")
    else:
        small = np.zeros(arr.size, dtype=np.int8)
        above = np.empty(arr.size, dtype=bool)
        for cut in cuts:
            np.greater(arr, cut, out=above)
            small += above
        idx = small.astype("int64")
    idx[np.isnan(arr)] = -1
    return idx


def grouped_counts(idx: np.ndarray, groups: np.ndarray, n_groups: int, n_bins: int) -> np.ndarray:
    """(n_groups, n_bins) counts of bin indices per group code in one ``bincount``
    (rows with a missing bin or group code < 0 are left out).

    Codes of -1 (missing) get their own row / column of the count table, cut off afterwards,
    so no row is masked or copied: one integer key per row, then the ``bincount``."""
    idx, groups = np.asarray(idx), np.asarray(groups)
    if idx.size and (idx.min() < -1 or groups.min() < -1):  # other negative codes: mask them
        ok = (idx >= 0) & (groups >= 0)
        idx, groups = np.where(ok, idx, -1), np.where(ok, groups, -1)
    key = np.multiply(groups, n_bins + 1, dtype=np.int64)
    key += idx
    key += n_bins + 2  # (group + 1) * (n_bins + 1) + (idx + 1)
    flat = np.bincount(key, minlength=(n_groups + 1) * (n_bins + 1))
    return np.ascontiguousarray(flat.reshape(n_groups + 1, n_bins + 1)[1:, 1:])


def sample_le_counts(sorted_sample: Any, current: Any) -> tuple[np.ndarray, int]:
    """(how many non-missing ``current`` values are <= each point of ``sorted_sample``, how many
    non-missing values): one sort of ``current`` (numpy's vectorised sort) + k lookups, cheaper
    than n lookups into the sample. Both counts add up over parts of ``current``."""
    cur = _sorted_finite(current)
    return np.searchsorted(cur, np.asarray(sorted_sample, dtype="float64"), side="right"), int(cur.size)


def ks_at_sample_points(sorted_sample: np.ndarray, current: Any) -> float:
    """KS D between a stored sorted reference sample and ``current``, evaluated at the
    sample's points: max_j |F_ref(x_j) - F_cur(x_j)| with F_cur(x_j) = share of current
    values <= x_j (:func:`sample_le_counts`); equals the streamed KS of
    :class:`StreamAccumulator` and is a lower bound of :func:`ks_against_sample`
    (within one reference step, 1/k, for continuous data)."""
    sample = np.asarray(sorted_sample, dtype="float64")
    le, n = sample_le_counts(sample, current)
    if n == 0 or sample.size == 0:
        return float("nan")
    ref_cdf = np.searchsorted(sample, sample, side="right") / sample.size
    return float(np.abs(ref_cdf - le / n).max())
