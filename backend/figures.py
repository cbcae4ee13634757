"""Markup that pages repeat by the hundred, written in Python: the strips of thumbnails (the feature
page draws its top images and interval samples, the list 300), a label's badge, and the feature
list's rows. A Jinja loop spent two macro calls and ~10 escapes on each thumbnail (the feature page
1.64 -> 1.17 ms of server CPU, in-process), and ~1,400 generator steps and escapes on a list page
of 50 rows (4.6 -> 3.6 ms). Templates call strips and badges as globals (``backend/app.py``), strips
through the ``thumbs`` macro (``frontend/templates/_macros.html``); the list's rows are written by
``services/list_rows.py``, from the database or from the pieces it keeps, with the same functions.
What a value holds is escaped; numbers are formatted as the templates' ``format`` filter formats them."""

from __future__ import annotations

from typing import Any, Iterable

from markupsafe import Markup, escape

from backend.services.labels import CATEGORY_NAMES
from clipscope.veils import veil_data_uri

_MAPPED = ' class="mapped"'
_VEIL = '<img class="veil" src="{}" alt="" title="dark where the feature does not fire; hover to see the image">'


def _escaped(text: str) -> str:
    """``escape(text)`` as a plain string; text holding none of ``&<>"'`` (thumbnail paths, most names) is
    returned as it is, 6x faster than markupsafe's ``escape``, which a list page calls ~800 times."""
    if "&" in text or "<" in text or ">" in text or '"' in text or "'" in text:
        return str(escape(text))
    return text


def figures(examples: Iterable[dict[str, Any]], tokens: str | None = None, link: str | None = None) -> Markup:
    """One ``<figure>`` per example: its thumbnail, veiled where the feature does not fire when ``tokens``
    (the SAE's token mode) is given and the example has a token map, linked to ``link`` + its image id
    when ``link`` is given, and captioned with its activation."""
    out, href = [], escape(link) if link else None
    for e in examples:
        veil = veil_data_uri(e["token_map"], tokens) if tokens and e["token_map"] else None
        img = image_tag(e["thumbnail"], e["class_name"], e["index"])
        if veil:
            img += _VEIL.format(escape(veil))
        if href:
            img = f'<a class="to-image" href="{href}{e["image_id"]}" title="what else this image fires">{img}</a>'
        out.append(figure(img, e["activation"], mapped=bool(veil)))
    return Markup("\n".join(out))


def image_tag(thumbnail: str, class_name: str | None, index: int) -> str:
    """A thumbnail's ``<img>``, its alt text the image's class and index in its dataset."""
    return f'<img src="{_escaped(thumbnail)}" alt="{_escaped(class_name or "image")} #{index}" loading="lazy">'


def figure(img: str, activation: float, mapped: bool = False) -> str:
    """One example's ``<figure>``: its image markup captioned with its activation."""
    return f'<figure{_MAPPED if mapped else ""}>{img}<figcaption>{"%.3g" % activation}</figcaption></figure>'


def label_badge(label: dict[str, Any] | None) -> Markup:
    """A label as its category's badge and its text (``label_dict``'s keys), or "unlabelled"."""
    if not label:
        return Markup('<span class="muted">unlabelled</span>')
    category = label["category"]
    return Markup(f'<span class="cat cat-{escape(category)}">{escape(CATEGORY_NAMES.get(category, category))}</span> {_escaped(label["text"])}')


def percent(x: float | None, digits: int = 1) -> str:
    """A fraction as a percentage with ``digits`` decimals ("12.3 %"), or "–" for none."""
    return "–" if x is None else "%.*f %%" % (digits, 100 * x)


def facts(r: dict[str, Any]) -> str:
    """A list row's line of numbers and flags, what only a precompute changes: frequency, maximum, and
    what the row has of the rest (the list's rows kept per process hold it: ``services/list_rows.py``)."""
    out = [f"freq {percent(r['frequency'], 3)} · max {'%.3g' % r['max_activation']}"]
    if r["is_dead"]:
        out.append(' · <span class="flag">dead</span>')
    if r["is_dense"]:
        out.append(' · <span class="flag">dense</span>')
    if r["top_class"]:
        out.append(f' · mostly <span class="top-class">{_escaped(r["top_class"])}</span> ({"%.0f" % (100 * r["top_class_share"])} %)')
    if r["auto_name"]:
        out.append(f' · auto: <span class="auto-name">{_escaped(r["auto_name"])}</span>')
    if r["coherence"] is not None:
        out.append(f" · coherence {'%.2f' % r['coherence']}")
    return "".join(out)


def ranked_facts(r: dict[str, Any], concept: str, matched_in: str) -> str:
    """The end of a ranked list's row line: its ``concept_score`` or ``match_cosine``, if it has one."""
    out = []
    if "concept_score" in r:
        out.append(f' · <span class="concept-score" title="how much more its top images match “{escape(concept)}” than the average image does">'
                   f"match {'%+.3f' % r['concept_score']}</span>")
    if "match_cosine" in r:
        other = escape(matched_in)
        out.append(f' · <span class="match-cosine" title="the cosine of its dictionary atom to the nearest live atom of {other}">'
                   f"best cosine in {other} {'%.2f' % r['match_cosine']}</span>")
    return "".join(out)


def feature_rows(rows: Iterable[dict[str, Any]], sae_key: str, concept: str = "", matched_in: str = "") -> Markup:
    """The feature list's ``<li>`` rows (``list_features``' rows): index, label, numbers, six thumbnails;
    ``concept`` and ``matched_in`` name what the rows' ``concept_score`` or ``match_cosine`` were measured against."""
    href = feature_href(sae_key)
    return Markup("\n".join(
        feature_row(href, r["index"], label_badge(r["label"]), facts(r) + ranked_facts(r, concept, matched_in), figures(r["examples"]))
        for r in rows))


def feature_href(sae_key: str) -> str:
    """The start of an SAE's feature pages' addresses, escaped: append an index."""
    return f"/saes/{escape(sae_key)}/features/"


def feature_row(href: str, index: int, label: str, line: str, strip: str) -> str:
    """One ``<li>`` of the feature list: its index linked to its page, its label's badge, its line of numbers, its strip."""
    return f"""  <li class="feature-row">
    <a class="idx" href="{href}{index}">#{index}</a>
    <div class="meta">
      <div class="label">{label}</div>
      <div class="small muted">{line}</div>
    </div>
    <div class="thumbs small">
  {strip}
  </div>
  </li>"""
