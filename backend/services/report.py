"""An SAE written up as the study was: a Markdown report (what was trained and on what, reconstruction,
zero-shot accuracy clean and spliced, feature density and dictionary redundancy, what the labels
estimate) followed by the collage, label and statistics of each chosen feature, with the collages as
PNG files beside it. Made by ``clipscope report``; it reads the database and the data dir only."""

from __future__ import annotations

import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from backend.figures import percent as pct
from backend.services.collages import feature_collage
from backend.services.feature_order import FeatureOrders
from backend.services.features import FeatureFilter, feature_detail
from backend.services.label_sample import label_summary
from backend.services.labels import CATEGORY_NAMES
from backend.services.saes import decoder_redundancy, evaluation_table, feature_density, shared_features
from clipscope.db.models import Sae, SaeStatus
from clipscope.errors import ClipScopeError
from clipscope.settings import usable_cores

ORDERS = {
    "frequency": (FeatureFilter(sort="frequency", order="desc", dead="hide"), "the most frequently firing features (the study's choice: its 300 most active)"),
    "sample": (FeatureFilter(sort="sample", dead="hide"), "the first live features of the random sample order, labelled or not"),
    "labelled": (FeatureFilter(labelled="yes", sort="sample"), "the labelled features, in the random sample order"),
}
"""Which features a report shows, and how it says so."""

_MARKDOWN = re.compile(r"([\\`*_{}\[\]<>|#])")


def md(text: Any) -> str:
    """``text`` as literal Markdown inline text (a label may hold ``*``, ``|`` or ``<``), on one line."""
    return _MARKDOWN.sub(r"\\\1", " ".join(str(text).split()))


def num(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def write_report(session: Session, sae: Sae, data_dir: Path, out: Path, features: int = 300, order: str = "frequency") -> Path:
    """Write ``out/README.md`` and ``out/collages/feature-<idx>.png`` for ``features`` features chosen by
    ``order`` (a key of :data:`ORDERS`); returns the Markdown file. Raises ClipScopeError before writing
    anything when the SAE is not ready, and naming the thumbnail when this server lacks one."""
    if sae.status != SaeStatus.READY:
        raise ClipScopeError(f"SAE {sae.key} has no features to report yet (status: {sae.status}); run `clipscope precompute` first.")
    query, chosen_by = ORDERS[order]
    ids = FeatureOrders().get(session, sae, query)[:features].tolist()
    collages = out / "collages"
    collages.mkdir(parents=True, exist_ok=True)
    lines = _summary(session, sae)
    lines += ["", f"## Features: {len(ids):,} of {sae.d_sae:,}", "", f"Chosen as {chosen_by}. Each collage holds its top images, the highest activation first.", ""]
    details = [feature_detail(session, sae, idx) for idx in ids]

    def collage(detail: dict[str, Any]) -> str | None:
        if not detail["top"]:
            return None
        name = f"feature-{detail['index']}.png"
        shutil.copyfile(feature_collage(data_dir, sae, detail), collages / name)
        return name

    with ThreadPoolExecutor(min(16, usable_cores())) as pool:  # PIL decodes, resizes and encodes outside the GIL: 2 cores, 2x
        for detail, name in zip(details, pool.map(collage, details)):
            lines += _feature(detail)
            if name:
                lines += [f"![the top images of feature {detail['index']}](collages/{name})", ""]
    path = out / "README.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _summary(session: Session, sae: Sae) -> list[str]:
    m, pc = sae.metrics or {}, sae.precompute or {}
    lines = [f"# SAE {md(sae.key)}", ""]
    if sae.random_weights:
        lines += ["**Trained on random-initialised CLIP weights: these features describe an untrained network, not CLIP.**", ""]
    lines += [
        f"A TopK sparse autoencoder ({sae.recipe} recipe) of {sae.d_sae:,} latents with k = {sae.k} on the residual stream of "
        f"{md(sae.model)} ({md(sae.pretrained)}) after block {sae.layer}, {sae.tokens} tokens; its features measured over "
        f"{num(pc.get('n_images'), ',')} precompute images.", "",
        "## Reconstruction", "",
        "| EVR | MSE | L0 | dead |", "| --- | --- | --- | --- |",
        f"| {pct(m.get('evr'), 2)} | {num(m.get('mse'), '.4g')} | {num(m.get('l0'), '.1f')} | {pct(m.get('dead_fraction'))} |", "",
        "EVR = 1 − Σᵢ Var(xᵢ − x̂ᵢ) / Σᵢ Var(xᵢ) on held-out images; L0 = mean active latents.", "",
    ]
    evaluations = evaluation_table(session, sae.id)
    if evaluations:
        lines += ["## Zero-shot accuracy (top-1)", "", "| set | images | clean | spliced | drop | loss recovered |", "| --- | --- | --- | --- | --- | --- |"]
        for e in evaluations:
            c = e["conditions"]
            drop = f"{e['drop_pp']:.2f} pp" if e.get("drop_pp") is not None else "–"
            lines.append(f"| {md(e['dataset'])}/{md(e['split'])} | {e['n']:,} | {pct(c.get('clean', {}).get('top1'), 2)} | "
                         f"{pct(c.get('spliced', {}).get('top1'), 2)} | {drop} | {pct(e.get('loss_recovered'), 1)} |")
        lines += ["", "Spliced: the SAE's reconstruction replaces the residual stream at the hook site. Loss recovered: the share of the "
                  "zero-shot cross-entropy that mean-ablating the site adds which the reconstruction takes back.", ""]
        for e in evaluations:
            if e["by_class"]:
                lines += _hurt_classes(e)
    density, redundancy = feature_density(session, sae), decoder_redundancy(session, sae)
    lines += ["## Features at a glance", ""]
    if density:
        lines.append(f"- {density['dead']:,} of {density['n_features']:,} features never fire on the precompute images"
                     + (f", {density['dense']:,} fire on more than {pct(density['dense_threshold'], 0)} of them" if density["dense"] is not None else "")
                     + (f"; the median live feature fires on {pct(density['median_live'], 3)}." if density["median_live"] is not None else "."))
    if redundancy and redundancy["n_features"]:
        lines.append(f"- Each live feature's dictionary atom against its nearest other atom: median cosine {redundancy['median']:.2f}, "
                     f"{redundancy['near_duplicates']:,} above 0.9; the nearest of this many random directions reaches {redundancy['chance']:.2f} by chance.")
    for o in shared_features(session, sae):
        lines.append(f"- Shared with {md(o['sae'])} ({md(o['recipe'])}, {o['d_sae']:,} latents, k = {o['k']}): median best cosine {num(o['median'], '.2f')}; "
                     + ", ".join(f"{pct(share, 0)} at {t} or more" for t, share in o["shared"].items())
                     + f" (chance {o['chance']:.2f}).")
    labels = label_summary(session, sae)
    sample = labels["sample"]
    lines += ["", "## Labels", "", f"{labels['labelled']:,} features labelled by hand"
              + ("".join(f"; {CATEGORY_NAMES[c]} {n:,}" for c, n in labels["categories"].items() if n)) + "."]
    if sample["n"]:
        lines += ["", f"The first {sample['n']:,} live features of the random sample order are all labelled: an estimate over all {sample['alive']:,}.", "",
                  "| category | labelled | share | 95 % interval (Wilson) |", "| --- | --- | --- | --- |"]
        lines += [f"| {CATEGORY_NAMES[s['category']]} | {s['count']} | {pct(s['share'], 0)} | {pct(s['low'], 0)} – {pct(s['high'], 0)} |" for s in sample["shares"]]
    return lines


def _hurt_classes(e: dict[str, Any], rows: int = 8) -> list[str]:
    """The classes of one evaluated set the splice hurts most, with what the spliced model takes them for
    and the features clean CLIP's recognition of them rests on most."""
    lines = [f"Classes of {md(e['dataset'])}/{md(e['split'])} the splice hurts most:", "",
             "| class | images | clean | spliced | drop | spliced mistakes it for | rests on |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in e["by_class"][:rows]:
        mistaken = r["spliced_mistaken_for"]
        rests = ", ".join(f"#{f['index']}" for f in (r["features"] or [])[:3]) or "–"
        lines.append(f"| {md(r['class'])} | {r['n']} | {pct(r['clean'])} | {pct(r['spliced'])} | {r['drop_pp']:.1f} pp | "
                     f"{md(mistaken['class']) + ' (' + pct(mistaken['share'], 0) + ')' if mistaken else '–'} | {rests} |")
    return lines + [""]


def _feature(f: dict[str, Any]) -> list[str]:
    label = f["label"]
    title = f"### #{f['index']}" + (f" · {md(label['text'])} ({CATEGORY_NAMES[label['category']]})" if label else " · unlabelled")
    facts = [f"fires on {pct(f['frequency'], 3)} of images", f"max {f['max_activation']:.3g}"]
    if f["top_class"]:
        facts.append(f"mostly {md(f['top_class'])} ({pct(f['top_class_share'], 0)})")
    if f["auto_name"]:
        facts.append(f"automatic name: {md(f['auto_name'])}")
    if f["coherence"] is not None:
        facts.append(f"coherence {f['coherence']:.3f}")
    return [title, "", " · ".join(facts), ""]
