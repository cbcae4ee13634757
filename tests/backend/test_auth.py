"""CLIPSCOPE_AUTH=password: hashed passwords, signed sessions, login-only labelling, closed browsing."""

from fastapi.testclient import TestClient
from typer.testing import CliRunner

from clipscope.accounts import hash_password, verify_password
from clipscope.db.models import User
from clipscope.db.session import session_scope
from tests.backend.conftest import copy_database, with_token


def test_passwords_are_salted_scrypt_hashes():
    a, b = hash_password("correct horse"), hash_password("correct horse")
    assert a != b and a.startswith("scrypt$") and "correct" not in a
    assert verify_password("correct horse", a) and not verify_password("wrong horse", a)
    assert not verify_password("x", "garbage")


def _app(web_data, tmp_path, browse):
    from backend.app import create_app
    from clipscope.accounts import add_user

    settings, key = web_data
    url = copy_database(settings, tmp_path / "auth.db")
    with session_scope(url) as s:
        add_user(s, "ann", "s3cret-pass")
    app = create_app(settings.model_copy(update={"database_url": url, "auth": "password", "browse": browse, "secret_key": "k" * 40}))
    return TestClient(app), key


def _login(client, password="s3cret-pass", next_="/"):
    return client.post("/login", data=with_token(client, username="ann", password=password, next=next_), follow_redirects=False)


def test_open_browsing_lets_anyone_read_but_only_users_label(web_data, tmp_path):
    client, key = _app(web_data, tmp_path, "open")
    assert client.get("/").status_code == 200 and client.get(f"/api/saes/{key}/features/0").status_code == 200
    r = client.post(f"/api/saes/{key}/features/0/labels", json={"text": "x", "category": "noise", "author": "mallory"})
    assert r.status_code == 401
    r = client.post(f"/saes/{key}/features/0/label", data=with_token(client, text="x", category="noise", author="mallory", base_revision=0), follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login")
    assert _login(client, "wrong-pass").status_code == 401
    ok = _login(client, next_=f"/saes/{key}/features/0")
    assert ok.status_code == 303 and ok.headers["location"] == f"/saes/{key}/features/0"
    assert "clipscope_session" in client.cookies and "ann" not in client.cookies["clipscope_session"].split(".")[-1]
    r = client.post(f"/api/saes/{key}/features/0/labels", json={"text": "x", "category": "noise", "author": "mallory"})
    assert r.status_code == 201 and r.json()["author"] == "ann"  # the revision records who made it
    page = client.get(f"/saes/{key}/features/0").text
    assert "Saved as ann" in page and "log out" in page
    client.post("/logout", data=with_token(client))
    assert client.post(f"/api/saes/{key}/features/0/labels", json={"text": "y", "category": "noise", "author": "ann", "base_revision": 1}).status_code == 401


def test_a_forged_session_cookie_is_worthless(web_data, tmp_path):
    client, key = _app(web_data, tmp_path, "open")
    client.cookies.set("clipscope_session", "eyJ1c2VyIjogImFubiJ9.forged.signature")
    r = client.post(f"/api/saes/{key}/features/0/labels", json={"text": "x", "category": "noise", "author": "ann"})
    assert r.status_code == 401


def test_closed_browsing_requires_login_for_everything_but_login(web_data, tmp_path):
    client, key = _app(web_data, tmp_path, "closed")
    r = client.get(f"/saes/{key}/features", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/login?next=/saes/{key}/features"
    assert client.get("/api/saes").status_code == 401
    assert client.get("/healthz").status_code == 200 and client.get("/login").status_code == 200
    assert _login(client).status_code == 303
    assert client.get(f"/saes/{key}/features").status_code == 200 and client.get("/api/saes").status_code == 200


def test_logins_never_redirect_to_another_site(web_data, tmp_path):
    client, _ = _app(web_data, tmp_path, "open")
    for target in ("https://evil.example/", "//evil.example/x", "/\\\\evil.example"):
        assert _login(client, next_=target).headers["location"] == "/"


def test_the_users_command_adds_hashed_accounts(tmp_path, monkeypatch):
    from sqlalchemy import select

    from clipscope.settings import get_settings
    from clipscope_cli.main import app

    monkeypatch.setenv("CLIPSCOPE_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        out = runner.invoke(app, ["users", "add", "bob", "--password-stdin"], input="long-enough-pw\n")
        assert out.exit_code == 0 and "added user bob" in out.output
        assert runner.invoke(app, ["users", "add", "bob", "--password-stdin"], input="long-enough-pw\n").exit_code != 0
        assert runner.invoke(app, ["users", "add", "eve", "--password-stdin"], input="short\n").exit_code != 0
        with session_scope(get_settings().resolved_database_url) as s:
            (user,) = s.scalars(select(User)).all()
            assert user.username == "bob" and verify_password("long-enough-pw", user.password_hash)
    finally:
        get_settings.cache_clear()
