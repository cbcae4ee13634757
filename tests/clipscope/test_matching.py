import math

import pytest
import torch

from clipscope.matching import best_matches, chance_level, unit_atoms


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
