"""The run's learning curve as files in the run directory, rewritten as evaluations come in.

``learning_curve.html`` is self-contained (the chart library and the data are inlined: it opens from a
copied run directory on a machine without network); ``learning_curve.png`` is drawn with matplotlib
when it is installed. Both plot the evaluation return (mean, with min-max band) against hours since
the first evaluation (minutes for a run under two hours) and against learner steps.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any, Sequence

from ..monitor import thin
from .server import STATIC_DIR

HTML_NAME = "learning_curve.html"
PNG_NAME = "learning_curve.png"
# Points drawn per curve, spread evenly over the run (the first and the latest always): the evaluator redraws
# the files after each evaluation for as long as the run lasts, and drawing every evaluation of a long run made
# its memory grow with the run's length (matplotlib: ~10 MB more at 400 evaluations than at 100, measured).
CURVE_MAX_POINTS = 300


def curve_points(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Column arrays from evaluation rows: time since the first one (in ``time_unit``), learner
    steps, mean, min, max."""
    rows = [r for r in rows if isinstance(r.get("time"), float) and isinstance(r.get("mean"), float)]
    t0 = rows[0]["time"] if rows else 0.0
    span = rows[-1]["time"] - t0 if rows else 0.0
    unit, scale = ("minutes", 60.0) if span < 2 * 3600 else ("hours", 3600.0)

    def col(name: str) -> list[float | None]:
        return [r.get(name) if isinstance(r.get(name), float) else None for r in rows]

    return {"since_first": [round((r["time"] - t0) / scale, 6) for r in rows], "time_unit": unit,
            "learner_steps": col("learner_steps"), "mean": col("mean"), "min": col("min"), "max": col("max")}


def _inline(text: str) -> str:
    # Inside <script>/<style>, "</" could close the element early; "<\/" means the same to JS.
    return text.replace("</", "<\\/")


_SCRIPT = """
const D = JSON.parse(document.getElementById("curve-data").textContent);
function chart(el, xs, xlabel) {
  // The chart library draws lines in x order: sort the points by x (a resumed run may repeat steps).
  const idx = xs.map((x, i) => i).filter(i => xs[i] !== null).sort((a, b) => xs[a] - xs[b]);
  const pick = a => idx.map(i => a[i]);
  const data = [pick(xs), pick(D.mean), pick(D.min), pick(D.max)];
  const w = Math.min(900, document.body.clientWidth - 20);
  return new uPlot({width: w, height: 320, scales: {x: {time: false}},
    axes: [{label: xlabel}, {label: "evaluation return"}],
    series: [{label: xlabel}, {label: "mean", stroke: "#1f6feb", width: 2},
             {label: "min", stroke: "#9ab", dash: [4, 4]}, {label: "max", stroke: "#9ab", dash: [4, 4]}]},
    data, el);
}
window.curveCharts = [chart(document.getElementById("by-time"), D.since_first, D.time_unit + " since first evaluation"),
                      chart(document.getElementById("by-steps"), D.learner_steps, "learner steps")];
"""


def learning_curve_html(rows: Sequence[dict[str, Any]], title: str, static_dir: Path = STATIC_DIR,
                        total: int | None = None) -> str:
    """A self-contained HTML page plotting ``rows`` (evaluation rows as in eval.csv; ``total``: how many
    evaluations the run has made, when ``rows`` is a thinned selection of them)."""
    pts = curve_points(rows)
    total = len(pts["mean"]) if total is None else total
    js = (static_dir / "uPlot.iife.min.js").read_text()
    css = (static_dir / "uPlot.min.css").read_text()
    last = (f"latest: mean return {pts['mean'][-1]:.1f} after {pts['learner_steps'][-1] or 0:.0f} learner steps, "
            f"{total} evaluations") if pts["mean"] else "no evaluation yet"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)} learning curve"
            f"</title><style>{_inline(css)} body{{font:14px system-ui,sans-serif;margin:10px}}</style>"
            f"</head><body><h2>{html.escape(title)}: learning curve</h2><p id='summary'>{html.escape(last)}</p>"
            f"<div id='by-time'></div><div id='by-steps'></div>"
            f"<script type='application/json' id='curve-data'>{_inline(json.dumps(pts))}</script>"
            f"<script>{_inline(js)}</script><script>{_inline(_SCRIPT)}</script></body></html>")


def learning_curve_png(rows: Sequence[dict[str, Any]], title: str, path: Path, total: int | None = None) -> bool:
    """Draw the curve into ``path`` with matplotlib; False when matplotlib is not installed (``total`` as
    for ``learning_curve_html``)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    pts = curve_points(rows)
    total = len(pts["mean"]) if total is None else total
    fig = Figure(figsize=(11, 4), dpi=100)  # a Figure of its own: pyplot's global state is not thread-safe
    FigureCanvasAgg(fig)
    for ax, xs, label in zip(fig.subplots(1, 2), (pts["since_first"], pts["learner_steps"]),
                             (f"{pts['time_unit']} since first evaluation", "learner steps")):
        order = sorted((i for i, x in enumerate(xs) if x is not None), key=lambda i: xs[i])
        x = [xs[i] for i in order]
        lo = [pts["min"][i] if pts["min"][i] is not None else pts["mean"][i] for i in order]
        hi = [pts["max"][i] if pts["max"][i] is not None else pts["mean"][i] for i in order]
        ax.fill_between(x, lo, hi, color="#1f6feb", alpha=0.15, linewidth=0, label="min-max")
        ax.plot(x, [pts["mean"][i] for i in order], color="#1f6feb", marker="." if len(x) < 50 else None,
                label="mean")
        ax.set_xlabel(label)
        ax.set_ylabel("evaluation return")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(loc="best")
    fig.suptitle(f"{title}: learning curve ({total} evaluations)")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return True


def write_learning_curves(run_dir: str | Path, rows: Sequence[dict[str, Any]], title: str) -> bool:
    """Rewrite both files atomically (a reader never sees half a file), with at most ``CURVE_MAX_POINTS``
    of ``rows``; False if the PNG was skipped."""
    shown = thin(rows, CURVE_MAX_POINTS)
    path = Path(run_dir) / HTML_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(learning_curve_html(shown, title, total=len(rows)))
    os.replace(tmp, path)
    return learning_curve_png(shown, title, Path(run_dir) / PNG_NAME, total=len(rows))
