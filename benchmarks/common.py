"""Shared by the benchmark scripts (run as `python benchmarks/NAME.py`, so this folder is on sys.path)."""

from __future__ import annotations

from pathlib import Path


def emit_table(lines: list[str], append: Path | None) -> str:
    "Print a Markdown result table and, when `append` names a file (e.g. benchmarks/RESULTS.md), append it there."
    table = "\n".join(lines) + "\n"
    print(table)
    if append:
        with Path(append).open("a") as f:
            f.write("\n" + table)
    return table
