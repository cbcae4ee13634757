"""The activation cache an SAE's precompute read, which the server needs for what the database does not
hold (which features fire on which image); a server given only the database says what to copy."""

from __future__ import annotations

from pathlib import Path

from clipscope.activation_cache import ActivationCache
from clipscope.db.models import Sae
from clipscope.errors import ClipScopeError


def open_precompute_cache(data_dir: Path, sae: Sae) -> ActivationCache:
    """Raises ClipScopeError, naming the folder and the way out, when this server lacks it."""
    name = (sae.precompute or {}).get("cache")
    path = Path(data_dir) / "activations" / str(name)
    if not name or not (path / "metadata.json").is_file():
        raise ClipScopeError(f"its precompute's activation cache is not on this server ({path}): copy the data dir's "
                             "activations/ folder with the database, or run `clipscope precompute` here.")
    return ActivationCache.open(path)
