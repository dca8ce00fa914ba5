"""``fastpretrain report``: metrics.jsonl files written by hand (resumes, kills, garbage, older runs) against values
worked out by hand, and the PNG it draws."""

from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from fastpretrain.errors import UserError
from fastpretrain.log import forget_said
from fastpretrain.train import report
from fastpretrain.train.report import draw_report, load_metrics


def train_line(step, loss, **extra) -> str:
    return json.dumps({"event": "train", "step": step, "epoch": 0, "loss": loss, "lr": 0.1,
                       "images_per_sec": 800.0, "skipped_samples": {"unlabeled": 1}, **extra})


def write_run(tmp_path, lines, name="run") -> str:
    run = tmp_path / name
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    return run


def test_after_a_kill_and_a_resume_the_run_that_continued_wins(tmp_path):
    # steps 10..50, killed during step 51 (the last line cut off mid-write), resumed from the checkpoint of step 30
    first = [train_line(s, loss) for s, loss in [(10, 5.0), (20, 4.0), (30, 3.0), (40, 2.5), (50, 2.4)]]
    resumed = [train_line(s, loss) for s, loss in [(40, 2.6), (50, 2.5), (60, 2.3)]]
    run = write_run(tmp_path, first + ['{"event": "train", "step": 51, "lo'] + resumed +
                    ['{"event": "eval", "step": 60, "precision@1": 0.5, "precision@5": 0.3, '
                     '"majority_precision@1": 0.2, "images": 64}'])
    metrics = load_metrics(run)
    loss = metrics.train["loss"]
    assert loss.steps.tolist() == [10, 20, 30, 40, 50, 60]
    assert loss.values.tolist() == [5.0, 4.0, 3.0, 2.6, 2.5, 2.3]
    assert metrics.unreadable_lines == 1
    assert metrics.last_step == 60
    assert [e["precision@1"] for e in metrics.evals] == [0.5]


def test_a_resumed_segment_supersedes_what_the_dead_run_wrote_from_its_first_step_on(tmp_path):
    # the dead run logged every 5 steps to 50; the resumed one (from step 30) every 20: its 40 and 60 win, and the
    # dead run's 45 and 50, past the resumed segment's first line, go with it; its 35 cannot be told apart and stays
    first = [train_line(s, float(s)) for s in range(5, 51, 5)]
    resumed = [train_line(40, 400.0), train_line(60, 600.0)]
    metrics = load_metrics(write_run(tmp_path, first + resumed))
    assert metrics.train["loss"].steps.tolist() == [5, 10, 15, 20, 25, 30, 35, 40, 60]
    assert metrics.train["loss"].values.tolist() == [5, 10, 15, 20, 25, 30, 35, 400, 600]
    assert metrics.unreadable_lines == 0


def test_evals_after_a_resume_the_later_of_a_step_wins(tmp_path):
    def eval_line(step, p1):
        return json.dumps({"event": "eval", "step": step, "precision@1": p1, "precision@5": 0.1,
                           "majority_precision@1": 0.2, "images": 10})

    # a finished run evaluated at 20, resumed from its last checkpoint (step 20): evaluated again; then more steps
    lines = [train_line(10, 3.0), train_line(20, 2.0), eval_line(20, 0.4), eval_line(20, 0.45),
             train_line(30, 1.5), eval_line(30, 0.6)]
    metrics = load_metrics(write_run(tmp_path, lines))
    assert [(e["step"], e["precision@1"]) for e in metrics.evals] == [(20, 0.45), (30, 0.6)]
    assert metrics.train["loss"].steps.tolist() == [10, 20, 30]


def test_unreadable_lines_are_skipped_counted_and_said_once(tmp_path, caplog):
    garbage = ["not json at all", "[1, 2, 3]", "42", '"a string"', "{}", '{"event": "train"}',
               '{"event": "train", "step": "7"}', '{"event": "train", "step": true}', '{"event": 3, "step": 1}',
               '{"event": "train", "step": -1}', '{"event": "train", "step": 2.5}', "{'event': 'train'}"]
    ignored = ["", "   ", '{"event": "checkpoint", "step": 10}']  # blank lines and other events are not broken
    run = write_run(tmp_path, [train_line(1, 9.0)] + garbage + ignored + [train_line(2, 8.0)])
    with (run / "metrics.jsonl").open("ab") as f:
        f.write(b"\x00\x00\xff\xfe{\n" + b'{"event": "train", "step": 3, "loss": 7.')  # a binary tail, a cut line
    forget_said()
    with caplog.at_level(logging.WARNING, logger="fastpretrain"):
        for _ in range(2):
            metrics = load_metrics(run)
    assert metrics.unreadable_lines == len(garbage) + 2
    assert metrics.train["loss"].steps.tolist() == [1, 2]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"skipped {len(garbage) + 2} unreadable" in warnings[0]


def test_an_older_run_without_the_new_fields(tmp_path):
    run = write_run(tmp_path, [train_line(s, 10.0 - s) for s in (25, 50, 75)])
    metrics = load_metrics(run)
    assert set(metrics.train) == {"epoch", "loss", "lr", "images_per_sec"}  # skipped_samples is not a number
    assert metrics.world_size is None
    assert metrics.train["images_per_sec"].values.tolist() == [800.0] * 3
    png = draw_report(run)
    assert png == run / "report.png" and Image.open(png).size == (1200, 750)


def test_fields_missing_from_some_lines_make_shorter_series(tmp_path):
    lines = [train_line(1, 5.0, world_size=2, data_wait_share=0.01), train_line(2, 4.0),
             train_line(3, 3.0, world_size=4, data_wait_share=float("nan"))]  # json writes NaN, and reads it back
    metrics = load_metrics(write_run(tmp_path, lines))
    assert metrics.train["world_size"].steps.tolist() == [1, 3]
    assert metrics.world_size == 4
    assert metrics.train["data_wait_share"].steps.tolist() == [1, 3]
    assert metrics.train["data_wait_share"].values[0] == 0.01
    assert math.isnan(metrics.train["data_wait_share"].values[1])


def panels() -> list:
    """The report's four axes, empty."""
    fig = Figure()
    FigureCanvasAgg(fig)
    return list(fig.subplots(2, 2).flat)


def test_the_data_wait_share_is_drawn_clipped_to_one_without_non_finite_points(tmp_path):
    lines = [train_line(1, 5.0, data_wait_share=0.1), train_line(2, 5.0),  # a line without the field
             train_line(3, 5.0, data_wait_share=0.2), train_line(4, 5.0, data_wait_share=1.5),
             train_line(5, 5.0, data_wait_share=float("nan"))]  # not a share: left out
    metrics = load_metrics(write_run(tmp_path, lines))
    ax = panels()[3]
    report._draw_data_wait(ax, metrics)
    (line,) = ax.get_lines()  # too few points to smooth: the points themselves
    assert line.get_xdata().tolist() == [1, 3, 4]
    np.testing.assert_allclose(line.get_ydata(), [0.1, 0.2, 1.0])
    assert ax.get_ylim() == (0, 1)


def test_panels_without_data_say_not_recorded(tmp_path):
    metrics = load_metrics(write_run(tmp_path, [json.dumps({"event": "train", "step": s, "epoch": 0})
                                                for s in (1, 2)]))
    for draw, ax in zip((report._draw_loss, report._draw_lr, report._draw_throughput, report._draw_data_wait), panels()):
        draw(ax, metrics)
        assert [t.get_text() for t in ax.texts] == ["not recorded"] and not ax.get_lines()


@pytest.mark.parametrize("world_size, labels", [(1, ["all devices"]), (2, ["all devices", "per device"])])
def test_the_per_device_line_only_where_there_are_several_devices(tmp_path, world_size, labels):
    lines = [train_line(s, 1.0, images_per_sec=800.0, images_per_sec_per_device=800.0 / world_size,
                        world_size=world_size) for s in (1, 2, 3)]
    metrics = load_metrics(write_run(tmp_path, lines))
    ax = panels()[2]
    report._draw_throughput(ax, metrics)
    assert [line.get_label() for line in ax.get_lines()] == labels


def centered_medians(values, window) -> list[float]:
    """Window by window, centered even at the ends (the window shrinks on both sides there)."""
    reach = [min(i, len(values) - 1 - i, window // 2) for i in range(len(values))]
    return [float(np.median(values[i - r:i + r + 1])) for i, r in enumerate(reach)]


def test_the_rolling_median_matches_a_window_by_window_median(rng):
    values = rng.normal(size=int(rng.integers(1, 60)))
    window = 2 * int(rng.integers(0, 8)) + 1
    np.testing.assert_allclose(report._smooth(values, window), centered_medians(values, window))


def test_a_long_run_is_cut_into_block_medians_before_the_rolling_median(rng, monkeypatch):
    monkeypatch.setattr(report, "TREND_POINTS", 40)
    n = int(rng.integers(41, 400))
    steps, values = np.arange(n) * 10, rng.normal(size=n)
    block = math.ceil(n / 40)
    medians = [np.median(values[i:i + block]) for i in range(0, n, block)]
    trend_steps, trend, window = report._trend(steps, values)
    assert window == int(len(medians) / 20) | 1
    np.testing.assert_allclose(trend_steps, [np.median(steps[i:i + block]) for i in range(0, n, block)])
    np.testing.assert_allclose(trend, centered_medians(np.array(medians), window))


def realistic_run(tmp_path, rng, steps=300):
    """A run of two devices: decaying loss, warm-up + cosine lr, noisy throughput, ~5% data wait, two evals."""
    lines = []
    for s in range(1, steps + 1):
        lr = 0.2 * s / 30 if s <= 30 else 0.1 * (1 + math.cos(math.pi * (s - 30) / (steps - 30)))
        step_time = 0.078 * (1 + 0.08 * rng.normal())
        lines.append(train_line(s, 2 + 7.7 * math.exp(-s / 60) + 0.08 * rng.normal(), lr=lr,
                                images_per_sec=64 / step_time, images_per_sec_per_device=32 / step_time,
                                world_size=2, data_wait_share=abs(rng.normal(0.05, 0.015)),
                                step_time=step_time, peak_memory_mb=1234.5, nonfinite_steps=0))
        if s in (steps // 2, steps):
            lines.append(json.dumps({"event": "eval", "step": s, "precision@1": 0.5 + s / 1000, "precision@5": 0.4,
                                     "majority_precision@1": 0.29, "images": 512}))
    return write_run(tmp_path, lines, name="ig-demo")


def test_draw_report_writes_a_png_atomically(tmp_path, rng):
    run = realistic_run(tmp_path, rng)
    out = tmp_path / "reports" / "nested" / "r.png"
    assert draw_report(run, out) == out
    image = Image.open(out)
    image.verify()  # a whole PNG, not a truncated one
    image = Image.open(out)
    assert image.format == "PNG" and image.size == (1200, 750)
    assert np.asarray(image.convert("L"), dtype=np.float64).var() > 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.png"]  # no temporary file left behind


def test_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        draw_report(tmp_path / "missing")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserError, match="no such folder"):
        draw_report(tmp_path / "a-file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no metrics.jsonl"):
        draw_report(tmp_path / "empty")
    run = write_run(tmp_path, ["garbage", '{"event": "eval", "step": 3, "precision@1": 0.5}'], name="no-train")
    with pytest.raises(UserError, match="no train line"):
        draw_report(run)
    assert not (run / "report.png").exists()


def parse(argv):
    parser = argparse.ArgumentParser()
    report.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_the_command_prints_the_path_of_the_png(tmp_path, rng, capsys):
    run = realistic_run(tmp_path, rng, steps=20)
    args = parse(["report", str(run)])
    assert args.func(args) == 0
    assert capsys.readouterr().out == f"{run / 'report.png'}\n"
    out = tmp_path / "elsewhere.png"
    args = parse(["report", str(run), "--out", str(out)])
    assert args.func(args) == 0
    assert capsys.readouterr().out == f"{out}\n" and Image.open(out).size == (1200, 750)
    args = parse(["report", str(tmp_path / "nope")])
    with pytest.raises(UserError, match="no such folder"):
        args.func(args)


def test_pyplot_is_never_imported(tmp_path, rng):
    run = realistic_run(tmp_path, rng, steps=20)
    code = ("import sys\nfrom fastpretrain.train.report import draw_report\n"
            f"draw_report({str(run)!r})\n"
            "assert 'matplotlib' in sys.modules, 'the test must draw'\n"
            "assert 'matplotlib.pyplot' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)
