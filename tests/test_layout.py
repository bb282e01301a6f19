"""Exact checks of the packed byte layout: sizes, plane geometry, bytes per token, validation messages."""

import pytest
from tq_serve.kernels.layout import SUPPORTED_HEAD_DIMS, KVLayout, VectorLayout, parse_bits


@pytest.mark.parametrize(("bits", "nbytes"), [(4, 66), (3, 50), (2, 34), (16, 256)])
def test_bytes_per_vector_at_head_dim_128(bits, nbytes):
    assert VectorLayout(head_dim=128, bits=bits).bytes_per_vector == nbytes


def test_prod_adds_qjl_plane_and_residual_norm():
    lay = VectorLayout(head_dim=128, bits=3, variant="prod")
    assert lay.mse_bits == 2
    assert (lay.plane_bytes, lay.qjl_bytes, lay.code_bytes) == (32, 16, 32 + 16)
    assert (lay.norms_per_vector, lay.bytes_per_vector) == (2, 32 + 16 + 2 + 2)
    assert VectorLayout(head_dim=128, bits=1, variant="prod").plane_bytes == 0


@pytest.mark.parametrize("head_dim", SUPPORTED_HEAD_DIMS)
@pytest.mark.parametrize("bits", [1, 2, 2.5, 3, 3.5, 4])
def test_planes_tile_the_code_bytes_and_channels(head_dim, bits):
    lay = VectorLayout(head_dim=head_dim, bits=bits)
    offset, covered = 0, 0
    for seg in lay.segments:
        assert seg.start == covered
        shift = 0
        for plane in seg.planes:
            assert plane.offset == offset and plane.shift == shift
            assert plane.nbytes * plane.per_byte == seg.channels
            offset += plane.nbytes
            shift += plane.bits
        assert shift == seg.bits
        covered += seg.channels
    assert covered == head_dim and offset == lay.plane_bytes == lay.code_bytes
    assert lay.code_bytes * 8 == bits * head_dim


@pytest.mark.parametrize(("bits", "code_bytes"), [(4, 64), (3, 48), (2, 32)])
def test_code_rows_at_head_dim_128_are_16_byte_aligned_and_apart_from_the_norm(bits, code_bytes):
    lay = VectorLayout(head_dim=128, bits=bits)
    assert (lay.code_bytes, lay.code_row_align, lay.norms_per_vector, lay.norm_bytes) == (code_bytes, 16, 1, 2)


def test_raw_layout_is_the_bf16_vector_without_a_norm():
    lay = VectorLayout(head_dim=96, bits=16)
    assert (lay.code_bytes, lay.norms_per_vector, lay.bytes_per_vector) == (192, 0, 192)


def test_fractional_bits_split_channels_in_half():
    lay = VectorLayout(head_dim=128, bits=2.5)
    assert [(s.start, s.channels, s.bits) for s in lay.segments] == [(0, 64, 3), (64, 64, 2)]
    assert lay.bytes_per_vector == 40 + 2


def test_kv_layout_bytes_per_token_sums_layers_heads_k_and_v():
    kv = KVLayout(num_layers=3, num_kv_heads=8, head_dim=128, layer_bits=((4, 4), (4, 2), (16, 3)))
    assert kv.bytes_per_token == 8 * ((66 + 66) + (66 + 34) + (256 + 50))
    assert kv.bf16_bytes_per_token == 3 * 8 * 2 * 256
    assert kv.average_bits == pytest.approx((4 + 4 + 4 + 2 + 16 + 3) / 6)


@pytest.mark.parametrize(("bits", "ratio"), [(4, 3.88), (3, 5.12), (2, 7.53)])
def test_compression_ratio_of_uniform_schedules(bits, ratio):
    kv = KVLayout.uniform(num_layers=32, num_kv_heads=8, head_dim=128, bits=bits)
    assert kv.compression_ratio == pytest.approx(ratio, abs=0.01)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"head_dim": 100, "bits": 4}, "unsupported head_dim 100: supported values are 64, 80, 96, 128, 256"),
        ({"head_dim": 128, "bits": 5}, "unsupported bits 5: supported values are 1, 2, 2.5, 3, 3.5, 4, 16"),
        ({"head_dim": 128, "bits": 4, "variant": "fast"}, "unsupported variant 'fast'"),
        ({"head_dim": 128, "bits": 2.5, "variant": "prod"}, "unsupported bits 2.5 for variant 'prod'"),
        ({"head_dim": 128, "bits": 4, "norm_dtype": "bfloat16"}, "unsupported norm_dtype 'bfloat16'"),
    ],
)
def test_bad_vector_layout_names_value_and_choices(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        VectorLayout(**kwargs)


def test_bad_kv_layout_names_layer():
    with pytest.raises(ValueError, match="layer_bits has 2 entries but the model has 3 layers"):
        KVLayout(num_layers=3, num_kv_heads=2, head_dim=64, layer_bits=((4, 4), (4, 4)))
    with pytest.raises(ValueError, match="layer 1 v_bits: unsupported bits 7"):
        KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, layer_bits=((4, 4), (4, 7)))


def test_parse_bits():
    assert parse_bits("4") == 4 and isinstance(parse_bits("4"), int)
    assert parse_bits("2.5") == 2.5
    with pytest.raises(ValueError, match="unsupported bits 'x'"):
        parse_bits("x")
