"""Every supported architecture through SGLang with the TurboQuant cache: `python -m tq_serve.bench architectures`.

For each tiny random-weight stand-in (tq_serve.models.tiny_arch: the real head_dim, GQA ratio, windows, soft-caps,
QK-norm and bias of its family) it starts in-process SGLang engines from `python -m tq_serve` settings (the same
settings -> ServeConfig -> ServerArgs path as the CLI) and measures on the same prompts:

- `bf16`: SGLang's own bf16 cache and torch_native attention, the reference;
- `raw16`: the TurboQuant pool with every layer raw (a bit schedule of 16s): greedy tokens, their logprobs and the
  teacher-forced prompt logprobs against bf16. This isolates the plumbing (windows, soft-cap, QK-norm, GQA,
  head_dim): the records hold the same bf16 K/V, so only the attention arithmetic differs. Where an argmax differs
  (teacher-forced, or where the greedy tokens part) the row records how far apart bf16 itself put the two tokens:
  a different rounding can flip a near-tie, and only a near-tie;
- `tq4`, `tq3`: teacher-forced next-token KL(bf16 || TurboQuant) over the prompt positions (full distributions),
  prefix-cache invariance (greedy tokens with the prompt cold and cached, and a batch that shares a cached prefix),
  and the capacity SGLang's own pool reports against the layout spec's bytes per token.

Results go to JSON (default results/cpu/architectures.json). tests/test_architectures.py runs the same functions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tq_serve.bench.harness import table, write_report
from tq_serve.registry import REPO_ROOT

SETTINGS = {
    "bf16": ["--kv-cache", "bf16"],
    "raw16": ["--kv-schedule", "{raw16}"],
    "tq4": ["--kv-bits", "4", "--batch-invariant-cpu"],
    "tq3": ["--kv-bits", "3", "--batch-invariant-cpu"],
}
"""tq4/tq3 turn oneDNN off (--batch-invariant-cpu) for the prefix-cache check: the model's own bf16 linears would
otherwise round a row differently in a cold prefill and a one-token cached extend. raw16 keeps oneDNN, as bf16 does
(that engine has no TurboQuant config to turn it off), so that the two run the same linears."""
POOL_BYTES = 0.3 * 2**30
"""KV memory of the TurboQuant engines' pools: SGLang reports it in GB to 3 decimals, so 0.3 GB pins bytes per token
to 0.2%. Their token count is this over the layout's bytes per token."""
SMALL_POOL = 8192
GREEDY_TOKENS = 8
HELDOUT = REPO_ROOT / "models" / "tq-tiny" / "heldout.txt"


def prompts(n_chars: int = 900) -> list[str]:
    """Two real-text prompts of about 250 tokens (tq-tiny's held-out snippet): each crosses a 64-token window."""
    text = HELDOUT.read_text()
    return [text[:n_chars], text[n_chars : 2 * n_chars]]


def raw16_schedule(num_layers: int, directory: Path) -> Path:
    path = directory / f"raw16-{num_layers}.yaml"
    path.write_text("layer_bits:\n" + "".join("- [16, 16]\n" for _ in range(num_layers)))
    return path


@contextlib.contextmanager
def engine(model_dir: Path, flags: Sequence[str], max_total_tokens: int) -> Iterator[object]:
    """An in-process sglang.Engine configured exactly as `python -m tq_serve --model DIR FLAGS` would be."""
    from tq_serve import server
    from tq_serve.settings import load_settings, resolve

    argv = ["--model", str(model_dir), "--device", "cpu", "--log-level", "error"]
    cfg = resolve(load_settings([*argv, "--max-total-tokens", str(max_total_tokens), *flags]))
    if cfg.kv_layout is not None:  # a TurboQuant pool of POOL_BYTES
        tokens = round(POOL_BYTES / cfg.kv_layout.bytes_per_token)
        cfg = resolve(load_settings([*argv, "--max-total-tokens", str(tokens), *flags]))
    server.prepare_environment(cfg)
    from sglang.srt.plugins import load_plugins

    load_plugins()  # before ServerArgs: the turboquant backend must be a valid choice
    import sglang

    llm = sglang.Engine(server_args=server.server_args(cfg))
    try:
        llm.tq_config = cfg
        yield llm
    finally:
        llm.shutdown()


def _dists(tops: Sequence, vocab: int) -> list[list[float]]:
    """SGLang's top-`vocab` logprob lists, one per position, as full log-distributions indexed by token id."""
    dists = []
    for top in tops:
        dist = [-math.inf] * vocab
        for lp, tid, *_ in top:
            dist[tid] = lp
        dists.append(dist)
    return dists


def score(llm, texts: Sequence[str], vocab: int) -> list[dict]:
    """Per prompt: greedy output ids, their logprobs and full distributions, the prompt's token logprobs and full
    next-token distributions (teacher-forced, position 1 on)."""
    outs = llm.generate(
        list(texts),
        {"max_new_tokens": GREEDY_TOKENS, "temperature": 0, "ignore_eos": True},
        return_logprob=True,
        logprob_start_len=0,
        top_logprobs_num=vocab,
    )
    rows = []
    for out in outs:
        meta = out["meta_info"]
        rows.append(
            {
                "output_ids": list(out["output_ids"]),
                "output_logprobs": [x[0] for x in meta["output_token_logprobs"]],
                "output_dists": _dists(meta["output_top_logprobs"], vocab),
                "input_logprobs": [x[0] for x in meta["input_token_logprobs"][1:]],
                "input_dists": _dists(meta["input_top_logprobs"][1:], vocab),
            }
        )
    return rows


def mean_kl(reference: list[dict], other: list[dict]) -> float:
    """Mean over prompt positions of KL(reference || other), in nats, from full log-distributions."""
    total, count = 0.0, 0
    for ref, oth in zip(reference, other, strict=True):
        for p_log, q_log in zip(ref["input_dists"], oth["input_dists"], strict=True):
            total += sum(math.exp(p) * (p - q) for p, q in zip(p_log, q_log, strict=True) if p > -math.inf)
            count += 1
    return total / count


def greedy_agreement(reference: list[dict], other: list[dict]) -> float:
    same = total = 0
    for ref, oth in zip(reference, other, strict=True):
        for p_log, q_log in zip(ref["input_dists"], oth["input_dists"], strict=True):
            same += max(range(len(p_log)), key=p_log.__getitem__) == max(range(len(q_log)), key=q_log.__getitem__)
            total += 1
    return same / total


def _argmax(dist: Sequence[float]) -> int:
    return max(range(len(dist)), key=dist.__getitem__)


def argmax_flip_gaps(reference: list[dict], other: list[dict]) -> list[float]:
    """At each teacher-forced prompt position where the argmaxes differ: how far the reference's own distribution puts
    its argmax above the other's (nats; 0 at an exact tie). If no logprob moves by more than e, only positions with a
    gap below 2e can flip."""
    gaps = []
    for ref, oth in zip(reference, other, strict=True):
        for p_log, q_log in zip(ref["input_dists"], oth["input_dists"], strict=True):
            a, b = _argmax(p_log), _argmax(q_log)
            if a != b:
                gaps.append(p_log[a] - p_log[b])
    return sorted(gaps)


def output_comparison(reference: list[dict], other: list[dict]) -> tuple[list[dict | None], float]:
    """The greedy outputs of each prompt: where they part (None: never), with the gap the reference's own distribution
    put between its token and the other's at that step; and the largest logprob difference of the reference's token
    over the steps whose context both share (up to and including the parting step)."""
    partings, diff = [], 0.0
    for ref, oth in zip(reference, other, strict=True):
        pairs = zip(ref["output_ids"], oth["output_ids"], strict=True)
        part = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
        for i in range(len(ref["output_ids"]) if part is None else part + 1):
            token = ref["output_ids"][i]
            diff = max(diff, abs(ref["output_dists"][i][token] - oth["output_dists"][i][token]))
        if part is None:
            partings.append(None)
        else:
            dist = ref["output_dists"][part]
            partings.append({"step": part, "gap": dist[ref["output_ids"][part]] - dist[oth["output_ids"][part]]})
    return partings, diff


def prefix_invariance(llm, texts: Sequence[str]) -> dict:
    """Greedy tokens of each prompt cold (empty cache) and again with it cached; then a batch of suffixes that share
    the first prompt as a cached prefix, against each served cold."""
    greedy = {"max_new_tokens": GREEDY_TOKENS, "temperature": 0, "ignore_eos": True}
    same, cached_tokens = True, []
    for text in texts:
        assert llm.flush_cache().success
        [cold] = llm.generate([text], greedy)
        [warm] = llm.generate([text], greedy)
        cached_tokens.append(warm["meta_info"]["cached_tokens"])
        same &= cold["output_ids"] == warm["output_ids"] and cold["meta_info"]["cached_tokens"] == 0
    suffixes = [texts[0] + f"\ndef helper_{i}(x):\n    return x * {i} + " for i in range(4)]
    cold_ids = []
    for text in suffixes:
        assert llm.flush_cache().success
        [out] = llm.generate([text], greedy)
        cold_ids.append(out["output_ids"])
    assert llm.flush_cache().success
    llm.generate([texts[0]], greedy)
    warm = llm.generate(suffixes, greedy)
    batch_same = [w["output_ids"] for w in warm] == cold_ids
    return {
        "cold_equals_cached": bool(same),
        "cached_tokens": cached_tokens,
        "shared_prefix_batch_equals_cold": batch_same,
        "shared_prefix_cached_tokens": [w["meta_info"]["cached_tokens"] for w in warm],
    }


def capacity(llm) -> dict:
    """Bytes per token of SGLang's own pool (its memory report) against the layout spec's."""
    memory = llm.get_server_info()["internal_states"][0]["memory_usage"]
    layout, tokens = llm.tq_config.kv_layout, llm.tq_config.max_total_tokens
    pool_bytes = memory["kvcache"] * 2**30
    return {
        "max_total_tokens": tokens,
        "token_capacity": memory["token_capacity"],
        "pool_bytes_per_token": pool_bytes / (tokens + 1),  # + SGLang's padding slot
        "resolution": 0.0005 * 2**30 / (tokens + 1),  # the report's rounding (3 decimals of GB), in bytes per token
        "layout_bytes_per_token": layout.bytes_per_token,
        "bf16_bytes_per_token": layout.bf16_bytes_per_token,
    }


def measure_arch(arch: str, model_dir: Path, settings: Sequence[str] = tuple(SETTINGS), log=print) -> dict:
    """Every setting of `settings` on the tiny `arch` checkpoint at model_dir (bf16 first: the reference)."""
    from tq_serve.models.tiny_arch import VOCAB_SIZE, hf_config

    texts = prompts()
    num_layers = hf_config(arch).num_hidden_layers
    result: dict = {"arch": arch, "settings": {}}
    scored: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        raw16 = raw16_schedule(num_layers, Path(tmp))
        for name in settings:
            flags = [f.format(raw16=raw16) for f in SETTINGS[name]]
            start = time.monotonic()
            with engine(model_dir, flags, SMALL_POOL) as llm:
                started = time.monotonic() - start
                scored[name] = score(llm, texts, VOCAB_SIZE)
                row: dict = {"engine_start_s": round(started, 1)}
                if name != "bf16":
                    row["capacity"] = capacity(llm)
                if name.startswith("tq"):
                    row["prefix_cache"] = prefix_invariance(llm, texts)
            row["wall_s"] = round(time.monotonic() - start, 1)
            row["output_ids"] = [s["output_ids"] for s in scored[name]]
            if name != "bf16" and "bf16" in scored:
                ref = scored["bf16"]
                row["kl_to_bf16"] = mean_kl(ref, scored[name])
                row["greedy_agreement"] = greedy_agreement(ref, scored[name])
                row["same_greedy_tokens"] = row["output_ids"] == [s["output_ids"] for s in ref]
                row["greedy_parting"], row["max_abs_output_logprob_diff"] = output_comparison(ref, scored[name])
                if name == "raw16":  # where a flip must be a near-tie (the compressed settings flip many)
                    row["argmax_flip_gaps"] = argmax_flip_gaps(ref, scored[name])
                diffs = [
                    abs(x - y)
                    for a, b in zip(ref, scored[name], strict=True)
                    for x, y in zip(a["input_logprobs"], b["input_logprobs"], strict=True)
                ]
                row["max_abs_prompt_logprob_diff"] = max(diffs)
                if name == "raw16":
                    row["largest_prompt_logprob_diffs"] = sorted(diffs, reverse=True)[:10]
            result["settings"][name] = row
            brief = {k: v for k, v in row.items() if k not in ("output_ids", "argmax_flip_gaps")}
            log(f"{arch} {name}: " + json.dumps(brief))
    result["prompt_positions"] = sum(len(s["input_dists"]) for s in scored[next(iter(scored))])
    return result


def measure_arch_isolated(arch: str, model_dir: Path, settings: Sequence[str] = tuple(SETTINGS), timeout: float = 2400):
    """measure_arch in a child process: SGLang's engine kills its whole process when a scheduler dies (a model it
    cannot load, an engine error), which must fail one architecture, not the caller."""
    with tempfile.TemporaryDirectory() as tmp:
        out, log = Path(tmp) / "result.json", Path(tmp) / "log.txt"
        cmd = [sys.executable, "-m", "tq_serve.bench.architectures", "--one", arch, str(model_dir), str(out), *settings]
        with log.open("w") as sink:
            run = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT, timeout=timeout)
        text = log.read_text()
        print("\n".join(line for line in text.splitlines() if line.startswith(f"{arch} ")), flush=True)
        if run.returncode != 0 or not out.is_file():
            raise RuntimeError(f"{arch}: measurement exited with {run.returncode}; its log ends:\n{text[-4000:]}")
        return json.loads(out.read_text())


def _one(argv: list[str]) -> int:
    """`--one ARCH MODEL_DIR OUT.json [SETTINGS...]`: measure_arch in this process, the result to OUT.json."""
    arch, model_dir, out, *settings = argv
    from tq_serve.cpu_support import apply_cpu_support

    apply_cpu_support()  # before anything imports sglang
    result = measure_arch(arch, Path(model_dir), settings or tuple(SETTINGS), log=lambda line: print(line, flush=True))
    Path(out).write_text(json.dumps(result))
    return 0


def main(argv: list[str]) -> int:
    from tq_serve.models.tiny_arch import ARCHS, build

    parser = argparse.ArgumentParser(prog="python -m tq_serve.bench architectures", description=__doc__.split("\n")[0])
    parser.add_argument("--archs", nargs="+", choices=tuple(ARCHS), default=list(ARCHS))
    parser.add_argument("--settings", nargs="+", choices=tuple(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "tq_tiny_arch")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "cpu" / "architectures.json")
    args = parser.parse_args(argv)
    if "bf16" not in args.settings:
        parser.error("the bf16 setting is the reference of every comparison: keep it")
    settings = ["bf16", *[s for s in args.settings if s != "bf16"]]
    rows = []
    for arch in args.archs:
        try:
            rows.append(measure_arch_isolated(arch, build(arch, args.cache / arch), settings))
        except Exception as err:  # one architecture failing must not lose the others' figures
            print(f"{arch}: failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            rows.append({"arch": arch, "error": f"{type(err).__name__}: {err}"})
        write_report(args.out, "architectures", {"archs": args.archs, "settings": settings}, rows)
    flat = []
    for r in rows:
        for name, s in r.get("settings", {}).items():
            cap = s.get("capacity", {})
            flat.append(
                {
                    "arch": r["arch"],
                    "setting": name,
                    "kl": s.get("kl_to_bf16"),
                    "agree": s.get("greedy_agreement"),
                    "same_tokens": s.get("same_greedy_tokens"),
                    "dlogp": s.get("max_abs_prompt_logprob_diff"),
                    "pool_B/tok": cap.get("pool_bytes_per_token"),
                    "layout_B/tok": cap.get("layout_bytes_per_token"),
                    "prefix_ok": (s.get("prefix_cache") or {}).get("cold_equals_cached"),
                }
            )
    if not flat:  # every architecture failed: their errors are above
        return 1
    print(
        table(
            flat,
            {
                "arch": "",
                "setting": "",
                "kl": ".5f",
                "agree": ".3f",
                "same_tokens": "",
                "dlogp": ".2e",
                "pool_B/tok": ".1f",
                "layout_B/tok": "d",
                "prefix_ok": "",
            },
        )
    )
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(_one(sys.argv[2:]) if sys.argv[1:2] == ["--one"] else main(sys.argv[1:]))
