"""The benchmarks' one format: rows of (benchmark, ours, baseline, ratio, unit, device), their table, the gate against
``bench/baselines.json``, and the step from pytest-benchmark's JSON to ``bench/results/`` and the README.

    pytest bench/ --benchmark-only --benchmark-json=run.json
    python bench/summarize.py run.json            # -> bench/results/YYYY-MM-DD-<device>.json
    python bench/summarize.py run.json --readme   # the same, then the README's performance section from all results
    python bench/summarize.py --readme            # only the README

A row's ``ratio`` is above 1 when ours is better (baseline / ours for times, ours / baseline for rates): the median
over interleaved rounds of each round's ratio, so it is not always ``baseline / ours`` of the two medians shown.
A results file is one run on one device, named by its date (a second run of the day on that device replaces it).
Plain Python (no torch): ``bench/conftest.py`` imports it for the table and the gate.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
BASELINES = BENCH / "baselines.json"
README = BENCH.parent / "README.md"
BEGIN, END = "<!-- performance:begin -->", "<!-- performance:end -->"

EXTRA_INFO_KEY = "fastpretrain"  # benchmark.extra_info[EXTRA_INFO_KEY]: the rows a benchmark reported
ROW_FIELDS = ("benchmark", "ours", "baseline", "ratio", "unit", "device", "note")  # note: optional, a few words
TIME_UNITS = ("s", "ms", "us")  # lower is better; every other unit is a rate ("img/s", "posts/s", ...)
RESULTS_FORMAT = 1


def make_row(benchmark: str, ours: float, baseline: float, ratio: float, unit: str, device: str,
             note: str | None = None) -> dict:
    """One comparison, checked: a row that cannot be read back is refused where it is made."""
    for name, value in (("ours", ours), ("baseline", baseline), ("ratio", ratio)):
        if not (isinstance(value, (int, float)) and value > 0 and value != float("inf")):
            raise ValueError(f"{benchmark}: {name} must be a positive finite number, got {value!r}")
    if not re.fullmatch(r"[a-z0-9_.+-]+(/[a-z0-9_.+-]+)+", benchmark):
        raise ValueError(f"benchmark names are lowercase and slash-separated (suite/device/case...), got {benchmark!r}")
    return {"benchmark": benchmark, "ours": float(ours), "baseline": float(baseline), "ratio": float(ratio),
            "unit": unit, "device": device, "note": note}


def notes(rows: list[dict]) -> list[tuple[str, str]]:
    """(benchmark, note) of the rows with a note: what the table's columns cannot hold (e.g. the data-wait share)."""
    return [(row["benchmark"], row["note"]) for row in rows if row.get("note")]


# ----------------------------------------------------------------------------------------------------
# Floors and the gate


def load_baselines(path: Path = BASELINES) -> dict[str, dict]:
    """baselines.json's entries by benchmark name; ValueError naming the entry and the field that is wrong."""
    body = json.loads(path.read_text())
    entries = body.get("benchmarks")
    if not isinstance(entries, dict):
        raise ValueError(f"{path}: no 'benchmarks' object")
    for name, entry in entries.items():
        for field, kind, what in (("ratio", (int, float), "number"), ("floor", (int, float), "number"),
                                  ("device", str, "string"), ("why", str, "string")):
            if not isinstance(entry.get(field), kind):
                raise ValueError(f"{path}: {name}: '{field}' missing or not a {what}")
        if entry["device"] not in ("cpu", "cuda"):
            raise ValueError(f"{path}: {name}: device must be cpu or cuda, got {entry['device']!r}")
        if not 0 < entry["floor"] < entry["ratio"]:
            raise ValueError(f"{path}: {name}: the floor must lie between 0 and the measured ratio")
    return entries


def gate_failures(rows: list[dict], baselines: dict[str, dict], cuda: bool) -> list[str]:
    """A line per benchmark under its floor, and per benchmark of baselines.json that did not report (one that needs
    CUDA may be missing where there is none)."""
    measured = {row["benchmark"]: row for row in rows}
    failures = []
    for name, entry in baselines.items():
        row = measured.get(name)
        if row is None:
            if entry["device"] == "cuda" and not cuda:
                continue
            failures.append(f"GATE FAIL {name}: did not run (baselines.json gates it on {entry['device']})")
        elif row["ratio"] < entry["floor"]:
            ratio = next(text for digits in (3, 4, 6) if float(text := f"{row['ratio']:.{digits}g}") < entry["floor"])
            failures.append(f"GATE FAIL {name}: ratio {ratio} < floor {entry['floor']:g} ({entry['why']})")
    return failures


# ----------------------------------------------------------------------------------------------------
# The table


def format_value(value: float, unit: str) -> str:
    if value >= 1e6:
        number = f"{value / 1e6:.3g}M"
    elif value >= 1e4:
        number = f"{value / 1e3:.3g}k"
    elif value >= 100:
        number = f"{value:.0f}"
    else:
        number = f"{value:.3g}"
    return f"{number} {unit}"


def table_cells(rows: list[dict], floors: dict[str, float]) -> list[list[str]]:
    """The header and a line per row: benchmark, ours, baseline, ratio, floor, device."""
    cells = [["benchmark", "ours", "baseline", "ratio", "floor", "device"]]
    for row in rows:
        floor = floors.get(row["benchmark"])
        cells.append([row["benchmark"], format_value(row["ours"], row["unit"]),
                      format_value(row["baseline"], row["unit"]), f"{row['ratio']:.3g}x",
                      "-" if floor is None else f"{floor:g}x", row["device"]])
    return cells


def text_table(rows: list[dict], floors: dict[str, float]) -> list[str]:
    cells = table_cells(rows, floors)
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    return ["  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                      for i, (cell, width) in enumerate(zip(line, widths))).rstrip() for line in cells]


def markdown_table(rows: list[dict], floors: dict[str, float]) -> list[str]:
    cells = table_cells(rows, floors)
    cells[1:] = [[f"`{line[0]}`", *line[1:]] for line in cells[1:]]
    lines = ["| " + " | ".join(line) + " |" for line in cells]
    lines.insert(1, "| --- | ---: | ---: | ---: | ---: | --- |")
    return lines


def describe_machine(machine: dict) -> str:
    cpu = (f"{machine.get('cpu_model') or 'unknown CPU'}, {machine.get('cores')} cores, "
           f"{machine.get('cpu_capability')}{' + native bf16' if machine.get('native_bf16') else ''}")
    gpu = f"; {machine['cuda_device']}" if machine.get("cuda_device") else ""
    return f"{cpu}{gpu}; torch {machine.get('torch')}"


def device_label(machine: dict) -> str:
    """A results file's device: the GPU where one ran, else the CPU's cores and vector ISA."""
    if machine.get("cuda_device"):
        return re.sub(r"[^a-z0-9]+", "-", machine["cuda_device"].lower()).strip("-")
    return f"cpu-{machine.get('cores')}core-{str(machine.get('cpu_capability')).lower()}"


# ----------------------------------------------------------------------------------------------------
# pytest-benchmark JSON -> bench/results/


def summarize(benchmark_json: dict, floors: dict[str, float]) -> dict:
    """One results file's content from a pytest-benchmark JSON written with ``--benchmark-json``."""
    run = benchmark_json.get("fastpretrain")
    if run is None:
        raise ValueError("no 'fastpretrain' section: the JSON was not written by a run of bench/ (its conftest)")
    rows = [row for bench in benchmark_json["benchmarks"] for row in bench["extra_info"].get(EXTRA_INFO_KEY, [])]
    if not rows:
        raise ValueError("no benchmark reported a row")
    stamp = datetime.fromisoformat(benchmark_json["datetime"])
    commit = benchmark_json.get("commit_info", {})
    return {"format": RESULTS_FORMAT, "date": stamp.date().isoformat(), "datetime": stamp.isoformat(timespec="seconds"),
            "device": device_label(run["machine"]), "machine": run["machine"], "command": run["command"],
            "mode": run["mode"], "load_average": run["load_average"],
            "commit": (commit.get("id") or "")[:10] + (" (with uncommitted changes)" if commit.get("dirty") else ""),
            "rows": [{**row, "floor": floors.get(row["benchmark"])} for row in rows]}


def write_results(results: dict, folder: Path = RESULTS) -> Path:
    path = folder / f"{results['date']}-{results['device']}.json"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------
# bench/results/ -> the README's performance section

INTRODUCTION = """\
Every benchmark times our path and its baseline side by side in one run (interleaved rounds; each ratio is the median
of the rounds' ratios, so that load coming and going on a shared machine cancels), and
`pytest bench/ --benchmark-only` ends with this table. A ratio above 1 means ours is faster. `make bench-gate` (what CI
runs after `make test`) runs the short mode (`--short`: fewer rounds, the smaller cases) with the gate (`--gate`): it
fails when a ratio falls under its floor in `bench/baselines.json`, which says for each benchmark why that floor.
`make bench` runs everything and regenerates this section from `bench/results/` (`bench/summarize.py`): no number here
is typed by hand."""


def results_files(folder: Path = RESULTS) -> tuple[list[dict], list[Path]]:
    """Results files of this format, newest first, and the older summaries kept as history."""
    current, history = [], []
    for path in sorted(folder.glob("*.json")):
        body = json.loads(path.read_text())
        if body.get("format") == RESULTS_FORMAT:
            current.append({**body, "path": path})
        else:
            history.append(path)
    current.sort(key=lambda body: body["datetime"], reverse=True)
    return current, history


def describe_old(body: dict) -> str:
    """Machine, date and what was measured, from a summary in the old format."""
    cpu = body.get("machine", {}).get("cpu", {})
    what = body.get("what") or ", ".join(body.get("groups", {}))
    return f"{cpu.get('brand_raw', 'unknown CPU')}, {cpu.get('count', '?')} cores, {body.get('date', '?')[:10]}: {what}"


def readme_section(current: list[dict], history: list[Path], root: Path = BENCH.parent) -> str:
    lines = [BEGIN, "## Performance", "", INTRODUCTION, ""]
    devices = list(dict.fromkeys(body["device"] for body in current))
    for device in devices:
        runs = [body for body in current if body["device"] == device]
        newest = runs[0]
        floors = {row["benchmark"]: row["floor"] for row in newest["rows"] if row["floor"] is not None}
        load = newest["load_average"]
        about = (f"{describe_machine(newest['machine'])}; load average {load['start']:.1f} at the start, "
                 f"{load['end']:.1f} at the end ({newest['mode']} mode, `{newest['path'].relative_to(root)}`).")
        lines += [f"### {device}, {newest['date']}", "", about, "", f"`{newest['command']}`", ""]
        lines += markdown_table(newest["rows"], floors)
        if notes(newest["rows"]):
            lines += ["", *(f"- `{name}`: {note}" for name, note in notes(newest["rows"]))]
        if len(runs) > 1:
            older = ", ".join(f"`{body['path'].relative_to(root)}`" for body in runs[1:])
            lines += ["", f"Earlier runs on this device: {older}."]
        lines.append("")
    if history:
        lines += ["Earlier summaries, in the format before this table (ratios under each group's `extra_info`):", ""]
        lines += [f"- `{path.relative_to(root)}`: {describe_old(json.loads(path.read_text()))}" for path in history]
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def rewrite_readme(readme: Path, section: str) -> None:
    text = readme.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"{readme} needs one {BEGIN} ... {END} pair around its performance section")
    head, rest = text.split(BEGIN)
    readme.write_text(head + section + rest.split(END, 1)[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("benchmark_json", nargs="?", help="pytest-benchmark JSON (--benchmark-json) of a bench/ run")
    parser.add_argument("--readme", action="store_true", help="rewrite the README's performance section")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results folder (default: bench/results)")
    args = parser.parse_args(argv)
    if args.benchmark_json is None and not args.readme:
        parser.error("give a pytest-benchmark JSON, --readme, or both")
    try:
        if args.benchmark_json is not None:
            floors = {name: entry["floor"] for name, entry in load_baselines().items()}
            results = summarize(json.loads(Path(args.benchmark_json).read_text()), floors)
            print(f"wrote {write_results(results, args.results)}")
        if args.readme:
            rewrite_readme(README, readme_section(*results_files(args.results)))
            print(f"rewrote the performance section of {README}")
    except (OSError, ValueError, KeyError) as e:  # json.JSONDecodeError is a ValueError
        print(f"summarize.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
