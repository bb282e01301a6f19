"""The SGLang plug-in without a running server: its config contract, the hooked-name check, SGLang's capacity
computation with the capacity hook installed, the packed pool and the attention backend on hand-made batches.

Capacity runs SGLang's own DefaultPoolConfigurator (the code that sizes max_total_num_tokens from a KV byte budget)
around the plug-in's hook, for several configs in one process.
"""

import json
import logging
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from tq_serve.kernels.layout import KVLayout
from tq_serve.kernels.quantizer import get_quantizer
from tq_serve.kernels.reference import attend_packed

from tq_serve.schedule import BitSchedule
from tq_serve.sglang_plugin.config import ENV_VAR, TurboQuantConfig
from tq_serve.sglang_plugin.ops import cpu_ops

if not torch.cuda.is_available():
    from tq_serve.cpu_support import apply_cpu_support

    apply_cpu_support()  # before anything imports sglang


def write_tiny_llama_config(path, *, head_dim=128, num_layers=2, num_heads=4, num_kv_heads=2, vocab=256):
    """A Llama config and byte-level tokenizer (no weights): enough for SGLang's ModelConfig."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="Ā", eos_token="ā").save_pretrained(path)
    LlamaConfig(
        architectures=["LlamaForCausalLM"],
        vocab_size=vocab,
        hidden_size=num_heads * head_dim,
        intermediate_size=2 * num_heads * head_dim,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=1024,
        torch_dtype="bfloat16",
    ).save_pretrained(path)
    return path


# -- the config contract --------------------------------------------------------------------------------------------


def scheduled(*layer_bits, variant="mse", **options) -> TurboQuantConfig:
    return TurboQuantConfig(
        schedule=BitSchedule(name="test", model="tiny", layer_bits=layer_bits, variant=variant), **options
    )


def test_config_defaults_without_the_env_var():
    cfg = TurboQuantConfig.from_env({})
    assert (cfg.kv_bits, cfg.schedule, cfg.layer_bits, cfg.variant, cfg.norm_dtype) == (4, None, None, "mse", "float16")
    assert (cfg.seed, cfg.rotation, cfg.norm_correction, cfg.use_triton_interpreter) == (0, "qr", False, False)
    assert cfg.batch_invariant_cpu is False  # oneDNN stays on unless asked: the fast default


def test_config_round_trips_through_the_env_var():
    cfg = scheduled((4, 2), (3.5, 16), seed=7, rotation="hadamard", norm_correction=True, norm_dtype="float32")
    env = cfg.to_env()
    assert list(env) == [ENV_VAR]
    assert json.loads(env[ENV_VAR])["schedule"]["layer_bits"] == [[4, 2], [3.5, 16]]
    assert TurboQuantConfig.from_env(env) == cfg
    uniform = TurboQuantConfig(kv_bits=2.5, batch_invariant_cpu=True)
    assert TurboQuantConfig.from_env(uniform.to_env()) == uniform


def test_config_accepts_the_launchers_json():
    text = (
        '{"kv_bits": 4.0, "schedule": null, "variant": "prod", "norm_dtype": "float16", "seed": 0, '
        '"rotation": "qr", "norm_correction": false, "use_triton_interpreter": false}'
    )
    cfg = TurboQuantConfig.from_env({ENV_VAR: text})
    assert cfg.kv_bits == 4 and cfg.variant == "prod"


def test_a_schedule_fixes_the_variant_and_replaces_kv_bits():
    cfg = scheduled((4, 4), variant="prod")
    assert (cfg.kv_bits, cfg.variant) == (None, "prod")
    with pytest.raises(ValueError, match="variant 'mse' contradicts bit schedule 'test'"):
        TurboQuantConfig(schedule=cfg.schedule, variant="mse")


SCHEDULE_JSON = '{"name": "s", "model": "m", "layer_bits": [[4]]}'


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not valid JSON"),
        ('{"kv_bits": 5}', "unsupported bits"),
        ('{"kv_bits": 16}', "unsupported bits"),  # 16 is the plain-SGLang baseline, which has no config
        ('{"bits": 4}', "unknown keys"),
        ('{"variant": "fast"}', "unsupported variant"),
        ('{"rotation": "dct"}', "unsupported rotation"),
        ('{"norm_dtype": "bfloat16"}', "unsupported norm_dtype"),
        ('{"seed": -1}', "seed must be an integer"),
        ('{"schedule": ' + SCHEDULE_JSON + "}", r"layer 0: expected \[k_bits, v_bits\]"),
        ('{"kv_bits": null, "schedule": null}', "kv_bits or a schedule"),
        ('{"variant": "prod", "norm_correction": true}', "norm_correction"),
    ],
)
def test_config_rejects_bad_input_with_a_reason(text, message):
    with pytest.raises(ValueError, match=message):
        TurboQuantConfig.from_env({ENV_VAR: text})


def test_layout_follows_the_schedule_and_a_pipeline_slice():
    cfg = scheduled((4, 4), (3, 2), (2, 2))
    full = cfg.kv_layout(num_layers=3, num_kv_heads=8, head_dim=128)
    assert full.layer_bits == ((4, 4), (3, 2), (2, 2))
    assert full.bytes_per_token == 8 * (66 + 66 + 50 + 34 + 34 + 34)
    stage = cfg.kv_layout(num_layers=3, num_kv_heads=8, head_dim=128, start_layer=1, end_layer=3)
    assert stage.layer_bits == ((3, 2), (2, 2))
    with pytest.raises(ValueError, match="has 3 layers but the model has 4"):
        cfg.kv_layout(num_layers=4, num_kv_heads=8, head_dim=128)
    uniform = TurboQuantConfig(kv_bits=3).kv_layout(num_layers=2, num_kv_heads=1, head_dim=128)
    assert uniform.layer_bits == ((3, 3), (3, 3))


# -- the hooked-name check ------------------------------------------------------------------------------------------


def test_every_hooked_name_exists_in_the_installed_sglang():
    from tq_serve.sglang_plugin.compat import check_sglang, missing_names

    assert missing_names() == []
    check_sglang()


def test_a_missing_hooked_name_fails_naming_the_supported_version():
    from tq_serve.sglang_plugin.compat import HOOKED_NAMES, IncompatibleSGLangError, check_sglang

    gone = (
        "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool.no_such_method",
        "sglang.srt.no_such_module.Thing",
    )
    with pytest.raises(IncompatibleSGLangError) as err:
        check_sglang(HOOKED_NAMES + gone)
    message = str(err.value)
    assert "sglang==0.5.23" in message
    assert all(name in message for name in gone)
    assert "MHATokenToKVPool._create_buffers" not in message  # only the missing ones are listed


def test_a_changed_hooked_signature_fails_naming_the_supported_version():
    from tq_serve.sglang_plugin.compat import CELL_SIZE_TARGET, IncompatibleSGLangError, check_sglang

    with pytest.raises(IncompatibleSGLangError, match="sglang==0.5.23") as err:
        check_sglang(signatures={CELL_SIZE_TARGET: ("self", "kvc", "num_layers", "page_size")})
    assert "changed: " + CELL_SIZE_TARGET + "(self, kvc, num_layers)" in str(err.value)


# -- capacity: SGLang's own sizing with the plug-in's hooks ---------------------------------------------------------


def test_register_adds_the_backend_and_wraps_the_two_hooked_functions():
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator
    from sglang.srt.model_executor.pool_configurator import DefaultPoolConfigurator
    from sglang.srt.plugins import load_plugins

    load_plugins()  # the entry point, as every SGLang process runs it
    assert "turboquant" in ATTENTION_BACKEND_CHOICES
    assert ATTENTION_BACKENDS["turboquant"].__module__ == "tq_serve.sglang_plugin"
    assert hasattr(DefaultPoolConfigurator._compute_cell_size, "__wrapped__")
    assert hasattr(KVCacheConfigurator._resolve_kv_pool_class, "__wrapped__")
    from sglang.srt.models import utils as model_utils

    assert hasattr(model_utils.enable_fused_set_kv_buffer, "__wrapped__")


def test_models_never_write_bf16_kv_into_the_packed_pool_themselves():
    """Qwen3-MoE, gpt-oss and others fuse rope with a bf16 KV write when enable_fused_set_kv_buffer says so (on
    CUDA with a bf16 pool): for the packed pool the hook says no, and the backend offers the pool SGLang's forward
    context asks it for."""
    from tq_serve.sglang_plugin import hooks

    pool, _ = make_pool(TurboQuantConfig(kv_bits=4))
    asked = []

    def original(forward_batch):
        asked.append(forward_batch)
        return True

    assert hooks.no_fused_kv_write(original, "batch", pool=pool) is False and not asked
    assert hooks.no_fused_kv_write(original, "batch", pool=object()) is True and asked == ["batch"]
    backend, _ = make_backend(pool)
    assert backend.token_to_kv_pool is pool and backend.req_to_token_pool.size == 4


@pytest.fixture(scope="module")
def sglang_sizing(tmp_path_factory):
    """max_total_num_tokens as SGLang's DefaultPoolConfigurator computes it for a KV budget, for the tiny Llama
    (head_dim 128, 2 layers, 2 KV heads), with the plug-in's capacity hook installed for a given config."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_executor.pool_configurator import DefaultPoolConfigurator
    from sglang.srt.runtime_context import create_context, use_context
    from sglang.srt.server_args import ServerArgs
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    from tq_serve.sglang_plugin import hooks, register

    register()  # the backend name must be a valid ServerArgs choice
    model = write_tiny_llama_config(tmp_path_factory.mktemp("tiny-llama-config"))
    unhooked = DefaultPoolConfigurator._compute_cell_size
    unhooked = getattr(unhooked, "__wrapped__", unhooked)

    def size(backend: str, config: TurboQuantConfig | None, budget: int) -> tuple[int, int]:
        def hooked(sizer, kvc, num_layers):  # what register() installs, for this test's config
            return hooks.compute_cell_size(config, unhooked, sizer, kvc, num_layers)

        args = ServerArgs(model_path=str(model), device="cpu", attention_backend=backend, disable_cuda_graph=True)
        with (
            use_context(create_context(args, role="scheduler")),
            mock.patch.object(DefaultPoolConfigurator, "_compute_cell_size", hooked if config else unhooked),
        ):
            model_config = ModelConfig.from_server_args(args)
            n = model_config.num_hidden_layers
            kvc = SimpleNamespace(
                model_config=model_config,
                server_args=args,
                kv_cache_dtype=torch.bfloat16,
                kv_cache_dtype_str="auto",
                use_mla_backend=False,
                is_hybrid_swa=False,
                mambaish_config=None,
                is_draft_worker=False,
                pp_size=1,
                spec_algorithm=SpeculativeAlgorithm.NONE,
                layer_info=SimpleNamespace(start_layer=0, end_layer=n, num_effective_layers=n),
            )
            sizer = DefaultPoolConfigurator(kvc)
            return sizer._cell_size, sizer.calculate_pool_sizes(budget, 1).max_total_num_tokens

    return size


CAPACITY_CONFIGS = {
    "4-bit": TurboQuantConfig(kv_bits=4),
    "3-bit": TurboQuantConfig(kv_bits=3),
    "2-bit": TurboQuantConfig(kv_bits=2),
    "4-bit prod": TurboQuantConfig(kv_bits=4, variant="prod"),
    "schedule": scheduled((4, 2), (3, 16)),
}
DOCUMENTED_RATIOS = {"4-bit": 3.9, "3-bit": 5.1, "2-bit": 7.5}  # docs/ARCHITECTURE.md section 2, d=128


@pytest.mark.parametrize("budget", [1 << 30, 3 * (1 << 20) + 12345])
@pytest.mark.parametrize("name", list(CAPACITY_CONFIGS))
def test_capacity_comes_from_the_packed_bytes_per_token(sglang_sizing, name, budget):
    config = CAPACITY_CONFIGS[name]
    layout = config.kv_layout(num_layers=2, num_kv_heads=2, head_dim=128)
    bf16_cell, bf16_tokens = sglang_sizing("torch_native", None, budget)
    tq_cell, tq_tokens = sglang_sizing("turboquant", config, budget)
    assert bf16_cell == layout.bf16_bytes_per_token  # SGLang's own bf16 sizing
    assert tq_cell == layout.bytes_per_token
    assert tq_tokens == budget // layout.bytes_per_token
    assert tq_tokens / bf16_tokens == pytest.approx(layout.compression_ratio, rel=0.02)
    if name in DOCUMENTED_RATIOS:
        assert tq_tokens / bf16_tokens == pytest.approx(DOCUMENTED_RATIOS[name], abs=0.05)


def test_capacity_hook_passes_other_backends_through(sglang_sizing):
    assert sglang_sizing("torch_native", TurboQuantConfig(kv_bits=2), 1 << 30) == sglang_sizing(
        "torch_native", None, 1 << 30
    )


# -- the packed pool ------------------------------------------------------------------------------------------------

SCHEDULE = scheduled((4, 2), (3, 16))
HKV, D = 2, 128


def make_pool(config=SCHEDULE, size=64):
    from tq_serve.sglang_plugin.pool import TurboQuantKVPool

    num_layers = len(config.layer_bits) if config.layer_bits else 2
    layout = config.kv_layout(num_layers=num_layers, num_kv_heads=HKV, head_dim=D)
    pool_cls = TurboQuantKVPool.bind(layout, config)
    pool = pool_cls(
        size,
        page_size=1,
        dtype=torch.bfloat16,
        head_num=HKV,
        head_dim=D,
        layer_num=layout.num_layers,
        device="cpu",
        enable_memory_saver=False,
        v_head_dim=D,
        start_layer=0,
        end_layer=layout.num_layers - 1,
    )
    return pool, layout


def test_pool_is_an_mha_pool_of_per_layer_code_rows_and_norms():
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    pool, layout = make_pool()
    assert isinstance(pool, MHATokenToKVPool)
    assert [tuple(b.shape) for b in pool.k_buffer] == [(65, HKV, 64), (65, HKV, 48)]
    assert [tuple(b.shape) for b in pool.v_buffer] == [(65, HKV, 32), (65, HKV, 256)]
    assert all(b.dtype == torch.uint8 for b in pool.k_buffer + pool.v_buffer)
    assert [tuple(b.shape) for b in pool.k_norm_buffer + pool.v_norm_buffer] == [(65, HKV, 1)] * 3 + [(65, HKV, 0)]
    k_bytes, v_bytes = pool.get_kv_size_bytes()
    assert k_bytes + v_bytes == (64 + 1) * layout.bytes_per_token  # exactly what capacity charges per slot
    keys = pool.get_key_buffer(1)  # packed codes and norms, never a bf16 view
    assert keys.codes is pool.k_buffer[1] and keys.norms is pool.k_norm_buffer[1]
    descs = pool._kv_buffer_descs
    assert sum(d.row_bytes for d in descs) == layout.bytes_per_token  # every byte of a slot is described


def test_pool_slot_moves_and_cpu_copies_carry_the_norms():
    pool, _ = make_pool()
    torch.manual_seed(1)
    k, v = torch.randn(2, HKV, D, dtype=torch.bfloat16), torch.randn(2, HKV, D, dtype=torch.bfloat16)
    pool.set_kv_buffer(SimpleNamespace(layer_id=0), torch.tensor([4, 5]), k, v)
    before = [b[[4, 5]].clone() for b in pool._all_buffers()]
    pool.move_kv_cache(torch.tensor([20, 21]), torch.tensor([4, 5]))
    assert all(torch.equal(b[[20, 21]], w) for b, w in zip(pool._all_buffers(), before, strict=True))
    saved = pool.get_cpu_copy(torch.tensor([20, 21]))
    for b in pool._all_buffers():
        b.zero_()
    pool.load_cpu_copy(saved, torch.tensor([30, 31]))
    assert all(torch.equal(b[[30, 31]], w) for b, w in zip(pool._all_buffers(), before, strict=True))


def test_pool_write_quantizes_into_exactly_the_given_slots():
    pool, layout = make_pool()
    torch.manual_seed(0)
    k, v = torch.randn(3, HKV, D, dtype=torch.bfloat16), torch.randn(3, HKV, D, dtype=torch.bfloat16)
    loc = torch.tensor([9, 3, 40])
    pool.set_kv_buffer(SimpleNamespace(layer_id=1), loc, k, v)
    kq, vq = pool.quantizers(1)
    k_packed = kq.quantize(k)
    assert torch.equal(pool.k_buffer[1][loc], k_packed.codes) and torch.equal(
        pool.k_norm_buffer[1][loc], k_packed.norms
    )
    assert torch.equal(pool.v_buffer[1][loc], vq.quantize(v).codes)  # 16 bits: the raw bf16 vector, no norm
    others = torch.ones(65, dtype=torch.bool)
    others[loc] = False
    assert not pool.k_buffer[1][others].any() and not pool.v_buffer[1][others].any()
    assert not pool.k_norm_buffer[1][others].any()
    assert not pool.k_buffer[0].any() and not pool.k_norm_buffer[0].any()  # layer 0 untouched


def test_pool_saturates_norms_beyond_float16_counts_them_and_warns_once_per_layer(caplog):
    """A K norm of 1e6 (outlier coordinates of 1e5) is stored at float16's max, never inf; the pool counts it per
    layer and logs one line naming the layer and --kv-norm-dtype float32."""
    pool, _ = make_pool()
    k, v = torch.randn(3, HKV, D), torch.randn(3, HKV, D)
    k[1, 0, 7] = 1e5
    k[2, 1] *= 1e6
    with caplog.at_level(logging.WARNING, logger="tq_serve.sglang_plugin.pool"):
        pool.set_kv_buffer(SimpleNamespace(layer_id=1), torch.tensor([5, 6, 7]), k, v)
        pool.set_kv_buffer(SimpleNamespace(layer_id=1), torch.tensor([8, 9, 10]), k, v)
    assert torch.isfinite(pool.k_norm_buffer[1].float()).all()
    assert pool.k_norm_buffer[1][6, 0, 0] == torch.finfo(torch.float16).max
    assert pool.norm_saturated.tolist() == [0, 4]
    assert pool.check_norm_saturation() == {1: 4}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "layer 1" in lines[0] and "--kv-norm-dtype float32" in lines[0]


# -- the attention backend on hand-made batches ---------------------------------------------------------------------

HQ = 4


def make_backend(pool, *, max_reqs=4, max_context=64):
    from tq_serve.sglang_plugin.backend import TurboQuantAttnBackend

    req_to_token = torch.zeros(max_reqs, max_context, dtype=torch.int32)
    runner = SimpleNamespace(
        token_to_kv_pool=pool,
        model_config=SimpleNamespace(is_encoder_decoder=False),
        device="cpu",
        req_to_token_pool=SimpleNamespace(req_to_token=req_to_token, size=max_reqs),
    )
    return TurboQuantAttnBackend(runner), req_to_token


def make_layer(layer_id):
    from sglang.srt.layers.radix_attention import AttentionType

    return SimpleNamespace(
        layer_id=layer_id,
        tp_q_head_num=HQ,
        tp_k_head_num=HKV,
        qk_head_dim=D,
        v_head_dim=D,
        scaling=D**-0.5,
        logit_cap=0.0,
        logit_capping_method="tanh",
        is_cross_attention=False,
        attn_type=AttentionType.DECODER,
        sliding_window_size=-1,
    )


def extend_batch(req_pool_indices, prefix_lens, extend_lens, out_cache_loc, mode=None):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    seq_lens = torch.tensor([p + e for p, e in zip(prefix_lens, extend_lens, strict=True)])
    return SimpleNamespace(
        forward_mode=mode or ForwardMode.EXTEND,
        batch_size=len(req_pool_indices),
        req_pool_indices=torch.tensor(req_pool_indices),
        seq_lens=seq_lens,
        seq_lens_sum=int(seq_lens.sum()),
        extend_prefix_lens=torch.tensor(prefix_lens),
        extend_seq_lens=torch.tensor(extend_lens),
        extend_seq_lens_cpu=list(extend_lens),
        out_cache_loc=out_cache_loc,
    )


def exact_causal_attention(q, k, v, prefix_len):
    """float32 attention of q (Lq, HQ, D) over k, v (Lk, HKV, D), query i seeing keys < prefix_len + i + 1."""
    lq, lk = q.shape[0], k.shape[0]
    group = HQ // HKV
    k, v = k.float().repeat_interleave(group, dim=1), v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * D**-0.5
    visible = torch.arange(lk)[None, :] <= (torch.arange(lq)[:, None] + prefix_len)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


def test_extend_writes_new_tokens_first_then_attends_through_the_pool():
    pool, layout = make_pool(TurboQuantConfig(kv_bits=4))
    backend, req_to_token = make_backend(pool)
    torch.manual_seed(1)
    layer = make_layer(0)
    # two requests: A has 5 cached prefix tokens (already in the pool) and 3 new ones; B is new with 4 tokens
    slots_a, slots_b = torch.arange(10, 18), torch.arange(30, 34)
    req_to_token[2, :8], req_to_token[0, :4] = slots_a, slots_b
    k_all, v_all = torch.randn(12, HKV, D, dtype=torch.bfloat16), torch.randn(12, HKV, D, dtype=torch.bfloat16)
    pool.set_kv_buffer(layer, slots_a[:5], k_all[:5], v_all[:5])  # the cached prefix
    new = torch.cat([torch.arange(5, 8), torch.arange(8, 12)])
    batch = extend_batch([2, 0], [5, 0], [3, 4], torch.cat([slots_a[5:], slots_b]))
    q = torch.randn(7, HQ * D, dtype=torch.bfloat16)

    backend.init_forward_metadata(batch)
    out = backend.forward_extend(q, k_all[new].reshape(7, -1), v_all[new].reshape(7, -1), layer, batch)

    assert out.shape == (7, HQ * D) and out.dtype == torch.bfloat16
    kq, vq = pool.quantizers(0)
    assert torch.equal(pool.k_buffer[0][slots_a], kq.quantize(k_all[:8]).codes)  # new tokens were written
    k_hat, v_hat = kq.dequantize(kq.quantize(k_all)), vq.dequantize(vq.quantize(v_all))
    q3 = q.view(7, HQ, D)
    expect_a = exact_causal_attention(q3[:3], k_hat[:8], v_hat[:8], prefix_len=5)
    expect_b = exact_causal_attention(q3[3:], k_hat[8:], v_hat[8:], prefix_len=0)
    # against attention over the *dequantized* K/V, new tokens included: they were attended in quantized form
    torch.testing.assert_close(out.view(7, HQ, D).float(), torch.cat([expect_a, expect_b]), atol=2e-2, rtol=2e-2)


def test_cached_prefix_gives_the_same_output_as_computing_it():
    """Prefix-cache invariance at the backend: the last tokens' outputs do not depend on whether the prefix was
    computed in the same extend or read from slots a previous request wrote."""
    pool, _ = make_pool(TurboQuantConfig(kv_bits=3))
    backend, req_to_token = make_backend(pool)
    torch.manual_seed(2)
    layer = make_layer(0)
    n, prefix = 12, 9
    k, v = torch.randn(n, HKV, D, dtype=torch.bfloat16), torch.randn(n, HKV, D, dtype=torch.bfloat16)
    q = torch.randn(n, HQ * D, dtype=torch.bfloat16)

    cold_slots = torch.arange(1, 1 + n)
    req_to_token[0, :n] = cold_slots
    cold = extend_batch([0], [0], [n], cold_slots)
    backend.init_forward_metadata(cold)
    out_cold = backend.forward_extend(q, k.reshape(n, -1), v.reshape(n, -1), layer, cold)

    # a second request whose first 9 tokens hit the radix cache: they are the cold request's slots
    hit_slots = torch.cat([cold_slots[:prefix], torch.arange(40, 40 + n - prefix)])
    req_to_token[1, :n] = hit_slots
    hit = extend_batch([1], [prefix], [n - prefix], hit_slots[prefix:])
    backend.init_forward_metadata(hit)
    out_hit = backend.forward_extend(
        q[prefix:], k[prefix:].reshape(n - prefix, -1), v[prefix:].reshape(n - prefix, -1), layer, hit
    )
    torch.testing.assert_close(out_hit, out_cold[prefix:], atol=0, rtol=0)


def test_decode_reads_the_batch_slots_and_matches_the_packed_reference():
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    pool, _ = make_pool(TurboQuantConfig(kv_bits=2, variant="prod"))
    backend, req_to_token = make_backend(pool)
    torch.manual_seed(3)
    layer = make_layer(0)
    lens = [6, 1, 9]
    slot_rows = [torch.arange(2, 8), torch.arange(20, 21), torch.arange(50, 59)]
    for r, slots in enumerate(slot_rows):
        req_to_token[r, : lens[r]] = slots
        if lens[r] > 1:  # the context before this step's token
            ctx = slots[:-1]
            kv = torch.randn(2, ctx.numel(), HKV, D, dtype=torch.bfloat16)
            pool.set_kv_buffer(layer, ctx, kv[0], kv[1])
    pool.k_buffer[0][60:].fill_(255)  # garbage outside the batch's slots must not matter
    pool.k_norm_buffer[0][60:].fill_(float("nan"))
    new_k, new_v = torch.randn(3, HKV, D, dtype=torch.bfloat16), torch.randn(3, HKV, D, dtype=torch.bfloat16)
    batch = SimpleNamespace(
        forward_mode=ForwardMode.DECODE,
        batch_size=3,
        req_pool_indices=torch.tensor([0, 1, 2]),
        seq_lens=torch.tensor(lens),
        seq_lens_sum=sum(lens),
        out_cache_loc=torch.stack([s[-1] for s in slot_rows]),
    )
    q = torch.randn(3, HQ * D, dtype=torch.bfloat16)
    backend.init_forward_metadata(batch)
    out = backend.forward_decode(q, new_k.reshape(3, -1), new_v.reshape(3, -1), layer, batch)

    kq, vq = pool.quantizers(0)
    for r, slots in enumerate(slot_rows):
        expect = attend_packed(
            q.view(3, HQ, D)[r : r + 1],
            pool.get_key_buffer(0).index_select(slots),
            pool.get_value_buffer(0).index_select(slots),
            kq,
            vq,
            D**-0.5,
        )
        torch.testing.assert_close(out.view(3, HQ, D)[r : r + 1].float(), expect, atol=1e-2, rtol=1e-2)


def test_backend_refuses_what_it_does_not_implement():
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    pool, _ = make_pool(TurboQuantConfig(kv_bits=4))
    backend, _ = make_backend(pool)
    with pytest.raises(NotImplementedError, match="TARGET_VERIFY"):
        backend.init_forward_metadata(extend_batch([0], [0], [1], torch.tensor([1]), mode=ForwardMode.TARGET_VERIFY))
    with pytest.raises(RuntimeError, match="packed TurboQuant KV pool"):
        make_backend(SimpleNamespace())


def test_each_layer_attends_within_its_own_sliding_window():
    """Layers of one model with different windows (layer 0: W = 3, layer 1: none, as Gemma 2 alternates): each call
    passes its layer's window, extend and decode match the reference with that window, and slots outside the
    window are never read (NaN norms there leave the output finite)."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from tq_serve.kernels import reference

    pool, _ = make_pool(TurboQuantConfig(kv_bits=4))
    backend, req_to_token = make_backend(pool)
    torch.manual_seed(4)
    n = 10
    slots = torch.arange(1, 1 + n)
    req_to_token[0, : n + 1] = torch.arange(1, 2 + n)
    k, v = torch.randn(n, HKV, D, dtype=torch.bfloat16), torch.randn(n, HKV, D, dtype=torch.bfloat16)
    q = torch.randn(n, HQ * D, dtype=torch.bfloat16)
    for layer_id, window in ((0, 3), (1, -1)):
        layer = make_layer(layer_id)
        layer.sliding_window_size = window
        batch = extend_batch([0], [0], [n], slots)
        backend.init_forward_metadata(batch)
        out = backend.forward_extend(q, k.reshape(n, -1), v.reshape(n, -1), layer, batch)
        kq, vq = pool.quantizers(layer_id)
        kp, vp = pool.get_key_buffer(layer_id), pool.get_value_buffer(layer_id)
        expect = reference.extend_attention(q.view(n, HQ, D), kp, vp, torch.tensor([0, n]), torch.tensor([0, n]),
                                            slots, kq, vq, D**-0.5, sliding_window_size=window)  # fmt: skip
        torch.testing.assert_close(out.view(n, HQ, D).float(), expect.float(), atol=1e-2, rtol=1e-2)
        if window >= 0:  # decode one more token with the slots outside its window poisoned
            kp.norms[slots[: n - window]] = float("nan")
            vp.norms[slots[: n - window]] = float("nan")
        decode = SimpleNamespace(
            forward_mode=ForwardMode.DECODE, batch_size=1, req_pool_indices=torch.tensor([0]),
            seq_lens=torch.tensor([n + 1]), seq_lens_sum=n + 1, out_cache_loc=torch.tensor([n + 1]),
        )  # fmt: skip
        backend.init_forward_metadata(decode)
        new = torch.randn(2, 1, HKV * D, dtype=torch.bfloat16)
        out = backend.forward_decode(q[:1], new[0], new[1], layer, decode)
        assert torch.isfinite(out.float()).all()
        indptr, indices = torch.tensor([0, n + 1]), torch.arange(1, 2 + n)
        expect = reference.decode_attention(
            q[:1].view(1, HQ, D), kp, vp, indptr, indices, kq, vq, D**-0.5, sliding_window_size=window
        )
        torch.testing.assert_close(out.view(1, HQ, D).float(), expect.float(), atol=1e-2, rtol=1e-2)


def test_turboquant_must_serve_both_prefill_and_decode():
    from tq_serve.sglang_plugin.hooks import turboquant_selected

    def args(**kw):
        base = dict(attention_backend=None, prefill_attention_backend=None, decode_attention_backend=None)
        return SimpleNamespace(**{**base, **kw})

    assert turboquant_selected(args(attention_backend="turboquant"))
    assert not turboquant_selected(args(attention_backend="torch_native"))
    with pytest.raises(ValueError, match="both prefill and decode"):
        turboquant_selected(args(attention_backend="turboquant", decode_attention_backend="triton"))


def test_layout_is_one_object_for_pool_and_capacity(monkeypatch):
    """The pool and the capacity hook derive their layout from the same KVCacheConfigurator fields."""
    from tq_serve.sglang_plugin import hooks
    from tq_serve.sglang_plugin.hooks import kv_layout_of

    monkeypatch.setattr(hooks, "get_parallel", lambda: SimpleNamespace(attn_tp_size=2, attn_dcp_size=1))

    model_config = SimpleNamespace(
        num_hidden_layers=2,
        head_dim=D,
        v_head_dim=D,
        get_num_kv_heads=lambda tp, dcp: 8 // tp,
        hf_config=SimpleNamespace(architectures=["LlamaForCausalLM"]),
    )
    kvc = SimpleNamespace(
        model_config=model_config,
        use_mla_backend=False,
        is_hybrid_swa=False,
        mambaish_config=None,
        kv_cache_dtype_str="auto",
        layer_info=SimpleNamespace(start_layer=0, end_layer=2, num_effective_layers=2),
    )
    layout = kv_layout_of(kvc, SCHEDULE)
    assert layout == KVLayout(num_layers=2, num_kv_heads=4, head_dim=D, layer_bits=((4, 2), (3, 16)))
    kvc.use_mla_backend = True
    with pytest.raises(NotImplementedError, match="MLA"):
        kv_layout_of(kvc, SCHEDULE)
    kvc.use_mla_backend, kvc.kv_cache_dtype_str = False, "fp8_e4m3"
    with pytest.raises(ValueError, match="kv-cache-dtype"):
        kv_layout_of(kvc, SCHEDULE)


def test_quantizers_follow_the_config_seed_and_rotation():
    cfg = TurboQuantConfig(kv_bits=4, seed=5, rotation="hadamard")
    pool, layout = make_pool(cfg)
    assert pool.quantizers(0)[0] is get_quantizer(layout.k(0), 5, "hadamard", False)


@pytest.mark.parametrize("variant", ["mse", "prod"])
def test_triton_interpreter_path_matches_the_reference_path(variant):
    """use_triton_interpreter runs the GPU code path (the Triton kernels) on a CPU: same batch, same outputs."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    torch.manual_seed(4)
    layer = make_layer(0)
    k, v = torch.randn(2, 9, HKV, D, dtype=torch.bfloat16)  # 2 cached, 5 extend, 2 decode tokens
    q_extend, q_decode = torch.randn(5, HQ * D, dtype=torch.bfloat16), torch.randn(2, HQ * D, dtype=torch.bfloat16)
    # request 0: 2 new tokens at slots 5, 6; request 1: 2 cached at 20, 21 and 3 new at 22..24; then one decode step
    extend = extend_batch([0, 1], [0, 2], [2, 3], torch.tensor([5, 6, 22, 23, 24]))
    decode = SimpleNamespace(
        forward_mode=ForwardMode.DECODE,
        batch_size=2,
        req_pool_indices=torch.tensor([0, 1]),
        seq_lens=torch.tensor([3, 6]),
        seq_lens_sum=9,
        out_cache_loc=torch.tensor([7, 25]),
    )
    outputs = {}
    for interpret in (False, True):
        pool, _ = make_pool(TurboQuantConfig(kv_bits=3, variant=variant, use_triton_interpreter=interpret))
        backend, req_to_token = make_backend(pool)
        assert backend._ops(layer).name == ("triton" if interpret else cpu_ops().name)
        req_to_token[0, :3], req_to_token[1, :6] = torch.tensor([5, 6, 7]), torch.arange(20, 26)
        pool.set_kv_buffer(layer, torch.tensor([20, 21]), k[:2], v[:2])
        backend.init_forward_metadata(extend)
        out_e = backend.forward_extend(q_extend, k[2:7].reshape(5, -1), v[2:7].reshape(5, -1), layer, extend)
        backend.init_forward_metadata(decode)
        out_d = backend.forward_decode(q_decode, k[7:].reshape(2, -1), v[7:].reshape(2, -1), layer, decode)
        outputs[interpret] = (out_e.float(), out_d.float())
    for ref, tri in zip(outputs[False], outputs[True], strict=True):
        torch.testing.assert_close(tri, ref, atol=3e-2, rtol=3e-2)
