"""tune_schedule end to end and the offline evaluator, on a tiny random Llama built in a temporary directory."""

from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tq_serve.schedule import BitSchedule
from tq_serve.schedule_eval import QuantizedKV, evaluate_schedules, kv_transform, load_model, token_windows
from tq_serve.tune_schedule import DEFAULT_CALIBRATION, AttentionErrorProbe, main, measure_layer_kl

NUM_LAYERS = 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A 2-layer GQA Llama (head_dim 64) with a byte-level BPE tokenizer trained on the calibration text."""
    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|bos|>", "<|eos|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([DEFAULT_CALIBRATION.read_text()], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|bos|>", eos_token="<|eos|>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=256,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    fast.save_pretrained(out)
    return out


def test_tune_schedule_cli_writes_a_valid_schedule_and_plot(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny-3.0.yaml"
    argv = ["--model", str(model_dir), "--budget", "3.0", "--bits", "2", "3", "4", "16"]
    schedule = main([*argv, "--window", "48", "--max-tokens", "96", "--out", str(out)])
    loaded = BitSchedule.load(out, num_layers=NUM_LAYERS)
    assert loaded == schedule
    assert loaded.name == "tiny-3.0" and loaded.budget == 3.0 and loaded.average_bits <= 3.0
    tuning = loaded.tuning
    assert tuning["tokens"] == 96 and tuning["calibration"] == "configs/calibration/python_code.txt"
    assert tuning["command"].startswith("python -m tq_serve.tune_schedule --model")
    # The solver can always fall back to uniform 3 bits, so it never does worse on its own objective.
    assert tuning["total_error"] <= tuning["uniform_total_error"]["3"] + 1e-9
    assert sum(tuning["layer_error"]) == pytest.approx(tuning["total_error"], abs=1e-5)
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    assert yaml.safe_load(out.read_text())["layer_bits"] == [list(p) for p in loaded.layer_bits]


def test_logits_metric_weights_layers_by_their_measured_gain(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny-logits.yaml"
    argv = ["--model", str(model_dir), "--budget", "2.5", "--bits", "2", "3", "--metric", "logits"]
    schedule = main([*argv, "--window", "48", "--max-tokens", "96", "--out", str(out), "--no-plot"])
    assert schedule.tuning["metric"] == "logits" and len(schedule.tuning["logit_gain"]) == NUM_LAYERS
    assert all(gain > 0 for gain in schedule.tuning["logit_gain"])
    assert schedule.average_bits <= 2.5 and not out.with_suffix(".png").exists()


def test_kl_metric_measures_each_layer_and_pair_directly(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny-kl.yaml"
    argv = ["--model", str(model_dir), "--budget", "2.5", "--bits", "2", "3", "--metric", "kl", "--no-plot"]
    schedule = main([*argv, "--window", "48", "--max-tokens", "96", "--out", str(out)])
    assert schedule.tuning["metric"] == "kl" and schedule.average_bits <= 2.5
    # Layer 1's entry for (2, 3) is the KL of a model whose layer 1 alone has 2-bit K and 3-bit V (layer 0 raw).
    lm, tokenizer, _ = load_model(str(model_dir))
    windows = token_windows(tokenizer, DEFAULT_CALIBRATION.read_text(), 48, 96)
    kl = measure_layer_kl(lm, windows, [2, 3], show_progress=False)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            exact = lm(input_ids=ids[None], use_cache=False).logits[0].log_softmax(-1)
            with kv_transform(QuantizedKV([(16, 16), (2, 3)], head_dim=lm.config.head_dim)):
                quantized = lm(input_ids=ids[None], use_cache=False).logits[0].log_softmax(-1)
            total += torch.nn.functional.kl_div(quantized, exact, log_target=True, reduction="sum").item()
            tokens += len(ids)
    assert kl[1][2, 3] == pytest.approx(total / tokens, rel=0.05)
    assert all(table[2, 2] > table[3, 3] > 0 for table in kl)


def test_tune_schedule_refuses_a_budget_below_the_candidates(model_dir: Path) -> None:
    with pytest.raises(SystemExit):
        main(["--model", str(model_dir), "--budget", "1.5"])


def test_probe_sees_what_the_layer_computes(model_dir: Path) -> None:
    """The probe's exact attention output equals the layer's own o_proj output: same q, K after RoPE, V and mask."""
    lm, tokenizer, _ = load_model(str(model_dir))
    ids = token_windows(tokenizer, DEFAULT_CALIBRATION.read_text(), 40)[0]
    actual = [0.0] * NUM_LAYERS
    hooks = [
        layer.self_attn.o_proj.register_forward_hook(
            lambda _m, _i, out, layer=i: actual.__setitem__(layer, out.square().sum().item())
        )
        for i, layer in enumerate(lm.model.layers)
    ]
    probe = AttentionErrorProbe(NUM_LAYERS, 64, (2, 4, 16))
    with torch.no_grad(), kv_transform(probe):
        lm(input_ids=ids[None], use_cache=False)
    for hook in hooks:
        hook.remove()
    assert probe.squared_norm == pytest.approx(actual, rel=1e-4)
    for errors in probe.relative_errors():
        assert errors[16, 16] < 1e-3 < errors[2, 2]
        assert errors[4, 4] < errors[2, 2] and errors[16, 4] < errors[16, 2] and errors[4, 16] < errors[2, 16]


def test_evaluator_reference_row_and_quantized_rows(model_dir: Path) -> None:
    lm, tokenizer, _ = load_model(str(model_dir))
    windows = token_windows(tokenizer, DEFAULT_CALIBRATION.read_text(), 64, max_tokens=128)
    with torch.no_grad():
        plain = lm(input_ids=windows[0][None], use_cache=False).logits
        with kv_transform(QuantizedKV(((16, 16),) * NUM_LAYERS, head_dim=64)):
            raw = lm(input_ids=windows[0][None], use_cache=False).logits
    # The raw bf16 cache differs from float32 K/V only by bf16 rounding.
    torch.testing.assert_close(raw, plain, rtol=0, atol=1e-2)
    rows = evaluate_schedules(lm, windows, [BitSchedule.uniform(NUM_LAYERS, 2), BitSchedule.uniform(NUM_LAYERS, 16)])
    bf16, two, sixteen = rows
    assert bf16.label == "bf16" and bf16.agreement == 1.0 and bf16.kl_to_bf16 == 0 and bf16.tokens == 126
    assert (sixteen.perplexity, sixteen.kl_to_bf16, sixteen.agreement) == (bf16.perplexity, 0, 1.0)
    assert two.perplexity != bf16.perplexity and two.kl_to_bf16 > 0
    assert two.bytes_per_token < bf16.bytes_per_token / 5


def test_boundary_layers_are_pinned_raw_and_the_rest_tuned_within_the_budget():
    from tq_serve.schedule import solve_budget
    from tq_serve.tune_schedule import pin_boundary_layers

    table = {(2, 2): 4.0, (3, 3): 2.0, (4, 4): 1.0, (16, 16): 0.0}
    errors = pin_boundary_layers([dict(table) for _ in range(6)], 1)
    assert errors[0] == errors[5] == {(16, 16): 0.0} and errors[1] == table
    layer_bits, _ = solve_budget(errors, budget=(16 * 2 + 4 * 3 + 3) / 6)
    assert layer_bits[0] == layer_bits[5] == (16, 16)
    assert sorted(layer_bits[1:5]) == [(3, 3), (4, 4), (4, 4), (4, 4)]
    with pytest.raises(ValueError, match="at least one"):
        pin_boundary_layers([dict(table) for _ in range(2)], 1)
