"""The explorer in a real browser: browse, filter, label, analyze. Screenshots land in artifacts/screenshots/."""


import re

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import TimeoutError as PlaywrightTimeout


def test_a_researcher_browses_labels_and_analyzes(browser, server, shot, tmp_path):
    base, key = server
    page = browser.new_page(viewport={"width": 1280, "height": 900})

    page.goto(base + "/")
    assert page.locator(f"#sae-{key}").is_visible()
    assert page.get_by_text("random-initialised CLIP weights").first.is_visible()
    facts = page.locator(f"#sae-{key} .facts dt").count()
    for i in range(facts):  # every fact's value stands right under its name, never on the next grid row
        name = page.locator(f"#sae-{key} .facts dt").nth(i).bounding_box()
        value = page.locator(f"#sae-{key} .facts dd").nth(i).bounding_box()
        assert abs(value["x"] - name["x"]) < 1 and 0 <= value["y"] - (name["y"] + name["height"]) < 8, i
    shot(page, "1-overview")

    page.click(f"#sae-{key} h2 a")
    page.wait_for_url(f"**/saes/{key}/features")
    assert page.locator(".feature-row").count() == 50
    page.click("a[rel=next]")
    page.wait_for_url("**page=2**")
    assert page.locator(".feature-row .idx").first.inner_text() == "#50"
    page.select_option("select[name=sort]", "frequency")
    page.select_option("select[name=order]", "desc")
    page.select_option("select[name=dead]", "hide")
    page.click("form.filters button")
    page.wait_for_url("**dead=hide**")
    freqs = page.locator(".feature-row .meta .small").all_inner_texts()
    assert freqs and not any("dead" in t for t in freqs)
    shot(page, "2-feature-list")

    first = page.locator(".feature-row .idx").first
    idx = first.inner_text().lstrip("#")
    first.click()
    page.wait_for_url(f"**/features/{idx}")
    assert page.locator(".thumbs.collage img").count() >= 1
    page.wait_for_selector("section.cofiring", timeout=60_000)  # loaded by htmx after the page
    page.wait_for_function("!document.getElementById('matches')", timeout=60_000)  # one SAE: nothing to match, the placeholder goes
    assert page.locator("#cofiring").count() == 1 and page.locator("section.cofiring .matched li").count() >= 1
    page.fill("textarea[name=text]", "blue things <script>alert(1)</script>")
    page.select_option("select[name=category]", "semantic")
    page.fill("input[name=author]", "e2e")
    page.wait_for_function("window.htmx !== undefined")  # the deferred script has run and bound the form
    with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/label")) as posted:
        page.click("form.label-form button[type=submit]")  # htmx swaps the editor in place; without JS the form posts and redirects
    assert posted.value.status in (200, 303), f"label POST answered {posted.value.status}: {posted.value.text()[:300]}"
    page.wait_for_selector("#label-editor .history")
    assert page.get_by_role("status").inner_text() == "Saved."
    assert "blue things <script>alert(1)</script>" in page.locator(".history").inner_text()
    assert page.locator("#label-editor").count() == 1 and page.locator("h1").count() == 1  # swapped, not nested
    shot(page, "3-feature")
    page.fill("textarea[name=text]", "")
    page.evaluate("document.querySelector('textarea[name=text]').removeAttribute('required')")
    with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/label")):
        page.click("form.label-form button[type=submit]")
    page.wait_for_selector("#label-editor .error")
    assert "empty" in page.locator("#label-editor .error").inner_text()

    page.focus("textarea[name=text]")
    with pytest.raises(PlaywrightTimeout):  # typing in a field moves the caret, not the page
        with page.expect_navigation(timeout=1000):
            page.keyboard.press("ArrowRight")
    page.locator("h1").click()
    page.keyboard.press("ArrowRight")
    page.wait_for_url(f"**/features/{int(idx) + 1}")
    page.keyboard.press("ArrowLeft")
    page.wait_for_url(f"**/features/{idx}")
    with page.expect_navigation():
        page.keyboard.press("r")
    assert re.search(r"/features/\d+$", page.url)
    page.locator("h1").click()
    page.keyboard.press("g")  # the header's box, empty: the key is not typed into it
    assert page.evaluate("document.activeElement.name") == "idx" and page.input_value("input[name=idx]") == ""
    page.keyboard.type("5")
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert page.url.endswith(f"/saes/{key}/features/5") and page.locator("h1").inner_text() == "Feature #5"

    page.goto(f"{base}/saes/{key}/features?labelled=yes")
    rows = page.locator(".feature-row")
    assert rows.count() == 1 and "blue things" in rows.first.inner_text()
    shot(page, "4-labelled-list")

    image = tmp_path / "upload.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(image)
    page.goto(f"{base}/saes/{key}/analyze")
    page.set_input_files("input[type=file]", str(image))
    page.click("#analyze-form button")
    page.wait_for_selector(".analyze-by_activation .feature-row", timeout=120_000)  # the first analysis loads CLIP: slow on a busy machine
    assert page.locator(".analyze-by_activation .feature-row").count() >= 1
    assert "features fire on" in page.content()
    shot(page, "5-analyze")

    page.set_input_files("input[type=file]", str(image))
    page.check("input[name=occlude]")
    page.click("#analyze-form button")
    page.wait_for_selector(".analyze-by_activation .veil.occlusion", timeout=120_000)
    tile = page.locator(".analyze-by_activation figure.yours").first
    veil, upload = tile.locator(".veil").bounding_box(), tile.locator(".upload").bounding_box()
    assert all(abs(veil[k] - upload[k]) <= 1 for k in ("x", "y", "width", "height")), "the veil lies exactly over the upload"
    assert tile.locator(".veil").evaluate("v => getComputedStyle(v).opacity") == "1"
    tile.hover()
    page.wait_for_function("v => getComputedStyle(v).opacity === '0'", arg=tile.locator(".veil").element_handle(), timeout=5_000)
    shot(page, "5b-analyze-occlusion")

    page.set_input_files("input[type=file]", str(image))
    page.uncheck("input[name=occlude]")
    page.check("input[name=explain]")
    page.fill("input[name=classes]", "red things, blue things, stripes")
    page.click("#analyze-form button")
    page.wait_for_selector(".prediction table.effects tr.supports, .prediction table.effects tr.opposes", timeout=120_000)
    assert page.locator(".prediction table.classes").first.locator("tr").count() == 3
    assert page.input_value("input[name=classes]") == "red things, blue things, stripes", "the form keeps the classes asked about"
    card = page.locator(".prediction")
    assert card.evaluate("c => c.scrollWidth <= c.clientWidth + 1"), "the explanation fits its card"
    shot(page, "5c-analyze-explained")

    removes = page.locator("button[data-edit]")  # remove the two most supporting features together, on the same image
    wanted = [removes.nth(i).get_attribute("data-edit") for i in range(2)]
    removes.nth(0).click()
    removes.nth(1).click()
    removes.nth(0).click()  # a second click adds nothing twice
    assert page.input_value("input[name=edits]") == ", ".join(wanted)
    page.uncheck("input[name=explain]")
    page.click("#analyze-form button")  # no file chosen: the image analysed before
    page.wait_for_selector(".steering table.edits", timeout=120_000)
    assert page.locator(".steering table.edits tr").count() == 1 + 2 and page.locator(".prediction table.effects tr.supports").count() == 0
    assert page.locator("strong.kept").inner_text() == "upload.png" and page.input_value("input[name=edits]") == ", ".join(wanted)
    shot(page, "5d-analyze-steered")
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"), "no sideways scrolling on a phone"
    page.set_viewport_size({"width": 1280, "height": 900})

    phone = browser.new_page(viewport={"width": 390, "height": 844})
    phone.goto(f"{base}/saes/{key}/features/{idx}")
    assert phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"), "no sideways scrolling on a phone"
    shot(phone, "6-feature-phone")


def test_the_automatic_name_fills_the_label_editor_and_saves_nothing(browser, server):
    base, key = server
    page = browser.new_page()
    rows = page.request.get(f"{base}/api/saes/{key}/features", params={"labelled": "no", "sort": "coherence", "order": "desc"}).json()["features"]
    feature = next(r for r in rows if r["auto_name"])
    page.goto(f"{base}/saes/{key}/features/{feature['index']}")
    assert page.locator(".auto-names .auto-name").inner_text() == feature["auto_name"]
    posts = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    page.wait_for_function("document.readyState === 'complete'")  # the deferred script has run
    page.click("[data-fill-label]")
    assert page.input_value("textarea[name=text]") == feature["auto_name"]
    assert page.evaluate("document.activeElement.name") == "text"
    assert not posts, "filling the editor saves nothing"
    page.goto(f"{base}/saes/{key}/features")
    page.fill("input[name=concept]", feature["auto_name"])
    page.click("form.filters button")
    page.wait_for_url("**concept=**")
    matches = [float(t.split()[-1]) for t in page.locator(".feature-row .concept-score").all_inner_texts()]
    assert len(matches) == 50 and matches == sorted(matches, reverse=True), "ranked by their match, best first"
    page.close()


def test_a_top_image_leads_to_everything_it_fires(browser, server, shot):
    base, key = server
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{base}/saes/{key}/features?sort=frequency&order=desc")
    idx = page.locator(".feature-row .idx").first.inner_text().lstrip("#")
    page.locator(".feature-row .idx").first.click()
    page.wait_for_url(f"**/features/{idx}")
    page.locator(".thumbs.collage figure a.to-image").first.click()  # its first top image
    page.wait_for_url(f"**/saes/{key}/images/*")
    assert any(t.split()[:4] == [f"#{idx}", "top", "image", "1"] for t in page.locator(".examples-of li").all_inner_texts())
    ranked = page.locator(".analyze-by_activation .feature-row .idx").all_inner_texts()
    assert f"#{idx}" in ranked and page.locator(".analyze-by_relative .feature-row").count() == len(ranked)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    shot(page, "7-image")
    image_url = page.url
    page.click("a.analyze-it")
    page.wait_for_url(f"**/saes/{key}/analyze?image=*")
    page.check("input[name=occlude]")
    page.click("#analyze-form button")  # no file chosen: the offered image of the set
    page.wait_for_selector(".analyze-by_activation .veil.occlusion", timeout=120_000)
    assert f"#{idx}" in page.locator(".analyze-by_activation .feature-row .idx").all_inner_texts()
    shot(page, "7b-image-analysed")
    page.goto(image_url)
    page.locator(f".examples-of li a[href$='/features/{idx}']").click()
    page.wait_for_url(f"**/features/{idx}")
    page.set_viewport_size({"width": 390, "height": 844})
    page.go_back()
    page.wait_for_url(f"**/saes/{key}/images/*")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"), "no sideways scrolling on a phone"


def test_labelling_the_random_sample_from_the_keyboard(browser, server):
    base, key = server
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{base}/saes/{key}/features")
    page.locator("h1").click()
    page.keyboard.press("n")
    page.wait_for_url(re.compile(rf"/saes/{key}/features/\d+$"))
    first = page.url.rsplit("/", 1)[1]
    page.wait_for_function("window.htmx !== undefined")
    page.locator("h1").click()
    page.keyboard.press("2")
    assert page.input_value("select[name=category]") == "visual"
    assert page.evaluate("document.activeElement.name") == "text", "the caret goes to the label's text"
    page.keyboard.type("stripes")
    if page.locator("input[name=author]").count():
        page.fill("input[name=author]", "e2e")
        page.focus("textarea[name=text]")
    with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/label")):
        page.keyboard.press("Control+Enter")
    page.wait_for_selector("#label-editor .history")
    assert "stripes" in page.locator(".history").inner_text()
    page.locator("h1").click()
    page.keyboard.press("n")
    page.wait_for_url(lambda url: url.split("?")[0].rsplit("/", 1)[1] not in (first, "next-to-label"))
    summary = page.request.get(f"{base}/api/saes/{key}/labels/summary").json()
    assert summary["sample"]["n"] >= 1 and page.url.endswith(f"/features/{summary['sample']['next']}")


def test_a_labelled_match_in_another_sae_fills_the_label_editor_with_its_text_and_category(browser, two_saes, tmp_path):
    from backend.app import create_app
    from tests.conftest import copy_data_dir
    from tests.e2e.conftest import serving

    settings, (a, b) = two_saes
    url = copy_data_dir(settings.data_dir, tmp_path / "data")
    with serving(create_app(settings.model_copy(update={"data_dir": tmp_path / "data", "database_url": url}))) as base:
        page = browser.new_page()
        best = page.request.get(f"{base}/api/saes/{a}/features/1/matches").json()["matches"][0]["features"][0]
        label = {"text": "berries on cream", "category": "visual", "author": "ann"}
        assert page.request.post(f"{base}/api/saes/{b}/features/{best['index']}/labels", data=label).status == 201
        page.goto(f"{base}/saes/{a}/features/1")
        posts = []
        page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
        page.click("#matches [data-fill-label]")  # waits for the section htmx loads after the page
        assert page.input_value("textarea[name=text]") == "berries on cream" and page.input_value("select[name=category]") == "visual"
        assert page.evaluate("document.activeElement.name") == "text"
        assert not posts and page.request.get(f"{base}/api/saes/{a}/features/1").json()["label"] is None, "nothing saved"
        page.close()


def test_several_images_show_the_features_they_share(browser, server, shot, tmp_path):
    base, key = server
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"shared-{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (80, 100, 3), dtype=np.uint8)).save(paths[-1])
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{base}/saes/{key}/analyze")
    page.click("a[href$='/analyze-set']")
    page.wait_for_url(f"**/saes/{key}/analyze-set")
    page.set_input_files("input[name=files]", [str(p) for p in paths[:3]])
    page.set_input_files("input[name=without]", [str(paths[3])])
    with page.expect_navigation():
        page.click("#analyze-set-form button")
    assert page.locator(".set-views figure").count() == 4 and page.locator(".set-views figure.without").inner_text().startswith("−1 shared-3.png")
    rows = page.locator(".set-features .feature-row")
    assert rows.count() > 0 and all(rows.nth(i).locator(".per-image .cell").count() == 4 for i in range(rows.count()))
    shares = [(int(a.split()[0]) / 3 - int(b.split()[0])) for a, b in zip(page.locator(".set-count").all_inner_texts(), page.locator(".without-count").all_inner_texts())]
    assert shares == sorted(shares, reverse=True), "the largest contrast first"
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    shot(page, "9-image-set")
    page.close()


def test_the_pages_load_without_a_console_error(browser, server):
    """Every page's scripts, styles and icon load: a missing file or a script error shows in the console."""
    base, key = server
    context = browser.new_context()  # a fresh one: the browser asks for the icon once per context
    page = context.new_page()
    problems = []
    page.on("console", lambda m: problems.append(f"{page.url}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"{page.url}: {e}"))
    for path in ("/", f"/saes/{key}/features", f"/saes/{key}/features/3", f"/saes/{key}/classes", f"/saes/{key}/analyze",
                 f"/saes/{key}/analyze-set"):
        page.goto(base + path, wait_until="networkidle")
    context.close()
    assert problems == []
