"""Group statistics against values worked out by hand. Run: pytest tests/test_advantages.py"""

import math

import pytest
import torch

from opo_cli.advantages import (
    centered_escort_drive,
    extreme_pairs,
    group_centered,
    group_normalized,
    group_softmax,
    group_sum,
    uniform_group_fraction,
    uniform_groups,
)


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def test_group_centered_hand_values():
    # groups (1, 0) and (0, 1): mean 0.5 each
    out = group_centered(t([1.0, 0.0, 0.0, 1.0]), 2)
    torch.testing.assert_close(out, t([0.5, -0.5, -0.5, 0.5]))
    # group (3, 0, 0): mean 1 -> (2, -1, -1); group (2, 2, 2) -> zeros
    out = group_centered(t([3.0, 0.0, 0.0, 2.0, 2.0, 2.0]), 3)
    torch.testing.assert_close(out, t([2.0, -1.0, -1.0, 0.0, 0.0, 0.0]))


def test_group_normalized_hand_values():
    # group (1, 0): deviations ±0.5, Bessel std = sqrt((0.25 + 0.25) / 1) = sqrt(0.5)
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    out = group_normalized(t([1.0, 0.0, 0.0, 1.0]), 2)
    torch.testing.assert_close(out, t([a, -a, -a, a]))
    # group (3, 0, 0): deviations (2, -1, -1), Bessel std = sqrt(6 / 2) = sqrt(3)
    s = math.sqrt(3.0) + 1e-4
    out = group_normalized(t([3.0, 0.0, 0.0]), 3)
    torch.testing.assert_close(out, t([2.0 / s, -1.0 / s, -1.0 / s]))


def test_group_normalized_custom_eps_and_uniform_group():
    out = group_normalized(t([1.0, 0.0, 5.0, 5.0]), 2, eps=0.5)
    a = 0.5 / (math.sqrt(0.5) + 0.5)
    torch.testing.assert_close(out, t([a, -a, 0.0, 0.0]))  # uniform group: 0 / eps = 0


def test_group_normalized_needs_two_rows_per_group():
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_normalized(t([1.0, 0.0]), 1)


def test_uniform_groups_and_fraction():
    r = t([1.0, 1.0, 0.0, 1.0, 2.0, 2.0])  # groups (1,1) (0,1) (2,2)
    assert uniform_groups(r, 2).tolist() == [True, False, True]
    assert uniform_group_fraction(r, 2) == pytest.approx(2.0 / 3.0)
    assert isinstance(uniform_group_fraction(r, 2), float)
    assert uniform_group_fraction(t([1.0, 0.0, 0.0, 1.0]), 2) == 0.0


def test_centered_escort_drive_hand_values():
    # group (1, 0), alpha = 0.5: A = ±0.5, ω = exp(±0.25), g = ω − mean ω = ±sinh(0.25)
    g = centered_escort_drive(t([1.0, 0.0]), 2, alpha=0.5)
    torch.testing.assert_close(g, t([math.sinh(0.25), -math.sinh(0.25)]))
    # group (3, 0, 0), alpha = 0: A = (2, -1, -1), ω = (e², e⁻¹, e⁻¹)
    w = [math.exp(2.0), math.exp(-1.0), math.exp(-1.0)]
    mean = sum(w) / 3
    g = centered_escort_drive(t([3.0, 0.0, 0.0]), 3, alpha=0.0)
    torch.testing.assert_close(g, t([wi - mean for wi in w]))


def test_centered_escort_drive_alpha_one_is_zero():
    g = centered_escort_drive(t([3.0, 0.0, 1.0, 7.0]), 2, alpha=1.0)
    torch.testing.assert_close(g, torch.zeros(4, dtype=torch.float64))


def test_group_softmax_hand_values():
    # group (0, log 3) at temperature 1 -> (1/4, 3/4); at temperature 0.5 -> e^(2 log 3) = 9
    out = group_softmax(t([0.0, math.log(3.0), 1.0, 1.0]), 2, temperature=1.0)
    torch.testing.assert_close(out, t([0.25, 0.75, 0.5, 0.5]))
    out = group_softmax(t([0.0, math.log(3.0)]), 2, temperature=0.5)
    torch.testing.assert_close(out, t([0.1, 0.9]))
    # per-group temperatures
    out = group_softmax(t([0.0, math.log(3.0), 0.0, 2.0]), 2, temperature=t([1.0, 2.0]))
    torch.testing.assert_close(out, t([0.25, 0.75, 1 / (1 + math.e), math.e / (1 + math.e)]))


def test_group_sum():
    torch.testing.assert_close(group_sum(t([1.0, 2.0, 3.0, 4.0]), 2), t([3.0, 7.0]))


def test_extreme_pairs_first_argmax_and_argmin():
    # group 0: (0, 1, 1, 0) -> chosen row 1 (first max), rejected row 0 (first min)
    # group 1: all equal -> no pair; group 2: (3, 0, 3, 0) -> chosen 8, rejected 9
    r = t([0.0, 1.0, 1.0, 0.0, 2.0, 2.0, 2.0, 2.0, 3.0, 0.0, 3.0, 0.0])
    chosen, rejected = extreme_pairs(r, 4)
    assert chosen.tolist() == [1, 8]
    assert rejected.tolist() == [0, 9]


def test_extreme_pairs_none_when_all_uniform():
    chosen, rejected = extreme_pairs(t([1.0, 1.0, 0.0, 0.0]), 2)
    assert chosen.numel() == 0 and rejected.numel() == 0


def test_bad_group_size_is_a_clear_error():
    with pytest.raises(ValueError, match="G=3"):
        group_centered(t([1.0, 0.0, 0.0, 1.0]), 3)
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        group_centered(t([1.0]), 0)
