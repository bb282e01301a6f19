"""Train `tq-tiny`, the bundled Llama-architecture code model, from text every machine already has.

    python -m tq_serve.models.train_tiny --out models/tq-tiny

Why a trained model at all: `python -m tq_serve` must serve something real without downloads, and the quality of the
compressed KV cache (perplexity, greedy agreement) is only meaningful on a model whose attention has learned
structure; random weights attend uniformly and hide every error.

Corpus: the `.py` sources of the running interpreter's standard library (tests, encoding tables and generated data
excluded), in sorted order. A file is held out when a hash of its path says so, so the split is the same on every
machine and for every Python version that ships the file. Held-out files are used neither for the tokenizer nor for
training. A tenth of the training files is also rendered through the chat template (one block of lines as the user
turn, the next block as the assistant turn), so that /v1/chat/completions continues code instead of emitting noise.

The output directory is a Hugging Face model directory (config.json, model.safetensors, tokenizer files,
chat_template.jinja, generation_config.json) that transformers' Auto classes and SGLang's LlamaForCausalLM load as is,
plus heldout.txt / heldout.json (a committed held-out snippet and its perplexity, checked by
tests/test_tiny_model.py) and README.md (the model card, written from the numbers measured here).

The defaults reproduce the committed model: the seed fixes the tokenizer, the document order, the initial weights
and every batch. torch.compile is used when a C compiler is present (about 3x faster on a CPU); compiled and eager
runs differ in the last bits, so only runs on the same path are bit-for-bit comparable.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import shutil
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, *ROLE_TOKENS)

# One turn is `<|role|>\n content <|eos|>`; generation stops at <|eos|>, the same id as the end of a file, so the
# server needs a single stop token.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Directories whose files are not code a user would write: tests, codec tables, generated help text.
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__", "encodings", "pydoc_data"})
HELDOUT_MODULUS = 20  # 1 file in 20 is held out
CHAT_MODULUS = 10  # 1 training file in 10 is also rendered as chat turns
CHAT_BLOCK_LINES = 24
SNIPPET_CHARS = 16_000  # the committed held-out snippet: about 4k tokens, so the test runs in seconds
HELDOUT_EVAL_TOKENS = 16_384  # of the held-out files: enough for a stable number, cheap on a busy CPU

SAMPLE_PROMPTS = (
    "def fibonacci(n):\n",
    'def read_json(path):\n    """Return the parsed contents of the JSON file at path."""\n',
    "class Stack:\n    def __init__(self):\n",
    "import os\n\n\ndef list_python_files(root):\n",
    "    for key, value in sorted(mapping.items()):\n",
)


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """Everything that determines the trained model; the defaults produce the committed `models/tq-tiny`."""

    seed: int = 0
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 8
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 128
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    seq_len: int = 512
    batch_size: int = 8
    steps: int = 1400
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 60
    weight_decay: float = 0.1
    grad_clip: float = 1.0


def stdlib_root() -> Path:
    """The directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: Path) -> list[str]:
    """Relative POSIX paths of the corpus files under `root`, sorted so that every run sees the same order."""
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]) or rel.name.startswith("_sysconfigdata"):
            continue
        files.append(rel.as_posix())
    return sorted(files)


def _path_bucket(rel: str, modulus: int) -> int:
    # A content-independent hash of the path: the split does not depend on the Python version's file contents.
    return int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % modulus


def is_heldout(rel: str) -> bool:
    """Whether a corpus file is held out from tokenizer and model training."""
    return _path_bucket(rel, HELDOUT_MODULUS) == 0


def read_texts(root: Path, rels: list[str]) -> list[str]:
    """The files' texts; undecodable bytes are replaced rather than dropped so offsets stay meaningful."""
    return [(root / rel).read_text(encoding="utf-8", errors="replace") for rel in rels]


def train_tokenizer(texts: list[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (every byte is representable, so no <unk>) trained on `texts`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )


def chat_renderings(tokenizer: PreTrainedTokenizerFast, text: str) -> list[str]:
    """`text` as conversations: each pair of consecutive line blocks becomes one user turn and one assistant turn."""
    lines = text.splitlines(keepends=True)
    blocks = ["".join(lines[i : i + CHAT_BLOCK_LINES]).rstrip("\n") for i in range(0, len(lines), CHAT_BLOCK_LINES)]
    conversations = []
    for user, assistant in zip(blocks[0::2], blocks[1::2], strict=False):
        if user.strip() and assistant.strip():
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
            conversations.append(tokenizer.apply_chat_template(messages, tokenize=False))
    return conversations


def _encode_stream(tokenizer: PreTrainedTokenizerFast, documents: list[str]) -> torch.Tensor:
    # The backend tokenizer directly: whole files exceed model_max_length, which only matters for model inputs.
    encodings = tokenizer.backend_tokenizer.encode_batch(documents, add_special_tokens=False)
    return torch.tensor([i for enc in encodings for i in enc.ids], dtype=torch.int32)


def training_stream(tokenizer: PreTrainedTokenizerFast, rels: list[str], texts: list[str], seed: int) -> torch.Tensor:
    """All training documents as one token stream, `<|bos|> file <|eos|>` and chat renderings, in a seeded order."""
    documents = [BOS + text + EOS for text in texts]
    for rel, text in zip(rels, texts, strict=True):
        if _path_bucket(rel, CHAT_MODULUS) == 1:
            documents.extend(chat_renderings(tokenizer, text))
    random.Random(seed).shuffle(documents)
    return _encode_stream(tokenizer, documents)


def heldout_stream(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    """The held-out files as one token stream, delimited like the training files."""
    return _encode_stream(tokenizer, [BOS + text + EOS for text in texts])


def heldout_snippet(texts: list[str]) -> str:
    """The first held-out files (in sorted order) up to SNIPPET_CHARS, cut at a line end."""
    snippet = "\n\n".join(texts)[:SNIPPET_CHARS]
    return snippet[: snippet.rfind("\n") + 1]


def model_config(settings: TrainSettings, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """The Llama config: GQA (num_heads / num_kv_heads query heads per KV head), explicit head_dim, tied embeddings."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_kv_heads,
        head_dim=settings.head_dim,
        max_position_embeddings=settings.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": settings.rope_theta},
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
    )


def build_model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    """A freshly initialised model; the seed fixes the weights."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


@torch.no_grad()
def perplexity(model: LlamaForCausalLM, ids: torch.Tensor, window: int) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of `window` tokens; window starts are not scored.

    Done in the model's dtype; the recorded numbers use float32 so they do not depend on bf16 matmul kernels.
    """
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window].long()
        if len(chunk) < 2:
            continue
        logits = model(input_ids=chunk[None]).logits[0].float()
        nll += F.cross_entropy(logits[:-1], chunk[1:], reduction="sum").item()
        count += len(chunk) - 1
    return math.exp(nll / count)


def _lr_factor(step: int, settings: TrainSettings) -> float:
    # Linear warm-up, then cosine decay to min_lr_ratio of the peak at the last step.
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return settings.min_lr_ratio + (1 - settings.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _can_compile() -> bool:
    # Inductor's CPU backend generates C++; without a compiler torch.compile fails at the first step.
    return shutil.which(os.environ.get("CXX", "c++")) is not None or shutil.which("g++") is not None


def train(
    model: LlamaForCausalLM,
    stream: torch.Tensor,
    settings: TrainSettings,
    *,
    compile_model: bool,
    max_minutes: float | None,
    checkpoint: Path,
    checkpoint_every: int = 20,
) -> dict:
    """Train in place with AdamW under bf16 autocast; returns a log of losses and timings.

    Every `checkpoint_every` steps the whole training state (weights, optimizer, LR schedule, batch generator) goes
    to `checkpoint`; a later call with the same settings resumes from it and ends with the same weights as an
    uninterrupted run. On a shared or sleeping laptop CPU a 30-minute job is often interrupted. The checkpoint is
    also written at the last step, so a finished run is not repeated.
    """
    params_decay = [p for p in model.parameters() if p.dim() >= 2]
    params_plain = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": params_decay, "weight_decay": settings.weight_decay}, {"params": params_plain, "weight_decay": 0}],
        lr=settings.lr,
        betas=(0.9, 0.95),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, settings))
    batches = torch.Generator().manual_seed(settings.seed)
    log: dict = {"loss": [], "steps_done": 0, "stopped_early": False, "train_seconds": 0.0, "resumed_at": []}
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        if state["settings"] != asdict(settings):
            raise SystemExit(f"{checkpoint} was written with other settings; delete it to start afresh")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        batches.set_state(state["batches"])
        log = state["log"]
        log["resumed_at"].append(log["steps_done"])
        tqdm.write(f"resuming from {checkpoint} at step {log['steps_done']}")
    forward = torch.compile(model) if compile_model else model
    model.train()
    ema = sum(log["loss"][-20:]) / len(log["loss"][-20:]) if log["loss"] else None
    start, seconds_before = time.monotonic(), log["train_seconds"]
    first_step_done = None
    bar = tqdm(
        range(log["steps_done"], settings.steps),
        initial=log["steps_done"],
        total=settings.steps,
        desc="train tq-tiny",
        unit="step",
        dynamic_ncols=True,
    )
    for step in bar:
        offsets = torch.randint(0, len(stream) - settings.seq_len, (settings.batch_size,), generator=batches)
        batch = torch.stack([stream[o : o + settings.seq_len] for o in offsets.tolist()]).long()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = forward(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        value = loss.item()
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        log["loss"].append(round(value, 4))
        log["steps_done"] = step + 1
        log["train_seconds"] = round(seconds_before + time.monotonic() - start, 1)
        if first_step_done is None:
            # The first step of a process includes torch.compile; throughput is measured from the second on.
            first_step_done, first_step = time.monotonic(), step + 1
        else:
            tokens_per_s = (step + 1 - first_step) * settings.batch_size * settings.seq_len
            tokens_per_s /= time.monotonic() - first_step_done
            bar.set_postfix(loss=f"{ema:.3f}", lr=f"{scheduler.get_last_lr()[0]:.1e}", tok_s=f"{tokens_per_s:.0f}")
        stop = max_minutes is not None and log["train_seconds"] > 60 * max_minutes and step + 1 < settings.steps
        if (step + 1) % checkpoint_every == 0 or step + 1 == settings.steps or stop:
            state = {
                "settings": asdict(settings),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "batches": batches.get_state(),
                "log": log,
            }
            torch.save(state, checkpoint.with_suffix(".tmp"))
            os.replace(checkpoint.with_suffix(".tmp"), checkpoint)  # atomic: a kill never leaves half a file
        if stop:
            log["stopped_early"] = True
            tqdm.write(f"stopped at step {step + 1} after --max-minutes {max_minutes}: not the default schedule")
            break
    return log


def greedy_samples(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, max_new_tokens: int = 64) -> list[dict]:
    """Greedy continuations of SAMPLE_PROMPTS, as the model card shows them."""
    model.eval()
    samples = []
    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        samples.append({"prompt": prompt, "completion": tokenizer.decode(out[0, ids.shape[1] :])})
    return samples


def _dir_megabytes(path: Path) -> float:
    return (
        sum(f.stat().st_size for f in path.iterdir() if f.is_file() and not f.name.startswith("train_checkpoint")) / 1e6
    )


def write_model_card(out: Path, settings: TrainSettings, results: dict) -> None:
    """README.md of the model directory, from the numbers measured in this run."""
    s, r = settings, results
    params = r["parameters"]
    samples = "\n\n".join(
        f"Prompt:\n\n```python\n{x['prompt']}```\n\nGreedy completion (64 new tokens):\n\n```python\n"
        f"{x['prompt']}{x['completion']}\n```"
        for x in r["samples"]
    )
    group = s.num_heads // s.num_kv_heads
    card = f"""# tq-tiny: the bundled code model

`tq-tiny` is the default model of `python -m tq_serve`: a {params / 1e6:.1f} M-parameter Llama-architecture causal LM
trained by this project on the Python standard library, so the server runs on any machine (a laptop CPU included)
and the quality of the compressed KV cache can be measured end to end without downloads.

## Architecture

| | |
|---|---|
| architecture | `LlamaForCausalLM` (RoPE, RMSNorm, SwiGLU, grouped-query attention) |
| layers | {s.num_layers} |
| hidden size / intermediate size | {s.hidden_size} / {s.intermediate_size} |
| query heads / KV heads / head_dim | {s.num_heads} / {s.num_kv_heads} / {s.head_dim} (GQA group {group}) |
| max positions / rope_theta | {s.max_position_embeddings} / {s.rope_theta:g} (trained on {s.seq_len}-token windows) |
| vocabulary | {r["vocab_size"]} byte-level BPE tokens, special `{"`, `".join(SPECIAL_TOKENS)}` |
| embeddings | tied input/output |
| weights | bfloat16 safetensors, {r["size_mb"]:.1f} MB for the whole directory |

Chat: `chat_template.jinja` renders each turn as `<|role|>\\n content <|eos|>`; generation stops at `<|eos|>`.
A tenth of the training files were also rendered as (user: a block of 24 lines, assistant: the next block), so a chat
request that sends code gets the code continued.

## Training data

The `.py` files of the standard library of the interpreter that runs the script (Python {r["python"]} here), sorted by
path; `test`/`tests`/`idle_test` directories, `encodings`, `pydoc_data` and `_sysconfigdata*` excluded. One file in
{HELDOUT_MODULUS}, chosen by a hash of its path, is held out from both tokenizer and model training:
{r["train_files"]} training files ({r["train_tokens"] / 1e6:.2f} M tokens with chat renderings),
{r["heldout_files"]} held-out files (the perplexity below is over their first {r["heldout_tokens"]} tokens).

Training: {r["steps_done"]} steps of {s.batch_size} x {s.seq_len} tokens ({r["tokens_seen"] / 1e6:.2f} M tokens),
AdamW (betas 0.9/0.95, weight decay {s.weight_decay}), peak LR {s.lr:g} with {s.warmup_steps} warm-up steps and
cosine decay to {s.min_lr_ratio:g}x, grad clip {s.grad_clip}, bf16 autocast, seed {s.seed}. It took
{r["train_seconds"] / 60:.1f} min of training ({r["total_seconds"] / 60:.1f} min in all) on {r["machine"]}.

Reproduce (defaults produce this directory):

```bash
python -m tq_serve.models.train_tiny --out models/tq-tiny
```

## Held-out perplexity

Float32 forward, non-overlapping {s.seq_len}-token windows, files not used in training:

| model | held-out files | committed snippet `heldout.txt` |
|---|---|---|
| tq-tiny (trained) | **{r["heldout_ppl"]:.2f}** | **{r["snippet_ppl"]:.2f}** |
| untrained, same shape and seed | {r["untrained_heldout_ppl"]:.0f} | {r["untrained_snippet_ppl"]:.0f} |

`tests/test_tiny_model.py` checks the snippet perplexity recorded in `heldout.json` within 1%.

## Sample greedy completions

{samples}
"""
    (out / "README.md").write_text(card)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = TrainSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory (a Hugging Face model directory)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--max-minutes", type=float, default=None, help="stop training after this long (the result then differs)"
    )
    parser.add_argument("--no-compile", action="store_true", help="train eagerly (slower; no C++ compiler needed)")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="CPU threads (default: all cores; on a CPU shared with other busy processes 1 can be faster)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = TrainSettings(steps=args.steps, seed=args.seed)
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    root = stdlib_root()
    rels = corpus_files(root)
    train_rels = [r for r in rels if not is_heldout(r)]
    heldout_rels = [r for r in rels if is_heldout(r)]
    train_texts, heldout_texts = read_texts(root, train_rels), read_texts(root, heldout_rels)
    print(f"corpus: {root}: {len(train_rels)} training files, {len(heldout_rels)} held-out files")

    tokenizer = train_tokenizer(train_texts, settings.vocab_size, settings.max_position_embeddings)
    stream = training_stream(tokenizer, train_rels, train_texts, settings.seed)
    heldout_ids = heldout_stream(tokenizer, heldout_texts)[:HELDOUT_EVAL_TOKENS]
    print(f"tokenizer: {len(tokenizer)} tokens; training stream {len(stream)} tokens, held out {len(heldout_ids)}")

    config = model_config(settings, tokenizer)
    model = build_model(config, settings.seed)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.2f} M parameters")
    compile_model = not args.no_compile and _can_compile()
    # Kept until everything is written, so that a run killed during evaluation resumes without retraining.
    checkpoint = out / "train_checkpoint.pt"
    log = train(
        model, stream, settings, compile_model=compile_model, max_minutes=args.max_minutes, checkpoint=checkpoint
    )

    model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    snippet = heldout_snippet(heldout_texts)
    (out / "heldout.txt").write_text(snippet)

    # Score the saved files, exactly as a user (and the test) loads them: bf16 weights, float32 compute.
    trained = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    untrained = build_model(config, settings.seed)
    snippet_ids = torch.tensor(tokenizer(snippet, add_special_tokens=False)["input_ids"], dtype=torch.int32)
    results = {
        "parameters": params,
        "vocab_size": len(tokenizer),
        "python": platform.python_version(),
        "machine": f"{platform.machine()} CPU ({os.cpu_count()} cores, {args.threads} threads), "
        f"torch {torch.__version__}, {'torch.compile' if compile_model else 'eager'}",
        "train_files": len(train_rels),
        "heldout_files": len(heldout_rels),
        "train_tokens": len(stream),
        "heldout_tokens": len(heldout_ids),
        "steps_done": log["steps_done"],
        "tokens_seen": log["steps_done"] * settings.batch_size * settings.seq_len,
        "train_seconds": log["train_seconds"],
        "heldout_ppl": perplexity(trained, heldout_ids, settings.seq_len),
        "untrained_heldout_ppl": perplexity(untrained, heldout_ids, settings.seq_len),
        "snippet_ppl": perplexity(trained, snippet_ids, settings.seq_len),
        "untrained_snippet_ppl": perplexity(untrained, snippet_ids, settings.seq_len),
        "samples": greedy_samples(trained, tokenizer),
    }
    record = {
        "snippet": "heldout.txt",
        "snippet_tokens": len(snippet_ids),
        "window": settings.seq_len,
        "dtype": "float32",
        "perplexity": round(results["snippet_ppl"], 4),
        "untrained_perplexity": round(results["untrained_snippet_ppl"], 2),
        "heldout_files_perplexity": round(results["heldout_ppl"], 4),
        "untrained_heldout_files_perplexity": round(results["untrained_heldout_ppl"], 2),
        "heldout_files": heldout_rels,
        "python": results["python"],
        "settings": asdict(settings),
        "steps_done": log["steps_done"],
        "stopped_early": log["stopped_early"],
        "resumed_at_steps": log["resumed_at"],
        "train_seconds": log["train_seconds"],
        "final_loss_mean_last_20": round(sum(log["loss"][-20:]) / len(log["loss"][-20:]), 4),
    }
    (out / "heldout.json").write_text(json.dumps(record, indent=2) + "\n")
    results["total_seconds"] = time.monotonic() - started
    results["size_mb"] = _dir_megabytes(out)
    write_model_card(out, settings, results)
    checkpoint.unlink()
    print(json.dumps({k: v for k, v in record.items() if k not in ("heldout_files", "settings")}, indent=2))
    for sample in results["samples"]:
        print(f"--- {sample['prompt']!r}\n{sample['prompt']}{sample['completion']}")


if __name__ == "__main__":
    sys.exit(main())
