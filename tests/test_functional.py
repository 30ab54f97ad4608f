"""Each piece of the GR step against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from gradreg import functional as F


def tensors(seed: int, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=dtype) for shape in [(3, 4), (4,), (2, 2, 2)]]


def flat(tensor_list):
    return torch.cat([t.reshape(-1) for t in tensor_list])


def test_global_norm_matches_flat_norm():
    values = tensors(0)
    assert float(F.global_norm(values)) == pytest.approx(float(flat(values).norm()), rel=1e-6)
    assert float(F.global_norm([])) == 0.0


def test_global_dot_matches_flat_dot():
    first, second = tensors(0), tensors(1)
    expected = float(torch.dot(flat(first), flat(second)))
    assert float(F.global_dot(first, second)) == pytest.approx(expected, rel=1e-6)


def test_displacement_dot_matches_flat_dot():
    moved, origin, other = tensors(0), tensors(1), tensors(2)
    expected = float(torch.dot(flat(moved) - flat(origin), flat(other)))
    assert float(F.displacement_dot(moved, origin, other)) == pytest.approx(expected, rel=1e-12)
    assert float(F.displacement_dot([], [], [])) == 0.0


def test_perturbation_scale_guards():
    assert F.perturbation_scale(0.1, 2.0) == 0.05
    assert F.perturbation_scale(0.1, 0.0) == 0.0
    assert F.perturbation_scale(0.1, math.inf) == 0.0
    assert F.perturbation_scale(0.1, math.nan) == 0.0
    assert F.perturbation_scale(0.0, 3.0) == 0.0


def test_perturb_and_restore_exact():
    params = tensors(0, dtype=torch.float32)
    original = [p.clone() for p in params]
    direction = tensors(1, dtype=torch.float32)

    backup = F.backup_parameters(params)
    F.perturb_parameters_(params, direction, 0.37)
    for p, o, d in zip(params, original, direction):
        torch.testing.assert_close(p, o + 0.37 * d)
    F.restore_parameters_(params, backup)
    for p, o in zip(params, original):
        assert torch.equal(p, o)


def test_mix_gradients_raw_and_normalized():
    first, second = tensors(0), tensors(1)
    first_norm = float(flat(first).norm())
    for mode, coefficient in [("raw", 1 - 0.3), ("normalized", (1 - 0.3) / first_norm)]:
        mixed = [s.clone() for s in second]
        c = F.first_gradient_coefficient(0.3, mode, first_norm)
        assert c == pytest.approx(coefficient)
        F.mix_gradients_(mixed, first, alpha=0.3, first_coefficient=c)
        for m, f, s in zip(mixed, first, second):
            torch.testing.assert_close(m, coefficient * f + 0.3 * s)


def test_mix_with_alpha_one_is_second_gradient_exactly():
    first, second = tensors(0), tensors(1)
    mixed = [s.clone() for s in second]
    F.mix_gradients_(mixed, first, alpha=1.0, first_coefficient=F.first_gradient_coefficient(1.0, "raw", 1.0))
    for m, s in zip(mixed, second):
        assert torch.equal(m, s)


def test_normalized_coefficient_zero_norm():
    assert F.first_gradient_coefficient(0.5, "normalized", 0.0) == 0.0
    assert F.first_gradient_coefficient(0.5, "normalized", math.inf) == 0.0


def test_clip_coefficient_follows_reference():
    assert F.clip_coefficient(4.0, 5.0) == 1.0
    assert F.clip_coefficient(5.0, 5.0) == 1.0  # g * 5 / 5
    assert F.clip_coefficient(10.0, 5.0) == 0.5
    assert F.clip_coefficient(10.0, None) == 1.0
    assert F.clip_coefficient(math.inf, 5.0) == 1.0


def test_scale_multiplies():
    values = tensors(0)
    expected = [2.5 * v for v in values]
    F.scale_(values, 2.5)
    for v, e in zip(values, expected):
        torch.testing.assert_close(v, e)
