"""CSV that a spreadsheet opens as data: a text cell that begins with `=`, `+`, `-`, `@`, a tab or a
carriage return would be run as a formula (a class folder named `=HYPERLINK(...)`), so it is written
with a leading `'`, which spreadsheets show as text (OWASP, CSV injection). Numbers stay numbers."""

from __future__ import annotations

import csv
from collections.abc import Iterable

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value):
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def safe_row(row: Iterable) -> list:
    return [safe_cell(value) for value in row]


class SafeWriter:
    """csv.writer whose text cells are made safe."""

    def __init__(self, f, **options):
        self.writer = csv.writer(f, **options)

    def writerow(self, row: Iterable) -> None:
        self.writer.writerow(safe_row(row))

    def writerows(self, rows: Iterable[Iterable]) -> None:
        self.writer.writerows(safe_row(row) for row in rows)


def read_cell(text: str) -> str:
    """The value a SafeWriter cell was written from: its guarding `'` taken off again."""
    if text.startswith("'") and text[1:].startswith(FORMULA_STARTS):
        return text[1:]
    return text
