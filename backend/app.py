"""The application factory: ``create_app(settings)`` builds a configured FastAPI app (tests build their own)."""

from __future__ import annotations

import gc
import sys
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import jinja2

from fastapi import FastAPI
from fastapi.templating import Jinja2Templates

import clipscope
from starlette.middleware.sessions import SessionMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from backend import charts, errors
from backend.assets import ImmutableFiles, static_url
from backend.auth import SESSION_COOKIE, LoginGate, current_user
from backend.deps import SaeRows
from backend.figures import figures, label_badge
from backend.security import CSRF_FIELD, CsrfMiddleware
from backend.services.analysis_pool import AnalysisPool
from backend.services.kept_uploads import KeptUploads
from backend.services.label_sample import LabelSummaries
from backend.services.cofiring import CoFiring
from backend.services.dataset_images import DatasetImages
from backend.services.matches import Matches
from backend.services.recently_used import RecentlyUsed
from backend.services.feature_order import FeatureOrders
from backend.services.list_rows import ListRows
from backend.services.class_support import ClassesSupported
from backend.services.lazy_analyzer import LazyAnalyzer
from backend.services.concepts import ConceptSearch
from backend.services.labels import CATEGORY_NAMES
from clipscope.db import migrate
from clipscope.settings import Settings, get_settings
from clipscope.veils import occlusion_veil_data_uri, veil_data_uri

FRONTEND = Path(__file__).resolve().parents[1] / "frontend"
HTMX = "vendor/htmx-2.0.11.min.js"
SWAGGER_UI = "vendor/swagger-ui-5.35.0"
"""Swagger UI's files for ``/docs``, vendored like htmx: the API's page works offline (FastAPI's default loads them from a CDN)."""


@asynccontextmanager
async def _lifespan(app: FastAPI):
    """Once the app serves, torch and open_clip are imported in the background (``LazyAnalyzer.prepare``:
    the pages answer meanwhile, and the first co-firing table or upload finds them imported). At
    shutdown a build of the feature list's kept rows is waited for, the analysis worker ends and the loaded models go with it (a test process builds many
    apps: each one's CLIP would otherwise stay in memory until the process ends)."""
    app.state.analysis.analyzer.prepare()
    yield
    app.state.list_rows.wait(timeout=30)
    app.state.analysis.close()


def create_app(settings: Settings | None = None, check_schema: bool = True) -> FastAPI:
    """Build the app. The database must already be migrated (``clipscope db upgrade``): the web never migrates."""
    settings = settings or get_settings()
    url = settings.resolved_database_url
    if check_schema:
        migrate.require_current(url)
    app = FastAPI(
        max_body_size=settings.max_upload_bytes + 64 * 1024,  # multipart overhead; 413 before reading past it
        title="ClipScope",
        version=clipscope.__version__,
        description="Sparse-autoencoder features of CLIP ViT-B/32: SAEs, features, labels and live analysis.",
        docs_url=None,  # served by backend/routes/pages.py from the vendored Swagger UI
        redoc_url=None,
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.state.database_url = url
    app.state.feature_orders = FeatureOrders()
    app.state.list_rows = ListRows(url)
    app.state.classes_supported = ClassesSupported()
    app.state.sae_rows = SaeRows()
    app.state.reads_in_event_loop = settings.resolved_reads_in_event_loop  # decided once, not per request
    if settings.device != "auto":
        settings.resolved_device()  # a GPU asked for must be there at the start, not at the first upload
    analyzer = LazyAnalyzer(settings.data_dir, settings.resolved_device)  # torch: imported once the app serves (_lifespan)
    app.state.analysis = AnalysisPool(analyzer, settings.analyze_queue, settings.analyze_batch)
    app.state.concepts = ConceptSearch(analyzer, settings.data_dir)  # shares the loaded CLIP
    app.state.kept_uploads = KeptUploads(settings.analyze_kept)
    app.state.matches = Matches(settings.data_dir)
    app.state.cofiring = CoFiring(settings.data_dir, analyzer)
    app.state.dataset_images = DatasetImages(settings.data_dir, analyzer)  # encodes with the analysis' SAE
    app.state.label_summaries = LabelSummaries()
    app.state.diagnostics = RecentlyUsed(48)  # per SAE row version: backend/routes/api.py:density_of, redundancy_of, coverage_of
    # Templates ship with the code: no modification-time check of three files on every render.
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(FRONTEND / "templates"), autoescape=jinja2.select_autoescape(), auto_reload=False)
    templates = Jinja2Templates(env=env)
    templates.env.globals.update(
        version=clipscope.__version__, static=partial(static_url, FRONTEND / "static"), htmx=HTMX, swagger_ui=SWAGGER_UI, csrf_field=CSRF_FIELD, current_user=current_user, auth=settings.auth, line_chart=charts.line_chart, histogram=charts.histogram, scatter=charts.scatter, category_names=CATEGORY_NAMES,
        veil=veil_data_uri, occlusion_veil=occlusion_veil_data_uri, figures=figures, label_badge=label_badge,
    )
    app.state.templates = templates
    errors.install(app)
    if settings.auth == "password":
        if settings.browse == "closed":
            app.add_middleware(LoginGate)
        app.add_middleware(
            SessionMiddleware, secret_key=settings.resolved_secret_key(), session_cookie=SESSION_COOKIE,
            same_site="lax", https_only=False, max_age=14 * 24 * 3600,
        )
    app.add_middleware(CsrfMiddleware)  # outermost: refuses cross-site writes before anything else runs
    app.mount("/static", ImmutableFiles(directory=str(FRONTEND / "static")), name="static")
    thumbs = Path(settings.data_dir) / "thumbnails"
    thumbs.mkdir(parents=True, exist_ok=True)
    app.mount("/thumbnails", ImmutableFiles(directory=str(thumbs)), name="thumbnails")

    from backend.routes import api, pages

    app.include_router(api.router)
    app.include_router(pages.router)
    return app


class FreezeAfterImports:
    """After a request in whose time modules were imported, one full collection, then ``gc.freeze()``.

    torch and open_clip, imported once the app serves (``_lifespan``), leave ~200,000 objects that
    live as long as the server; frozen like what start-up left, full collections do not walk them
    either. Modules still being imported when a request ends are frozen after a later one."""

    def __init__(self, app: ASGIApp):
        self.app, self.modules = app, len(sys.modules)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)
        if scope["type"] != "lifespan" and len(sys.modules) != self.modules:
            self.modules = len(sys.modules)
            gc.collect()  # the garbage of requests so far, not frozen with the rest
            gc.freeze()


def serve_app() -> FastAPI:
    """The factory ``clipscope serve`` gives uvicorn: ``create_app()``, then ``gc.freeze()``, again
    once torch is in (:class:`FreezeAfterImports`).

    Start-up leaves objects alive for good (the app and its libraries, then torch and open_clip:
    ~280,000 in all), and every full collection of the garbage collector would walk them
    all: a ~120 ms pause of the whole server every few seconds under load, the feature list's p99.
    Frozen, they are left out of collections, which then walk only what requests allocate
    (docs/benchmarks.md, Serving).
    """
    app = create_app()
    app.add_middleware(FreezeAfterImports)
    gc.freeze()
    return app
