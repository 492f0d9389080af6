"""Label-free quality signals (trainers/evaluation/signals.py) against values derived by hand.

Not to be confused with tests/test_signals_ray.py (Ctrl-C / SIGTERM handling of `bamray train`).
"""

from __future__ import annotations

import math

import pytest
import torch

from trainers.evaluation.signals import alignment, embedding_std, rankme, signals, uniformity


def _gaussian(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _rank_one(n: int = 10, d: int = 6) -> torch.Tensor:
    """Rows = positive multiples of one vector (all rows the same direction)."""
    g = torch.Generator().manual_seed(1)
    v = torch.randn(d, generator=g)
    scales = torch.rand(n, 1, generator=g) * 5 + 0.1
    return scales * v


# ---------------------------------------------------------------- rankme
@pytest.mark.parametrize("d", [1, 4, 16, 64])
def test_rankme_of_identity_is_d(d):
    # every singular value is 1: p_k = 1/d, entropy log d, rankme d
    assert rankme(torch.eye(d)) == pytest.approx(d, rel=1e-4)


def test_rankme_of_rank_one_is_one():
    r = rankme(_rank_one())
    assert 1.0 <= r < 1.01


def test_rankme_of_isotropic_gaussian_is_nearly_full():
    d = 32
    assert rankme(_gaussian(4000, d)) > 0.9 * d


def test_rankme_is_bounded_by_min_n_d():
    # 5 rows in 32 dimensions: at most 5 non-zero singular values
    assert 1.0 <= rankme(_gaussian(5, 32)) <= 5.0 + 1e-6


# ---------------------------------------------------------------- embedding_std
@pytest.mark.parametrize("d", [2, 8, 32])
def test_embedding_std_of_identity_by_hand(d):
    # each column holds one 1 and N-1 zeros (N = d): mean 1/N, population variance
    # 1/N - 1/N^2 = (N-1)/N^2, std sqrt(N-1)/N, the same for every column
    n = d
    assert embedding_std(torch.eye(d)) == pytest.approx(math.sqrt(n - 1) / n, rel=1e-9)


def test_embedding_std_is_population_std():
    # two rows e1, e2 in 2-d: each column is (1, 0) -> population std 0.5 (the unbiased one is 0.707)
    assert embedding_std(torch.eye(2)) == pytest.approx(0.5, abs=1e-12)


def test_embedding_std_of_rank_one_is_zero():
    assert embedding_std(_rank_one()) == pytest.approx(0.0, abs=1e-7)


def test_embedding_std_of_isotropic_gaussian_is_one_over_sqrt_d():
    d = 32
    assert 0.95 <= embedding_std(_gaussian(4000, d)) * math.sqrt(d) <= 1.05


# ---------------------------------------------------------------- alignment
def test_alignment_of_identical_views_is_zero():
    z = _gaussian(50, 8)
    assert alignment(z, z) == pytest.approx(0.0, abs=1e-6)


def test_alignment_of_orthonormal_pairs_is_two():
    d = 6
    eye = torch.eye(d)
    z2 = eye.roll(1, dims=0)  # row i = e_{i-1}: e_i vs e_j with i != j
    assert alignment(eye, z2) == pytest.approx(2.0, rel=1e-6)
    # alpha = 1: ||e_i - e_j|| = sqrt(2)
    assert alignment(eye, z2, alpha=1) == pytest.approx(math.sqrt(2), rel=1e-6)


def test_alignment_of_antipodal_views_is_four():
    z = _gaussian(20, 5)
    assert alignment(z, -z) == pytest.approx(4.0, rel=1e-6)


# ---------------------------------------------------------------- uniformity
def test_uniformity_of_copies_is_zero():
    assert uniformity(_rank_one()) == pytest.approx(0.0, abs=1e-6)


def test_uniformity_of_two_antipodal_vectors():
    v = torch.tensor([[0.6, 0.8, 0.0], [-0.6, -0.8, 0.0]])
    assert uniformity(v) == pytest.approx(-8.0, rel=1e-6)  # ||.||^2 = 4, t = 2
    assert uniformity(v, t=1) == pytest.approx(-4.0, rel=1e-6)


def test_uniformity_of_standard_basis():
    assert uniformity(torch.eye(7)) == pytest.approx(-4.0, rel=1e-6)  # every pair: ||.||^2 = 2


def test_uniformity_needs_two_rows():
    with pytest.raises(ValueError, match="at least 2 rows"):
        uniformity(torch.ones(1, 4))


# ---------------------------------------------------------------- dtype and normalisation
def test_bf16_input_gives_the_same_values():
    z1 = _gaussian(256, 16, seed=3)
    z2 = z1 + 0.3 * _gaussian(256, 16, seed=4)
    for fn, args in [
        (rankme, (z1,)),
        (embedding_std, (z1,)),
        (alignment, (z1, z2)),
        (uniformity, (z1,)),
    ]:
        full = fn(*args)
        half = fn(*(a.bfloat16() for a in args))
        assert half == pytest.approx(full, rel=1e-2, abs=1e-2), fn.__name__
    assert isinstance(rankme(z1.bfloat16()), float)


def test_scaling_rows_changes_nothing_but_rankme():
    z1 = _gaussian(64, 8, seed=5)
    z2 = z1 + 0.5 * _gaussian(64, 8, seed=6)
    scale = torch.rand(64, 1, generator=torch.Generator().manual_seed(7)) * 10 + 0.01
    assert embedding_std(z1 * scale) == pytest.approx(embedding_std(z1), rel=1e-6)
    assert alignment(z1 * scale, z2) == pytest.approx(alignment(z1, z2), rel=1e-5)
    assert uniformity(z1 * scale) == pytest.approx(uniformity(z1), rel=1e-5)


# ---------------------------------------------------------------- the logged bundle
def test_signals_keys_and_values():
    z1 = _gaussian(100, 16, seed=8)
    z2 = z1 + 0.2 * _gaussian(100, 16, seed=9)
    out = signals("proj", z1, z2)
    assert set(out) == {"rankme_proj", "std_proj", "std_proj_norm", "align_proj", "uniform_proj"}
    assert all(isinstance(v, float) for v in out.values())
    assert out["rankme_proj"] == rankme(z1)
    assert out["std_proj"] == embedding_std(z1)
    assert out["std_proj_norm"] == pytest.approx(out["std_proj"] * 4.0)
    assert out["align_proj"] == alignment(z1, z2)
    assert out["uniform_proj"] == uniformity(z1)

    single = signals("backbone", z1)
    assert set(single) == {"rankme_backbone", "std_backbone", "std_backbone_norm"}
    collapsed = signals("backbone", _rank_one())
    assert collapsed["std_backbone_norm"] == pytest.approx(0.0, abs=1e-6)
