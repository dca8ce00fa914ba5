"""``fastpretrain report RUN_DIR``: a run's ``metrics.jsonl`` drawn as one PNG (loss, learning rate, throughput,
data wait), for a glance at a run without a notebook.

A resumed run appends to the same file. After a kill and a resume from an earlier checkpoint, the new segment
starts at a step the file already holds: the lines of the dead run from that step on are dropped (the later line
of a step wins, and so does the segment that continued).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastpretrain.errors import UserError
from fastpretrain.formats.files import atomic_write
from fastpretrain.log import log_once

logger = logging.getLogger("fastpretrain.train.report")

EVENTS = ("train", "eval")

# Loss, throughput and data wait jitter from one log line to the next; a centered rolling median of about a twentieth
# of the run shows the trend without hiding a real drop (a median ignores lone spikes, a mean smears them).
SMOOTH_FRACTION = 1 / 20
# A long run is first cut into this many blocks (their medians): more than a panel has pixel columns, and it keeps
# the rolling window small (a 100k-line run would otherwise want windows of 5,000 points).
TREND_POINTS = 1000


@dataclass
class Series:
    steps: np.ndarray   # (N,) int64, increasing
    values: np.ndarray  # (N,) float64, NaN or inf where the run wrote them


@dataclass
class Metrics:
    """A run's metrics: ``train`` maps each numeric field of the train lines (loss, lr, ...) to its points; ``evals``
    holds the eval records in step order; ``unreadable_lines`` counts the lines skipped (not JSON, not an object, no
    train/eval event, no integer step, a last line cut off by a kill)."""

    train: dict[str, Series]
    evals: list[dict]
    unreadable_lines: int
    last_step: int | None  # of the last train line; None without one

    @property
    def world_size(self) -> int | None:
        """The world size of the last train line that says (older runs do not)."""
        series = self.train.get("world_size")
        return int(series.values[-1]) if series is not None and len(series.values) else None


def _parse(line: str) -> dict | None:
    """The JSON object on ``line``; None when it holds none."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _is_step(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_metrics(run_dir: str | Path) -> Metrics:
    """Read ``RUN_DIR/metrics.jsonl``; UserError if the folder or the file is missing.

    Lines of other events are ignored; unreadable lines are skipped and counted (one warning with the count).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"report: no such folder: {run_dir}")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"report: {run_dir} has no metrics.jsonl (is it the --output of `fastpretrain train`?)")
    train: list[dict] = []  # strictly increasing steps, and so is evals
    evals: list[dict] = []
    unreadable = 0
    # errors="replace": a line of binary garbage (a disk-full tail, NULs) is one more unreadable line, not a crash
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            record = _parse(line)
            event = record.get("event") if record else None
            if isinstance(event, str) and event not in EVENTS:
                continue  # another kind of line (a later version's): not ours to draw, and not broken
            if event not in EVENTS or not _is_step(record.get("step")):
                unreadable += 1
                continue
            step = record["step"]
            # A step at or before the last one kept starts a resumed segment: what the dead run wrote from there on
            # is superseded (train and eval lines); an eval only supersedes earlier evals.
            if event == "train":
                while train and train[-1]["step"] >= step:
                    train.pop()
            while evals and evals[-1]["step"] >= step:
                evals.pop()
            (train if event == "train" else evals).append(record)
    if unreadable:
        log_once(logger, logging.WARNING, f"report: skipped {unreadable} unreadable line(s) of {path}")
    fields = dict.fromkeys(k for r in train for k, v in r.items() if k != "step" and _number(v))
    series = {}
    for field in fields:
        points = [(r["step"], float(r[field])) for r in train if _number(r.get(field))]
        series[field] = Series(np.array([p[0] for p in points], dtype=np.int64),
                               np.array([p[1] for p in points], dtype=np.float64))
    return Metrics(series, evals, unreadable, train[-1]["step"] if train else None)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centered rolling median over an odd ``window``; near the ends the window shrinks on both sides, so that a
    steep start (the first losses) is not pulled toward the values after it."""
    n, half = len(values), window // 2
    out = np.empty(n)
    if n > 2 * half:
        out[half:n - half] = np.median(np.lib.stride_tricks.sliding_window_view(values, window), axis=1)
    for i in {*range(min(half, n)), *range(max(n - half, 0), n)}:
        reach = min(i, n - 1 - i)
        out[i] = np.median(values[i - reach:i + reach + 1])
    return out  # (N,)


def _block_medians(values: np.ndarray, block: int) -> np.ndarray:
    """The median of each run of ``block`` values (the last run may be shorter)."""
    padded = np.pad(values.astype(np.float64), (0, -len(values) % block), constant_values=np.nan)
    return np.nanmedian(padded.reshape(-1, block), axis=1)  # (ceil(N / block),)


def _trend(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The rolling median of ``values`` over about a twentieth of the run, and its window (1: too few to smooth)."""
    block = -(-len(values) // TREND_POINTS)
    steps, values = _block_medians(steps, block), _block_medians(values, block)
    window = int(len(values) * SMOOTH_FRACTION) | 1  # odd: centered
    return steps, _smooth(values, window), window


def _finite(series: Series | None) -> tuple[np.ndarray, np.ndarray]:
    if series is None:
        return np.empty(0, np.int64), np.empty(0)
    keep = np.isfinite(series.values)
    return series.steps[keep], series.values[keep]


def _not_recorded(ax, title: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, "not recorded", transform=ax.transAxes, ha="center", va="center", color="0.5")
    ax.set_yticks([])


def _plot_noisy(ax, steps: np.ndarray, values: np.ndarray, label: str, color: str) -> None:
    """The raw points faint and their rolling median on top; the points alone when too few to smooth."""
    trend_steps, trend, window = _trend(steps, values)
    if window == 1:
        ax.plot(steps, values, color=color, linewidth=1.6, label=label)
        return
    ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
    ax.plot(trend_steps, trend, color=color, linewidth=1.6, label=f"{label} (rolling median)")


def _draw_loss(ax, metrics: Metrics) -> None:
    steps, loss = _finite(metrics.train.get("loss"))
    if not len(steps):
        return _not_recorded(ax, "training loss")
    _plot_noisy(ax, steps, loss, "training loss", "tab:blue")
    ax.set_ylabel("training loss", color="tab:blue")
    ax.tick_params(axis="y", colors="tab:blue")
    ax.set_title(f"training loss: last {loss[-1]:.3g}")
    evals = [e for e in metrics.evals if _number(e.get("precision@1"))]
    if not evals:
        return
    # Each axis in its lines' color, and the values written beside the points: no legend to cover them, and a
    # precision is never read off the loss scale.
    twin = ax.twinx()
    x, p1 = [e["step"] for e in evals], [e["precision@1"] for e in evals]
    twin.plot(x, p1, "o-", color="tab:red")
    twin.annotate(f"precision@1 {p1[-1]:.3f}", (x[-1], p1[-1]), xytext=(-6, 8), textcoords="offset points",
                  ha="right", color="tab:red")
    majority = [e["majority_precision@1"] for e in evals if _number(e.get("majority_precision@1"))]
    if majority:
        twin.axhline(majority[-1], color="tab:red", linestyle="--", linewidth=1)
        twin.annotate(f"most frequent class {majority[-1]:.3f}", (1, majority[-1]), xycoords=("axes fraction", "data"),
                      xytext=(-6, 4), textcoords="offset points", ha="right", color="tab:red")
    twin.set_ylim(0, 1)
    twin.set_ylabel("held-out precision@1", color="tab:red")
    twin.tick_params(axis="y", colors="tab:red")


def _draw_lr(ax, metrics: Metrics) -> None:
    steps, lr = _finite(metrics.train.get("lr"))
    if not len(steps):
        return _not_recorded(ax, "learning rate")
    ax.plot(steps, lr, color="tab:green")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("learning rate")
    ax.set_title(f"learning rate: peak {lr.max():.3g}, last {lr[-1]:.3g}")


def _draw_throughput(ax, metrics: Metrics) -> None:
    steps, total = _finite(metrics.train.get("images_per_sec"))
    per_steps, per_device = _finite(metrics.train.get("images_per_sec_per_device"))
    several = (metrics.world_size or 1) > 1  # on one device the per-device line is the total again
    if not len(steps) and not (several and len(per_steps)):
        return _not_recorded(ax, "throughput")
    parts = []
    if len(steps):
        _plot_noisy(ax, steps, total, "all devices", "tab:purple")
        parts.append(f"median {np.median(total):.4g} images/s")
    if several and len(per_steps):
        _plot_noisy(ax, per_steps, per_device, "per device", "tab:orange")
        parts.append(f"{np.median(per_device):.4g} per device")
    ax.set_ylim(bottom=0)  # from zero: a dip reads in proportion
    ax.set_ylabel("images / s")
    ax.legend(loc="best")
    ax.set_title("throughput: " + ", ".join(parts))


def _draw_data_wait(ax, metrics: Metrics) -> None:
    wait = metrics.train.get("data_wait_share")  # the trainer's share of wall time spent in next(loader)
    if wait is None:
        return _not_recorded(ax, "waiting for data")
    share = np.clip(wait.values, 0, 1)  # (N,)
    keep = np.isfinite(share)
    if not keep.any():
        return _not_recorded(ax, "waiting for data")
    steps = wait.steps
    _plot_noisy(ax, steps[keep], share[keep], "data wait / step time", "tab:brown")
    # always 0..100%: a share reads the same in every run's report
    ax.set_ylim(0, 1)
    ax.yaxis.set_major_formatter(lambda y, _: f"{y:.0%}")
    ax.set_ylabel("share of step time")
    ax.legend(loc="best")
    ax.set_title(f"waiting for data: median {np.median(share[keep]):.1%} of step time")


def draw_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw ``RUN_DIR/metrics.jsonl`` into a PNG at ``out`` (default ``RUN_DIR/report.png``), written atomically;
    return its path. UserError if the run has no train line."""
    # Imported here: every command would otherwise pay for matplotlib. Figure + the Agg canvas, never pyplot,
    # leave the caller's matplotlib (its backend, its open figures) as it was.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    metrics = load_metrics(run_dir)
    last_step = metrics.last_step
    if last_step is None:
        raise UserError(f"report: {run_dir / 'metrics.jsonl'} has no train line yet")
    out = Path(out) if out is not None else run_dir / "report.png"
    fig = Figure(figsize=(12, 7.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2, sharex=True)
    for draw, ax in zip((_draw_loss, _draw_lr, _draw_throughput, _draw_data_wait), axes.flat):
        draw(ax, metrics)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("step")
    world = metrics.world_size
    fig.suptitle(f"{run_dir.resolve().name}  \u00b7  world size {world if world is not None else 'not recorded'}"
                 f"  \u00b7  last step {last_step}", fontsize="x-large")
    with atomic_write(out) as f:
        fig.savefig(f, format="png")
    return out


def run_report(args: argparse.Namespace) -> int:
    print(draw_report(args.run_dir, args.out))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="draw a run's metrics.jsonl (loss, lr, throughput, data wait) as a PNG")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --output folder of `fastpretrain train`")
    p.add_argument("--out", metavar="FILE", help="where to write the PNG (default: RUN_DIR/report.png)")
    p.set_defaults(func=run_report)
