"""The thumbnail strips' markup, written in Python for speed: escaped, veiled and linked as the macro was."""

from backend.figures import figures


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


def test_a_token_map_veils_the_image_only_for_an_sae_over_patches_and_links_wrap_both():
    mapped = _example(token_map=[1.0] + [0.0] * 48)
    html = str(figures([mapped], tokens="patches", link="/saes/k/images/"))
    assert html.startswith('<figure class="mapped"><a class="to-image" href="/saes/k/images/42"')
    assert html.index('<img class="veil" src="data:image/png;base64,') < html.index("</a>") < html.index("<figcaption>")
    assert "veil" not in str(figures([mapped])), "without the SAE's token mode: no veil"
