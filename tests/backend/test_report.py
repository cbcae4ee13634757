"""``clipscope report``: an SAE written up as the study was, checked against what the explorer serves."""

import re

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from backend.services.label_sample import sample_order
from backend.services.report import md, write_report
from clipscope.db.models import Sae
from clipscope.db.session import session_scope
from clipscope.errors import ClipScopeError


def _write(client, key, data_dir, out, **kw):
    with session_scope(client.app.state.database_url) as s:
        return write_report(s, s.scalar(select(Sae).where(Sae.key == key)), data_dir, out, **kw)


def test_the_report_holds_the_sae_s_numbers_and_each_chosen_feature_s_collage(web, web_data, tmp_path):
    client, key = web
    alive = {r["index"] for r in client.get(f"/api/saes/{key}/features", params={"per_page": 500, "dead": "hide"}).json()["features"]}
    first = [f for f in sample_order(key, 64).tolist() if f in alive][:2]
    label = {"text": "berries | *cream*", "category": "semantic", "author": "ann"}
    for idx in first:
        assert client.post(f"/api/saes/{key}/features/{idx}/labels", json=label).status_code == 201
    text = _write(client, key, web_data[0].data_dir, tmp_path / "report", features=5).read_text()
    sae = client.get(f"/api/saes/{key}").json()
    assert f"| {100 * sae['metrics']['evr']:.2f} % |" in text and "random-initialised CLIP weights" in text
    ev = sae["evaluations"][0]
    recovered = f"{100 * ev['loss_recovered']:.1f} %" if ev["loss_recovered"] is not None else "–"
    assert (f"| {ev['dataset']}/{ev['split']} | {ev['n']:,} | {100 * ev['conditions']['clean']['top1']:.2f} % | "
            f"{100 * ev['conditions']['spliced']['top1']:.2f} % | {ev['drop_pp']:.2f} pp | {recovered} |") in text
    assert f"{sae['density']['dead']:,} of 64 features never fire" in text
    assert f"its features measured over {sae['precompute']['n_images']:,} precompute images." in text
    hurt = text[text.index("the splice hurts most"):]
    for r in ev["by_class"][:8]:  # the eight most hurt classes, in order
        row = f"| {r['class']} | {r['n']} | {100 * r['clean']:.1f} % | {100 * r['spliced']:.1f} % | {r['drop_pp']:.1f} pp |"
        assert row in hurt, row
        hurt = hurt[hurt.index(row):]
    assert "The first 2 live features of the random sample order are all labelled" in text and "| semantic | 2 | 100 % |" in text
    shown = [int(i) for i in re.findall(r"^### #(\d+)", text, flags=re.M)]
    most = client.get(f"/api/saes/{key}/features", params={"sort": "frequency", "order": "desc", "dead": "hide", "per_page": 5}).json()["features"]
    assert shown == [f["index"] for f in most], "the most frequently firing live features, in that order"
    for idx in shown:
        png = tmp_path / "report" / "collages" / f"feature-{idx}.png"
        assert f"(collages/feature-{idx}.png)" in text and png.read_bytes() == client.get(f"/saes/{key}/features/{idx}/collage.png").content
    labelled = _write(client, key, web_data[0].data_dir, tmp_path / "labelled", order="labelled").read_text()
    assert [int(i) for i in re.findall(r"^### #(\d+)", labelled, flags=re.M)] == first, "the labelled features, in sample order"
    assert r"· berries \| \*cream\* (semantic)" in labelled, "a label is literal text, not Markdown"


def test_markdown_in_a_name_is_escaped_and_kept_on_one_line():
    assert md("a|b *c* [d](e) <img>\n# f") == r"a\|b \*c\* \[d\](e) \<img\> \# f"


def test_no_report_for_an_sae_not_ready_nor_without_its_thumbnails(web, web_data, tmp_path):
    client, key = web
    with pytest.raises(ClipScopeError, match=r"The thumbnail .* is missing on this server"):
        _write(client, key, tmp_path / "elsewhere", tmp_path / "r1", features=1)
    with session_scope(client.app.state.database_url) as s:
        s.scalar(select(Sae).where(Sae.key == key)).status = "trained"
    with pytest.raises(ClipScopeError, match="has no features to report yet"):
        _write(client, key, web_data[0].data_dir, tmp_path / "r2")
    assert not (tmp_path / "r2").exists(), "refused before writing anything"


def test_the_report_command(web, web_data, tmp_path, monkeypatch):
    from clipscope.settings import get_settings
    from clipscope_cli.main import app

    client, key = web
    monkeypatch.setenv("CLIPSCOPE_DATA_DIR", str(web_data[0].data_dir))
    monkeypatch.setenv("CLIPSCOPE_DATABASE_URL", client.app.state.database_url)
    get_settings.cache_clear()
    try:
        out = CliRunner().invoke(app, ["report", key, "-o", str(tmp_path / "r"), "--features", "2", "--order", "sample"])
        assert out.exit_code == 0 and f"wrote {tmp_path / 'r' / 'README.md'}" in out.output, out.output
        assert len(re.findall(r"^### #", (tmp_path / "r" / "README.md").read_text(), flags=re.M)) == 2
        assert CliRunner().invoke(app, ["report", key, "-o", str(tmp_path / "r"), "--order", "best"]).exit_code == 2
    finally:
        get_settings.cache_clear()


def test_a_precompute_record_without_its_image_count_is_reported_as_unknown(web, web_data, tmp_path):
    """A bundle or database written by another version may lack a field of the precompute's record: the report
    says it does not know instead of failing."""
    client, key = web
    with session_scope(client.app.state.database_url) as s:
        sae = s.scalar(select(Sae).where(Sae.key == key))
        sae.precompute = {k: v for k, v in sae.precompute.items() if k != "n_images"}
    text = _write(client, key, web_data[0].data_dir, tmp_path / "report", features=1).read_text()
    assert "its features measured over – precompute images." in text
