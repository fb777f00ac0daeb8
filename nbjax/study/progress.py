"""Where a study stands: one progress line for the whole grid while it runs, and the
``--status`` table of done / running / missing cells."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from typing import Any

from nbjax.study import claims, store

_SEED = re.compile(r"_seed(\d+)$")


def duration(seconds: float | None) -> str:
    """``3 h 12 min``, ``12 min``, ``45 s``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


class Progress:
    """Cells done of the grid, the running cell and an ETA from measured wall times (of cells
    trained by this process, else of the store's records of this grid)."""

    def __init__(self, names: Sequence[str], records_dir: str,
                 log: Callable[[str], Any]) -> None:
        self.names, self.log = list(names), log
        self.done = sum(store.has_record(records_dir, n) for n in self.names)
        self.measured: list[float] = []
        wanted = set(self.names)
        self.recorded = [r["wall_time_s"] for r in store.load_records(records_dir)
                         if r["cell"] in wanted and r.get("wall_time_s")]

    def eta(self) -> tuple[float | None, str]:
        """(seconds left, what the estimate rests on)."""
        left = len(self.names) - self.done
        for times, where in ((self.measured, "run here"), (self.recorded, "in the records")):
            if times:
                per_cell = sum(times) / len(times)
                return left * per_cell, f"{duration(per_cell)}/cell over {len(times)} {where}"
        return None, "no cell timed yet"

    def line(self, running: str | None) -> str:
        """``study 12/123 cells done | running gmp_s0.9_tome_seed1 | ETA 3 h 12 min (...)``."""
        seconds, basis = self.eta()
        now = f" | running {running}" if running else ""
        return (f"study {self.done}/{len(self.names)} cells done{now} | "
                f"ETA {duration(seconds)} ({basis})")

    def start(self, name: str) -> None:
        """Logs the line for the cell that starts now."""
        self.log(self.line(name))

    def finish(self, seconds: float | None) -> None:
        """Counts a cell recorded by this process; ``seconds``: its training time here."""
        self.done += 1
        if seconds is not None:
            self.measured.append(seconds)


def cell_states(cells: Sequence[dict[str, Any]], records_dir: str,
                workdir: str | None) -> dict[str, str]:
    """``done`` (recorded), ``running`` (a live claim in ``workdir``) or ``missing``."""
    states = {}
    for cell in cells:
        name = cell["cell"]
        if store.has_record(records_dir, name):
            states[name] = "done"
        elif workdir and claims.holder(os.path.join(workdir, "runs", name)):
            states[name] = "running"
        else:
            states[name] = "missing"
    return states


def status_table(cells: Sequence[dict[str, Any]], states: dict[str, str]) -> str:
    """One row per cell without its seed, one column per seed, then the counts."""
    rows: dict[str, dict[int, str]] = {}
    for cell in cells:
        base = _SEED.sub("", cell["cell"])
        rows.setdefault(base, {})[int(cell["seed"])] = states[cell["cell"]]
    seeds = sorted({s for row in rows.values() for s in row})
    width = max([len(r) for r in rows] + [4])
    lines = [f"{'cell':<{width}}  " + "  ".join(f"{'seed' + str(s):<8}" for s in seeds)]
    for base, row in rows.items():
        lines.append(f"{base:<{width}}  " + "  ".join(f"{row.get(s, ''):<8}" for s in seeds))
    counts = {k: list(states.values()).count(k) for k in ("done", "running", "missing")}
    lines.append(f"{len(states)} cells: {counts['done']} done, {counts['running']} running, "
                 f"{counts['missing']} missing")
    return "\n".join(line.rstrip() for line in lines)
