import base64
import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from sqlalchemy import select, update

from clipscope.evaluation_summary import loss_recovered
from clipscope.db.models import Evaluation, Feature, Sae, SaeStatus, utcnow
from clipscope.db.session import session_scope
from tests.backend.conftest import with_token


def test_overview_shows_each_sae_with_metrics_curve_and_evaluations(web):
    client, key = web
    page = client.get("/").text
    assert key in page and "ViT-B-32" in page and "random-initialised CLIP" in page
    for fact in ("block", "tokens", "64 latents, k = 8", "topk", "EVR", "L0", "MSE", "dead"):
        assert fact in page
    assert page.count("<svg") >= 2 and "held-out EVR" in page
    assert "synthetic/test" in page and "mean-ablation" in page


def test_the_card_gives_each_evaluation_s_loss_recovered_and_kl_and_none_for_an_older_one(web):
    client, key = web
    (ev,) = client.get(f"/api/saes/{key}").json()["evaluations"]
    c = ev["conditions"]
    assert c["clean"]["kl"] == 0 and all(c[k]["ce"] > 0 for k in c) and c["spliced"]["kl"] >= 0
    expected = loss_recovered(c["clean"]["ce"], c["spliced"]["ce"], c["mean_ablation"]["ce"])
    assert ev["loss_recovered"] == expected
    row = client.get("/").text.split("Zero-shot accuracy (top-1)", 1)[1].split("</tr>", 2)[1]
    cells = re.findall(r"<td>(.*?)</td>", row)
    assert cells[-2:] == [f"{100 * expected:.1f} %" if expected is not None else "–", f"{c['spliced']['kl']:.4f}"]
    with session_scope(client.app.state.database_url) as s:  # a site whose mean-ablation costs what CLIP's would
        for r in s.scalars(select(Evaluation)):
            r.details = {**r.details, "ce": {"clean": 0.25, "spliced": 0.45, "spliced_error": 0.25, "mean_ablation": 2.25}[r.condition]}
    (ev,) = client.get(f"/api/saes/{key}").json()["evaluations"]
    row = client.get("/").text.split("Zero-shot accuracy (top-1)", 1)[1].split("</tr>", 2)[1]
    assert ev["loss_recovered"] == pytest.approx(0.9) and re.findall(r"<td>(.*?)</td>", row)[-2] == "90.0 %"
    with session_scope(client.app.state.database_url) as s:  # evaluated before the losses were kept
        for r in s.scalars(select(Evaluation)):
            r.details = {k: v for k, v in r.details.items() if k not in ("ce", "kl")}
    (ev,) = client.get(f"/api/saes/{key}").json()["evaluations"]
    assert ev["loss_recovered"] is None and ev["conditions"]["spliced"]["kl"] is None
    row = client.get("/").text.split("Zero-shot accuracy (top-1)", 1)[1].split("</tr>", 2)[1]
    assert re.findall(r"<td>(.*?)</td>", row)[-2:] == ["–", "–"]


def test_the_classes_the_splice_hurts_most_are_ranked_from_the_evaluation_s_tallies(web):
    client, key = web
    (ev,) = client.get(f"/api/saes/{key}").json()["evaluations"]
    rows = ev["by_class"]
    assert rows and sum(r["n"] for r in rows) == ev["n"]
    drops = [r["drop_pp"] for r in rows]
    assert drops == sorted(drops, reverse=True)
    for r in rows:
        assert r["drop_pp"] == pytest.approx(100 * (r["clean"] - r["spliced"]))
    clean = sum(r["clean"] * r["n"] for r in rows) / ev["n"]
    assert clean == pytest.approx(ev["conditions"]["clean"]["top1"])
    assert sum(r["spliced"] * r["n"] for r in rows) / ev["n"] == pytest.approx(ev["conditions"]["spliced"]["top1"])
    page = client.get("/").text
    table = page.split("Classes the splice hurts most", 1)[1].split("</table>", 1)[0]
    assert re.findall(r"<tr><td>([^<]+)</td>", table) == [r["class"] for r in rows[:8]]
    assert any(r["features"] for r in rows) and all(len(r["features"]) <= 10 for r in rows)
    for r in rows:
        supports = [f["support"] for f in r["features"]]
        assert supports == sorted(supports, reverse=True) and all(v > 0 for v in supports)
    cells = re.findall(r'<td class="rests-on">(.*?)</td>', table)
    assert [re.findall(r"#(\d+)</a>", c) for c in cells] == [[str(f["index"]) for f in r["features"][:3]] for r in rows[:8]]
    with session_scope(client.app.state.database_url) as s:  # evaluations made before the tallies were kept
        for row in s.scalars(select(Evaluation)):
            row.details = {k: v for k, v in row.details.items() if k != "by_class"}
    assert client.get(f"/api/saes/{key}").json()["evaluations"][0]["by_class"] is None
    assert "Classes the splice hurts most" not in client.get("/").text


def test_two_saes_are_compared_side_by_side_over_every_set_either_was_evaluated_on(web):
    client, key = web
    assert "Side by side" not in client.get("/").text, "one SAE has nothing to be compared with"
    with session_scope(client.app.state.database_url) as s:
        first = s.scalar(select(Sae).where(Sae.key == key))
        second = Sae(key="seed-b", name="seed-b", status=SaeStatus.TRAINED, model="ViT-B-32", pretrained="laion2b_s34b_b79k",
                     random_weights=False, layer=10, tokens="cls", d_in=768, d_sae=49152, k=500, recipe="seed", config={}, provenance={},
                     metrics={"evr": 0.8057, "l0": 500.0, "dead_fraction": 0.0125})
        s.add(second)
        s.flush()
        for condition, top1, ce in (("clean", 0.9366, 0.25), ("spliced", 0.9213, 0.45), ("mean_ablation", 0.1, 2.25)):
            s.add(Evaluation(sae_id=second.id, dataset="cifar10", split="test", dataset_key="k", n=10000, templates="clip_cifar",
                             n_templates=18, condition=condition, top1=top1, top5=0.99, details={"ce": ce, "kl": ce / 10}))
        first_evr = first.metrics["evr"]
    page = client.get("/").text
    table = page.split("Side by side", 1)[1].split("</table>", 1)[0]
    header = re.findall(r"<th[^>]*>([^<]*)</th>", table)
    assert sorted(header[-4:-2]) == ["cifar10/test drop", "synthetic/test drop"], "one column per set either SAE was evaluated on"
    assert sorted(header[-2:]) == ["cifar10/test loss recovered", "synthetic/test loss recovered"]
    rows = {re.search(r'href="#sae-([^"]+)"', r).group(1): dict(zip(header, re.findall(r"<td[^>]*>(.*?)</td>", r, flags=re.S))) for r in table.split("<tr>")[2:]}
    assert list(rows) == ["seed-b", key], "newest first, as the cards"
    assert [rows["seed-b"][h] for h in ("recipe", "block · tokens", "latents · k", "EVR", "L0", "dead", "coherence")] == [
        "seed", "10 · cls", "49152 · 500", "80.57 %", "500.0", "1.25 %", "–"]
    assert rows["seed-b"]["cifar10/test drop"] == "1.53 pp" and rows["seed-b"]["synthetic/test drop"] == "–", "CIFAR-10 93.66 -> 92.13 %"
    assert rows["seed-b"]["cifar10/test loss recovered"] == "90.0 %", "(2.25 - 0.45) / (2.25 - 0.25)"
    assert rows["seed-b"]["synthetic/test loss recovered"] == "–" and rows[key]["cifar10/test loss recovered"] == "–"
    assert "<title>seed-b: loss recovered 0.9, L0 500</title>" in page, "the sweep's L0 against loss recovered"
    assert rows[key]["EVR"] == f"{100 * first_evr:.2f} %" and rows[key]["cifar10/test drop"] == "–"
    assert rows[key]["synthetic/test drop"].endswith(" pp") and rows[key]["coherence"] != "–"
    assert "trained" in table and "random CLIP" in table
    assert rows["seed-b"]["semantic (random sample)"] == rows[key]["semantic (random sample)"] == "–", "no labelled sample yet"
    cards = {k: page.split(f'id="sae-{k}"', 1)[1].split("</section>", 1)[0] for k in ("seed-b", key)}
    assert "Prompt templates: clip_cifar." in cards["seed-b"], "a named set by its name"
    assert "Prompt templates: “a photo of a {}.”." in cards[key] and "custom:" not in page, "a config's own templates, quoted"


def test_every_page_of_a_random_weights_sae_carries_the_banner(web):
    client, key = web
    for url in (f"/saes/{key}/features", f"/saes/{key}/features/0", f"/saes/{key}/analyze"):
        assert "random-initialised CLIP weights" in client.get(url).text, url


def test_feature_list_pages_sorts_and_filters(web):
    client, key = web
    api = lambda **q: client.get(f"/api/saes/{key}/features", params=q).json()  # noqa: E731
    first, second = api(per_page=10), api(per_page=10, page=2)
    assert first["total"] == 64
    assert [f["index"] for f in first["features"]] == list(range(10))
    assert [f["index"] for f in second["features"]] == list(range(10, 20))
    by_freq = api(sort="frequency", order="desc", per_page=64)["features"]
    freqs = [f["frequency"] for f in by_freq]
    assert freqs == sorted(freqs, reverse=True)
    dead = api(dead="only", per_page=64)
    assert all(f["is_dead"] for f in dead["features"]) and dead["total"] == sum(1 for f in by_freq if f["is_dead"])
    assert api(dead="hide", per_page=64)["total"] == 64 - dead["total"]
    band = api(min_freq=0.05, max_freq=0.5, per_page=64)["features"]
    assert all(0.05 <= f["frequency"] <= 0.5 for f in band)
    alive = next(f for f in by_freq if not f["is_dead"])
    assert len(alive["examples"]) >= 1 and alive["examples"][0]["thumbnail"].startswith("/thumbnails/")
    html = client.get(f"/saes/{key}/features?per_page=10&page=2&sort=frequency").text
    assert 'rel="prev"' in html and 'rel="next"' in html and "page 2 of 7" in html


def test_labels_filter_search_and_sort(web):
    client, key = web
    for idx, text, cat in ((3, "red circles", "semantic"), (5, "stripes_100%", "visual"), (7, "Red stars", "semantic")):
        r = client.post(f"/api/saes/{key}/features/{idx}/labels", json={"text": text, "category": cat, "author": "ann"})
        assert r.status_code == 201
    api = lambda **q: client.get(f"/api/saes/{key}/features", params={"per_page": 64, **q}).json()  # noqa: E731
    assert [f["index"] for f in api(labelled="yes")["features"]] == [3, 5, 7]
    assert api(labelled="no")["total"] == 61
    assert [f["index"] for f in api(q="RED")["features"]] == [3, 7]
    assert [f["index"] for f in api(q="_100%")["features"]] == [5]  # LIKE wildcards are literal
    assert [f["index"] for f in api(category="visual")["features"]] == [5]
    assert [f["index"] for f in api(sort="label", labelled="yes")["features"]] == [3, 7, 5]
    assert "red circles" in client.get(f"/saes/{key}/features?labelled=yes").text


def test_feature_page_has_collage_stats_neighbours_navigation_and_editor(web):
    client, key = web
    detail = client.get(f"/api/saes/{key}/features", params={"sort": "frequency", "order": "desc", "per_page": 1}).json()["features"][0]
    idx = detail["index"]
    page = client.get(f"/saes/{key}/features/{idx}").text
    assert f"Feature #{idx}" in page
    assert page.count('class="thumbs collage"') == 1
    assert "Activation histogram" in page and "<rect" in page
    assert "Nearest features" in page and "Examples across activation intervals" in page
    assert f'href="/saes/{key}/features/{idx + 1}"' in page and "random" in page
    assert 'name="base_revision" value="0"' in page
    data = client.get(f"/api/saes/{key}/features/{idx}").json()
    assert len(data["top"]) <= 6 and len(data["neighbours"]) == 3
    acts = [e["activation"] for e in data["top"]]
    assert acts == sorted(acts, reverse=True)
    png = client.get(f"/saes/{key}/features/{idx}/collage.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size[0] == 4 * 160
    r = client.get(f"/saes/{key}/features/random", follow_redirects=False)
    assert r.status_code == 303 and re.fullmatch(rf"/saes/{key}/features/\d+", r.headers["location"])
    assert client.get(f"/saes/{key}/features/64").status_code == 404
    assert client.get("/saes/nope/features/1").status_code == 404


def test_a_random_feature_is_a_live_one_and_follows_a_new_precompute(web):
    client, key = web

    def drawn(n: int = 200) -> set[int]:
        return {int(client.get(f"/saes/{key}/features/random", follow_redirects=False).headers["location"].rsplit("/", 1)[1]) for _ in range(n)}

    features = client.get(f"/api/saes/{key}/features", params={"per_page": 500}).json()["features"]
    live = sorted(f["index"] for f in features if not f["is_dead"])
    assert 4 < len(live) < len(features)
    first = drawn()
    assert first <= set(live) and len(first) > len(live) // 2, "uniform over the live ones: 200 draws reach most of them"
    with session_scope(client.app.state.database_url) as s:
        sae = s.scalar(select(Sae).where(Sae.key == key))
        s.execute(update(Feature).where(Feature.sae_id == sae.id, Feature.idx.in_(live[2:])).values(is_dead=True))
        sae.name = sae.name + " "  # as a precompute does, the row's update moves updated_at
    assert drawn(40) == set(live[:2])


def test_the_header_box_goes_to_a_feature_by_its_number(web):
    client, key = web
    page = client.get(f"/saes/{key}/features/3").text
    assert f'<form class="goto" method="get" action="/saes/{key}/features/go"><input type="number" name="idx" min="0" max="63" required' in page
    r = client.get(f"/saes/{key}/features/go?idx=7", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/saes/{key}/features/7"
    for bad, says in (("64", "Feature 64 does not exist (0..63)."), ("-1", "Feature -1 does not exist (0..63)."), ("x", "idx")):
        r = client.get(f"/saes/{key}/features/go?idx={bad}", headers={"Accept": "text/html"}, follow_redirects=False)
        assert r.status_code in (404, 422) and says in r.text and "<html" in r.text, bad


def test_an_saes_own_address_leads_to_its_card_on_the_overview(web):
    client, key = web
    r = client.get(f"/saes/{key}", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/#sae-{key}"
    assert f'id="sae-{key}"' in client.get("/").text
    assert client.get("/saes/nope", headers={"Accept": "text/html"}).status_code == 404


def test_every_page_links_the_icon_and_favicon_ico_leads_to_it(web):
    client, key = web
    for url in ("/", f"/saes/{key}/features", f"/saes/{key}/features/3"):
        icon = re.search(r'<link rel="icon" href="([^"]+)" type="image/svg\+xml">', client.get(url).text)
        assert icon, url
    served = client.get(icon.group(1))
    assert served.status_code == 200 and served.headers["content-type"].startswith("image/svg+xml") and b"<svg" in served.content
    r = client.get("/favicon.ico", follow_redirects=False)
    assert r.status_code == 301 and r.headers["location"] == icon.group(1)


def test_the_list_filters_by_leading_class_and_sorts_by_its_share(web):
    client, key = web
    everything = client.get(f"/api/saes/{key}/features", params={"per_page": 64}).json()["features"]
    leading = [f for f in everything if f["top_class"]]
    assert leading and all(0 < f["top_class_share"] <= 1 for f in leading)
    word = leading[0]["top_class"].split()[-1]  # a shape, e.g. "circle": several colours share it
    api = lambda **q: client.get(f"/api/saes/{key}/features", params={"per_page": 64, **q}).json()["features"]  # noqa: E731
    assert [f["index"] for f in api(top_class=word.upper())] == [f["index"] for f in everything if word in (f["top_class"] or "")]
    assert api(top_class="_%") == [], "LIKE wildcards are literal"
    shares = [f["top_class_share"] for f in api(sort="class_share", order="desc")]
    known = [x for x in shares if x is not None]
    assert known == sorted(known, reverse=True) and shares == known + [None] * (len(shares) - len(known)), "no class last"
    page = client.get(f"/saes/{key}/features", params={"top_class": word}).text
    assert f'name="top_class" value="{word}"' in page and page.count('class="top-class"') == len(api(top_class=word))


def test_feature_page_lists_the_classes_it_fires_on(web):
    """The synthetic images have classes ("red circle", ...): the page shows the feature's leading ones."""
    client, key = web
    idx = client.get(f"/api/saes/{key}/features", params={"sort": "frequency", "order": "desc", "per_page": 1}).json()["features"][0]["index"]
    data = client.get(f"/api/saes/{key}/features/{idx}").json()
    classes = data["classes"]
    assert 0 < len(classes) <= 5 and sum(c["count"] for c in classes) <= data["n_active"]
    assert [c["count"] for c in classes] == sorted((c["count"] for c in classes), reverse=True)
    page = client.get(f"/saes/{key}/features/{idx}").text
    rows = re.findall(r"<tr><td><a href=\"([^\"]+)\"[^>]*>([^<]+)</a></td><td><span class=\"share\"[^>]*></span>([\d.]+) % \((\d+)\)</td>", page)
    assert [r[1:] for r in rows] == [(c["name"], f"{100 * c['share']:.1f}", str(c["count"])) for c in classes]
    link = rows[0][0].replace("&amp;", "&")  # each class leads to the live features it leads
    led = client.get(link).text
    assert f'top_class=%22{classes[0]["name"].replace(" ", "%20")}%22' in link, "the class's exact name"
    total = int(re.search(r"<h1>Features <span class=\"muted small\">(\d+) of", led).group(1))
    assert total == next(e["features"] for e in client.get(f"/api/saes/{key}/classes").json()["classes"] if e["name"] == classes[0]["name"])


def test_the_list_filters_by_automatic_name_and_sorts_by_coherence(web):
    client, key = web
    api = lambda **q: client.get(f"/api/saes/{key}/features", params={"per_page": 64, **q}).json()["features"]  # noqa: E731
    everything = api()
    named = [f for f in everything if f["auto_name"]]
    assert named and all(f["auto_score"] > 0 for f in named)
    word = named[0]["auto_name"].split()[-1]
    assert [f["index"] for f in api(auto_name=word.upper())] == [f["index"] for f in everything if word in (f["auto_name"] or "")]
    assert api(auto_name="_%") == [], "LIKE wildcards are literal"
    coherence = [f["coherence"] for f in api(sort="coherence", order="desc")]
    known = [c for c in coherence if c is not None]
    assert len(known) > 1 and known == sorted(known, reverse=True)
    assert coherence == known + [None] * (len(coherence) - len(known)), "features with fewer than two top images last"
    page = client.get(f"/saes/{key}/features", params={"auto_name": word}).text
    assert f'name="auto_name" value="{word}"' in page and page.count('class="auto-name"') == len(api(auto_name=word))


def test_feature_page_shows_the_automatic_name_and_offers_it_to_the_label_editor(web):
    client, key = web
    rows = client.get(f"/api/saes/{key}/features", params={"sort": "coherence", "order": "desc", "per_page": 64, "dead": "hide"}).json()["features"]
    unnamed = [r["index"] for r in rows if not r["auto_name"]]
    if unnamed:  # every candidate scores <= 0: the page says no name fits rather than naming it
        page = client.get(f"/saes/{key}/features/{unnamed[0]}").text
        assert "none (no concept fits the top images better than the average image)" in page and "data-fill-label" not in page
    idx = next(r["index"] for r in rows if r["auto_name"] and r["coherence"] is not None)
    data = client.get(f"/api/saes/{key}/features/{idx}").json()
    assert data["auto_name"] == data["auto_names"][0]["name"] and data["auto_score"] == data["auto_names"][0]["score"]
    scores = [c["score"] for c in data["auto_names"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    page = client.get(f"/saes/{key}/features/{idx}").text
    assert f'<strong class="auto-name">{data["auto_name"]}</strong>' in page
    assert ", ".join(f'{c["name"]} {c["score"]:+.3f}' for c in data["auto_names"]) in page
    assert f"coherence {data['coherence']:.3f}" in page
    names = {f["index"]: f["auto_name"] for f in client.get(f"/api/saes/{key}/features", params={"per_page": 64}).json()["features"]}
    differs = 0  # random CLIP names many features alike: count the neighbours whose name tells them apart
    for i in names:
        neighbours = client.get(f"/api/saes/{key}/features/{i}").json()["neighbours"]
        assert [n["auto_name"] for n in neighbours] == [names[n["index"]] for n in neighbours], i
        differs += sum(n["auto_name"] != names[i] for n in neighbours)
    assert differs, "some neighbour is named otherwise than its feature"
    for n in (n for n in data["neighbours"] if n["auto_name"]):
        assert re.search(rf'features/{n["index"]}">#{n["index"]}</a>.*?· auto: <span class="auto-name">{re.escape(n["auto_name"])}</span>', page)
    assert "from random CLIP weights: meaningless" in page, "the demo SAE's CLIP is random: its names are flagged"
    assert f'data-fill-label="{data["auto_name"]}"' in page, "an unlabelled feature is offered its automatic name"
    client.post(f"/saes/{key}/features/{idx}/label", data=with_token(client, text="mine", category="semantic", author="ann", base_revision=0))
    assert "data-fill-label" not in client.get(f"/saes/{key}/features/{idx}").text, "never over a label's own text"
    overview = client.get("/").text
    assert re.search(r"<dt>coherence</dt><dd>-?\d\.\d{3} \(median -?\d\.\d{3}\)</dd>", overview)


def test_concept_search_ranks_features_by_their_top_images_match_to_any_text(web, web_data, random_clip):
    """The ranking equals the stored directions against CLIP's embedding of the text, and for a vocabulary
    concept each feature's match equals the score its automatic names gave that concept."""
    from clipscope.clip.zeroshot import build_classifier

    client, key = web
    settings, _ = web_data
    api = lambda **q: client.get(f"/api/saes/{key}/features", params={"per_page": 64, **q})  # noqa: E731
    found = api(concept="  Stripes ").json()["features"]
    assert api(concept="   ").json()["features"] == api().json()["features"], "a blank search is no search"
    summary = client.get(f"/api/saes/{key}").json()["precompute"]["names"]
    directions = np.load(settings.data_dir / "saes" / key / summary["directions"]).astype(np.float32)
    text = build_classifier(random_clip.model, "ViT-B-32", ["Stripes"], summary["templates"], "cpu")[:, 0].numpy()
    scores = directions @ text
    alive = [i for i in range(64) if directions[i].any()]
    expected = sorted(alive, key=lambda i: (-scores[i], i))
    assert [f["index"] for f in found] == expected and len(expected) > 10
    assert [f["concept_score"] for f in found] == pytest.approx([float(scores[i]) for i in expected], abs=1e-5)
    everything = {f["index"]: f for f in api().json()["features"]}
    compared = 0
    for f in found:
        named = {c["name"]: c["score"] for c in client.get(f"/api/saes/{key}/features/{f['index']}").json()["auto_names"]}
        if "stripes" in named:
            assert f["concept_score"] == pytest.approx(named["stripes"], abs=2e-3)  # directions are kept as fp16
            compared += 1
    assert compared, "some feature has 'stripes' among its automatic names"
    hidden = [f["index"] for f in api(concept="stripes", dense="hide").json()["features"]]
    assert hidden == [i for i in expected if not everything[i]["is_dense"]], "filters still apply"
    page = client.get(f"/saes/{key}/features", params={"concept": "stripes", "per_page": 5}).text
    assert page.count('class="concept-score"') == 5 and f'match {scores[expected[0]]:+.3f}' in page
    assert "match “stripes”, best first" in page, "the page says the search, not the sort select, ranks it"
    plain = client.get(f"/saes/{key}/features", params={"per_page": 5}).text
    assert "ranked-by" not in plain


def test_concept_search_of_an_sae_without_directions_says_why(web):
    client, key = web
    with session_scope(client.app.state.database_url) as s:
        sae = s.scalar(select(Sae).where(Sae.key == key))
        sae.precompute = {**sae.precompute, "names": None}
    r = client.get(f"/api/saes/{key}/features", params={"concept": "stripes"})
    assert r.status_code == 409 and "clipscope precompute" in r.json()["detail"]
    page = client.get(f"/saes/{key}/features", params={"concept": "stripes"})
    assert page.status_code == 200 and "has no feature directions to search" in page.text
    assert page.text.count('class="feature-row"') == 50 and "concept-score" not in page.text, "the list, without the search"
    assert "ranked-by" not in page.text, "nothing claims a ranking the search could not make"


def test_an_sae_whose_clip_this_server_cannot_load_says_so_where_clip_is_needed(web, monkeypatch):
    from backend.services.analyze import Analyzer
    from clipscope.errors import ClipScopeError

    def no_weights(self, sae):
        raise ClipScopeError("Could not download the open_clip weights ViT-B-32/laion2b_s34b_b79k; set model.weights_file.")

    monkeypatch.setattr(Analyzer, "_get", no_weights)
    client, key = web
    says = f"This server cannot analyze with SAE {key}: Could not download the open_clip weights"
    api = client.post(f"/api/saes/{key}/analyze", files={"file": ("x.png", _png(), "image/png")})
    assert api.status_code == 503 and api.json()["detail"].startswith(says)
    page = client.post(f"/saes/{key}/analyze", files={"file": ("x.png", _png(), "image/png")}, data=with_token(client))
    assert page.status_code == 503 and says in page.text and 'class="error" role="alert"' in page.text
    search = client.get(f"/api/saes/{key}/features", params={"concept": "a never searched text"})
    assert search.status_code == 409 and "Cannot encode the text with SAE" in search.json()["detail"]
    listing = client.get(f"/saes/{key}/features", params={"concept": "a never searched text"})
    assert listing.status_code == 200 and "Could not download the open_clip weights" in listing.text
    assert listing.text.count('class="feature-row"') == 50, "the list, without the search"


def test_a_dead_features_page_offers_no_collage_to_download(web):
    client, key = web
    dead = client.get(f"/api/saes/{key}/features", params={"dead": "only", "per_page": 1}).json()["features"][0]["index"]
    page = client.get(f"/saes/{key}/features/{dead}").text
    assert "Never fires on the precompute images." in page
    assert "collage.png" not in page
    assert client.get(f"/saes/{key}/features/{dead}/collage.png").status_code == 404


def test_a_collage_whose_thumbnails_are_missing_says_which_and_why(web, web_data, tmp_path):
    import shutil

    client, key = web
    settings, _ = web_data
    top = client.get(f"/api/saes/{key}/features", params={"sort": "frequency", "order": "desc", "per_page": 1}).json()["features"][0]
    thumbnail = settings.data_dir / top["examples"][0]["thumbnail"].lstrip("/")
    shutil.rmtree(settings.data_dir / "collages", ignore_errors=True)  # rendered by another test: served from its cache
    shutil.move(thumbnail, tmp_path / "aside")
    try:
        r = client.get(f"/saes/{key}/features/{top['index']}/collage.png")
    finally:
        shutil.move(tmp_path / "aside", thumbnail)
    assert r.status_code == 503 and r.json()["detail"].startswith(f"The thumbnail {thumbnail} is missing on this server")


def test_a_first_label_needs_its_category_chosen_and_a_relabel_starts_from_the_current_one(web):
    client, key = web
    select = lambda page: re.search(r'<select name="category" required>(.*?)</select>', page, re.S).group(1)  # noqa: E731
    selected = lambda page: re.findall(r'<option value="([^"]*)" selected>', select(page))  # noqa: E731
    assert selected(client.get(f"/saes/{key}/features/4").text) == [""], "no category is preset for a first label"
    r = client.post(f"/saes/{key}/features/4/label", data=with_token(client, text="stripes", category="", author="ann", base_revision=0))
    assert r.status_code == 400 and "Category must be one of" in r.text and "stripes" in r.text
    assert client.get(f"/api/saes/{key}/features/4/labels").json() == []
    client.post(f"/saes/{key}/features/4/label", data=with_token(client, text="stripes", category="visual", author="ann", base_revision=0))
    assert selected(client.get(f"/saes/{key}/features/4").text) == ["visual"]


def test_saving_a_label_appends_revisions_shown_as_history(web):
    client, key = web
    r = client.post(f"/saes/{key}/features/2/label", data=with_token(client, **{"text": "blue", "category": "semantic", "author": "ann", "base_revision": 0}), follow_redirects=False)
    assert r.status_code == 303
    r = client.post(f"/saes/{key}/features/2/label", data=with_token(client, **{"text": "blue squares", "category": "visual", "author": "bob", "base_revision": 1}))
    assert r.status_code == 200 and "Saved." in r.text
    history = client.get(f"/api/saes/{key}/features/2/labels").json()
    assert [(h["revision"], h["text"], h["author"]) for h in history] == [(2, "blue squares", "bob"), (1, "blue", "ann")]
    assert "blue squares" in r.text and "r1" in r.text and 'name="base_revision" value="2"' in r.text



@pytest.mark.parametrize("via", ["page", "api"])
def test_a_write_is_committed_before_its_answer_is_sent(web_data, tmp_path, monkeypatch, via):
    """A browser follows the 303 at once: the label must already be committed when the answer leaves.
    And a commit that fails must answer an error, never a success."""
    from fastapi.testclient import TestClient
    from sqlalchemy.orm import Session

    from tests.backend.conftest import private_app

    key = web_data[1]
    with TestClient(private_app(web_data, tmp_path), raise_server_exceptions=False) as client:
        form = with_token(client, text="blue", category="semantic", author="ann", base_revision=0)
        real_commit = Session.commit

        def failing_commit(self):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(Session, "commit", failing_commit)
        if via == "page":
            r = client.post(f"/saes/{key}/features/2/label", follow_redirects=False, data=form)
        else:
            r = client.post(f"/api/saes/{key}/features/2/labels", json={"text": "blue", "category": "semantic", "author": "ann"})
        monkeypatch.setattr(Session, "commit", real_commit)
        assert r.status_code == 500, "the write was lost: the answer must say so"
        assert client.get(f"/api/saes/{key}/features/2/labels").json() == []

def test_a_concurrent_edit_is_a_conflict_that_shows_both_versions_and_loses_nothing(web):
    client, key = web
    client.post(f"/api/saes/{key}/features/4/labels", json={"text": "dots", "category": "visual", "author": "ann"})
    # bob opened the editor at revision 1; ann saves revision 2 first
    assert client.post(f"/api/saes/{key}/features/4/labels", json={"text": "polka dots", "category": "visual", "author": "ann", "base_revision": 1}).status_code == 201
    api = client.post(f"/api/saes/{key}/features/4/labels", json={"text": "noise", "category": "noise", "author": "bob", "base_revision": 1})
    assert api.status_code == 409
    assert api.json()["current"]["text"] == "polka dots" and api.json()["proposed"]["text"] == "noise"
    page = client.post(f"/saes/{key}/features/4/label", data=with_token(client, **{"text": "noise", "category": "noise", "author": "bob", "base_revision": 1}))
    assert page.status_code == 409 and "polka dots" in page.text and "noise" in page.text and "Nothing was overwritten" in page.text
    assert 'name="base_revision" value="2"' in page.text  # saving again from the conflict view is deliberate
    assert [h["text"] for h in client.get(f"/api/saes/{key}/features/4/labels").json()] == ["polka dots", "dots"]


def test_invalid_labels_are_refused_with_a_message(web):
    client, key = web
    r = client.post(f"/saes/{key}/features/1/label", data=with_token(client, **{"text": "  ", "category": "semantic", "author": "ann", "base_revision": 0}))
    assert r.status_code == 400 and "empty" in r.text
    r = client.post(f"/api/saes/{key}/features/1/labels", json={"text": "x", "category": "bogus", "author": "ann"})
    assert r.status_code == 422
    assert client.get(f"/api/saes/{key}/features/1/labels").json() == []


def test_labels_export_as_jsonl_and_csv_and_import_back(web):
    client, key = web
    for text in ("one", "two"):
        base = len(client.get(f"/api/saes/{key}/features/9/labels").json())
        client.post(f"/api/saes/{key}/features/9/labels", json={"text": text, "category": "unclear", "author": "ann", "base_revision": base})
    jsonl = client.get(f"/api/saes/{key}/labels.jsonl")
    lines = [l for l in jsonl.text.splitlines() if l]
    assert len(lines) == 2 and '"text": "one"' in lines[0]
    csv_text = client.get(f"/api/saes/{key}/labels.csv").text
    assert csv_text.splitlines()[0] == "sae,feature,revision,text,category,author,created_at" and len(csv_text.splitlines()) == 3
    again = client.post(f"/api/saes/{key}/labels/import", files={"file": ("l.jsonl", jsonl.content)})
    assert again.json() == {"added": 0, "skipped": 2}
    edited = csv_text.replace("two", "three")
    r = client.post(f"/api/saes/{key}/labels/import?format=csv", files={"file": ("l.csv", edited.encode())})
    assert r.json() == {"added": 1, "skipped": 1}
    assert [h["text"] for h in client.get(f"/api/saes/{key}/features/9/labels").json()] == ["three", "two", "one"]
    bad = client.post(f"/api/saes/{key}/labels/import", files={"file": ("l.jsonl", b'{"feature": 9}\nnot json\n')})
    assert bad.status_code == 400


def test_an_import_appends_each_feature_s_rows_in_file_order_after_its_stored_revisions(web):
    client, key = web
    client.post(f"/api/saes/{key}/features/9/labels", json={"text": "kept", "category": "unclear", "author": "ann"})
    rows = [(11, "first", "noise", "bob"), (9, "then", "visual", "bob"), (11, "second", "semantic", "cy"), (11, "first", "noise", "bob"),
            (9, "kept", "unclear", "ann"), (12, "only", "visual", "dee")]
    body = "".join(json.dumps({"feature": f, "text": t, "category": c, "author": a}) + "\n" for f, t, c, a in rows).encode()
    assert client.post(f"/api/saes/{key}/labels/import", files={"file": ("l.jsonl", body)}).json() == {"added": 4, "skipped": 2}
    history = {f: client.get(f"/api/saes/{key}/features/{f}/labels").json() for f in (9, 11, 12)}
    assert [(h["revision"], h["text"], h["author"]) for h in history[9]] == [(2, "then", "bob"), (1, "kept", "ann")]
    assert [(h["revision"], h["text"], h["category"]) for h in history[11]] == [(2, "second", "semantic"), (1, "first", "noise")]
    assert [h["text"] for h in history[12]] == ["only"] and all(h["created_at"] for hs in history.values() for h in hs)
    current = {f["index"]: f["label"] for f in client.get(f"/api/saes/{key}/features", params={"labelled": "yes", "per_page": 500}).json()["features"]}
    assert {f: (lab["revision"], lab["text"], lab["category"], lab["author"]) for f, lab in current.items()} == {
        9: (2, "then", "visual", "bob"), 11: (2, "second", "semantic", "cy"), 12: (1, "only", "visual", "dee")}
    r = client.post(f"/api/saes/{key}/features/11/labels", json={"text": "third", "category": "noise", "author": "ann", "base_revision": 2})
    assert r.status_code == 201, "the editor goes on from the imported revision"


GOOD_ROW = b'{"feature": 2, "text": "fine", "category": "noise", "author": "ann"}\n'


@pytest.mark.parametrize("body, fmt, says", [
    (b'[2, "text"]\n', "jsonl", "Row 2 is not an object with feature, text, category, author."),
    (b'{"feature": 2, "text": "x"}\n', "jsonl", "Row 2 has no category, author."),
    (b'{"feature": 1.5, "text": "x", "category": "noise", "author": "a"}\n', "jsonl", "Row 2: feature must be a whole number, not 1.5."),
    (b'{"feature": true, "text": "x", "category": "noise", "author": "a"}\n', "jsonl", "Row 2: feature must be a whole number, not True."),
    (b'{"feature": 64, "text": "x", "category": "noise", "author": "a"}\n', "jsonl", "Row 2: feature 64 does not exist (0..63)."),
    (b"not json\n", "jsonl", "Line 2 is not JSON"),
    (b"\xff\xfe not utf-8\n", "jsonl", "The file is not UTF-8 text (byte 69 cannot be decoded)"),
    (b"a,b\n1,2\n", "csv", "Row 1 has no feature, text, category, author."),
    (b"feature,text,category,author\nseven,x,noise,a\n", "csv", "Row 1: feature must be a whole number, not 'seven'."),
])
def test_a_malformed_import_is_refused_with_the_row_and_the_reason_and_writes_nothing(web, body, fmt, says):
    client, key = web
    before = client.get(f"/api/saes/{key}/labels.jsonl").text
    data = body if fmt == "csv" else GOOD_ROW + body  # the good first row is not written either
    r = client.post(f"/api/saes/{key}/labels/import?format={fmt}", files={"file": ("labels", data)})
    assert r.status_code == 400 and says in r.json()["detail"]
    assert client.get(f"/api/saes/{key}/labels.jsonl").text == before


def _png(seed=0, size=(96, 80)):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_analyze_ranks_the_features_that_fire_as_clip_and_the_sae_compute_them(web, web_data):
    client, key = web
    settings, _ = web_data
    r = client.post(f"/api/saes/{key}/analyze", files={"file": ("x.png", _png(), "image/png")})
    assert r.status_code == 200
    body = r.json()
    acts = [e["activation"] for e in body["by_activation"]]
    assert acts == sorted(acts, reverse=True) and 0 < body["n_active"] <= 8
    rel = [e["relative"] for e in body["by_relative"]]
    assert rel == sorted(rel, reverse=True)
    from clipscope.clip.hooks import residual_at
    from clipscope.clip.loading import load_clip
    from clipscope.clip.preprocess import OPENAI_MEAN, OPENAI_STD, build_transform, preprocess_descriptor
    from clipscope.config import ModelConfig
    from clipscope.sae.io import load_sae

    cfg = ModelConfig(pretrained="none", layer=10)
    clip = load_clip(cfg)
    sae, _ = load_sae(settings.data_dir / "saes" / key / "sae")
    image = build_transform(preprocess_descriptor(cfg))(Image.open(io.BytesIO(_png())).convert("RGB"))[None]
    with torch.no_grad():
        code = sae.encode(residual_at(clip.visual, image, 10)[:, 0])
    expected = sorted(((v, i) for i, v in zip(code.indices[0].tolist(), code.values[0].tolist()) if v > 0), reverse=True)
    assert [e["index"] for e in body["by_activation"]] == [i for _, i in expected]
    names = {f["index"]: f["auto_name"] for f in client.get(f"/api/saes/{key}/features", params={"per_page": 64}).json()["features"]}
    assert [e["auto_name"] for e in body["by_activation"]] == [names[e["index"]] for e in body["by_activation"]]
    page = client.post(f"/saes/{key}/analyze", files={"file": ("x.png", _png(), "image/png")}, data=with_token(client))
    assert page.status_code == 200 and "features fire on" in page.text and "of its max" in page.text
    shown = [e["auto_name"] for e in body["by_activation"] + body["by_relative"] if e["auto_name"]]
    assert shown and page.text.count('class="auto-name"') == len(shown), "each ranked feature says its automatic name"
    freqs = {f["index"]: f["frequency"] for f in client.get(f"/api/saes/{key}/features", params={"per_page": 64}).json()["features"]}
    said = re.findall(r'<a class="idx" href="/saes/[^/]+/features/(\d+)">.*?<span class="set-frequency"[^>]*>on ([0-9.]+) % of the set</span>', page.text, re.S)
    assert len(said) == len(body["by_activation"]) + len(body["by_relative"]), "each ranked feature says how often it fires on the set"
    assert all(float(share) == round(100 * freqs[int(i)], 2) for i, share in said)
    seen = re.search(r'<figure class="model-view">\s*<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page.text)
    assert seen, "the page shows the image as the model saw it"
    view = np.asarray(Image.open(io.BytesIO(base64.b64decode(seen.group(1)))).convert("RGB")).astype(float)
    expected = image[0] * torch.tensor(OPENAI_STD).view(3, 1, 1) + torch.tensor(OPENAI_MEAN).view(3, 1, 1)
    assert view.shape == (224, 224, 3)
    assert np.abs(view - 255 * expected.permute(1, 2, 0).numpy()).max() <= 1, "exactly the crop CLIP saw, not the upload"


def test_each_ranked_feature_of_an_analysis_carries_its_label_and_frequency(web):
    client, key = web
    post = lambda: client.post(f"/api/saes/{key}/analyze", files={"file": ("x.png", _png(), "image/png")}).json()  # noqa: E731
    top = post()["by_activation"][0]["index"]
    assert client.post(f"/api/saes/{key}/features/{top}/labels", json={"text": "stripes", "category": "visual", "author": "ann"}).status_code == 201
    body = post()
    freqs = {f["index"]: f["frequency"] for f in client.get(f"/api/saes/{key}/features", params={"per_page": 64}).json()["features"]}
    for e in body["by_activation"] + body["by_relative"]:
        assert e["frequency"] == freqs[e["index"]]
        if e["index"] == top:
            assert (e["label"]["text"], e["label"]["category"], e["label"]["author"]) == ("stripes", "visual", "ann")
        else:
            assert e["label"] is None


@pytest.mark.parametrize("payload", [b"", b"not an image at all", _png()[:60]])
def test_analyze_refuses_what_is_not_an_image_with_a_clear_4xx(web, payload):
    client, key = web
    r = client.post(f"/api/saes/{key}/analyze", files={"file": ("x.png", payload, "image/png")})
    assert r.status_code in (400, 415) and r.json()["detail"].startswith("The ")
    page = client.post(f"/saes/{key}/analyze", files={"file": ("x.png", payload, "image/png")}, data=with_token(client))
    assert page.status_code == r.status_code and 'role="alert"' in page.text and r.json()["detail"] in page.text


def test_openapi_describes_the_api_only_and_healthz_answers(web):
    client, _ = web
    paths = client.get("/openapi.json").json()["paths"]
    assert all(p.startswith("/api/") for p in paths)
    assert "/api/saes/{sae}/features/{idx}/labels" in paths and "/api/saes/{sae}/analyze" in paths
    assert client.get("/healthz").json() == {"status": "ok"}


def test_an_sae_that_is_not_ready_has_no_feature_pages(web, web_data):
    client, key = web
    url = client.app.state.database_url
    assert client.get(f"/saes/{key}/features").status_code == 200  # the pages' copy of the SAE row is made here...
    with session_scope(url) as s:
        s.query(Sae).filter(Sae.key == key).update({"status": SaeStatus.TRAINED})  # ...and must not outlive this
    assert client.get(f"/saes/{key}/features").status_code == 409
    assert client.get(f"/api/saes/{key}/features/0").status_code == 409
    assert "trained" in client.get("/").text


@pytest.mark.parametrize(
    "params",
    [{}, {"sort": "frequency", "order": "desc"}, {"sort": "max"}, {"dead": "hide", "dense": "hide"}, {"min_freq": 0.1}, {"labelled": "yes"},
     {"sort": "class_share", "order": "desc"}, {"top_class": "red"}, {"sort": "coherence", "order": "desc"}, {"auto_name": "stripes"},
     {"concept": "stripes", "dead": "hide"}],
    ids=["index", "frequency", "max", "flags", "min_freq", "labelled", "class_share", "top_class", "coherence", "auto_name", "concept"],
)
def test_feature_list_queries_use_an_index(web, params):
    """Every statement the list issues is answered through an index (no full scan of features or examples)."""
    from sqlalchemy import event

    client, key = web
    engine = __import__("clipscope.db.session", fromlist=["get_engine"]).get_engine(client.app.state.database_url)
    statements = []
    listener = lambda conn, cursor, stmt, params, ctx, many: statements.append((stmt, params))  # noqa: E731
    event.listen(engine, "before_cursor_execute", listener)
    try:
        response = client.get(f"/api/saes/{key}/features", params=params)
        assert response.status_code == 200
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    checked = 0
    with engine.connect() as conn:
        for stmt, p in statements:
            if "FROM features" not in stmt and "FROM feature_examples" not in stmt:
                continue
            plan = [row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + stmt, p)]
            for line in plan:
                for table in ("features", "feature_examples"):
                    if line.startswith(f"SCAN {table}") and "USING" not in line:
                        raise AssertionError(f"full scan of {table}: {line}\n{stmt}")
            checked += 1
    assert checked >= (2 if response.json()["total"] else 1), "the ordering, then the page's rows"


def test_absurd_paging_and_indices_are_client_errors(web):
    client, key = web
    assert client.get(f"/api/saes/{key}/features", params={"page": 184467440737095518}).status_code == 422
    assert client.get(f"/api/saes/{key}/features/99999999999999999999").status_code in (404, 422)
    assert client.get(f"/saes/{key}/features?page=0").status_code == 422


BROWSER = {"accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


def test_a_browser_gets_refusals_as_pages_and_every_other_client_json(web):
    client, key = web
    for url, status, says in (
        (f"/saes/{key}/features/64", 404, "Feature 64 does not exist (0..63)."),
        ("/saes/nope/features/1", 404, "No SAE &#39;nope&#39;."),
        (f"/saes/{key}/features/abc", 422, "idx (path): Input should be a valid integer"),
        (f"/saes/{key}/features?page=0", 422, "page (query): Input should be greater than or equal to 1"),
        ("/no/such/page", 404, "ClipScope has no page at /no/such/page."),
        ("/saes/%3Cscript%3Ex/features/1", 404, "No SAE &#39;&lt;script&gt;x&#39;."),  # markup in the URL is text
    ):
        page = client.get(url, headers=BROWSER)
        assert page.status_code == status and page.headers["content-type"].startswith("text/html"), url
        assert says in page.text and 'role="alert"' in page.text and 'href="/"' in page.text, url
        assert "Accept" in page.headers["vary"], url
        plain = client.get(url)  # a script, a probe, a test: FastAPI's JSON, as before
        assert plain.status_code == status and "detail" in plain.json() and "Accept" in plain.headers["vary"], url
    api = client.get(f"/api/saes/{key}/features/64", headers=BROWSER)  # the API answers JSON whatever the client accepts
    assert api.status_code == 404 and api.json() == {"detail": "Feature 64 does not exist (0..63)."}
    assert "vary" not in api.headers


def test_a_database_that_cannot_be_reached_is_a_503_to_retry_not_a_500(web, monkeypatch):
    from sqlalchemy.exc import OperationalError

    def down(*args, **kwargs):
        raise OperationalError("SELECT ...", {}, ConnectionRefusedError("connection refused"))

    monkeypatch.setattr("backend.routes.pages.feature_detail", down)
    monkeypatch.setattr("backend.routes.api.feature_detail", down)
    client, key = web
    says = "The database cannot be reached right now; try again in a moment."
    page = client.get(f"/saes/{key}/features/3", headers=BROWSER)
    assert page.status_code == 503 and page.headers["retry-after"] == "5" and says in page.text and 'role="alert"' in page.text
    api = client.get(f"/api/saes/{key}/features/3")
    assert api.status_code == 503 and api.headers["retry-after"] == "5" and api.json() == {"detail": says}


def test_a_frequency_range_that_nothing_can_fall_in_is_refused_and_the_form_keeps_it(web):
    client, key = web
    says = "min_freq (0.5) is above max_freq (0.1): no frequency lies between them."
    r = client.get(f"/api/saes/{key}/features", params={"min_freq": 0.5, "max_freq": 0.1})
    assert r.status_code == 422 and [(e["loc"], e["msg"]) for e in r.json()["detail"]] == [(["query", "min_freq"], says)]
    page = client.get(f"/saes/{key}/features?min_freq=0.5&max_freq=0.1", headers=BROWSER)
    assert page.status_code == 200 and f'role="alert">{says} The list is shown without it.<' in page.text
    assert 'name="min_freq"' in page.text and 'value="0.5"' in page.text and 'value="0.1"' in page.text  # what was typed, to correct
    assert page.text.count('class="feature-row"') == 50, "the list, without the range"
    assert client.get(f"/api/saes/{key}/features", params={"min_freq": 0.2, "max_freq": 0.2}).status_code == 200  # a point is a range


def test_a_page_past_the_last_links_back_to_it(web):
    client, key = web
    html = client.get(f"/saes/{key}/features?per_page=10&page=99&sort=frequency").text  # 64 features: 7 pages
    assert "Page 99 is past the last page" in html and "No feature matches" not in html
    last = "?sort=frequency&amp;per_page=10&amp;page=7"
    assert f'<a href="{last}">go to page 7</a>' in html and f'<a rel="prev" href="{last}">' in html and 'rel="next"' not in html
    first = client.get(f"/saes/{key}/features?page=1").text  # no other parameter: no stray "&"
    assert '<a rel="next" href="?page=2">' in first
    assert "No feature matches" in client.get(f"/saes/{key}/features?q=no+such+label").text


@pytest.mark.parametrize("mode", ["yes", "no"])
def test_read_pages_run_where_the_setting_says_and_answer_the_same(web_data, tmp_path, monkeypatch, mode):
    import asyncio

    from fastapi.testclient import TestClient

    from backend.services import features as feature_service
    from tests.backend.conftest import private_app

    on_loop: list[bool] = []
    real_detail = feature_service.feature_detail

    def spy(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return real_detail(*args, **kwargs)

    monkeypatch.setattr("backend.routes.pages.feature_detail", spy)
    monkeypatch.setattr("backend.routes.api.feature_detail", spy)
    key = web_data[1]
    with TestClient(private_app(web_data, tmp_path, reads_in_event_loop=mode)) as client:
        page, api = client.get(f"/saes/{key}/features/3"), client.get(f"/api/saes/{key}/features/3")
        listing = client.get(f"/api/saes/{key}/features", params={"sort": "frequency", "order": "desc", "per_page": 5})
        assert page.status_code == 200 and "Feature #3" in page.text
        assert api.json()["index"] == 3 and len(listing.json()["features"]) == 5
        assert client.get("/saes/nope/features/3").status_code == 404
        assert client.get(f"/api/saes/{key}/features/64").status_code == 404
    assert on_loop == [mode == "yes"] * 2


def test_reads_on_the_event_loop_by_default_for_sqlite_only():
    from clipscope.settings import Settings

    assert Settings(database_url="sqlite:///x.db").resolved_reads_in_event_loop is True
    assert Settings(database_url="postgresql+psycopg://u@h/db").resolved_reads_in_event_loop is False
    assert Settings(database_url="postgresql+psycopg://u@h/db", reads_in_event_loop="yes").resolved_reads_in_event_loop is True
    assert Settings(database_url="sqlite:///x.db", reads_in_event_loop="no").resolved_reads_in_event_loop is False


def test_the_api_docs_page_loads_nothing_from_another_host(web):
    from backend.assets import IMMUTABLE

    client, _ = web
    page = client.get("/docs")
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text and "url: '/openapi.json'" in page.text
    assets = re.findall(r'(?:href|src)="([^"]+)"', page.text)
    assert len(assets) == 3 and all(a.startswith("/static/vendor/swagger-ui-") for a in assets), assets  # script, stylesheet, icon
    for url in assets:
        got = client.get(url)
        assert got.status_code == 200 and got.headers["cache-control"] == IMMUTABLE and len(got.content) > 500, url
    assert client.get("/openapi.json").json()["info"]["title"] == "ClipScope"
    assert client.get("/redoc").status_code == 404  # one API page, not a second from a CDN


def test_thumbnails_and_static_files_are_named_by_content_and_cached_for_good(web, tmp_path):
    from backend.assets import IMMUTABLE, static_url

    client, key = web
    page = client.get(f"/saes/{key}/features").text
    thumb = re.search(r'<img src="(/thumbnails/[^"]+)"', page).group(1)
    links = re.findall(r'(?:href|src)="(/static/[^"?]+\?v=[0-9a-f]{12})"', page)
    assert len(links) == 5  # the icon, the stylesheet, htmx, the keyboard navigation and the label editor's "use <automatic name>"
    for url in (thumb, *links):
        first = client.get(url)
        assert first.status_code == 200 and first.headers["cache-control"] == IMMUTABLE, url
        again = client.get(url, headers={"if-none-match": first.headers["etag"]})
        assert again.status_code == 304 and again.headers["cache-control"] == IMMUTABLE, url
    for name, text in (("a.css", "a {}"), ("b.css", "a { color: red }"), ("c.css", "a {}")):
        (tmp_path / name).write_text(text)
    versions = {name: static_url(tmp_path, name).split("?v=")[1] for name in ("a.css", "b.css", "c.css")}
    assert versions["a.css"] == versions["c.css"] != versions["b.css"]  # the version is the hash of the bytes


def test_the_feature_page_says_what_the_atom_writes_toward_where_a_direct_path_exists(web, patch_web_data, tmp_path):
    from fastapi.testclient import TestClient

    from tests.backend.conftest import private_app

    client, key = web
    f = client.get(f"/api/saes/{key}/features/0").json()
    assert len(f["output_names"]) == 3 and all(set(c) == {"name", "score"} for c in f["output_names"])
    scores = [c["score"] for c in f["output_names"]]
    assert scores == sorted(scores, reverse=True)
    page = client.get(f"/saes/{key}/features/0").text
    assert "writes toward:" in page and page.count('class="output-name"') == len(f["output_names"])
    with TestClient(private_app(patch_web_data, tmp_path)) as patches:  # patch tokens are never pooled: no direct path
        key = patch_web_data[1]
        assert patches.get(f"/api/saes/{key}/features/0").json()["output_names"] == []
        assert "writes toward:" not in patches.get(f"/saes/{key}/features/0").text


def test_a_feature_page_names_the_classes_whose_recognition_rests_on_it(web):
    """The evaluation's per-class lists of most supporting features, turned around per feature; a new
    evaluation (which moves the SAE row's updated_at) is seen on the next request."""
    client, key = web
    (ev,) = client.get(f"/api/saes/{key}").json()["evaluations"]
    expected: dict[int, list] = {}
    for r in ev["by_class"]:
        for rank, f in enumerate(r["features"], 1):
            expected.setdefault(f["index"], []).append((r["class"], rank, f["support"]))
    assert expected, "the TINY evaluation lists supporting features"
    for idx, listed in expected.items():
        got = client.get(f"/api/saes/{key}/features/{idx}").json()["supports"]
        assert sorted((c["class"], c["rank"], c["support"]) for c in got) == sorted(listed)
        assert [c["support"] for c in got] == sorted((c["support"] for c in got), reverse=True)
        assert all(c["set"] == f"{ev['dataset']}/{ev['split']}" for c in got)
    idx = max(expected, key=lambda f: len(expected[f]))
    page = client.get(f"/saes/{key}/features/{idx}").text
    section = page.split("Classes whose recognition rests on it", 1)[1].split("</table>", 1)[0]
    assert re.findall(r"<tr><td>([^<]+)</td>", section) == [c["class"] for c in client.get(f"/api/saes/{key}/features/{idx}").json()["supports"]][:10]
    unlisted = next(f for f in range(64) if f not in expected)
    assert client.get(f"/api/saes/{key}/features/{unlisted}").json()["supports"] == []
    assert "Classes whose recognition rests on it" not in client.get(f"/saes/{key}/features/{unlisted}").text
    with session_scope(client.app.state.database_url) as s:  # a later evaluation without the lists
        for row in s.scalars(select(Evaluation)):
            row.details = {**row.details, "by_class": {k: v for k, v in row.details["by_class"].items() if k != "features"}}
        s.scalar(select(Sae).where(Sae.key == key)).updated_at = utcnow()
    assert client.get(f"/api/saes/{key}/features/{idx}").json()["supports"] == []
