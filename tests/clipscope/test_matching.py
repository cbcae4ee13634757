import math

import pytest
import torch

from clipscope.matching import best_cosines, best_matches, overlap_summary, unit_atoms
from clipscope.overlap_rows import chance_level


def test_best_matches_are_the_largest_cosines_best_first():
    g = torch.Generator().manual_seed(0)
    atoms = torch.randn(300, 24, generator=g) * torch.rand(300, 1, generator=g) * 5  # atoms of any length
    atom = torch.randn(24, generator=g)
    cos = torch.nn.functional.cosine_similarity(atoms, atom[None], dim=1)
    found = best_matches(atom * 3, unit_atoms(atoms), 5)
    assert [f for f, _ in found] == cos.argsort(descending=True)[:5].tolist()
    assert [c for _, c in found] == pytest.approx(cos.sort(descending=True).values[:5].tolist(), abs=1e-6)
    same = best_matches(atoms[17], unit_atoms(atoms), 1)
    assert same[0][0] == 17 and same[0][1] == pytest.approx(1.0, abs=1e-6)
    assert len(best_matches(atom, unit_atoms(atoms[:2]), 5)) == 2
    with pytest.raises(ValueError, match="width"):
        best_matches(torch.ones(23), unit_atoms(atoms), 1)


def test_a_zero_atom_matches_nothing_and_breaks_nothing():
    atoms = unit_atoms(torch.stack([torch.zeros(4), torch.tensor([1.0, 0, 0, 0])]))
    assert torch.equal(atoms[0], torch.zeros(4))
    assert best_matches(torch.tensor([2.0, 0, 0, 0]), atoms, 2) == [(1, 1.0), (0, 0.0)]


def test_the_chance_level_is_what_the_best_of_as_many_random_directions_reaches():
    g = torch.Generator().manual_seed(1)
    n, d = 4096, 96
    best = [float(best_matches(torch.randn(d, generator=g), unit_atoms(torch.randn(n, d, generator=g)), 1)[0][1]) for _ in range(20)]
    assert sum(best) / len(best) == pytest.approx(chance_level(n, d), rel=0.2)
    assert chance_level(49_152, 768) == pytest.approx(math.sqrt(2 * math.log(49_152) / 768)) and 0.16 < chance_level(49_152, 768) < 0.18


def test_best_cosines_are_each_rows_largest_cosine_to_the_other_set_in_both_directions_whatever_the_chunk_and_tile():
    g = torch.Generator().manual_seed(0)
    a, b = unit_atoms(torch.randn(37, 12, generator=g)), unit_atoms(torch.randn(23, 12, generator=g))
    full = a @ b.T
    for chunk, tile in ((1, 8192), (5, 1), (5, 7), (37, 23), (100, 4)):
        best_a, best_b = best_cosines(a, b, chunk=chunk, tile=tile)
        assert torch.allclose(best_a, full.amax(1)) and torch.allclose(best_b, full.amax(0)), (chunk, tile)
    same_a, same_b = best_cosines(a, a[:10])
    assert torch.allclose(same_a[:10], torch.ones(10)) and torch.allclose(same_b, torch.ones(10)), "an atom both SAEs have: cosine 1"
    with pytest.raises(ValueError, match="width 12 cannot be matched to atoms of width 5"):
        best_cosines(a, b[:, :5])


def test_the_overlap_summary_counts_every_feature_once_and_the_shares_at_each_threshold():
    best = torch.tensor([-0.2, 0.1, 0.5, 0.69, 0.7, 0.95, 1.0])
    got = overlap_summary(best, chance=0.17, bins=10)
    assert got["features"] == 7 and sum(got["counts"]) == 7 and got["counts"][:2] == [1, 1], "-0.2 counts in the first bin"
    assert got["counts"][9] == 2, "0.95 and 1.0 in the last bin"
    assert got["shared"] == pytest.approx({"0.5": 5 / 7, "0.7": 3 / 7, "0.9": 2 / 7}) and got["median"] == pytest.approx(0.69)
    assert overlap_summary(torch.zeros(0), chance=0.1)["median"] is None
