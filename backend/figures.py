"""The markup of a strip of thumbnails, written in Python: every page draws them (the feature page its
top images and interval samples, the list 300), and a Jinja loop spent two macro calls and ~10
escapes on each (the feature page 1.64 -> 1.17 ms of server CPU, in-process). Templates call it
through the ``thumbs`` macro (``frontend/templates/_macros.html``)."""

from __future__ import annotations

from typing import Any, Iterable

from markupsafe import Markup, escape

from clipscope.token_maps import veil_data_uri

_MAPPED = ' class="mapped"'
_VEIL = '<img class="veil" src="{}" alt="" title="dark where the feature does not fire; hover to see the image">'


def figures(examples: Iterable[dict[str, Any]], tokens: str | None = None, link: str | None = None) -> Markup:
    """One ``<figure>`` per example: its thumbnail, veiled where the feature does not fire when ``tokens``
    (the SAE's token mode) is given and the example has a token map, linked to ``link`` + its image id
    when ``link`` is given, and captioned with its activation."""
    out = []
    for e in examples:
        veil = veil_data_uri(e["token_map"], tokens) if tokens and e["token_map"] else None
        img = f'<img src="{escape(e["thumbnail"])}" alt="{escape(e["class_name"] or "image")} #{e["index"]}" loading="lazy">'
        if veil:
            img += _VEIL.format(escape(veil))
        if link:
            img = f'<a class="to-image" href="{escape(link)}{e["image_id"]}" title="what else this image fires">{img}</a>'
        out.append(f'<figure{_MAPPED if veil else ""}>{img}<figcaption>{"%.3g" % e["activation"]}</figcaption></figure>')
    return Markup("\n".join(out))
