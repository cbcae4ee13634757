import re

from backend.charts import line_chart


def _lines(svg: str) -> list[list[tuple[float, float]]]:
    return [[tuple(map(float, p.split(","))) for p in pts.split()] for pts in re.findall(r'<polyline[^>]* points="([^"]+)"', svg)]


def test_a_series_measured_every_few_steps_is_one_line_through_its_measurements():
    xs = [50, 100, 150, 200, 250, 300]
    svg = line_chart(xs, {"train": [0.5, 0.6, 0.7, 0.75, 0.8, 0.82], "held-out": [None, 0.55, None, 0.7, None, 0.78]})
    train, heldout = _lines(svg)
    assert len(train) == 6 and len(heldout) == 3
    assert [x for x, _ in heldout] == [train[1][0], train[3][0], train[5][0]]
    assert "<circle" not in svg


def test_a_non_finite_value_breaks_the_line_and_a_lone_point_is_a_dot():
    svg = line_chart([1, 2, 3, 4, 5], {"loss": [1.0, 0.9, float("nan"), 0.8, float("inf")]})
    assert [len(line) for line in _lines(svg)] == [2]
    assert svg.count("<circle") == 1


def test_no_measurement_at_all_says_so():
    assert "No data yet" in line_chart([1, 2], {"held-out": [None, None]})


def test_the_x_axis_is_named_between_its_end_values():
    svg = line_chart([50, 340], {"EVR": [0.6, 0.9]}, x_label="training <step>")
    assert re.search(r'<text x="\d+"[^>]*>50</text>.*>340</text>.*>training &lt;step&gt;</text>', svg)
    assert "class=\"axis\"" not in line_chart([50, 340], {"EVR": [0.6, 0.9]})
