"""The app's analyzer, built in the background once the app serves, or by the first request that
needs it, whichever comes first.

Building it imports torch and open_clip (about 3.5 s and 0.7 GB on 2 CPU cores): importing them
before the app serves made the explorer's first answer wait for them. What needs a model (an upload,
a co-firing table, an image of the set, a concept search) waits for the rest of the build, once.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from backend.services.analyze import Analyzer


class LazyAnalyzer:
    """Stands for :class:`~backend.services.analyze.Analyzer`: any of its attributes builds it first.

    ``device`` gives the torch device when the analyzer is built (``Settings.resolved_device``: for
    'auto' it asks torch whether a GPU is there)."""

    def __init__(self, data_dir: Path, device: Callable[[], str]):
        self.data_dir, self._device = Path(data_dir), device
        self._analyzer: Analyzer | None = None
        self._lock = threading.Lock()
        self._preparing = False

    def get(self) -> Analyzer:
        """The analyzer, built on the first call (the others wait for it)."""
        with self._lock:
            if self._analyzer is None:
                from backend.services.analyze import Analyzer

                self._analyzer = Analyzer(self.data_dir, self._device())
            return self._analyzer

    def prepare(self) -> None:
        """Build the analyzer in a background thread, unless it is built or being built."""
        if self._analyzer is None and not self._preparing:
            self._preparing = True  # two racing calls start two threads at worst: get() builds once
            threading.Thread(target=self._build_quietly, name="clipscope-analyzer", daemon=True).start()

    def _build_quietly(self) -> None:
        try:
            self.get()
        except Exception:  # the request that needs the analyzer builds it again, and reports why
            pass

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # not the analyzer's interface (and never recurses before __init__ ran)
            raise AttributeError(name)
        return getattr(self.get(), name)

    def loaded(self) -> int:
        """How many models are in memory (none before the analyzer is built)."""
        return self._analyzer.loaded() if self._analyzer is not None else 0

    def close(self) -> None:
        """Let go of every loaded model (the app's shutdown); nothing to do if none was ever needed."""
        if self._analyzer is not None:
            self._analyzer.close()
