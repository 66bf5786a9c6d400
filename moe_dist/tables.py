"""Markdown tables, as every report of moe_dist writes them (report.md, study.md, summary.md, README)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

# The separator cell of each alignment (GitHub-flavoured Markdown).
_RULES = {None: "---", "left": ":---", "right": "---:", "center": ":---:"}


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]],
                   align: Sequence[str | None] | None = None) -> str:
    """``| a | b |`` lines: the header, the separator ``|---|---|`` and one line per row
    (cells as ``str``, a ``|`` in a cell escaped; an empty string for an empty cell); no
    trailing newline. ``align``: per column None, "left", "right" or "center"."""
    align = list(align) if align is not None else [None] * len(headers)
    if len(align) != len(headers):
        raise ValueError(f"align has {len(align)} entries for {len(headers)} columns")
    lines = [_line(headers), "|" + "".join(_RULES[a] + "|" for a in align)]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"a row has {len(row)} cells for {len(headers)} columns: {list(row)!r}")
        lines.append(_line(row))
    return "\n".join(lines)


def _line(cells: Iterable[object]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
