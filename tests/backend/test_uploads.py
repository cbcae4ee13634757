"""Hostile uploads get a clear 4xx, never a 500 or a hang; awkward but valid images are converted."""

import io
import time

import numpy as np
import pytest
from PIL import Image

from backend.uploads import BadUpload, decode_upload
from tests.backend.hostile import corpus, exif_rotated_jpeg

CORPUS = corpus()


def test_the_corpus_is_large_and_mostly_hostile():
    assert len(CORPUS) >= 40 and sum(1 for *_, s in CORPUS if s != 200) >= 30


@pytest.mark.parametrize("name,data,expected", CORPUS, ids=[c[0] for c in CORPUS])
def test_each_upload_gets_its_answer_with_a_message(web, name, data, expected):
    client, key = web
    started = time.perf_counter()
    r = client.post(f"/api/saes/{key}/analyze", files={"file": (name, data, "image/jpeg")})
    assert time.perf_counter() - started < 30, "no upload may hang the server"
    assert r.status_code == expected, (name, r.status_code, r.text[:200])
    if expected != 200:
        detail = r.json()["detail"]
        assert isinstance(detail, str) and detail.startswith("The ") or "images are not accepted" in detail


def test_a_body_over_the_byte_limit_is_refused_with_413_before_it_is_read(web):
    client, key = web
    limit = client.app.state.settings.max_upload_bytes
    r = client.post(f"/api/saes/{key}/analyze", files={"file": ("big.jpg", b"\xff" * (limit + 200_000), "image/jpeg")})
    assert r.status_code == 413


def test_exif_orientation_is_applied():
    img = decode_upload(exif_rotated_jpeg(), 10**8)
    assert img.size == (20, 40)  # stored 40 x 20, viewed rotated


def test_alpha_is_composited_on_white_and_sixteen_bit_is_scaled():
    clear = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    buf = io.BytesIO()
    clear.save(buf, format="PNG")
    assert decode_upload(buf.getvalue(), 10**6).getpixel((0, 0)) == (255, 255, 255)
    ramp = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))  # mode I;16
    buf = io.BytesIO()
    ramp.save(buf, format="PNG")
    assert [decode_upload(buf.getvalue(), 10**6).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_pixel_limit_is_checked_before_decoding():
    from tests.backend.hostile import png_bomb

    with pytest.raises(BadUpload) as info:
        decode_upload(png_bomb(5000, 5000), max_pixels=1_000_000)
    assert info.value.status == 413
