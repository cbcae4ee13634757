"""Files whose URL names their content, served so that browsers keep them instead of asking again.

Thumbnails are named by the hash of their image; the frontend's static files are linked with the
hash of their bytes (``static_url``). A URL's content therefore never changes, and a browser that
has it does not revalidate it: a feature list shows 300 thumbnails, and every revisit would
otherwise cost 300 conditional requests.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from starlette.staticfiles import StaticFiles

IMMUTABLE = "public, max-age=31536000, immutable"


class ImmutableFiles(StaticFiles):
    """``StaticFiles`` whose responses (200 and 304 alike) carry ``Cache-Control: immutable``, one year."""

    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers["cache-control"] = IMMUTABLE
        return response


@lru_cache(maxsize=None)
def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


@lru_cache(maxsize=None)
def static_url(root: Path, name: str) -> str:
    """``/static/<name>?v=<hash of its bytes>``: a new URL whenever the file changes (read once per process)."""
    return f"/static/{name}?v={_digest(root / name)}"
