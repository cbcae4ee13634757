"""Forged requests are refused; markup in labels renders as text everywhere."""

import pytest

from tests.backend.conftest import with_token

PAYLOADS = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "</textarea><svg onload=alert(1)>",
    "{{ 7*7 }}{% raw %}",
    "javascript:alert(1)",
]


def test_a_form_post_without_its_token_is_refused_and_changes_nothing(web):
    client, key = web
    client.get("/")
    r = client.post(f"/saes/{key}/features/3/label", data={"text": "x", "category": "noise", "author": "eve", "base_revision": 0})
    assert r.status_code == 403 and "security token" in r.text
    r = client.post(f"/saes/{key}/features/3/label", data={"text": "x", "category": "noise", "author": "eve", "base_revision": 0, "csrf_token": "a" * 43})
    assert r.status_code == 403
    assert client.get(f"/api/saes/{key}/features/3/labels").json() == []
    ok = client.post(f"/saes/{key}/features/3/label", data=with_token(client, text="x", category="noise", author="ann", base_revision=0))
    assert ok.status_code == 200


@pytest.mark.parametrize("headers", [{"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}, {"Origin": "null"}])
def test_cross_site_requests_are_refused_even_with_a_token(web, headers):
    client, key = web
    data = with_token(client, text="x", category="noise", author="eve", base_revision=0)
    assert client.post(f"/saes/{key}/features/3/label", data=data, headers=headers).status_code == 403
    api = client.post(f"/api/saes/{key}/features/3/labels", json={"text": "x", "category": "noise", "author": "eve"}, headers=headers)
    assert api.status_code == 403
    assert client.get(f"/api/saes/{key}/features/3/labels").json() == []


def test_same_origin_and_script_clients_are_served(web):
    client, key = web
    r = client.post(f"/api/saes/{key}/features/3/labels", json={"text": "ok", "category": "noise", "author": "script"})
    assert r.status_code == 201
    r = client.post(f"/api/saes/{key}/features/3/labels", json={"text": "ok2", "category": "noise", "author": "b", "base_revision": 1},
                    headers={"Origin": "http://testserver"})
    assert r.status_code == 201


def test_the_csrf_cookie_is_http_only_and_same_site_strict(web):
    client, _ = web
    client.cookies.clear()
    cookie = client.get("/").headers["set-cookie"]
    assert "clipscope_csrf=" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie


def test_markup_in_labels_renders_as_text_on_every_page_and_export(web):
    client, key = web
    for i, payload in enumerate(PAYLOADS):
        r = client.post(f"/api/saes/{key}/features/{i}/labels", json={"text": payload, "category": "semantic", "author": payload[:100]})
        assert r.status_code == 201
    pages = [
        client.get("/").text,
        client.get(f"/saes/{key}/features?labelled=yes").text,
        client.get(f"/saes/{key}/features?q=alert").text,
        *[client.get(f"/saes/{key}/features/{i}").text for i in range(len(PAYLOADS))],
        *[client.get(f"/saes/{key}/features/{i + 1}").text for i in range(len(PAYLOADS) - 1)],  # neighbours and prev links
    ]
    for html in pages:
        for payload in PAYLOADS:
            if any(ch in payload for ch in "<>\""):
                assert payload not in html, payload
        assert "<script>alert" not in html and "onerror=alert(1)>" not in html and "<svg onload" not in html
    feature0 = client.get(f"/saes/{key}/features/0").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in feature0
    assert "{{ 7*7 }}" in client.get(f"/saes/{key}/features/3").text  # shown literally, never evaluated
    jsonl = client.get(f"/api/saes/{key}/labels.jsonl")
    assert jsonl.headers["content-type"].startswith("application/x-ndjson")
    csv_resp = client.get(f"/api/saes/{key}/labels.csv")
    assert csv_resp.headers["content-type"].startswith("text/csv") and "attachment" in csv_resp.headers["content-disposition"]


@pytest.mark.parametrize(
    "path",
    ["/thumbnails/../clipscope.db", "/thumbnails/..%2Fclipscope.db", "/thumbnails/%2e%2e/clipscope.db", "/static/../../etc/passwd",
     "/static/..%2F..%2F..%2Fetc%2Fpasswd", "/saes/..%2F..%2Fetc/features", "/api/saes/..%2Fclipscope.db", "/thumbnails/secret_key"],
)
def test_no_path_reaches_a_file_outside_the_served_folders(web, path):
    client, _ = web
    r = client.get(path)
    assert r.status_code in (400, 404), (path, r.status_code)
    assert b"SQLite format" not in r.content and b"root:" not in r.content
