"""docs/resilience.md shows the two layer orders measured side by side (issue 15's "done
when"): the table there is what ``bench/chain_order.py`` prints now (fake clock, seeded, so
it is exact), so a change to the chain that moves a figure must update the argument too."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from bench import chain_order

DOC = Path(__file__).resolve().parents[2] / "docs" / "resilience.md"


def test_the_documented_order_table_is_the_measurement() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        chain_order.main()
    table = out.getvalue().strip()
    assert "default" in table and "seed/default" in table
    assert table in DOC.read_text(), (
        "docs/resilience.md's order table differs from bench/chain_order.py now:\n" + table)
