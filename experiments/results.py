"""Reading a results file the study driver wrote, for a study's report.

A results file (``driver.Driver.write_results``) holds every step (``done``, ``result``,
``wall_s``) and the report's ``rows`` (their ``train_steps`` and ``eval_steps``, one per
seed). ``Results.row_stats`` gives a row's numbers over the seeds that finished; an unfinished
step has no result, and shows as "-".
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["Results", "fmt_seconds", "mean_std", "pct", "report_main", "save_figure",
           "seeds_cell", "top1_cell", "write_page", "write_section"]


def pct(x: Optional[float], digits: int = 2) -> str:
    """A fraction as a percentage with ``digits`` decimals ("-" for None)."""
    return "-" if x is None else f"{100 * x:.{digits}f}"


def mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (n - 1; None for fewer than two values)."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt_seconds(s: Optional[float]) -> str:
    """Seconds below two minutes, minutes above ("-" for None)."""
    if s is None:
        return "-"
    if s < 120:
        return f"{s:.0f} s"
    return f"{s / 60:.1f} min"


class Results:
    """A results file's data, read by step and by row of the report's table."""

    def __init__(self, data: dict[str, Any]):
        self.data = data
        self.steps: dict[str, dict] = data["steps"]

    def result(self, name: str) -> Optional[dict]:
        """The result of a finished step, else None."""
        step = self.steps.get(name)
        return step["result"] if step and step.get("done") else None

    def wall(self, name: str) -> Optional[float]:
        """The wall time of a finished step, else None."""
        step = self.steps.get(name)
        return step.get("wall_s") if step and step.get("done") else None

    def row_stats(self, row: dict) -> dict[str, Any]:
        """A row's top-1 (each finished seed's, mean, sample std), top-5 mean, seeds finished
        (``n``) and planned, the first finished run's result, mean wall and train seconds."""
        evals = [self.result(n) for n in row["eval_steps"]]
        top1 = [e["top1"] for e in evals if e]
        top5 = [e["top5"] for e in evals if e]
        trains = [self.result(n) for n in row["train_steps"]]
        walls = [self.wall(n) for n in row["train_steps"] if self.wall(n) is not None]
        m1, s1 = mean_std(top1)
        m5, _ = mean_std(top5)
        first = next((t for t in trains if t), None)
        return {"top1": top1, "mean": m1, "std": s1, "top5": m5, "n": len(top1),
                "planned": len(row["eval_steps"]), "train": first,
                "wall": statistics.fmean(walls) if walls else None,
                "train_s": statistics.fmean([t["train_seconds"] for t in trains if t])
                if any(trains) else None}


def top1_cell(st: dict) -> str:
    """A ``row_stats`` top-1 as "mean ± std" in percent (one seed: the mean; none: "-")."""
    if st["mean"] is None:
        return "-"
    if st["std"] is not None:
        return f"{100 * st['mean']:.2f} ± {100 * st['std']:.2f}"
    return f"{100 * st['mean']:.2f}"


def seeds_cell(st: dict) -> str:
    """A ``row_stats``'s seeds: "3", or "2/3" when fewer than planned finished."""
    return f"{st['n']}/{st['planned']}" if st["n"] != st["planned"] else str(st["n"])


def write_section(path: Path, name: str, text: str) -> None:
    """Put a report's generated ``text`` into ``path`` between the lines
    ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``, leaving the rest of the file as it is.

    A page such as docs/results.md holds several studies' sections and hand-written text around
    them: a report replaces its own section only. A file that does not exist is created holding
    the marked section; a file that exists without both markers (once each, in order) is refused
    with ``ValueError`` rather than overwritten. The file is replaced atomically."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n\n{text.strip()}\n{end}"
    path = Path(path)
    if path.exists():
        old = path.read_text()
        lines = old.splitlines()
        if lines.count(start) != 1 or lines.count(end) != 1 \
                or lines.index(start) > lines.index(end):
            raise ValueError(f"{path} exists but does not hold the lines {start} ... {end} "
                             "once each: the report writes only between them (add them where "
                             "the section goes, or give a new file)")
        i, j = lines.index(start), lines.index(end)
        new = "\n".join(lines[:i] + [block] + lines[j + 1:]) + "\n"
    else:
        new = block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new)
    tmp.replace(path)


def report_main(description: str, default_results: Path,
                write_markdown: Callable[[Results, Optional[Path]], str],
                write_plot: Callable[[Results, Path], bool],
                argv: Optional[list[str]] = None, *, section: str) -> int:
    """A study report's command line: read ``--results``, write the plot ``--png`` when asked
    (``write_plot`` returns False when there is nothing to draw; the markdown then names no
    plot) and the markdown into ``--md`` as the marked section ``section``
    (``write_section``). A page without the section's markers gives a one-line error and
    exit status 2, the page untouched."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--results", default=str(default_results))
    parser.add_argument("--md", required=True,
                        help=f"Markdown page: the report replaces only what lies between its "
                        f"<!-- {section}:start/end --> lines (a new file is created).")
    parser.add_argument("--png", default=None, help="Plot to write (needs matplotlib).")
    args = parser.parse_args(argv)
    res = Results(json.loads(Path(args.results).read_text()))
    png = Path(args.png) if args.png else None
    if png is not None and not write_plot(res, png):
        png = None
    write_page(parser, Path(args.md), section, write_markdown(res, png))
    return 0


def write_page(parser: argparse.ArgumentParser, md: Path, section: str, text: str) -> None:
    """``write_section`` for a report's command line: a page it refuses ends the command with
    one line and exit status 2 (``parser.exit``), the page untouched."""
    try:
        write_section(md, section, text)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")


def save_figure(fig: Any, png: Path) -> bool:
    """Lay out, write (120 dpi) and close a report's matplotlib figure; True, for
    ``write_plot``'s "a plot was written"."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return True
