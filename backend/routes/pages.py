"""HTML pages rendered from frontend/templates (kept out of the OpenAPI schema)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from PIL import ImageOps
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile as StarletteUploadFile

from backend.deps import FeatureOrdersDep, SaeDep, SessionDep, read_sae
from backend.services.concepts import ConceptsUnavailable
from backend.routes.api import (
    analyze_image, analyze_upload, analyze_uploads, answers, coverage_of, dataset_image, dataset_picture, density_of, feature_cofiring, feature_matches, image_name,
    image_of_set, redundancy_of,
)
from backend.auth import auth_enabled, author_for_write, current_user
from backend.security import CsrfForm
from backend.routes.common import ImageId, require_feature, require_ready
from backend.services import labels as label_service
from backend.services.labels import CATEGORIES
from backend.services.firing import rank_features
from backend.services.image_sets import features_of_set
from backend.services.collages import feature_collage
from backend.services.prediction import MAX_CLASS_CHARS, MAX_CLASSES, BadQuestion, dataset_classes, question_for
from backend.services.features import FeatureQuery, feature_detail, random_feature, ranking_of
from backend.services.saes import (
    NotShared, by_set, comparison_columns, evaluation_table, frontier, list_saes, matchable, sae_summary,
    shared_features, training_curve,
)
from clipscope.accounts import authenticate
from clipscope.db.models import SaeStatus
from clipscope.errors import ClipScopeError
from clipscope.feature_edits import EDIT_SYNTAX, MAX_EDITS
from clipscope.thumbnails import png_data_uri

router = APIRouter(include_in_schema=False)


def render(request: Request, template: str, status_code: int = 200, headers: dict | None = None, **context) -> HTMLResponse:
    return request.app.state.templates.TemplateResponse(request, template, context, status_code=status_code, headers=headers)


@router.get("/healthz")
def healthz(session: SessionDep) -> dict[str, str]:
    from sqlalchemy import text

    session.execute(text("SELECT 1"))
    return {"status": "ok"}


@router.get("/docs", response_class=HTMLResponse)
def api_docs(request: Request):
    """The JSON API's interactive description (Swagger UI over ``/openapi.json``), from vendored files only."""
    globals_ = request.app.state.templates.env.globals
    static, folder = globals_["static"], globals_["swagger_ui"]
    return get_swagger_ui_html(
        openapi_url=request.app.openapi_url, title=f"{request.app.title} API",
        swagger_js_url=static(f"{folder}/swagger-ui-bundle.js"), swagger_css_url=static(f"{folder}/swagger-ui.css"),
        swagger_favicon_url=static(f"{folder}/favicon-32x32.png"),
    )


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "/"):
    return render(request, "login.html", next=_safe_next(next), error=None)


@router.post("/login", response_class=HTMLResponse, dependencies=[CsrfForm])
def login(request: Request, session: SessionDep, username: Annotated[str, Form()] = "", password: Annotated[str, Form()] = "",
          next: Annotated[str, Form()] = "/"):
    if not auth_enabled(request):
        raise HTTPException(404, "Authentication is off (CLIPSCOPE_AUTH=none).")
    if not authenticate(session, username.strip(), password):
        return render(request, "login.html", status_code=401, next=_safe_next(next), error="Unknown user or wrong password.")
    request.session.clear()
    request.session["user"] = username.strip()
    return RedirectResponse(_safe_next(next), status_code=303)


@router.post("/logout", dependencies=[CsrfForm])
def logout(request: Request):
    if "session" in request.scope:
        request.session.clear()
    return RedirectResponse("/", status_code=303)


def _safe_next(target: str) -> str:
    """Only same-site paths: never redirect a login to another host."""
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/"


@router.get("/", response_class=HTMLResponse)
def overview(request: Request, session: SessionDep):
    saes = []
    for s in list_saes(session):
        evaluations = evaluation_table(session, s.id)
        saes.append({**sae_summary(s), "curve": training_curve(session, s.id), "evaluations": evaluations, "drops": by_set(evaluations, "drop_pp"),
                     "recovered": by_set(evaluations, "loss_recovered"),
                     "density": density_of(request, session, s), "redundancy": redundancy_of(request, session, s),
                     "shared": shared_features(session, s), "labels": request.app.state.label_summaries.of(session, s) if s.status == SaeStatus.READY else None})
    return render(request, "overview.html", saes=saes, compare_sets=comparison_columns(saes), frontier=frontier(saes))


@router.get("/favicon.ico")
def favicon(request: Request):
    """The icon the pages link to, also where a browser asks for it unasked (a JSON response viewed in a tab)."""
    return RedirectResponse(request.app.state.templates.env.globals["static"]("favicon.svg"), status_code=301)


@router.get("/saes/{sae}")
def sae_page(sae: SaeDep):
    """An SAE's own address: its card on the overview (recipe, metrics, curves, labels), ready or not."""
    return RedirectResponse(f"/#sae-{sae.key}", status_code=303)


@router.get("/saes/{sae}/features", response_class=HTMLResponse)
async def features_page(request: Request, sae: str, orders: FeatureOrdersDep, query: Annotated[FeatureQuery, Query()]):
    def work(session, sae):
        require_ready(sae)
        asked, errors = query, []
        if mistake := query.frequency_mistake():  # the list without the range, and why; the form keeps what was typed
            asked, errors = asked.model_copy(update={"min_freq": None, "max_freq": None}), [f"{mistake} The list is shown without it."]
        if mistake := query.ranking_mistake():
            asked, errors = asked.model_copy(update={"matched_in": ""}), [*errors, f"{mistake} The list is ranked by the concept."]
        try:
            ranking = ranking_of(request.app.state.concepts, session, sae, asked)
        except (ConceptsUnavailable, NotShared) as exc:  # the list without that ranking, and why
            asked, ranking = asked.model_copy(update={"concept": "", "matched_in": ""}), None
            errors.append(str(exc))
        rows, shown, total = request.app.state.list_rows.page(session, sae, asked, orders, ranking)
        pages = max(1, -(-total // query.per_page))
        params = query.model_dump(exclude_defaults=True, exclude={"page"})
        return render(request, "features.html", sae=sae_summary(sae), rows=rows, shown=shown, total=total, query=query, pages=pages,
                      params=params, categories=CATEGORIES, error=" ".join(errors), ranked_by=asked.concept, matched_in=asked.matched_in,
                      matchable=matchable(session, sae), csv_params=asked.model_dump(exclude_defaults=True, exclude={"page", "per_page"}))

    return await read_sae(request, sae, work, threaded=bool(query.concept))  # encoding the text is CLIP's work


@router.get("/saes/{sae}/classes", response_class=HTMLResponse)
def classes_page(request: Request, sae: SaeDep, session: SessionDep):
    """Which classes of the precompute set the SAE's live features lead, and which none leads."""
    require_ready(sae)
    return render(request, "classes.html", sae=sae_summary(sae), coverage=coverage_of(request, session, sae))


@router.get("/saes/{sae}/features/next-to-label")
def next_to_label(request: Request, sae: SaeDep, session: SessionDep):
    """The first live feature of the sample order without a label; the SAE's overview card once there is none."""
    require_ready(sae)
    nxt = request.app.state.label_summaries.of(session, sae)["sample"]["next"]
    return RedirectResponse(f"/saes/{sae.key}/features/{nxt}" if nxt is not None else f"/#sae-{sae.key}", status_code=303)


@router.get("/saes/{sae}/features/random")
async def random_page(request: Request, sae: str, orders: FeatureOrdersDep):
    def work(session, sae):
        require_ready(sae)
        return RedirectResponse(f"/saes/{sae.key}/features/{random_feature(session, sae, orders)}", status_code=303)

    return await read_sae(request, sae, work)


@router.get("/saes/{sae}/features/go")
def go_to_feature(sae: SaeDep, idx: int = Query(..., description="A feature's index, as the header's box takes it.")):
    """The header's "go to feature" box: to that feature's page; a number out of range is the page's 404 here."""
    require_ready(sae)
    require_feature(sae, idx)
    return RedirectResponse(f"/saes/{sae.key}/features/{idx}", status_code=303)


def _feature_page(request: Request, sae, session, idx: int, status_code: int = 200, **extra):
    require_ready(sae)
    require_feature(sae, idx)
    detail = feature_detail(session, sae, idx)
    if detail is None:
        raise HTTPException(404, f"Feature {idx} has no precomputed data.")
    detail["supports"] = request.app.state.classes_supported.of(session, sae, idx)
    history = label_service.history(session, sae, idx) if detail["label"] else []  # revisions exist only with a label
    return render(request, "feature.html", status_code=status_code, sae=sae_summary(sae), f=detail,
                  history=history, categories=CATEGORIES, **extra)


@router.get("/saes/{sae}/features/{idx}", response_class=HTMLResponse)
async def feature_page(request: Request, sae: str, idx: int):
    return await read_sae(request, sae, lambda session, sae: _feature_page(request, sae, session, idx))


@router.get("/saes/{sae}/features/{idx}/matches", response_class=HTMLResponse)
def feature_matches_fragment(request: Request, sae: SaeDep, idx: int, session: SessionDep):
    """The feature page's "in other SAEs at this site" section, loaded after the page (reading another
    SAE's atoms the first time takes a moment); empty when there is no other such SAE."""
    return render(request, "_matches.html", sae=sae_summary(sae), matches=feature_matches(request, sae, idx, session))


@router.get("/saes/{sae}/features/{idx}/cofiring", response_class=HTMLResponse)
def feature_cofiring_fragment(request: Request, sae: SaeDep, idx: int, session: SessionDep):
    """The feature page's "fires together with" section, loaded after the page (the first request for an
    SAE encodes its precompute images); the reason in place of the list when this server cannot tell."""
    try:
        found, error = feature_cofiring(request, sae, idx, session), None
    except HTTPException as exc:
        found, error = None, exc.detail
    return render(request, "_cofiring.html", sae=sae_summary(sae), f={"index": idx}, found=found, error=error)


@router.post("/saes/{sae}/features/{idx}/label", response_class=HTMLResponse, dependencies=[CsrfForm])
def save_label_form(
    request: Request, sae: SaeDep, idx: int, session: SessionDep,
    text: Annotated[str, Form()] = "", category: Annotated[str, Form()] = "",
    author: Annotated[str, Form()] = "", base_revision: Annotated[int, Form()] = 0,
):
    require_feature(sae, idx)
    if auth_enabled(request) and current_user(request) is None:
        return RedirectResponse(f"/login?next=/saes/{sae.key}/features/{idx}", status_code=303)
    author = author_for_write(request, author)
    try:
        label_service.save_label(session, sae, idx, text, category, author, base_revision)
    except label_service.LabelConflict as conflict:
        session.rollback()
        return _feature_page(request, sae, session, idx, status_code=409, conflict=conflict)
    except label_service.LabelError as exc:
        session.rollback()
        draft = {"text": text, "category": category, "author": author, "base_revision": base_revision}
        return _feature_page(request, sae, session, idx, status_code=400, error=str(exc), draft=draft)
    return RedirectResponse(f"/saes/{sae.key}/features/{idx}?saved=1", status_code=303)


@router.get("/saes/{sae}/features/{idx}/collage.png")
def collage(
    request: Request, sae: SaeDep, idx: int, session: SessionDep,
    veil: bool = Query(True, description="Veil each image where the feature does not fire (SAEs over patch tokens)."),
):
    require_ready(sae)
    require_feature(sae, idx)
    detail = feature_detail(session, sae, idx)
    if detail is None or not detail["top"]:
        raise HTTPException(404, f"Feature {idx} has no top examples.")
    try:
        path = feature_collage(request.app.state.settings.data_dir, sae, detail, veil)
    except ClipScopeError as exc:
        raise HTTPException(503, str(exc)) from None
    return FileResponse(path, media_type="image/png", filename=f"{sae.key}-feature-{idx}.png")


@router.get("/saes/{sae}/images/{image_id}", response_class=HTMLResponse)
def dataset_image_page(request: Request, sae: SaeDep, image_id: ImageId, session: SessionDep):
    """An image of the precompute set: where it is an example, and every feature it fires."""
    return render(request, "image.html", sae=sae_summary(sae), **dataset_image(request, sae, image_id, session))


@router.get("/saes/{sae}/analyze", response_class=HTMLResponse)
def analyze_form(request: Request, sae: SaeDep, session: SessionDep, edits: str = Query("", max_length=MAX_EDITS * 32),
                 image: int | None = Query(None, ge=1, le=2**31 - 1)):
    """The upload form; ``edits`` fills its edits field (a feature page's "steer an image with it"), ``image``
    offers an image of the precompute set instead of an upload (an image page's "analyse it")."""
    require_ready(sae)
    return render(request, "analyze.html", sae=sae_summary(sae), result=None, asked=_asked(sae, edits=edits),
                  image=_set_image(request, session, sae, image))


SET_LIMITS = (30, 100, 300)
"""How many of a set's features its page may show (the form's choices; the first is the default)."""


def _set_page(request: Request, sae, status_code: int = 200, headers: dict | None = None, limit: int = SET_LIMITS[0], **context):
    return render(request, "analyze_set.html", status_code=status_code, headers=headers, sae=sae_summary(sae), limit=limit,
                  limits=SET_LIMITS, **context)


@router.get("/saes/{sae}/analyze-set", response_class=HTMLResponse)
def analyze_set_form(request: Request, sae: SaeDep):
    """The form of "which features do these images share"."""
    require_ready(sae)
    return _set_page(request, sae, result=None)


@router.post("/saes/{sae}/analyze-set", response_class=HTMLResponse, dependencies=[CsrfForm])
async def analyze_set_page(request: Request, sae: SaeDep, session: SessionDep):
    """The features a set of uploads shares (``features_of_set``), beside each image as CLIP saw it. The form
    is read as it comes: a browser that sends no file sends a part without one, which is no error of typing."""
    require_ready(sae)
    form = await request.form()
    files, without = ([f for f in form.getlist(name) if isinstance(f, StarletteUploadFile) and f.filename] for name in ("files", "without"))
    limit = next((n for n in SET_LIMITS if form.get("limit") == str(n)), SET_LIMITS[0])
    try:
        firings, against = await analyze_uploads(request, sae, files, without)
    except HTTPException as exc:
        return _set_page(request, sae, exc.status_code, exc.headers, limit, result=None, error=exc.detail)
    views = [[{"name": f.filename, "src": png_data_uri(ImageOps.contain(a.model_view, (96, 96)))} for f, a in zip(uploads, analyses)]
             for uploads, analyses in ((files, firings), (without, against))]
    return _set_page(request, sae, limit=limit, result=features_of_set(session, sae, firings, against, limit=limit), views=views)


def _set_image(request: Request, session, sae, image_id: int | None) -> dict | None:
    """``{id, name}`` of an image of the SAE's precompute set for the form to offer (404 if it is none)."""
    if image_id is None:
        return None
    image = image_of_set(request, session, sae, image_id)
    return {"id": image.id, "name": image_name(image)}


def _asked(sae, occlude: bool = False, explain: bool = False, classes: str = "", target: str = "", contrast: str = "", edits: str = "") -> dict:
    """What the form was filled with (kept on the page it answers), and the dataset's classes it offers."""
    return {"occlude": occlude, "explain": explain, "classes": classes, "target": target, "contrast": contrast, "edits": edits,
            "dataset_classes": len(dataset_classes(sae)), "edit_syntax": EDIT_SYNTAX}


@router.post("/saes/{sae}/analyze", response_class=HTMLResponse, dependencies=[CsrfForm])
async def analyze_page(request: Request, sae: SaeDep, session: SessionDep, file: UploadFile | None = File(None), upload: str = Form("", max_length=64),
                       occlude: bool = Form(False), explain: bool = Form(False),
                       classes: str = Form("", max_length=MAX_CLASSES * (MAX_CLASS_CHARS + 2)),
                       target: str = Form("", max_length=MAX_CLASS_CHARS), contrast: str = Form("", max_length=MAX_CLASS_CHARS),
                       edits: str = Form("", max_length=MAX_EDITS * 32), image: int | None = Form(None, ge=1, le=2**31 - 1)):
    """Analyze the chosen image; with none chosen, the one this page showed last (``upload``: its token) or
    else the image of the precompute set it offered (``image``)."""
    require_ready(sae)
    asked = _asked(sae, occlude, explain, classes, target, contrast, edits)
    kept = request.app.state.kept_uploads
    chosen = file is not None and bool(file.filename)  # a form with no file chosen sends an empty, unnamed part
    again = None if chosen else kept.find(sae.key, upload)
    offered = {"id": image, "name": f"image {image} of the set"} if image is not None and not chosen and again is None else None

    def fail(status: int, error: str, headers: dict | None = None) -> HTMLResponse:  # the form keeps what was asked, and the kept image
        return render(request, "analyze.html", status_code=status, headers=headers, sae=sae_summary(sae), result=None, error=error,
                      asked=asked, upload=upload if again else "", filename=again.filename if again else None, image=offered)

    if not chosen and again is None and offered is None:
        return fail(422, "Choose an image to analyze." if not upload else
                    f"The image analysed before is no longer kept (this server keeps the last {request.app.state.settings.analyze_kept}); choose it again.")
    try:
        question = question_for(sae, explain, edits, classes, target, contrast)
        if again is not None:
            analysis = await analyze_image(request, sae, again.view, occlude, question)
        elif offered is not None:
            picture, offered["name"] = await run_in_threadpool(dataset_picture, request, session, sae, image)
            analysis = await analyze_image(request, sae, picture, occlude, question)
        else:
            analysis = await analyze_upload(request, sae, file, occlude, question)
    except BadQuestion as exc:
        return fail(422, str(exc))
    except HTTPException as exc:
        return fail(exc.status_code, exc.detail, exc.headers)
    filename = again.filename if again is not None else offered["name"] if offered is not None else file.filename
    result = {**rank_features(session, sae, analysis), **answers(session, sae, question, analysis)}
    view = analysis.model_view
    return render(request, "analyze.html", sae=sae_summary(sae), result=result, filename=filename, asked=asked,
                  upload=upload if again is not None else kept.keep(sae.key, filename, view),
                  model_view={"src": png_data_uri(view), "width": view.width, "height": view.height})