"""The committed `models/tq-tiny` loads with transformers' Auto classes and still scores its recorded perplexity.

The held-out snippet is committed with the model because the standard library (the training corpus) differs between
Python versions; the test therefore does not depend on the interpreter that runs it.
"""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tq_serve.models.train_tiny import perplexity

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "tq-tiny"


@pytest.fixture(scope="module")
def record() -> dict:
    return json.loads((MODEL_DIR / "heldout.json").read_text())


def test_config_is_llama_with_gqa_and_explicit_head_dim() -> None:
    config = AutoConfig.from_pretrained(MODEL_DIR)
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.num_attention_heads // config.num_key_value_heads >= 2
    assert config.num_attention_heads % config.num_key_value_heads == 0
    assert config.head_dim in (64, 128)
    assert config.max_position_embeddings >= 1024


def test_tokenizer_ids_match_config_and_chat_template_renders() -> None:
    config = AutoConfig.from_pretrained(MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (config.bos_token_id, config.eos_token_id)
    assert len(tokenizer) == config.vocab_size
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "def f(x):"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|assistant|>\n")
    text = "def f(x):\n    return [x, {'a': 1}]\n"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_heldout_snippet_perplexity_matches_record(record: dict) -> None:
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    snippet = (MODEL_DIR / record["snippet"]).read_text()
    ids = torch.tensor(tokenizer(snippet, add_special_tokens=False)["input_ids"])
    assert len(ids) == record["snippet_tokens"]
    ppl = perplexity(model, ids, record["window"])
    assert ppl == pytest.approx(record["perplexity"], rel=0.01)
    # The model learned something: far below an untrained model of the same shape (about the vocabulary size).
    # The committed checkpoint is 86x below it; 50x leaves room for another interpreter's numerics, not for a
    # checkpoint that stopped early.
    assert ppl < record["untrained_perplexity"] / 50
