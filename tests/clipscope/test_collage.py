import io

from PIL import Image

from clipscope.collage import cached_collage, render_collage


def _thumbs(tmp_path, n):
    paths = []
    for i in range(n):
        p = tmp_path / f"{i}.webp"
        Image.new("RGB", (32, 32), (20 * i, 255 - 20 * i, 0)).save(p, format="WEBP")
        paths.append(p)
    return paths


def test_collage_is_a_4x3_grid_in_rank_order(tmp_path):
    paths = _thumbs(tmp_path, 12)
    png = render_collage(paths, [1.0 - i / 20 for i in range(12)], cell=40)
    img = Image.open(io.BytesIO(png))
    assert img.size == (160, 3 * (40 + 18))
    first = img.getpixel((20, 20))
    last = img.getpixel((3 * 40 + 20, 2 * 58 + 20))
    assert abs(first[0] - 0) < 10 and abs(last[0] - 220) < 12  # thumbnail 0 top-left, 11 bottom-right


def test_collage_is_rendered_once_and_then_served_from_the_cache(tmp_path):
    paths = _thumbs(tmp_path, 3)
    first = cached_collage(tmp_path / "c", paths, [3.0, 2.0, 1.0], title="feature 7")
    mtime = first.stat().st_mtime_ns
    again = cached_collage(tmp_path / "c", paths, [3.0, 2.0, 1.0], title="feature 7")
    assert again == first and again.stat().st_mtime_ns == mtime
    other = cached_collage(tmp_path / "c", paths[:2], [3.0, 2.0], title="feature 7")
    assert other != first
