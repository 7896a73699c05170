"""Every test file has its place in the suite's run order (tests/support/order.py), so a new file cannot silently
change how the early commands and the multi-rank runs overlap (the suite's time), and no listed file is gone."""

from __future__ import annotations

from support.order import RUN_ORDER
from support.runs import REPO


def test_every_test_file_is_in_the_run_order_once():
    tests = REPO / "tests"
    files = sorted(path.relative_to(tests).as_posix() for path in tests.rglob("test_*.py"))
    assert len(RUN_ORDER) == len(set(RUN_ORDER)), "a file is listed twice in tests/support/order.py"
    assert sorted(set(files) - set(RUN_ORDER)) == [], "add these files to RUN_ORDER in tests/support/order.py"
    assert sorted(set(RUN_ORDER) - set(files)) == [], "these files of RUN_ORDER do not exist"
