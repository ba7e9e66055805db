"""The monitor run's pictures and report: PSI heatmap, PSI timeline, Evidently HTML.

- :func:`psi_figure` (``psi_heatmap.png``): daily PSI of every feature and the score
  (features x days) and the segments' PSI against their size-aware thresholds;
- :func:`timeline_figure` (``psi_timeline.png``): the same daily PSI as lines for the
  features, the score and the segments that moved most, with the smallest PSI trigger value;
- :func:`evidently_report` (``drift_report.html``): Evidently 0.7's DataDriftPreset on a
  sample of the window against a reference re-sampled from the profile's marginals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlflow_churn.monitoring.policy import WindowStats


def _reference_frame(profile: dict[str, Any], rows: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    out = {}
    for name, e in list(profile["features"].items()) + [("score", profile["score"])]:
        if e["kind"] == "numeric":
            out[name] = (
                rng.choice(np.asarray(e["sample"], float), size=rows, replace=True)
                if e["sample"]
                else np.full(rows, np.nan)
            )
        else:
            p = np.asarray(e["shares"][:-1], float)
            out[name] = rng.choice(e["categories"], size=rows, p=p / p.sum())
    return pd.DataFrame(out)


def evidently_report(
    frame: pd.DataFrame,
    scores: np.ndarray,
    profile: dict[str, Any],
    path: Path,
    rows: int = 20_000,
    seed: int = 0,
) -> Path:
    """Evidently 0.7 DataDriftPreset HTML of a sample of the window vs the profile's marginals."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    feats = profile["features"]
    cols = [c for c in feats if c in frame.columns]
    take = min(rows, len(frame))
    idx = np.random.default_rng(seed).choice(len(frame), size=take, replace=False)
    cur = pd.DataFrame(
        {
            c: (
                frame[c].iloc[idx].astype("object").astype(str).to_numpy()
                if feats[c]["kind"] == "categorical"
                else frame[c].iloc[idx].to_numpy(float)
            )
            for c in cols
        }
    )
    cur["score"] = np.asarray(scores)[idx]
    ref = _reference_frame(profile, take, seed)[cols + ["score"]]
    num = [c for c in cols if feats[c]["kind"] == "numeric"] + ["score"]
    cat = [c for c in cols if feats[c]["kind"] == "categorical"]
    dd = DataDefinition(numerical_columns=num, categorical_columns=cat)
    snap = Report([DataDriftPreset()]).run(
        Dataset.from_pandas(cur, data_definition=dd), Dataset.from_pandas(ref, data_definition=dd)
    )
    snap.save_html(str(path))
    return path


def psi_figure(daily: pd.DataFrame, stats: WindowStats, title: str) -> Any:
    """Heatmap of daily PSI (features x days) and the top segments' PSI."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 6))
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    if not daily.empty:
        mat = daily.T.fillna(0.0)
        im = ax1.imshow(
            mat.to_numpy(), aspect="auto", cmap="magma_r", vmin=0, vmax=max(0.3, float(mat.max().max()))
        )
        ax1.set_yticks(range(len(mat.index)), mat.index, fontsize=7)
        ax1.set_xticks(
            range(len(mat.columns)),
            _day_labels(mat.columns),
            fontsize=7,
            rotation=45,
        )
        fig.colorbar(im, ax=ax1, label="PSI")
    ax1.set_title(f"daily PSI vs reference: {title}")
    segs = sorted(stats.segment_psi.items(), key=lambda kv: -kv[1])[:10]
    if segs:
        ax2.barh([k for k, _ in segs][::-1], [v for _, v in segs][::-1], color="tab:red")
        thr = [stats.segment_threshold.get(k, 0) for k, _ in segs][::-1]
        ax2.scatter(thr, range(len(segs)), marker="|", color="k", s=200, label="size-aware noise threshold")
        ax2.legend(fontsize=7)
    ax2.set_title("segment PSI (max over features)")
    ax2.tick_params(labelsize=7)
    fig.tight_layout()
    return fig



def _day_labels(index: pd.Index) -> list[str]:
    return [pd.Timestamp(c).strftime("%m-%d") for c in index]


def timeline_figure(daily: pd.DataFrame, daily_segments: pd.DataFrame, threshold: float, title: str,
                    top: int = 6) -> Any:
    """Daily PSI as lines: the ``top`` features that moved most and the score (left), the
    ``top`` segments that moved most (right); ``threshold`` dashed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 5))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, table, what in ((axes[0], daily, "features and score"), (axes[1], daily_segments, "segments")):
        if not table.empty:
            order = table.max().sort_values(ascending=False).index[:top]
            x = np.arange(len(table.index))
            for col in order:
                label = "score" if col == "__score__" else str(col)
                ax.plot(x, table[col].to_numpy(float), marker=".", label=label,
                        lw=2.5 if col == "__score__" else 1.5)
            ax.set_xticks(x, _day_labels(table.index), fontsize=7, rotation=45)
            ax.legend(fontsize=7)
        ax.axhline(threshold, color="k", ls="--", lw=1)
        ax.set_title(f"daily PSI, {what}: {title}", fontsize=9)
    axes[0].set_ylabel("PSI vs reference")
    fig.tight_layout()
    return fig
