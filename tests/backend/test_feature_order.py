"""The feature list's kept orderings follow label writes from any process and stay bounded."""

from sqlalchemy import select

from backend.services.feature_order import FeatureOrders
from backend.services.features import FeatureQuery
from backend.services.labels import save_label
from clipscope.db.models import Sae
from clipscope.db.session import session_scope


def _total(client, key, **params):
    response = client.get(f"/api/saes/{key}/features", params=params)
    assert response.status_code == 200
    return response.json()["total"], [f["index"] for f in response.json()["features"]]


def test_a_label_written_outside_the_web_app_is_in_the_next_filtered_list(web):
    client, key = web
    assert _total(client, key, labelled="yes") == (0, [])
    assert _total(client, key, q="stripes")[0] == 0
    everything, first_page = _total(client, key)
    with session_scope(client.app.state.database_url) as s:  # as `clipscope import` would: another session, no web request
        sae = s.scalar(select(Sae).where(Sae.key == key))
        save_label(s, sae, 3, "red stripes", "visual", "cli", 0)
    assert _total(client, key, labelled="yes") == (1, [3])
    assert _total(client, key, q="stripes") == (1, [3])
    assert _total(client, key, labelled="no")[0] == everything - 1
    assert _total(client, key) == (everything, first_page), "orderings that read no label are unchanged"


def test_a_new_precompute_replaces_the_ordering(web):
    client, key = web
    _, before = _total(client, key, sort="frequency", order="desc")
    with session_scope(client.app.state.database_url) as s:
        sae = s.scalar(select(Sae).where(Sae.key == key))
        from clipscope.db.models import Feature

        first = s.scalar(select(Feature).where(Feature.sae_id == sae.id, Feature.idx == before[-1]))
        first.frequency = 2.0  # now the most frequent
        sae.precompute = {**(sae.precompute or {}), "rewritten": True}  # what a precompute run does to the SAE row
    _, after = _total(client, key, sort="frequency", order="desc")
    assert after[0] == before[-1]


def test_the_store_keeps_at_most_max_entries_orderings(web):
    client, key = web
    orders = FeatureOrders(max_entries=2)
    with session_scope(client.app.state.database_url) as s:
        sae = s.scalar(select(Sae).where(Sae.key == key))
        for sort in ("index", "frequency", "max"):
            orders.get(s, sae, FeatureQuery(sort=sort))
        assert len(orders._entries) == 2
        kept = orders.get(s, sae, FeatureQuery(sort="max"))
        assert orders.get(s, sae, FeatureQuery(sort="max")) is kept, "a repeated query is answered from the store"
