"""Lloyd-Max codebooks: exact structural properties, shipped data equal to a fresh solve, and the paper's D_mse."""

import numpy as np
import pytest
import torch
from tq_serve.kernels import codebook
from tq_serve.kernels.layout import SUPPORTED_HEAD_DIMS


@pytest.mark.parametrize("head_dim", SUPPORTED_HEAD_DIMS)
@pytest.mark.parametrize("bits", codebook.CODEBOOK_BITS)
def test_codebook_sorted_symmetric_with_midpoint_boundaries(head_dim, bits):
    c = codebook.centroids(head_dim, bits)
    b = codebook.boundaries(head_dim, bits)
    assert c.shape == (2**bits,) and b.shape == (2**bits - 1,)
    assert torch.all(c[1:] > c[:-1])
    torch.testing.assert_close(c, -c.flip(0), rtol=0, atol=1e-7)
    torch.testing.assert_close(b, (c[1:] + c[:-1]) / 2, rtol=0, atol=1e-7)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("bits", codebook.CODEBOOK_BITS)
def test_shipped_codebooks_equal_a_fresh_solve(head_dim, bits):
    fresh = codebook.solve_lloyd_max(head_dim, bits)
    np.testing.assert_allclose(codebook.centroids(head_dim, bits).double().numpy(), fresh, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(("bits", "paper"), [(1, 0.361), (2, 0.116), (3, 0.034), (4, 0.0093)])
def test_solved_d_mse_matches_paper_at_head_dim_128(bits, paper):
    c = codebook.solve_lloyd_max(128, bits)
    assert 128 * codebook.coordinate_mse(128, c) == pytest.approx(paper, rel=0.03)


def test_centroids_are_cell_means_of_the_sphere_coordinate_law():
    """A Lloyd-Max fixed point: each centroid is the mean of its cell under f_d (Monte Carlo on the Beta law)."""
    d, bits = 128, 3
    a = (d - 1) / 2
    x = 2 * np.random.default_rng(0).beta(a, a, size=2_000_000) - 1
    c = codebook.centroids(d, bits).double().numpy()
    cell = np.searchsorted(codebook.boundaries(d, bits).double().numpy(), x)
    means = np.array([x[cell == i].mean() for i in range(len(c))])
    standard_error = np.array([x[cell == i].std() / np.sqrt(np.sum(cell == i)) for i in range(len(c))])
    assert np.all(np.abs(means - c) < 4 * standard_error)


def test_unshipped_head_dim_is_solved_on_demand_and_bad_bits_rejected():
    assert codebook.centroids(48, 2).shape == (4,)
    with pytest.raises(ValueError, match="unsupported codebook bits 5"):
        codebook.centroids(128, 5)
