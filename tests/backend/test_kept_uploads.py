from PIL import Image

from backend.services.kept_uploads import KeptUploads


def test_an_image_is_found_by_its_token_for_its_own_sae_only():
    kept = KeptUploads(4)
    view = Image.new("RGB", (224, 224))
    token = kept.keep("sae-a", "cat.jpg", view)
    assert len(token) >= 20 and kept.keep("sae-a", "cat.jpg", view) != token, "random, not derived from the image"
    found = kept.find("sae-a", token)
    assert found is not None and found.view is view and found.filename == "cat.jpg"
    assert kept.find("sae-b", token) is None, "a token does not carry an image over to another SAE's page"
    assert kept.find("sae-a", "") is None and kept.find("sae-a", "nope") is None
