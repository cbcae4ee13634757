import pytest
import torch

from clipscope.db.session import check_url
from clipscope.errors import ClipScopeError
from clipscope.settings import Settings, get_settings


@pytest.fixture
def fresh_settings():
    get_settings.cache_clear()
    yield get_settings
    get_settings.cache_clear()


@pytest.mark.parametrize("var, value, says", [
    ("CLIPSCOPE_NUM_WORKERS", "abc", "CLIPSCOPE_NUM_WORKERS='abc' is not valid: Input should be a valid integer, unable to parse string as an integer or Input should be 'auto'."),
    ("CLIPSCOPE_DEVICE", "tpu", "CLIPSCOPE_DEVICE='tpu' is not valid"),
    ("CLIPSCOPE_AUTH", "maybe", "CLIPSCOPE_AUTH='maybe' is not valid: Input should be 'none' or 'password'."),
])
def test_a_setting_that_is_not_valid_is_one_sentence_naming_its_variable(monkeypatch, fresh_settings, var, value, says):
    monkeypatch.setenv(var, value)
    with pytest.raises(ClipScopeError) as exc:
        fresh_settings()
    assert str(exc.value).startswith(says)


def test_a_gpu_asked_for_must_be_there(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert Settings(device="auto").resolved_device() == "cpu"
    with pytest.raises(ClipScopeError, match="CLIPSCOPE_DEVICE=cuda, but PyTorch sees no CUDA GPU on this machine"):
        Settings(device="cuda").resolved_device()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert Settings(device="cuda:1").resolved_device() == "cuda:1"
    with pytest.raises(ClipScopeError, match=r"CLIPSCOPE_DEVICE=cuda:2, but this machine has 2 CUDA GPU\(s\): cuda:0 to cuda:1\."):
        Settings(device="cuda:2").resolved_device()


def test_only_sqlite_and_postgresql_urls_are_accepted_and_a_refusal_hides_the_password():
    check_url("sqlite:////tmp/x/clipscope.db")
    check_url("postgresql+psycopg://u:p@h/db")
    with pytest.raises(ClipScopeError, match=r"SQLite or PostgreSQL.*not mysql://u:\*\*\*@h/db\.$") as exc:
        check_url("mysql://u:secret@h/db")
    assert "secret" not in str(exc.value)
    with pytest.raises(ClipScopeError, match="not a value that is not a URL") as exc:
        check_url("postgres//u:secret@h/db")  # a typo: no scheme
    assert "secret" not in str(exc.value)
