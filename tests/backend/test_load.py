"""Under load the server refuses rather than queues without end, and its memory stays bounded
(a real `clipscope serve` process, 50 concurrent uploads over loopback)."""

import io
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from tests.backend.conftest import copy_database


def _rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def test_fifty_concurrent_uploads_get_200_or_503_and_memory_stays_bounded(web_data, tmp_path):
    settings, key = web_data
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "saes").symlink_to(settings.data_dir / "saes")
    (data_dir / "thumbnails").symlink_to(settings.data_dir / "thumbnails")
    copy_database(settings, data_dir / "clipscope.db")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "CLIPSCOPE_DATA_DIR": str(data_dir), "CLIPSCOPE_DEVICE": "cpu", "CLIPSCOPE_ANALYZE_QUEUE": "4",
           "CLIPSCOPE_ANALYZE_BATCH": "4"}
    server = subprocess.Popen([str(Path(sys.executable).parent / "clipscope"), "serve", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (600, 800, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=95)
    jpeg = buf.getvalue()
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=120, limits=httpx.Limits(max_connections=60)) as client:
            deadline = time.time() + 60
            while True:
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.time() < deadline, "server did not start"
                time.sleep(0.2)
            post = lambda _: client.post(f"/api/saes/{key}/analyze", files={"file": ("x.jpg", jpeg, "image/jpeg")})  # noqa: E731
            assert post(0).status_code == 200  # warm: CLIP and the SAE are loaded
            baseline = _rss_kb(server.pid, "VmRSS")
            with ThreadPoolExecutor(50) as pool:
                responses = list(pool.map(post, range(50)))
            peak = _rss_kb(server.pid, "VmHWM")
            codes = [r.status_code for r in responses]
            assert set(codes) <= {200, 503}, codes
            assert codes.count(200) >= 4 and codes.count(503) >= 1, codes
            assert all(r.headers.get("retry-after") == "1" for r in responses if r.status_code == 503)
            assert (peak - baseline) < 600 * 1024, f"peak RSS grew by {(peak - baseline) / 1024:.0f} MB"
            assert client.get("/healthz").status_code == 200 and post(0).status_code == 200
    finally:
        server.terminate()
        server.wait(timeout=30)


SERVE_FACTORY = """
import gc, io, sys, time, uvicorn
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner
from clipscope_cli.main import app
targets = []
uvicorn.run = lambda target, **options: targets.append((target, options.get("factory")))
result = CliRunner().invoke(app, ["serve"])
assert result.exit_code == 0, result.output
assert targets == [("backend.app:serve_app", True)], targets
from backend.app import serve_app
before = gc.get_freeze_count()
served = serve_app()
started, torch_at_start = gc.get_freeze_count(), "torch" in sys.modules
png = io.BytesIO()
Image.new("RGB", (64, 64), "blue").save(png, format="PNG")
with TestClient(served) as client:  # its start: the import begins in the background, no request asks for it
    deadline = time.monotonic() + 120
    while served.state.analysis.analyzer._analyzer is None and time.monotonic() < deadline:
        time.sleep(0.05)
    imported = "torch" in sys.modules
    assert client.get("/saes/%(key)s/features/0").status_code == 200
    frozen = gc.get_freeze_count()
    assert client.post("/api/saes/%(key)s/analyze", files={"file": ("x.png", png.getvalue(), "image/png")}).status_code == 200
print(before, started, torch_at_start, imported, frozen)
"""


def test_the_served_app_imports_torch_after_its_start_and_keeps_what_both_allocated_out_of_collections(web_data, tmp_path):
    """Full collections walking torch's ~280,000 objects paused the server ~120 ms (the list's p99);
    torch is imported in the background once the app serves, and frozen after the next request."""
    settings, key = web_data
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "saes").symlink_to(settings.data_dir / "saes")
    copy_database(settings, data_dir / "clipscope.db")
    env = {**os.environ, "CLIPSCOPE_DATA_DIR": str(data_dir), "CLIPSCOPE_DEVICE": "cpu"}
    out = subprocess.run([sys.executable, "-c", SERVE_FACTORY % {"key": key}], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    before, started, torch_at_start, imported, frozen = out.stdout.split()
    assert before == "0" and int(started) > 10_000, "what start-up left is frozen"
    assert (torch_at_start, imported) == ("False", "True"), "torch is imported after the app is built, without a request asking"
    assert int(frozen) - int(started) > 100_000, "torch and open_clip's objects are frozen after the next request"
