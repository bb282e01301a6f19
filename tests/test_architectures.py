"""The architectures of configs/models.yaml through SGLang on a CPU with the TurboQuant cache, with no downloads.

Each is a tiny random-weight stand-in built at test time (tq_serve.models.tiny_arch: its family's head_dim, GQA
ratio, windows, soft-caps, QK-norm, bias), served by in-process engines configured through `python -m tq_serve`'s
settings (tq_serve.bench.architectures, which also writes the README's figures):

- raw 16-bit TurboQuant records serve SGLang's own bf16 torch_native backend's greedy tokens, with logprobs equal up
  to the attention kernels' rounding (RAW16_LOGPROB_TOL, explained there), argmaxes differing only at near-ties;
- at 4 and 3 bits: the teacher-forced next-token KL to bf16 is reported and bounded, greedy tokens are the same with
  the prompt cold or cached, and SGLang's pool holds the layout spec's bytes per token.

Four engines per architecture (~1 min each on a 2-core CPU): Gemma 2 (head_dim 256, soft-caps, sliding windows) runs
in the default suite; the others are `slow` and opt-in with RUN_ALL_ARCHS=1 (`python -m tq_serve.bench
architectures` measures them all).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tq_serve.models.tiny_arch import ARCHS, build, hf_config

DEFAULT_ARCHS = ("gemma2",)
RUN_ALL = os.environ.get("RUN_ALL_ARCHS") == "1"
RAW16_LOGPROB_TOL = 0.05
"""Raw 16-bit records hold the same bf16 K/V as SGLang's cache; only the attention arithmetic differs. Saving each
layer's q, k, v and output in both engines (Qwen2.5 stand-in): layer 0's q, k, v are bitwise equal; the CPU kernel
keeps scores, softmax and the value sum in fp32 and rounds once, its bf16 output the correctly rounded exact
(float64) attention in all but 0.01% of coordinates (those within fp32 error of a rounding boundary); torch_native's
output is bitwise torch's bf16 SDPA, which rounds the softmax weights to bf16 before the value product: 20-27% of
coordinates 1 ulp off. For Gemma 2 torch_native also ignores the attention soft-cap (layer.logit_cap), which
TurboQuant applies. A bf16 network spreads any difference: with torch_native's SDPA run in fp32 (differing from the
kernel in 10 coordinates of layer 0), 45% of layer 2's q differed and prompt logprobs still moved by up to 0.03.
How far it spreads grows with the weights' gain (tq_serve.models.tiny_arch.init_std): at a fixed std the 448-wide
Qwen2.5 stand-in moved logprobs by 0.076 and parted its greedy tokens at a near-tie, and transformers' own model,
bf16 SDPA against exact attention with no SGLang and no TurboQuant, gave the same figures (KL 1.5e-4 against the
engines' 1.4e-4, argmax agreement 98.0% against 98.0%, logprobs 0.071 against 0.076).

So: prompt logprobs, and greedy tokens' logprobs while both engines share the context, within 0.05; a teacher-forced
argmax may differ only where bf16 itself puts the two tokens within NEAR_TIE (no logprob moving by 0.05 can flip a
wider gap), and greedy tokens may part only at such a near-tie. Random weights have many: logits are bf16, so a gap
is a multiple of 1/64 nat at their scale, and exact ties are common."""
NEAR_TIE = 2 * RAW16_LOGPROB_TOL
ROUTING_TIES = 0.01
"""Mixture-of-experts stand-ins: the share of prompt positions (and of teacher-forced argmax flips) allowed outside
those bounds. A router picks each token's experts by top-k of bf16 logits, which tie at bf16 resolution, so any
difference in attention rounding flips some token's experts and moves its logprob by a step: transformers' own
Qwen3-MoE stand-in, bf16 SDPA against exact attention, flipped one token's layer-1 experts of 227, whose logprob moved
0.16 while every other one moved at most 0.023."""
KL_BOUND = {"tq4": 0.15, "tq3": 0.4}
"""Nats per position: a sanity bound (broken plumbing gives KL of nats), not a quality claim. Measured on the random
stand-ins: 0.009-0.021 at 4 bits, 0.028-0.077 at 3 (README)."""


def _arch_param(arch: str):
    if arch in DEFAULT_ARCHS:
        return pytest.param(arch, marks=pytest.mark.sglang)
    skip = pytest.mark.skipif(not RUN_ALL, reason="opt-in: RUN_ALL_ARCHS=1 (four SGLang engines per architecture)")
    return pytest.param(arch, marks=[pytest.mark.sglang, pytest.mark.slow, skip])


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-archs")


@pytest.fixture(scope="module", params=[_arch_param(a) for a in ARCHS])
def measured(request, model_cache):
    """bf16, raw16, tq4 and tq3 engines on one architecture, one after the other; their figures."""
    from tq_serve.bench.architectures import measure_arch_isolated

    arch = request.param
    result = measure_arch_isolated(arch, build(arch, model_cache / arch))  # a child process: see its docstring
    out = os.environ.get("ARCH_RESULTS_DIR")
    if out:
        Path(out, f"{arch}.json").write_text(json.dumps(result, indent=1))
    return result


def test_raw_16_bit_records_serve_bf16s_greedy_tokens_and_logprobs(measured):
    raw = measured["settings"]["raw16"]
    print(f"{measured['arch']} raw16: greedy parting {raw['greedy_parting']}, argmax flips {raw['argmax_flip_gaps']}")
    outliers = int(ROUTING_TIES * measured["prompt_positions"]) if ARCHS[measured["arch"]].experts else 0
    # greedy tokens identical, or parting only where bf16 put the two within NEAR_TIE
    assert all(p is None or p["gap"] <= NEAR_TIE for p in raw["greedy_parting"])
    assert raw["max_abs_output_logprob_diff"] <= RAW16_LOGPROB_TOL
    # teacher-forced: every position but the outliers within the tolerance, every other argmax flip at a near-tie
    largest = raw["largest_prompt_logprob_diffs"]  # descending, the first 10
    assert outliers < len(largest) and largest[outliers] <= RAW16_LOGPROB_TOL
    flips = raw["argmax_flip_gaps"]  # ascending
    assert all(gap <= NEAR_TIE for gap in flips[: max(0, len(flips) - outliers)])


@pytest.mark.parametrize("setting", ["tq4", "tq3"])
def test_compressed_cache_kl_to_bf16_is_reported_and_bounded(measured, setting):
    row = measured["settings"][setting]
    print(f"{measured['arch']} {setting}: KL {row['kl_to_bf16']:.5f}, agreement {row['greedy_agreement']:.3f}")
    assert 0 <= row["kl_to_bf16"] < KL_BOUND[setting]
    assert measured["settings"]["tq4"]["kl_to_bf16"] <= measured["settings"]["tq3"]["kl_to_bf16"] * 1.5


@pytest.mark.parametrize("setting", ["tq4", "tq3"])
def test_greedy_tokens_do_not_depend_on_the_prefix_cache(measured, setting):
    cache = measured["settings"][setting]["prefix_cache"]
    assert cache["cold_equals_cached"]
    assert cache["shared_prefix_batch_equals_cold"]
    assert min(cache["cached_tokens"]) > 100 and min(cache["shared_prefix_cached_tokens"]) > 100


@pytest.mark.parametrize("setting", ["raw16", "tq4", "tq3"])
def test_sglangs_pool_holds_the_layout_specs_bytes_per_token(measured, setting):
    cap = measured["settings"][setting]["capacity"]
    assert cap["token_capacity"] == cap["max_total_tokens"]
    # SGLang reports the pool in GB to 3 decimals: `resolution` is that rounding in bytes per token (0.2% of 0.3 GB).
    assert abs(cap["pool_bytes_per_token"] - cap["layout_bytes_per_token"]) <= cap["resolution"]


# --- the stand-ins themselves and the refusals: no SGLang engine ---------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHS))
def test_stand_ins_keep_their_familys_attention(arch):
    config = hf_config(arch)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    expected = {"llama3": 128, "qwen2": 64, "qwen3": 128, "qwen3moe": 128, "mistral": 128, "gemma2": 256, "gemma3": 256}
    expected["phi3"] = 96
    assert head_dim == expected[arch]
    assert config.num_attention_heads % config.num_key_value_heads == 0
    if arch == "gemma2":
        assert config.attn_logit_softcapping and config.final_logit_softcapping
        assert config.layer_types[:2] == ["sliding_attention", "full_attention"]
    if arch == "gemma3":
        assert config.layer_types.count("sliding_attention") == 5 * config.layer_types.count("full_attention")
    if arch == "llama3":
        assert config.tie_word_embeddings


def test_every_registry_stand_in_exists_and_matches_its_alias_architecture():
    from tq_serve.registry import ModelRegistry

    for alias, entry in ModelRegistry.load().entries.items():
        if entry.tiny is not None:
            assert ARCHS[entry.tiny].hf_architecture == entry.architecture, alias
    covered = {e.tiny for e in ModelRegistry.load().entries.values()}
    assert covered >= set(ARCHS)


def _model_dir(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes(b"")
    return path


BASE = {"num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8, "hidden_size": 1024}
REFUSED = {
    "mla": (
        {**BASE, "model_type": "deepseek_v3", "kv_lora_rank": 512, "architectures": ["DeepseekV3ForCausalLM"]},
        "MLA",
    ),
    "linear": (
        {**BASE, "model_type": "qwen3_next", "layer_types": ["linear_attention", "full_attention"] * 2},
        "linear-attention",
    ),
    "encoder-decoder": ({**BASE, "model_type": "t5", "is_encoder_decoder": True}, "encoder-decoder"),
    "cross-attention": ({**BASE, "model_type": "mllama_text", "cross_attention_layers": [1]}, "cross-attention"),
}


@pytest.mark.parametrize("kind", list(REFUSED))
def test_unsupported_models_are_refused_before_sglang_starts(tmp_path, capsys, kind):
    from tq_serve.__main__ import main

    config, reason = REFUSED[kind]
    model = _model_dir(tmp_path, config)
    assert main(["--model", str(model), "--device", "cpu", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert reason in err and "--kv-cache bf16" in err
    # plain SGLang (the alternative the message names) is not refused
    assert main(["--model", str(model), "--device", "cpu", "--kv-cache", "bf16", "--dry-run"]) == 0


def test_speculative_decoding_through_the_pass_through_is_refused(capsys):
    from tq_serve.__main__ import main

    assert main(["--device", "cpu", "--dry-run", "--", "--speculative-algorithm", "EAGLE"]) == 2
    err = capsys.readouterr().err
    assert "speculative decoding" in err and "--kv-cache bf16" in err


# --- --context-length beyond the model's config ------------------------------------------------------------------


@pytest.mark.sglang
@pytest.mark.slow
def test_context_length_8192_serves_tq_tiny_past_1024_tokens(tmp_path):
    """tq-tiny's config says 1024 positions; with --context-length 8192 a 1500-token prompt is served (SGLang's
    override set by tq_serve, which warns that quality there is untrained)."""
    import httpx

    from tq_serve.bench.harness import server_process

    ids = [(i * 7919) % 4000 + 10 for i in range(1500)]
    with server_process(["--context-length", "8192", "--max-total-tokens", "16384"], tmp_path / "server.log") as srv:
        reply = httpx.post(
            f"{srv.url}/generate",
            json={"input_ids": ids, "sampling_params": {"max_new_tokens": 4, "temperature": 0}},
            timeout=600,
        )
        log = srv.log.read_text()
    assert reply.status_code == 200, reply.text
    meta = reply.json()["meta_info"]
    assert meta["prompt_tokens"] == 1500 and meta["completion_tokens"] == 4
    assert "--context-length 8192 exceeds the 1024 tokens" in log and "never trained" in log


def test_a_longer_context_without_the_flag_is_sglangs_refusal_not_ours():
    """Without --context-length, tq_serve sets no override (SGLang keeps the model's 1024)."""
    out = subprocess.run(
        [sys.executable, "-m", "tq_serve", "--device", "cpu", "--dry-run"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "context_length" not in out.stdout
