"""Markup that pages repeat by the hundred, written in Python: the strips of thumbnails (the feature
page draws its top images and interval samples, the list 300), a label's badge, and the feature
list's rows. A Jinja loop spent two macro calls and ~10 escapes on each thumbnail (the feature page
1.64 -> 1.17 ms of server CPU, in-process), and ~1,400 generator steps and escapes on a list page
of 50 rows (4.6 -> 3.6 ms). Templates call them as globals (``backend/app.py``); strips through the
``thumbs`` macro (``frontend/templates/_macros.html``). What a value holds is escaped; numbers are
formatted as the templates' ``format`` filter formats them."""

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
        img = f'<img src="{_escaped(e["thumbnail"])}" alt="{_escaped(e["class_name"] or "image")} #{e["index"]}" loading="lazy">'
        if veil:
            img += _VEIL.format(escape(veil))
        if href:
            img = f'<a class="to-image" href="{href}{e["image_id"]}" title="what else this image fires">{img}</a>'
        out.append(f'<figure{_MAPPED if veil else ""}>{img}<figcaption>{"%.3g" % e["activation"]}</figcaption></figure>')
    return Markup("\n".join(out))


def label_badge(label: dict[str, Any] | None) -> Markup:
    """A label as its category's badge and its text (``label_dict``'s keys), or "unlabelled"."""
    if not label:
        return Markup('<span class="muted">unlabelled</span>')
    category = label["category"]
    return Markup(f'<span class="cat cat-{escape(category)}">{escape(CATEGORY_NAMES.get(category, category))}</span> {_escaped(label["text"])}')


def percent(x: float | None, digits: int = 1) -> str:
    """A fraction as a percentage with ``digits`` decimals ("12.3 %"), or "–" for none."""
    return "–" if x is None else "%.*f %%" % (digits, 100 * x)


def _facts(r: dict[str, Any], concept: str, matched_in: str) -> str:
    """A list row's line of numbers and flags: frequency, maximum, and what the row has of the rest."""
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
    href = f"/saes/{escape(sae_key)}/features/"
    return Markup("\n".join(
        f"""  <li class="feature-row">
    <a class="idx" href="{href}{r['index']}">#{r['index']}</a>
    <div class="meta">
      <div class="label">{label_badge(r['label'])}</div>
      <div class="small muted">{_facts(r, concept, matched_in)}</div>
    </div>
    <div class="thumbs small">
  {figures(r['examples'])}
  </div>
  </li>""" for r in rows))
