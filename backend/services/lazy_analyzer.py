"""The app's analyzer, built by the first request that needs a model.

Building it imports torch and open_clip (about 4 s and 0.6 GB on 2 CPU cores), so the explorer
answers about a second after its start, and a server that is only browsed never holds them. What
needs a model (an upload, a co-firing table, an image of the set, a concept search) builds it, once.
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

    def get(self) -> Analyzer:
        """The analyzer, built on the first call (the others wait for it)."""
        with self._lock:
            if self._analyzer is None:
                from backend.services.analyze import Analyzer

                self._analyzer = Analyzer(self.data_dir, self._device())
            return self._analyzer

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
