import re

from backend.charts import histogram, line_chart, scatter


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


def _points(svg: str) -> list[tuple[str, float, float]]:
    return [(href, float(x), float(y)) for href, x, y in re.findall(r'<a href="([^"]*)"><circle cx="([\d.]+)" cy="([\d.]+)"', svg)]


def test_a_scatter_places_each_point_by_its_values_and_links_it():
    svg = str(scatter({"EVR": [(8, 0.91, "k8", "#sae-k8"), (32, 0.94, "k32", "#sae-k32"), (64, 0.95, "k64", "#sae-k64")]}, x_label="L0", y_label="EVR"))
    (h8, x8, y8), (h32, x32, y32), (h64, x64, y64) = _points(svg)
    assert (h8, h32, h64) == ("#sae-k8", "#sae-k32", "#sae-k64")
    assert x8 < x32 < x64 and y8 > y32 > y64, "right with L0, up with EVR (SVG's y grows downwards)"
    assert abs((x32 - x8) - 2 * (x64 - x32)) < 0.5 and "(log scale)" in svg, "8 -> 64 spans 8x: log scale, 8 -> 32 twice 32 -> 64"
    assert svg.count('class="point-name"') == 3 and "<title>k32: EVR 0.94, L0 32</title>" in svg
    linear = str(scatter({"EVR": [(30, 0.9, "a", "#a"), (32, 0.9, "b", "#b"), (60, 0.8, "c", "#c")]}))
    (_, xa, _), (_, xb, _), (_, xc, _) = _points(linear)
    assert abs((xb - xa) * 14 - (xc - xb)) < 0.5 and "log scale" not in linear


def test_a_scatter_escapes_titles_skips_what_is_not_finite_and_names_several_series():
    svg = str(scatter({"cifar10": [(8, 1.5, "<b>", "#x"), (16, float("nan"), "nan", "#y")], "cifar100": [(8, 9.0, "z", "#z")]}, named=False))
    assert len(_points(svg)) == 2 and "<b>" not in svg and "&lt;b&gt;" in svg
    assert "● cifar10" in svg and "● cifar100" in svg and 'class="point-name"' not in svg
    assert "No data yet" in scatter({"EVR": []})


def test_a_point_with_an_interval_draws_it_as_a_bar_inside_the_frame():
    svg = str(scatter({"semantic share": [(8, 0.4, "a", "#a", (0.2, 0.9)), (64, 0.5, "b", "#b")]}, height=220))
    (bar,) = re.findall(r'<line x1="([\d.]+)" x2="([\d.]+)" y1="([\d.]+)" y2="([\d.]+)"[^>]*class="interval"', svg)
    (_, xa, ya), _ = _points(svg)
    x1, x2, low, high = map(float, bar)
    assert x1 == x2 == xa and high < ya < low, "through the point, from its low (below) to its high (above)"
    assert 10 <= high and low <= 220 - 34, "the interval widens the y range: the bar stays inside the frame"


def test_a_histogram_counts_what_lies_left_of_its_first_edge_in_words_only_where_there_is_any():
    edges, counts = [0.5, 1.0, 2.0], [3, 1]
    assert len(re.findall(r'class="bar"', histogram(edges, counts, below=7))) == 2, "no bar for the values below"
    assert ">+ 7 below 0.5, not drawn</text>" in histogram(edges, counts, below=7)
    assert ">+ 2 never &lt;fire&gt;, not drawn</text>" in histogram(edges, counts, below=2, below_label="never <fire>")
    assert "not drawn" not in histogram(edges, counts, below=0), "nothing to count: no line that could pass for a tick"
