"""The JSON API under /api (described by /openapi.json)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Callable, Literal, TypeVar

from fastapi import APIRouter, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from PIL import Image
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from backend.auth import author_for_write
from backend.deps import FeatureOrdersDep, SaeDep, SessionDep, read_sae
from backend.services.concepts import ConceptsUnavailable
from backend.routes.common import ImageId, require_feature, require_ready
from backend.services import labels as label_service
from backend.services.analysis_pool import AnalysisInterrupted, PoolClosed, PoolFull
from backend.services.firing import Analysis, rank_features
from backend.services.prediction import (
    MAX_CLASS_CHARS, MAX_CLASSES, MAX_MEASURED, MEASURED, BadQuestion, Question, prediction_dict, question_for, steering_dict,
)
from backend.uploads import BadUpload, decode_upload
from clipscope.errors import ClipScopeError
from clipscope.feature_edits import EDIT_SYNTAX, MAX_EDITS
from backend.services.classes import class_coverage
from backend.services.csv_export import csv_text
from backend.services.dataset_images import NotInSet
from backend.services.image_sets import features_of_set
from backend.services.features import FeatureFilter, FeatureQuery, feature_detail, feature_table, list_features, ranking_of, table_fields
from backend.services.feature_order import Ranking
from backend.services.saes import (
    NotShared, decoder_redundancy, evaluation_table, feature_density, list_saes, sae_summary, shared_features, training_curve,
)

T = TypeVar("T")

router = APIRouter(prefix="/api", tags=["api"])
MAX_IMPORT = 20 * 1024 * 1024


class CSVResponse(PlainTextResponse):
    media_type = "text/csv"


class NDJSONResponse(PlainTextResponse):
    media_type = "application/x-ndjson"


def download(response_class: type[PlainTextResponse], body: str, filename: str) -> PlainTextResponse:
    """An export, named for saving: its media type is the one /openapi.json documents for the route."""
    return response_class(body, headers={"Content-Disposition": f'attachment; filename="{filename}"'})


class LabelIn(BaseModel):
    text: str = Field(..., max_length=label_service.MAX_TEXT, description="What the feature responds to.")
    category: Literal["semantic", "visual", "noise", "unclear"] = Field(..., description="Kind of feature.")
    author: str = Field(..., max_length=128, description="Who labels.")
    base_revision: int = Field(0, ge=0, le=1_000_000_000, description="Revision the editor started from (0 = unlabelled); a stale one is a conflict.")


@router.get("/saes", summary="All SAEs with their metrics")
def api_saes(session: SessionDep) -> list[dict[str, Any]]:
    return [sae_summary(s) for s in list_saes(session)]


@router.get("/saes/{sae}", summary="One SAE with its training curve, evaluation table, feature density, dictionary redundancy "
            "and the features other SAEs at its hook site share")
def api_sae(request: Request, sae: SaeDep, session: SessionDep) -> dict[str, Any]:
    return {**sae_summary(sae), "curve": training_curve(session, sae.id), "evaluations": evaluation_table(session, sae.id),
            "density": density_of(request, session, sae), "redundancy": redundancy_of(request, session, sae),
            "shared": shared_features(session, sae)}


def density_of(request: Request, session, sae) -> dict[str, Any] | None:
    """:func:`feature_density`, kept per process for each version of the SAE row (a read of every feature's frequency)."""
    return request.app.state.diagnostics.get(("density", sae.key, sae.updated_at), lambda: feature_density(session, sae))


def redundancy_of(request: Request, session, sae) -> dict[str, Any] | None:
    """:func:`decoder_redundancy`, kept like :func:`density_of` (a read of every live feature's neighbours)."""
    return request.app.state.diagnostics.get(("redundancy", sae.key, sae.updated_at), lambda: decoder_redundancy(session, sae))


def coverage_of(request: Request, session, sae) -> dict[str, Any]:
    """:func:`class_coverage`, kept like :func:`density_of` (a read of every live feature's leading class: 0.2-0.3 s at 49,152)."""
    return request.app.state.diagnostics.get(("classes", sae.key, sae.updated_at), lambda: class_coverage(session, sae))


def invalid_query(field: str, message: str, value: Any) -> RequestValidationError:
    """A 422 of the documented shape, as FastAPI's own, naming the query field at fault."""
    return RequestValidationError([{"type": "value_error", "loc": ("query", field), "msg": message, "input": value}])


def _ranking(request: Request, session, sae, query: FeatureFilter) -> Ranking | None:
    """:func:`ranking_of`; 409 when this SAE cannot be searched by concept, 422 when the pair named is not measured."""
    try:
        return ranking_of(request.app.state.concepts, session, sae, query)
    except ConceptsUnavailable as exc:
        raise HTTPException(409, str(exc)) from None
    except NotShared as exc:
        raise invalid_query("matched_in", str(exc), query.matched_in) from None


def _refuse_mistakes(query: FeatureFilter) -> None:
    """A frequency range no feature can fall in, or two rankings at once, is a 422."""
    if mistake := query.frequency_mistake():
        raise invalid_query("min_freq", mistake, query.min_freq)
    if mistake := query.ranking_mistake():
        raise invalid_query("matched_in", mistake, query.matched_in)


@router.get("/saes/{sae}/features", summary="A page of features, sorted and filtered")
async def api_features(request: Request, sae: str, orders: FeatureOrdersDep, query: Annotated[FeatureQuery, Query()]) -> dict[str, Any]:
    _refuse_mistakes(query)

    def work(session, sae):
        require_ready(sae)
        rows, total = list_features(session, sae, query, orders, ranking=_ranking(request, session, sae, query))
        return {"total": total, "page": query.page, "per_page": query.per_page, "features": rows}

    return await read_sae(request, sae, work, threaded=bool(query.concept))  # encoding the text is CLIP's work


@router.get("/saes/{sae}/features.csv", response_class=CSVResponse,
            summary="Every feature the filters select, in their order, as CSV: statistics, current label, concept match or best cosine in another SAE")
async def api_features_csv(request: Request, sae: str, orders: FeatureOrdersDep, query: Annotated[FeatureFilter, Query()]):
    _refuse_mistakes(query)

    def work(session, sae):
        require_ready(sae)
        ranking = _ranking(request, session, sae, query)
        body = csv_text(feature_table(session, sae, query, orders, ranking), table_fields(ranking))
        return download(CSVResponse, body, f"{sae.key}-features.csv")

    return await read_sae(request, sae, work, threaded=True)  # up to every feature of the SAE: off the event loop


@router.get("/saes/{sae}/features/{idx}", summary="Everything about one feature")
async def api_feature(request: Request, sae: str, idx: int) -> dict[str, Any]:
    def work(session, sae):
        require_ready(sae)
        require_feature(sae, idx)
        detail = feature_detail(session, sae, idx)
        if detail is None:
            raise HTTPException(404, f"Feature {idx} has no precomputed data.")
        supports = request.app.state.classes_supported.of(session, sae, idx)
        return {**detail, "supports": supports, "history": label_service.history(session, sae, idx)}

    return await read_sae(request, sae, work)


@router.get("/saes/{sae}/features/{idx}/matches", summary="Its closest features in the other SAEs at the same hook site")
def api_feature_matches(request: Request, sae: SaeDep, idx: int, session: SessionDep,
                        k: int = Query(3, ge=1, le=20, description="How many features per other SAE.")) -> dict[str, Any]:
    """Per other ready SAE of the same CLIP model, weights and block (its atoms live in the same
    residual stream): the ``k`` features whose decoder atoms have the largest cosine with this
    feature's, best first. An SAE whose files this server lacks is listed with ``unavailable``."""
    return {"matches": feature_matches(request, sae, idx, session, k)}


def feature_matches(request: Request, sae, idx: int, session, k: int = 3) -> list[dict[str, Any]]:
    """:meth:`Matches.of` for a page or the API (503 when this SAE's own files are missing)."""
    return _about_feature(sae, idx, lambda: request.app.state.matches.of(session, sae, idx, k), f"This server cannot match SAE {sae.key}'s features")


def _about_feature(sae, idx: int, find: Callable[[], T], cannot: str) -> T:
    """``find()`` for one feature of a ready SAE: 404 for an unknown feature, 503 with ``cannot`` and the
    reason when this server lacks a file it reads."""
    require_ready(sae)
    require_feature(sae, idx)
    try:
        return find()
    except ClipScopeError as exc:
        raise HTTPException(503, f"{cannot}: {exc}") from None


@router.get("/saes/{sae}/features/{idx}/cofiring", summary="The features that fire on the same precompute images")
def api_feature_cofiring(request: Request, sae: SaeDep, idx: int, session: SessionDep,
                         k: int = Query(8, ge=1, le=50, description="How many partners.")) -> dict[str, Any]:
    """The ``k`` features whose sets of precompute images are most alike this feature's (Jaccard:
    images both fire on over images either fires on), each with ``together`` (images both fire on),
    ``of_this`` (the share of this feature's images it fires on) and ``of_that`` (the share of its own
    images this feature fires on). Over the first 10,000 images of the precompute set."""
    return feature_cofiring(request, sae, idx, session, k)


def feature_cofiring(request: Request, sae, idx: int, session, k: int = 8) -> dict[str, Any]:
    """:meth:`CoFiring.of` for a page or the API (503 when the activation cache is not here)."""
    return _about_feature(sae, idx, lambda: request.app.state.cofiring.of(session, sae, idx, k),
                          f"This server cannot tell which features fire with SAE {sae.key}'s")


@router.get("/saes/{sae}/images/{image_id}", summary="An image of the precompute set: the features it fires, and those it is an example of",
            responses={404: {"description": "No such image, or not one of the SAE's precompute set"}})
def api_dataset_image(request: Request, sae: SaeDep, image_id: ImageId, session: SessionDep,
                      limit: int = Query(30, ge=1, le=500, description="How many features each ranking lists.")) -> dict[str, Any]:
    """``image`` (its dataset, split, index, class and thumbnail); ``examples_of``: the features it is a top
    image of (``bucket`` -1, ``rank`` from 0) or an interval sample of; ``ranked``: every feature it fires,
    ranked as an upload's are (``n_active``, ``by_activation``, ``by_relative``), computed from the
    precompute's activation cache, so each activation is the precompute's own. Without that cache on this
    server ``ranked`` is null and ``unavailable`` says why."""
    return dataset_image(request, sae, image_id, session, limit)


def dataset_picture(request: Request, session, sae, image_id: int) -> tuple[Image.Image, str]:
    """An image of the SAE's precompute set, read again from its dataset, and its name: to analyse it as
    an upload (404 for an image not of the set, 503 when this server lacks the dataset's files)."""
    image = image_of_set(request, session, sae, image_id)
    try:
        return request.app.state.dataset_images.pixels(sae, image), image_name(image)
    except ClipScopeError as exc:
        raise HTTPException(503, f"This server cannot read image {image_id}: {exc}") from None


def image_of_set(request: Request, session, sae, image_id: int):
    """The image row of an image of the SAE's precompute set (404 with the reason for any other id)."""
    try:
        return request.app.state.dataset_images.image(session, sae, image_id)
    except NotInSet as exc:
        raise HTTPException(404, str(exc)) from None


def image_name(image) -> str:
    return f"{image.dataset} {image.split} image {image.index}" + (f" ({image.class_name})" if image.class_name else "")


def dataset_image(request: Request, sae, image_id: int, session, limit: int = 30) -> dict[str, Any]:
    """:meth:`DatasetImages.of` for a page or the API (404 for an image not of the SAE's precompute set)."""
    require_ready(sae)
    try:
        return request.app.state.dataset_images.of(session, sae, image_id, limit)
    except NotInSet as exc:
        raise HTTPException(404, str(exc)) from None


@router.get("/saes/{sae}/features/{idx}/labels", summary="Label history, newest first")
def api_label_history(sae: SaeDep, idx: int, session: SessionDep) -> list[dict[str, Any]]:
    require_feature(sae, idx)
    return label_service.history(session, sae, idx)


@router.post("/saes/{sae}/features/{idx}/labels", status_code=201, summary="Save a label (appends a revision)",
             responses={409: {"description": "Someone saved a newer revision: both versions are returned"}})
def api_save_label(request: Request, sae: SaeDep, idx: int, body: LabelIn, session: SessionDep) -> dict[str, Any]:
    require_feature(sae, idx)
    author = author_for_write(request, body.author)
    try:
        rev = label_service.save_label(session, sae, idx, body.text, body.category, author, body.base_revision)
    except label_service.LabelConflict as conflict:
        session.rollback()
        return JSONResponse(status_code=409, content={"detail": "conflict", "current": conflict.current, "proposed": conflict.proposed})
    except label_service.LabelError as exc:
        raise HTTPException(400, str(exc)) from None
    return label_service.revision_dict(rev)


@router.get("/saes/{sae}/labels.jsonl", response_class=NDJSONResponse, summary="Export every label revision as JSON lines")
def api_export_jsonl(sae: SaeDep, session: SessionDep):
    body = label_service.to_jsonl(label_service.export_rows(session, sae))
    return download(NDJSONResponse, body, f"{sae.key}-labels.jsonl")


@router.get("/saes/{sae}/labels.csv", response_class=CSVResponse, summary="Export every label revision as CSV")
def api_export_csv(sae: SaeDep, session: SessionDep):
    body = label_service.to_csv(label_service.export_rows(session, sae))
    return download(CSVResponse, body, f"{sae.key}-labels.csv")


@router.get("/saes/{sae}/classes", summary="Which classes of the precompute set the live features lead, and which none leads")
def api_classes(request: Request, sae: SaeDep, session: SessionDep) -> dict[str, Any]:
    """``classes``: each class leading a live feature (the class holding most of the images it fires on), most
    features first, with how many it leads (``features``) and the one that alone picks it out best (``best``:
    ``index``, ``share`` of its images in the class times ``of_class``, the share of the class's images it fires
    on, largest); ``without``: the precompute set's classes that lead none; ``n_classes``; ``live`` features.
    The features a class leads: ``/api/saes/{sae}/features?top_class="NAME"`` (quoted: exactly that name)."""
    require_ready(sae)
    return coverage_of(request, session, sae)


@router.get("/saes/{sae}/labels/summary", summary="How many features are labelled, and what the random sample's labels estimate")
def api_label_summary(request: Request, sae: SaeDep, session: SessionDep) -> dict[str, Any]:
    """``labelled`` and ``categories`` (label counts); ``sample``: the live features (``alive``), how many
    of them from the start of the SAE's sample order (the list's ``sort=sample``) are all labelled
    (``n``), the first one there without a label (``next``), and per category its ``count`` among
    those ``n``, its ``share`` and the ``low`` and ``high`` ends of that share's 95 % Wilson interval:
    an estimate over all live features while nobody skips one; ``by_author``, the same counts per author of
    those ``n`` features' current labels, most labels first."""
    require_ready(sae)
    return request.app.state.label_summaries.of(session, sae)


@router.post("/saes/{sae}/labels/import", summary="Import an export (JSONL or CSV); appends revisions, never overwrites")
async def api_import(request: Request, sae: SaeDep, session: SessionDep, file: UploadFile = File(...), format: Literal["jsonl", "csv"] = "jsonl") -> dict[str, int]:
    author_for_write(request, "")  # with auth on, importing needs a logged-in user
    data = await file.read(MAX_IMPORT + 1)
    if len(data) > MAX_IMPORT:
        raise HTTPException(413, "The file is too large.")
    try:
        return label_service.import_rows(session, sae, label_service.parse_export(data, format))
    except label_service.LabelError as exc:
        session.rollback()
        raise HTTPException(400, str(exc)) from None


OCCLUDE_HELP = (
    "Also grey out each 32 x 32 patch of the model input in turn and report how much that lowers each feature "
    "(occlusion_map: one fraction of the feature's activation per patch, row-major; negative where it rises). "
    "One more forward pass per patch (49 for ViT-B/32)."
)


EXPLAIN_HELP = (
    "Also explain CLIP's zero-shot prediction for the image (prediction): its top classes, clean and with the SAE's "
    "reconstruction spliced in, and the features it rests on: each measured by removing it from the residual stream "
    "(the SAE's error kept) and reading the target class's logit (logit_change; negative where the feature supports the "
    "class), after a first-order estimate for every firing feature (estimate)."
)
EDITS_HELP = (
    f"Edit features in the residual stream and report CLIP's zero-shot prediction before and after (steering): up to {MAX_EDITS} "
    f"edits separated by commas, each {EDIT_SYNTAX}. The stream changes by each feature's new activation minus its old "
    "times its dictionary atom, the SAE's error kept; set applies at every token the SAE reads."
)
CLASSES_HELP = (f"With explain or edits: the classes, separated by commas or new lines (at most {MAX_CLASSES}; "
                "default: the precompute dataset's).")
TARGET_HELP = "With explain or edits: the class to explain or follow, one of the classes (default: clean CLIP's top class)."
MEASURE_HELP = ("With explain: how many features are measured by removing them, those with the largest first-order "
                "estimates (each costs a pass through the blocks after the hook site).")
CONTRAST_HELP = ("With explain: another of the classes; then what is explained is the target's logit minus this class's "
                 "(why CLIP says the target rather than it), and logit_change and estimate are changes of that margin.")


async def analyze_upload(request: Request, sae, file: UploadFile, occlude: bool = False, question: Question | None = None) -> Analysis:
    """Check and decode the upload, then :func:`analyze_image` it.

    Raises HTTPException: 413 (too many bytes or pixels), 415 (not an accepted format), 400
    (empty, truncated, corrupt, polyglot), and those of :func:`analyze_image`.
    """
    settings = request.app.state.settings
    data = await file.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise HTTPException(413, f"The upload is larger than {settings.max_upload_bytes:,} bytes.")
    try:
        image = await run_in_threadpool(decode_upload, data, settings.max_image_pixels)
    except BadUpload as exc:
        raise HTTPException(exc.status, str(exc)) from None
    return await analyze_image(request, sae, image, occlude, question)


async def analyze_image(request: Request, sae, image: Image.Image, occlude: bool = False, question: Question | None = None) -> Analysis:
    """Queue a decoded image for analysis and wait for its result.

    Raises HTTPException: 503 with Retry-After (analysis queue full, the server shutting down, or the
    analysis thread interrupted), 503 (the SAE's CLIP or files cannot be loaded here).
    """
    try:
        future = request.app.state.analysis.submit(sae, image, occlude, question)
    except PoolFull:
        raise HTTPException(503, "The analyzer is busy; try again in a moment.", headers={"Retry-After": "1"}) from None
    try:
        return await asyncio.wrap_future(future)
    except PoolClosed:
        raise HTTPException(503, "The server is shutting down; try again in a moment.", headers={"Retry-After": "5"}) from None
    except AnalysisInterrupted as exc:
        raise HTTPException(503, str(exc), headers={"Retry-After": "1"}) from None
    except ClipScopeError as exc:  # this server lacks what the SAE needs (its CLIP weights, its files): say which
        raise HTTPException(503, f"This server cannot analyze with SAE {sae.key}: {exc}") from None


async def analyze_uploads(request: Request, sae, files: list[UploadFile], without: list[UploadFile] = ()) -> tuple[list[Analysis], list[Analysis]]:
    """Check, decode and analyse a set of uploads and its counter-examples, ``analyze_batch`` images at a time
    (queued together, so the pool runs each lot in one pass; at most that many decoded images are held at once).

    Raises HTTPException: 422 (fewer than two images in the set, or more than ``analyze_set_max`` in all), an
    image's own refusal (:func:`analyze_upload`) with its file name, and those of :func:`analyze_image`. The
    request's body, every image together, is bounded by ``max_upload_bytes`` before it is read.
    """
    settings = request.app.state.settings
    files, without = [f for f in files if f.filename], [f for f in without if f.filename]  # a form with no file chosen sends an empty part
    most = settings.analyze_set_max
    if len(files) < 2 or len(files) + len(without) > most:
        chosen = f"{len(files)} + {len(without)} without" if without else str(len(files))
        raise HTTPException(422, f"Choose from 2 to {most} images to compare, counter-examples included (chosen: {chosen}).")
    out: list[Analysis] = []
    every = files + without
    for start in range(0, len(every), settings.analyze_batch):
        images = []
        for f in every[start : start + settings.analyze_batch]:
            try:
                images.append(await run_in_threadpool(decode_upload, await f.read(), settings.max_image_pixels))
            except BadUpload as exc:
                raise HTTPException(exc.status, f"{f.filename}: {exc}") from None
        out += await asyncio.gather(*(analyze_image(request, sae, image) for image in images))
    return out[: len(files)], out[len(files) :]


@router.post("/saes/{sae}/analyze-set", summary="Which features a set of uploaded images shares",
             responses={413: {"description": "Too large: every image together, or one image's pixels"},
                        415: {"description": "An image is not of an accepted format"},
                        400: {"description": "An image is empty, truncated, corrupt or a polyglot"},
                        422: {"description": "Fewer than two images, or more than this server's analyze_set_max in all"},
                        503: {"description": "Analysis queue full"}})
async def api_analyze_set(
    request: Request, sae: SaeDep, session: SessionDep,
    files: list[UploadFile] = File(..., description="The images, at least 2; with `without`, at most the server's `analyze_set_max` "
                                   "(16 by default) in all, together at most `max_upload_bytes`."),
    without: list[UploadFile] = File(default_factory=list, description="Counter-examples (optional): images without what the set shares."),
    limit: int = Query(30, ge=1, le=500, description="Features returned, the first of the ranking."),
) -> dict[str, Any]:
    """The features that fire on any of the images, ranked by how many of them each fires on and then by
    its lift (that share over its firing frequency on the precompute set: what is particular to these images
    rather than what fires on nearly every image); each with its activation on every image, in upload order.
    With counter-examples, ranked by the contrast instead (the share of the images it fires on minus the share
    of the counter-examples), then by lift; each also with its activation on every counter-example."""
    require_ready(sae)
    firings, against = await analyze_uploads(request, sae, files, without)
    return features_of_set(session, sae, firings, against, limit=limit)


@router.post("/saes/{sae}/analyze", summary="Which features fire on an uploaded image, or on an image of the precompute set",
             responses={413: {"description": "Too large"}, 415: {"description": "Not an accepted image format"},
                        400: {"description": "Empty, truncated, corrupt or polyglot image"},
                        404: {"description": "image_id is not an image of the SAE's precompute set"},
                        503: {"description": "Analysis queue full, or the dataset's files not on this server"}})
async def api_analyze(
    request: Request, sae: SaeDep, session: SessionDep, file: UploadFile | None = File(None),
    image_id: int | None = Query(None, ge=1, le=2**31 - 1, description="Instead of a file: an image of the precompute set (an example's "
                                 "`image_id`), read again from its dataset on this server."),
    limit: int = Query(30, ge=1, le=500),
    occlude: bool = Query(False, description=OCCLUDE_HELP), explain: bool = Query(False, description=EXPLAIN_HELP),
    classes: str | None = Query(None, max_length=MAX_CLASSES * (MAX_CLASS_CHARS + 2), description=CLASSES_HELP),
    target: str | None = Query(None, max_length=MAX_CLASS_CHARS, description=TARGET_HELP),
    contrast: str | None = Query(None, max_length=MAX_CLASS_CHARS, description=CONTRAST_HELP),
    measure: int = Query(MEASURED, ge=1, le=MAX_MEASURED, description=MEASURE_HELP),
    edits: str | None = Query(None, max_length=MAX_EDITS * 32, description=EDITS_HELP),
) -> dict[str, Any]:
    require_ready(sae)
    try:
        question = question_for(sae, explain, edits, classes, target, contrast, measure)
    except BadQuestion as exc:
        raise invalid_query(exc.field, str(exc), exc.value) from None
    if (file is None) == (image_id is None):
        raise invalid_query("image_id", "Send one image: a file, or the image_id of an image of the precompute set.", image_id)
    if file is not None:
        analysis = await analyze_upload(request, sae, file, occlude, question)
    else:
        picture, _ = await run_in_threadpool(dataset_picture, request, session, sae, image_id)
        analysis = await analyze_image(request, sae, picture, occlude, question)
    return {**rank_features(session, sae, analysis, limit=limit), **answers(session, sae, question, analysis)}


def answers(session, sae, question: Question | None, analysis: Analysis) -> dict[str, Any]:
    """``prediction`` when an explanation was asked for, ``steering`` when edits were; else nothing."""
    out: dict[str, Any] = {}
    if question is not None and analysis.explanation is not None:
        out["prediction"] = prediction_dict(session, sae, question, analysis.explanation)
    if question is not None and analysis.steering is not None:
        out["steering"] = steering_dict(session, sae, question, analysis.steering)
    return out
