"""The app's analyzer is built once, by the first request that needs a model, and never to be closed."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from backend.services import analyze
from backend.services.lazy_analyzer import LazyAnalyzer


class SlowAnalyzer:
    """Counts how often it is built; building takes long enough for concurrent requests to meet."""

    built = 0

    def __init__(self, data_dir, device):
        SlowAnalyzer.built += 1
        time.sleep(0.2)
        self.data_dir, self.device, self.closed = data_dir, device, False

    def loaded(self):
        return 2

    def close(self):
        self.closed = True


def test_concurrent_first_requests_build_one_analyzer_on_the_device_asked_then(monkeypatch, tmp_path):
    monkeypatch.setattr(analyze, "Analyzer", SlowAnalyzer)
    monkeypatch.setattr(SlowAnalyzer, "built", 0)
    asked = []
    lazy = LazyAnalyzer(tmp_path, lambda: asked.append(threading.get_ident()) or "cpu")
    assert lazy.loaded() == 0 and not asked, "nothing is built, nor the device resolved, before it is needed"
    lazy.close()
    assert SlowAnalyzer.built == 0, "closing an analyzer never needed builds none"
    with ThreadPoolExecutor(8) as pool:
        devices = list(pool.map(lambda _: lazy.device, range(8)))
    assert SlowAnalyzer.built == 1 and len(asked) == 1 and devices == ["cpu"] * 8
    assert lazy.get() is lazy.get() and lazy.data_dir == tmp_path and lazy.loaded() == 2
    lazy.close()
    assert lazy.get().closed
