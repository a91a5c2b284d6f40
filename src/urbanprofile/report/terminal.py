"""Tables for the terminal that fit its width: columns are dropped or wrapped, never a figure or a name cut."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text


@dataclass(frozen=True)
class Column:
    """One column of a :class:`FitTable`.

    Attributes:
        header: The column's title (may wrap at spaces).
        kind: ``name`` or ``figure`` cells are never wrapped nor cut; ``text`` cells may wrap at spaces.
        priority: 0 is always shown; when the terminal is too narrow, the highest numbers are dropped first.
        to_title: When every row holds the same value, say it once in the title instead of in a column.
        justify: Alignment of the cells.
    """

    header: str
    kind: Literal["name", "figure", "text"] = "name"
    priority: int = 0
    to_title: bool = False
    justify: Literal["left", "right"] = "left"


# Rich's default box with one space of padding either side: n columns cost 3n + 1 cells beyond their text.
_TEXT_MIN = 24


def _table_width(widths: Iterable[int]) -> int:
    widths = list(widths)
    return sum(widths) + 3 * len(widths) + 1


class FitTable:
    """A table that chooses its columns by the console's width when printed.

    Columns of low importance are left out (and named below the table) when the rest would not fit;
    when even the essential ones do not fit, every row is printed as a block of ``header: value`` lines.
    Nothing is ever shortened with an ellipsis. Cells are plain text (no markup is interpreted).
    """

    def __init__(self, columns: list[Column], title: str | None = None, notes: list[str] | None = None,
                 group_by: list[str] | None = None, keep: int = 0) -> None:
        """Args:
            columns: The columns, in the order shown.
            title: Said above the table.
            notes: Lines printed below the table.
            group_by: Headers of name columns to split the rows by (one table per value, the value in its
                title) when one table does not fit; the first is tried first.
            keep: Columns of this priority or less must be shown: when they do not fit, the rows are split
                by ``group_by`` (or printed as blocks) rather than left out.
        """
        self.columns = columns
        self.title = title
        self.notes = list(notes or [])
        self.group_by = list(group_by or [])
        self.keep = keep
        self.rows: list[list[str]] = []

    def add_row(self, *cells: str) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"a row needs {len(self.columns)} cells, got {len(cells)}")
        self.rows.append([str(c) for c in cells])

    # -- layout ------------------------------------------------------------------------------------------
    def _constant(self) -> dict[int, str]:
        """Columns that may go to the title because every row holds the same value there."""
        if len(self.rows) < 1:
            return {}
        return {i: self.rows[0][i] for i, col in enumerate(self.columns)
                if col.to_title and len({row[i] for row in self.rows}) == 1}

    def _widths(self, i: int) -> tuple[int, int]:
        """(smallest, natural) width of column ``i``."""
        col = self.columns[i]
        cells = [row[i] for row in self.rows]
        longest_cell = max((cell_len(c) for c in cells), default=0)
        header_word = max((cell_len(w) for w in col.header.split()), default=1)
        natural = max(cell_len(col.header), longest_cell)
        if col.kind == "text":  # wraps at spaces, and folds a long word (a path) onto the next line, whole
            return max(header_word, min(_TEXT_MIN, natural)), natural
        return max(longest_cell, header_word), natural

    def layout(self, width: int) -> tuple[list[int], dict[int, int], dict[int, str]] | None:
        """The shown columns, their widths and the constant columns moved to the title; None: use blocks."""
        constant = self._constant()
        candidates = [i for i in range(len(self.columns)) if i not in constant]
        sizes = {i: self._widths(i) for i in candidates}
        shown = [i for i in candidates if self.columns[i].priority <= self.keep]
        if _table_width(sizes[i][0] for i in shown) > width:
            return None
        optional = sorted((i for i in candidates if self.columns[i].priority > self.keep),
                          key=lambda i: self.columns[i].priority)
        for i in optional:
            if _table_width([*(sizes[j][0] for j in shown), sizes[i][0]]) <= width:
                shown.append(i)
        shown.sort()
        widths = {i: sizes[i][0] for i in shown}
        spare = width - _table_width(widths.values())
        # Widen headers of names and figures first (cheap), then share what is left among the text columns in
        # proportion to what each still lacks (so a long description is not squeezed by a short list).
        for i in shown:
            if self.columns[i].kind != "text" and spare > 0:
                extra = min(spare, sizes[i][1] - widths[i])
                widths[i] += extra
                spare -= extra
        texts = [i for i in shown if self.columns[i].kind == "text"]
        lacking = {i: sizes[i][1] - widths[i] for i in texts}
        total = sum(lacking.values())
        if total > 0 and spare > 0:
            shares = {i: min(lacking[i], spare * lacking[i] // total) for i in texts}
            for i in texts:
                widths[i] += shares[i]
            spare -= sum(shares.values())
            for i in texts:  # what rounding left over
                extra = min(spare, sizes[i][1] - widths[i])
                widths[i] += extra
                spare -= extra
        return shown, widths, constant

    def _title(self, constant: dict[int, str]) -> str | None:
        said = ", ".join(f"{self.columns[i].header} {value}" for i, value in constant.items())
        if self.title and said:
            return f"{self.title}: {said}"
        return self.title or said or None

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        plan = self.layout(options.max_width)
        if plan is None and self.group_by:
            yield from self._groups()
        elif plan is None:
            yield from self._blocks()
        else:
            shown, widths, constant = plan
            table = Table(title=self._title(constant))
            for i in shown:
                col = self.columns[i]
                # a header may wrap at its spaces even in a column whose cells never wrap
                table.add_column(Text(col.header, no_wrap=False), width=widths[i], no_wrap=col.kind != "text",
                                 overflow="fold",
                                 justify=col.justify)
            for row in self.rows:
                table.add_row(*(Text(row[i]) for i in shown))
            yield table
            dropped = [self.columns[i].header for i in range(len(self.columns)) if i not in shown and i not in constant]
            if dropped:
                yield Text(f"not shown at this width: {', '.join(dropped)} (a wider terminal shows them)")
        for note in self.notes:
            yield Text(note)

    def _groups(self) -> Iterator[FitTable | Text]:
        """One table per value of the first grouping column (which goes to each table's title)."""
        key = [c.header for c in self.columns].index(self.group_by[0])
        columns = [Column(c.header, c.kind, c.priority, True, c.justify) if i == key else c
                   for i, c in enumerate(self.columns)]
        values = list(dict.fromkeys(row[key] for row in self.rows))
        for value in values:
            part = FitTable(columns, self.title, group_by=self.group_by[1:], keep=self.keep if len(
                self.group_by) > 1 else 0)
            part.rows = [row for row in self.rows if row[key] == value]
            yield part

    def _blocks(self) -> Iterator[Text]:
        """One block per row: the row's names on one line, then one ``header: value`` line per other cell."""
        title = self._title({})
        if title:
            yield Text(title, style="bold")
        keys = [i for i, col in enumerate(self.columns) if col.priority == 0 and col.kind == "name"] or [0]
        for row in self.rows:
            yield Text(" · ".join(row[i] for i in keys), style="bold")
            for i, col in enumerate(self.columns):
                if i not in keys:
                    yield Text(f"  {col.header}: {row[i]}")
