import csv
import io

from toolbox.csv_cells import SafeWriter, safe_cell


def test_cells_a_spreadsheet_would_run_are_written_as_text():
    for cell in ("=1+2", '+HYPERLINK("http://x")', "-2+3", "@SUM(1)", "\tx", "\rx"):
        assert safe_cell(cell) == "'" + cell
    for cell in ("cat", "a=b", "", "1.5", 0.25, -3, None):
        assert safe_cell(cell) == cell


def test_safe_writer_rows_read_back_as_text():
    buffer = io.StringIO()
    writer = SafeWriter(buffer)
    writer.writerow(["path", "class"])
    writer.writerows([["a.jpg", "=1+2"], ["b.jpg", -0.5]])
    assert list(csv.reader(io.StringIO(buffer.getvalue()))) == [
        ["path", "class"],
        ["a.jpg", "'=1+2"],
        ["b.jpg", "-0.5"],
    ]
