import itertools

import pytest
import torch

from clipscope.errors import ClipScopeError
from clipscope.naming import BUILTIN_VOCABULARY, mean_pair_cosine, name_features, output_directions, output_names, read_vocabulary


def _unit(x):
    return torch.nn.functional.normalize(x, dim=-1)


def test_scores_and_coherence_equal_brute_force():
    """Chunks of 3 features; a feature with no top image, one with a single one, and empty slots between rows."""
    g = torch.Generator().manual_seed(0)
    images = _unit(torch.randn(50, 8, generator=g))
    concepts = _unit(torch.randn(12, 8, generator=g)).T
    top = torch.randint(0, 50, (7, 4), generator=g)
    top[0] = -1
    top[1, 1:] = -1
    top[4, 2] = -1
    names = name_features(top, images, concepts, candidates=3, chunk=3)
    pair = lambda rows: [float(images[a] @ images[b]) for a, b in itertools.combinations(rows, 2)]  # noqa: E731
    baseline = sum(pair(range(50))) / len(pair(range(50)))
    assert names.baseline == pytest.approx(baseline, abs=1e-6)
    average = (images @ concepts).mean(0)
    for f in range(7):
        rows = [r for r in top[f].tolist() if r >= 0]
        if not rows:
            assert names.concepts[f].tolist() == [-1] * 3 and names.scores[f].isnan().all() and names.coherence[f].isnan()
            assert not names.directions[f].any()
            continue
        torch.testing.assert_close(names.directions[f], images[rows].mean(0) - images.mean(0), atol=1e-6, rtol=0)
        scores = (images[rows] @ concepts).mean(0) - average
        best = scores.topk(3)
        assert names.concepts[f].tolist() == best.indices.tolist()
        torch.testing.assert_close(names.scores[f], best.values, atol=1e-6, rtol=0)
        if len(rows) < 2:
            assert names.coherence[f].isnan()
        else:
            assert float(names.coherence[f]) == pytest.approx(sum(pair(rows)) / len(pair(rows)) - baseline, abs=1e-6)


def test_what_every_image_shares_does_not_name_a_feature():
    """All images lean towards a "food" direction more than feature 0's top images lean towards "berries": the
    raw similarity would name it "food"; measured against the average image, it is "berries"."""
    g = torch.Generator().manual_seed(1)
    food, berries, other = torch.eye(16)[:3]
    images = _unit(3 * food + 0.5 * torch.randn(40, 16, generator=g))
    images[:5] = _unit(3 * food + 1.5 * berries + 0.5 * torch.randn(5, 16, generator=g))
    concepts = torch.stack([food, berries, other], dim=1)
    top = torch.tensor([[0, 1, 2, 3, 4], [10, 20, 30, 35, -1]])
    raw = (images[:5] @ concepts).mean(0)
    assert raw.argmax() == 0, "the plant: raw similarity prefers the shared concept"
    names = name_features(top, images, concepts, candidates=1)
    assert names.concepts[:, 0].tolist()[0] == 1
    assert names.coherence[0] > 0.1 > abs(float(names.coherence[1])), "top images alike beyond chance vs random ones"


def test_mean_pair_cosine_is_the_mean_over_pairs():
    v = _unit(torch.randn(6, 5, generator=torch.Generator().manual_seed(2)))
    brute = sum(float(v[a] @ v[b]) for a, b in itertools.combinations(range(6), 2)) / 15
    assert float(mean_pair_cosine(v.sum(0), torch.tensor(6))) == pytest.approx(brute, abs=1e-6)
    assert mean_pair_cosine(v[0], torch.tensor(1)).isnan()


def test_vocabularies_builtin_file_and_list(tmp_path):
    builtin = read_vocabulary("builtin")
    assert len(builtin) > 500 and len({c.lower() for c in builtin}) == len(builtin)
    assert not any(c.startswith("#") or not c.strip() for c in builtin)
    assert "stripes" in builtin and "something red" in builtin
    assert BUILTIN_VOCABULARY.read_text().count("\n") > len(builtin), "comments and blank lines are dropped"
    path = tmp_path / "mine.txt"
    path.write_text("# my concepts\nberry  tart   # sweet\n\nBerry tart\nsoup\n")
    assert read_vocabulary(str(path)) == ["berry tart", "soup"]
    assert read_vocabulary(["a", " A ", "b"]) == ["a", "b"]
    with pytest.raises(ClipScopeError, match="does not exist"):
        read_vocabulary(str(tmp_path / "missing.txt"))


def test_an_atom_s_output_direction_is_the_embedding_s_derivative_along_it_through_ln_post_and_the_projection(random_clip):
    """At a stream whose centred part is orthogonal to the atom's, ``ln_post``'s Jacobian reduces to
    ``(gamma / sigma) * centre``: there the derivative of ``ln_post(x) @ proj`` along the atom, times
    sigma, is the atom's output direction (the derivative taken in float64 through the model's own modules)."""
    import copy

    visual = torch.nn.Module()  # the tower's end, in float64: its ln_post and projection
    visual.ln_post, visual.proj = copy.deepcopy(random_clip.visual.ln_post).double(), random_clip.visual.proj.detach().double()
    with torch.no_grad():
        visual.ln_post.weight.normal_(1.0, 0.3)  # a non-trivial gamma
    gen = torch.Generator().manual_seed(0)
    atoms = torch.randn(4, 768, generator=gen, dtype=torch.float64) + 0.5  # a non-zero mean for the centring to remove
    directions = output_directions(atoms, visual)
    for atom, direction in zip(atoms, directions):
        x = torch.randn(768, generator=gen, dtype=torch.float64) * 2 + 1
        cx, cv = x - x.mean(), atom - atom.mean()
        x = x - (cx @ cv) / (cv @ cv) * cv
        sigma = torch.sqrt(x.var(unbiased=False) + visual.ln_post.eps)
        with torch.no_grad():  # central difference in float64: its error, O(h^2), is far below the fp32 direction's
            h = 1e-4
            slope = (visual.ln_post(x + h * atom) - visual.ln_post(x - h * atom)) @ visual.proj / (2 * h)
        assert float((slope * sigma - direction.double()).norm() / direction.norm()) < 1e-6  # the direction is computed in fp32


def test_output_names_rank_concepts_beyond_their_mean_and_need_a_cls_pooled_tower(random_clip):
    gen = torch.Generator().manual_seed(1)
    directions = torch.randn(10, 512, generator=gen)
    concepts = _unit(torch.randn(7, 512, generator=gen)).T  # [D, V]
    idx, scores = output_names(directions, concepts, 3, chunk=4)
    expected = _unit(directions) @ (concepts - concepts.mean(dim=1, keepdim=True))
    top = expected.topk(3, dim=1)
    assert torch.equal(idx, top.indices) and torch.allclose(scores, top.values, atol=1e-6)

    class Pooled(torch.nn.Module):
        def __init__(self, **kw):
            super().__init__()
            self.ln_post, self.proj = random_clip.visual.ln_post, random_clip.visual.proj
            self.__dict__.update(kw)

    atoms = torch.randn(2, 768, generator=gen)
    assert output_directions(atoms, Pooled(attn_pool=None, pool_type="tok")) is not None
    assert output_directions(atoms, Pooled(attn_pool=torch.nn.Identity(), pool_type="tok")) is None
    assert output_directions(atoms, Pooled(attn_pool=None, pool_type="avg")) is None
