"""SGLang serving with the turboquant backend: prefix-cache invariance, shared prefixes, no leaked KV slots.

docs/ARCHITECTURE.md section 3: a request must get the same tokens whether its prefix came from the radix cache or
was just computed, which holds because new tokens are written to the packed pool first and attended in their
quantized form.
One in-process sglang.Engine for the module (start-up takes 30 s to minutes on a shared CPU).
"""

import dataclasses
import os
import time
from pathlib import Path

import pytest
import torch

from tq_serve.sglang_plugin.config import ENV_VAR, TurboQuantConfig

pytestmark = [pytest.mark.sglang, pytest.mark.slow]

BUNDLED_MODEL = Path(__file__).resolve().parents[1] / "models" / "tq-tiny"
# A lossy setting: the cached and fresh paths would differ if they disagreed. batch_invariant_cpu: the model's own
# oneDNN matmuls round a row differently in a 19-row and a 132-row extend, which on its own flips near-tied greedy
# tokens between a cold and a cached prompt (seen on tq-tiny at layer 2, with the attention outputs bitwise equal).
CONFIG = TurboQuantConfig(kv_bits=3, batch_invariant_cpu=True)
GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
MAX_TOKENS = 131072  # a pool of tens of MB: its size, reported in GB to 3 decimals, tells bytes per token
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

if DEVICE == "cpu":
    from tq_serve.cpu_support import apply_cpu_support

    apply_cpu_support()  # before anything imports sglang


def write_random_tiny_llama(path: Path) -> Path:
    """A randomly initialised Llama (head_dim 128, GQA 2) with a byte-level tokenizer, until models/tq-tiny exists."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="Ā", eos_token="ā").save_pretrained(path)
    config = LlamaConfig(
        vocab_size=len(alphabet),
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=128,
        max_position_embeddings=2048,
        bos_token_id=alphabet.index("Ā"),
        eos_token_id=alphabet.index("ā"),
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    if (BUNDLED_MODEL / "config.json").exists():
        return BUNDLED_MODEL
    return write_random_tiny_llama(tmp_path_factory.mktemp("random-tiny-llama"))


@pytest.fixture(scope="module")
def engine(model_path):
    previous = os.environ.get(ENV_VAR)
    os.environ.update(CONFIG.to_env())  # the scheduler subprocess reads it in the plug-in's register()
    import sglang

    llm = sglang.Engine(
        model_path=str(model_path),
        device=DEVICE,
        attention_backend="turboquant",
        disable_cuda_graph=True,
        mem_fraction_static=0.5,
        max_total_tokens=MAX_TOKENS,
        max_running_requests=32,
        random_seed=0,
        log_level="error",
    )
    try:
        yield llm
    finally:
        llm.shutdown()
        if previous is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = previous


PREFIX = """import os
import sys


def read_lines(path):
    with open(path) as handle:
        return handle.read().splitlines()


def count_words(lines):
    total = 0
    for line in lines:
        total += len(line.split())
    return total


class Counter:
    def __init__(self):
        self.counts = {}

    def add(self, key):
        self.counts[key] = self.counts.get(key, 0) + 1

"""
SUFFIXES = [f"def helper_{i}(x):\n    return x * {i} + " for i in range(16)]


def _generate(engine, prompts):
    outs = engine.generate(prompts, GREEDY)
    return [(o["output_ids"], o["meta_info"]["cached_tokens"], o["meta_info"]["prompt_tokens"]) for o in outs]


def test_same_prompt_cold_and_cached_gives_identical_greedy_tokens(engine):
    assert engine.flush_cache().success
    [(cold, cold_cached, n_prompt)] = _generate(engine, [PREFIX])
    [(warm, warm_cached, _)] = _generate(engine, [PREFIX])
    assert cold_cached == 0
    assert warm_cached >= n_prompt - 1  # SGLang recomputes at most the last prompt token
    assert warm == cold


def test_batch_sharing_a_long_prefix_hits_the_cache_and_matches_cold_runs(engine):
    prompts = [PREFIX + s for s in SUFFIXES]
    cold = []
    for prompt in prompts:  # each served alone, from an empty cache (a batch could hit its own first request)
        assert engine.flush_cache().success
        [(ids, cached, _)] = _generate(engine, [prompt])
        assert cached == 0
        cold.append(ids)

    assert engine.flush_cache().success
    [(_, _, n_prefix)] = _generate(engine, [PREFIX])  # puts the shared prefix into the radix cache
    warm = _generate(engine, prompts)
    for (ids, cached, _), expect in zip(warm, cold, strict=True):
        assert cached >= n_prefix - 1
        assert ids == expect


def _load(engine):
    [load] = engine.loop.run_until_complete(engine.tokenizer_manager.get_loads())
    return load


def test_every_kv_slot_is_free_again_after_load(engine):
    """SGLang's allocator and radix cache hold slot indices only; the packed pool must not change their accounting.
    (The scheduler also checks this itself when idle and raises on a leak: the engine must still serve.)"""
    assert engine.flush_cache().success
    prefilled_before = _load(engine).total_prefill_uncached_tokens
    engine.generate([PREFIX + s for s in SUFFIXES], {"temperature": 0.8, "max_new_tokens": 8})
    finished = time.time()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the idle scheduler publishes a snapshot taken after the load
        load = _load(engine)
        if load.timestamp > finished and load.total_prefill_uncached_tokens > prefilled_before:
            break
        time.sleep(1)
    else:
        pytest.fail("no load snapshot published after the requests finished")
    assert load.num_running_reqs == 0
    assert load.num_used_tokens == 0  # every slot is free or held only by the (evictable) radix cache
    assert engine.flush_cache().success
    [(ids, cached, _)] = _generate(engine, [PREFIX])
    assert cached == 0 and len(ids) == GREEDY["max_new_tokens"]


def test_the_engine_serves_from_the_packed_pool(engine, model_path):
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(model_path)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    layout = CONFIG.kv_layout(num_layers=hf.num_hidden_layers, num_kv_heads=hf.num_key_value_heads, head_dim=head_dim)
    memory = engine.get_server_info()["internal_states"][0]["memory_usage"]
    assert memory["token_capacity"] == MAX_TOKENS
    bytes_per_token = memory["kvcache"] * 2**30 / (MAX_TOKENS + 1)  # + the padding slot
    assert bytes_per_token == pytest.approx(layout.bytes_per_token, rel=0.05)  # bf16 would be 5.1x more


INTERPRETED_ENGINE = """
import json, sys
from tq_serve.cpu_support import apply_cpu_support
apply_cpu_support()
import sglang
llm = sglang.Engine(model_path=sys.argv[1], device="cpu", attention_backend="turboquant", disable_cuda_graph=True,
                    mem_fraction_static=0.5, max_total_tokens=8192, random_seed=0, log_level="error")
try:
    out = llm.generate([sys.argv[2]], json.loads(sys.argv[3]))
    print("OUTPUT_IDS", json.dumps(out[0]["output_ids"]))
finally:
    llm.shutdown()
"""


@pytest.mark.skipif(DEVICE != "cpu", reason="compares the CPU torch path with the Triton kernels interpreted on CPU")
def test_cpu_path_and_interpreted_triton_path_give_the_same_greedy_tokens(engine, model_path):
    """The GPU code path (the Triton kernels, under TRITON_INTERPRET=1) serves the same tokens as the CPU path."""
    import json
    import subprocess
    import sys

    assert engine.flush_cache().success
    [(expected, _, _)] = _generate(engine, [PREFIX])
    interpreted = dataclasses.replace(CONFIG, use_triton_interpreter=True)
    run = subprocess.run(
        [sys.executable, "-c", INTERPRETED_ENGINE, str(model_path), PREFIX, json.dumps(GREEDY)],
        env={**os.environ, **interpreted.to_env()},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("OUTPUT_IDS ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    assert json.loads(lines[-1].removeprefix("OUTPUT_IDS ")) == expected
