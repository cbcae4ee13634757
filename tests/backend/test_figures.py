"""The markup written in Python for speed (thumbnail strips, label badges, the list's rows): escaped, veiled,
linked and formatted as the templates were."""

import re

from backend.figures import feature_rows, figures, label_badge


def _example(**over):
    return {"thumbnail": "/thumbnails/ab/cd.webp", "class_name": "sushi", "index": 7, "image_id": 42, "activation": 3.14159,
            "token_map": None, **over}


def test_a_plain_strip_is_one_captioned_figure_per_example():
    html = str(figures([_example(), _example(index=8, activation=0.000123456)]))
    assert html.count("<figure>") == 2 and '<img src="/thumbnails/ab/cd.webp" alt="sushi #7" loading="lazy">' in html
    assert "<figcaption>3.14</figcaption>" in html and "<figcaption>0.000123</figcaption>" in html
    assert "<a " not in html and "veil" not in html


def test_what_a_dataset_names_is_escaped():
    html = str(figures([_example(class_name='<script>alert("x")</script>', thumbnail='/t/"onerror=x.webp')], link='/saes/"k/images/'))
    assert "<script>" not in html and "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; #7" in html
    assert 'src="/t/&#34;onerror=x.webp"' in html and 'href="/saes/&#34;k/images/42"' in html
    assert 'alt="image #7"' in str(figures([_example(class_name=None)])), "an unlabelled image"


def test_each_character_that_needs_it_is_escaped_alone_and_plain_text_is_kept():
    for char, entity in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ('"', "&#34;"), ("'", "&#39;")):
        html = str(figures([_example(class_name=f"a{char}b", thumbnail=f"/t/{char}.webp")]))
        assert f'src="/t/{entity}.webp" alt="a{entity}b #7"' in html, char
        assert f"a{entity}b" in str(label_badge({"category": "visual", "text": f"a{char}b"})), char
    assert 'src="/thumbnails/ab/cd.webp" alt="sushi #7"' in str(figures([_example()]))


def test_a_token_map_veils_the_image_only_for_an_sae_over_patches_and_links_wrap_both():
    mapped = _example(token_map=[1.0] + [0.0] * 48)
    html = str(figures([mapped], tokens="patches", link="/saes/k/images/"))
    assert html.startswith('<figure class="mapped"><a class="to-image" href="/saes/k/images/42"')
    assert html.index('<img class="veil" src="data:image/png;base64,') < html.index("</a>") < html.index("<figcaption>")
    assert "veil" not in str(figures([mapped])), "without the SAE's token mode: no veil"


def _row(**over):
    return {"index": 12, "frequency": 0.001234, "max_activation": 7.891, "is_dead": False, "is_dense": False, "top_class": None,
            "top_class_share": None, "auto_name": None, "coherence": None, "label": None, "examples": [_example()], **over}


def test_a_label_badge_names_its_category_and_escapes_its_text():
    html = str(label_badge({"category": "visual", "text": 'stripes <b>& "dots"'}))
    assert html == '<span class="cat cat-visual">visual pattern</span> stripes &lt;b&gt;&amp; &#34;dots&#34;'
    assert str(label_badge(None)) == '<span class="muted">unlabelled</span>'


def test_a_list_row_links_its_feature_and_shows_its_numbers_and_strip():
    html = str(feature_rows([_row()], "demo"))
    assert html.count('<li class="feature-row">') == 1 and '<a class="idx" href="/saes/demo/features/12">#12</a>' in html
    facts = re.search(r'<div class="small muted">(.*?)</div>', html).group(1)
    assert facts == "freq 0.123 % · max 7.89", "only what the row has: no flags, class, name or coherence"
    assert '<span class="muted">unlabelled</span>' in html and str(figures([_example()])) in html


def test_a_list_row_shows_flags_class_name_coherence_and_rankings_escaped():
    row = _row(is_dead=True, is_dense=True, top_class="<i>sushi</i>", top_class_share=0.426, auto_name='a "dog"', coherence=0.1234,
               concept_score=0.01234, match_cosine=0.876, label={"category": "semantic", "text": "fish"})
    html = str(feature_rows([row, _row(index=13, frequency=None, coherence=0.0)], '"k', concept="<red>", matched_in="b&c"))
    facts = re.findall(r'<div class="small muted">(.*?)</div>', html)
    assert facts[0].startswith("freq 0.123 % · max 7.89 · <span class=\"flag\">dead</span> · <span class=\"flag\">dense</span>")
    assert ' · mostly <span class="top-class">&lt;i&gt;sushi&lt;/i&gt;</span> (43 %) · auto: <span class="auto-name">a &#34;dog&#34;</span>' in facts[0]
    assert " · coherence 0.12" in facts[0] and "&lt;red&gt;" in facts[0] and "match +0.012</span>" in facts[0]
    assert "live atom of b&amp;c" in facts[0] and "best cosine in b&amp;c 0.88</span>" in facts[0]
    assert facts[1] == "freq – · max 7.89 · coherence 0.00", "no frequency, a coherence of 0, no ranking fields"
    assert 'href="/saes/&#34;k/features/13"' in html and '<span class="cat cat-semantic">semantic</span> fish' in html
