"""TurboQuant quantizer: exact packing round trips, rotations, variants, and the paper's distortion figures."""

import json

import pytest
import torch
from tq_serve.kernels.codebook import boundaries
from tq_serve.kernels.layout import SUPPORTED_HEAD_DIMS, Plane, VectorLayout
from tq_serve.kernels.packed import PackedVectors
from tq_serve.kernels.quantizer import get_quantizer, pack_plane, unpack_plane
from tq_serve.kernels.rotation import qjl_matrix, rotation_matrix

from tq_serve.bench import distortion


def unit_vectors(n: int, d: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("channels", [32, 40, 48, 64, 128, 256])
def test_plane_pack_unpack_round_trip_is_exact(width, channels):
    plane = Plane(offset=3, bits=width, shift=0, start=0, channels=channels)
    values = torch.randint(0, 2**width, (5, 7, channels), generator=torch.Generator().manual_seed(1))
    packed = pack_plane(values, plane)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 7, channels * width // 8)
    record = torch.cat([torch.zeros(5, 7, 3, dtype=torch.uint8), packed], dim=-1)
    assert torch.equal(unpack_plane(record, plane), values.to(torch.int32))


def test_plane_byte_holds_channels_one_block_apart():
    """Byte j of a 2-bit plane over 16 channels holds channels j, j+4, j+8, j+12 at bits 0, 2, 4, 6."""
    plane = Plane(offset=0, bits=2, shift=0, start=0, channels=16)
    values = torch.zeros(16, dtype=torch.int64)
    values[[1, 5, 9, 13]] = torch.tensor([1, 2, 3, 1])
    assert pack_plane(values, plane).tolist() == [0, 1 | 2 << 2 | 3 << 4 | 1 << 6, 0, 0]


@pytest.mark.parametrize("head_dim", SUPPORTED_HEAD_DIMS)
@pytest.mark.parametrize("bits", [1, 2, 2.5, 3, 3.5, 4])
def test_codes_round_trip_through_the_packed_record(head_dim, bits):
    qz = get_quantizer(VectorLayout(head_dim=head_dim, bits=bits))
    x = 3.0 * unit_vectors(64, head_dim)
    packed = qz.quantize(x)
    assert packed.codes.shape == (64, qz.layout.code_bytes) and packed.norms.shape == (64, 1)
    y = x / x.norm(dim=-1, keepdim=True) @ rotation_matrix(head_dim).T
    expected = torch.cat(
        [
            torch.bucketize(y[:, s.start : s.start + s.channels].contiguous(), boundaries(head_dim, s.bits))
            for s in qz.layout.segments
        ],
        dim=-1,
    )
    assert torch.equal(qz.codes(packed), expected.to(torch.int32))
    torch.testing.assert_close(qz.norms(packed), torch.full((64,), 3.0), rtol=1e-3, atol=0)


def test_raw_16_bit_layer_is_exact_bf16():
    qz = get_quantizer(VectorLayout(head_dim=64, bits=16))
    x = torch.randn(9, 2, 64).to(torch.bfloat16)
    assert torch.equal(qz.dequantize(qz.quantize(x)), x.float())


@pytest.mark.parametrize("kind", ["qr", "hadamard"])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_rotations_are_orthogonal_and_seeded(kind, head_dim):
    r = rotation_matrix(head_dim, 3, kind).double()
    torch.testing.assert_close(r @ r.T, torch.eye(head_dim, dtype=torch.float64), rtol=0, atol=1e-6)
    assert torch.equal(rotation_matrix(head_dim, 3, kind), rotation_matrix.__wrapped__(head_dim, 3, kind))
    assert not torch.equal(rotation_matrix(head_dim, 3, kind), rotation_matrix(head_dim, 4, kind))


def test_hadamard_entries_are_plus_minus_one_over_sqrt_d_and_non_power_of_two_falls_back():
    r = rotation_matrix(64, 0, "hadamard")
    torch.testing.assert_close(r.abs(), torch.full((64, 64), 1 / 8))
    assert torch.equal(rotation_matrix(80, 0, "hadamard"), rotation_matrix(80, 0, "qr"))
    assert qjl_matrix(64).shape == (64, 64)


def test_norm_correction_keeps_the_norm_of_the_reconstruction():
    x = 5.0 * unit_vectors(100, 128)
    plain = get_quantizer(VectorLayout(head_dim=128, bits=2))
    corrected = get_quantizer(VectorLayout(head_dim=128, bits=2), norm_correction=True)
    norms = corrected.dequantize(corrected.quantize(x)).norm(dim=-1)
    torch.testing.assert_close(norms, torch.full((100,), 5.0), rtol=2e-3, atol=0)
    assert plain.dequantize(plain.quantize(x)).norm(dim=-1).mean() < 0.96 * 5.0  # E||c|| = sqrt(1 - D_mse) < 1
    with pytest.raises(ValueError, match="norm_correction applies to the 'mse' variant only"):
        get_quantizer(VectorLayout(head_dim=128, bits=2, variant="prod"), norm_correction=True)


def test_bad_shapes_name_the_expected_shape():
    qz = get_quantizer(VectorLayout(head_dim=128, bits=4))
    with pytest.raises(ValueError, match="expected vectors of head_dim 128, got shape \\(3, 64\\)"):
        qz.quantize(torch.randn(3, 64))
    with pytest.raises(
        ValueError, match="expected codes uint8 \\(\\.\\.\\., 64\\) and norms float16 \\(\\.\\.\\., 1\\)"
    ):
        qz.dequantize(PackedVectors.empty(VectorLayout(head_dim=128, bits=3), (3,)))
    with pytest.raises(TypeError, match="expected PackedVectors"):
        qz.dequantize(torch.zeros(3, 66, dtype=torch.uint8))


def test_distortion_matches_the_paper_at_head_dim_128(capsys):
    """TurboQuant section 4.1: d_mse within 3% (mse) and d_prod * 128 within 5% with no bias (prod)."""
    assert distortion.main(["--head-dim", "128", "--samples", "50000", "--json"]) == 0
    rows = {(r["bits"], r["variant"]): r for r in json.loads(capsys.readouterr().out)}
    for bits in (1, 2, 3, 4):
        mse, prod = rows[bits, "mse"], rows[bits, "prod"]
        assert set(mse) >= {"bits", "variant", "d_mse", "d_prod", "ip_bias", "bytes_per_vector"}
        assert mse["d_mse"] == pytest.approx(distortion.PAPER_D_MSE[bits], rel=0.03)
        assert prod["d_prod"] * 128 == pytest.approx(distortion.PAPER_D_PROD_TIMES_D[bits], rel=0.05)
        assert abs(prod["ip_bias"]) < 0.003
    assert [rows[b, "mse"]["bytes_per_vector"] for b in (4, 3, 2)] == [66, 50, 34]


def test_distortion_cli_rejects_unsupported_head_dim(capsys):
    assert distortion.main(["--head-dim", "100"]) == 2
    assert "unsupported head_dim 100" in capsys.readouterr().err


def test_a_vector_is_rotated_bitwise_the_same_alone_and_among_others():
    """The write rotates each vector on its own, so its codes do not depend on what is written with it."""
    from tq_serve.kernels.quantizer import _rotate_each

    rotation_t = rotation_matrix(128, 0, "qr").T
    u = unit_vectors(70, 128, seed=3).view(35, 2, 128)
    together = _rotate_each(u, rotation_t)
    for i in range(35):
        assert torch.equal(_rotate_each(u[i : i + 1], rotation_t), together[i : i + 1])
    torch.testing.assert_close(together, u @ rotation_t, rtol=1e-5, atol=1e-6)
