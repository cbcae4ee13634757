"""Every page and API answer of the explorer at the serving benchmark's scale (``bench/serve.py``'s database:
49,152 features x 12 examples over 5,000 images, a second SAE at the same site), on SQLite or PostgreSQL:
the first request and the median of the next ones, sequential, each against a static file of the same size
served by the same server. ``serve.py`` loads the two pages a researcher reads most; this one looks for the
answer that reads a whole SAE on every view.

The server is a real ``clipscope serve`` process on loopback. The first request of a kind pays for what is
kept after it (an ordering, a decoder read from disk, the firing table); "then" is what every later view costs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scratch import scratch_dir  # noqa: E402
from serve import build_database, running_server  # noqa: E402


def answers(key: str) -> list[str]:
    """One address of every kind of page and API answer that reads the database (forms and uploads aside)."""
    s, api = f"/saes/{key}", f"/api/saes/{key}"
    lists = ["", "?sort=frequency&order=desc&page=300", "?sort=max&order=desc", "?sort=label", "?sort=class_share&order=desc",
             "?sort=coherence&order=desc", "?sort=sample", "?q=red", "?top_class=class+3", "?auto_name=stripes", "?dead=only",
             "?min_freq=0.01&max_freq=0.2", "?concept=a+red+circle", "?matched_in=bench-other"]
    return [
        "/", s, f"{s}/classes", *(f"{s}/features{q}" for q in lists),
        f"{s}/features/random", f"{s}/features/next-to-label", f"{s}/features/123", f"{s}/features/123/cofiring",
        f"{s}/features/123/matches", f"{s}/features/123/collage.png", f"{s}/images/17", f"{s}/analyze", f"{s}/analyze?image=17",
        f"{s}/analyze-set", "/api/saes", api, f"{api}/features", f"{api}/features.csv", f"{api}/features/123", f"{api}/features/123/labels",
        f"{api}/labels.jsonl", f"{api}/labels.csv", f"{api}/labels/summary", f"{api}/classes", f"{api}/images/17", "/docs", "/openapi.json",
    ]


def timed(client: httpx.Client, url: str) -> tuple[float, httpx.Response]:
    t = time.perf_counter()
    response = client.get(url)
    return time.perf_counter() - t, response


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--d-sae", type=int, default=49_152)
    parser.add_argument("--repeats", type=int, default=5, help="requests after the first, per address")
    parser.add_argument("--postgresql", metavar="URL", help="an empty PostgreSQL database to build the benchmark's rows in instead of SQLite")
    a = parser.parse_args()
    data_dir = scratch_dir("clipscope-bench-pages-") / "data"
    data_dir.mkdir(parents=True)
    t = time.perf_counter()
    key = build_database(data_dir, a.d_sae, 500, 5000, url=a.postgresql)
    build_s = time.perf_counter() - t
    rows = {}
    with running_server(data_dir, a.postgresql) as (_, base), httpx.Client(base_url=base, timeout=120, headers={"accept": "text/html"}) as client:
        for url in answers(key):
            first, response = timed(client, url)
            assert response.status_code in (200, 303), (url, response.status_code, response.text[:300])
            then = statistics.median(timed(client, url)[0] for _ in range(a.repeats))
            static = data_dir / "thumbnails" / f"static-{len(response.content)}.bin"
            static.write_bytes(b"x" * len(response.content))
            client.get(f"/thumbnails/{static.name}")
            floor = statistics.median(timed(client, f"/thumbnails/{static.name}")[0] for _ in range(a.repeats))
            rows[url] = {"status": response.status_code, "bytes": len(response.content), "first_ms": round(1000 * first, 1),
                         "then_ms": round(1000 * then, 2), "static_ms": round(1000 * floor, 2), "then_over_static": round(then / floor, 1)}
            print(f"{rows[url]['then_ms']:9.2f} ms  first {rows[url]['first_ms']:8.1f} ms  {rows[url]['then_over_static']:7.1f}x static  {url}", file=sys.stderr)
    slowest = sorted(rows, key=lambda u: -rows[u]["then_ms"])[:5]
    print(json.dumps({
        "setup": f"{a.d_sae} features x 12 examples in {'PostgreSQL' if a.postgresql else 'SQLite'} (built in {build_s:.0f} s), one uvicorn worker, "
                 f"sequential requests, first + median of {a.repeats}",
        "answers": rows,
        "slowest_after_the_first": {u: rows[u]["then_ms"] for u in slowest},
    }, indent=2))


if __name__ == "__main__":
    main()
