"""Only the outermost progress loop shows a bar."""
from influence_lib.common import progress as progress_module


def test_nested_loops_show_one_bar(bars):
    shown = bars
    total = 0
    for outer in progress_module.progress(range(3), True, "outer"):
        for inner in progress_module.progress(range(2), True, "inner"):
            total += outer * inner
    assert total == 3 and shown == ["outer"]
    assert list(progress_module.progress(range(2), True, "again")) == [0, 1]
    assert shown == ["outer", "again"]
    assert list(progress_module.progress(range(2), False, "off")) == [0, 1] and shown == ["outer", "again"]
