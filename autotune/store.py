"""Tuned kernel configs as JSON files under configs/kernels/, one per key, and their run-time lookup.

A key is what changes the best launch config: kernel, GPU name, Triton version, head_dim, k_bits, v_bits, GQA group
and variant. Never the sequence length: the kernels split long contexts themselves. A file is named by its key:

    configs/kernels/decode/NVIDIA_H200__triton-3.6.0__d128_k4_v4_g4_mse.json

and holds the key fields again (a file whose name and content disagree is refused), the winning config (launcher
keyword arguments), the timings of the winner and of the default, and a stamp with GPU, Triton, torch and date.

Lookup falls back in this order: exact -> same GPU with another Triton version -> nearest head_dim/bits/group on the
same GPU -> the rule of thumb in spaces.default_config. A fallback logs one line naming the tune command. A corrupt
or mismatched file is a warning and is skipped, never a crash.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict, dataclass, fields
from functools import cache
from pathlib import Path

from .spaces import KERNEL_PARAMS, default_config

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "kernels"
TUNE_COMMAND = "python -m tq_serve.autotune"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")


def _bits(value: float) -> str:
    return str(int(value)) if value == int(value) else str(value)


@dataclass(frozen=True, kw_only=True)
class TuningKey:
    kernel: str
    gpu: str
    triton: str
    head_dim: int
    k_bits: float
    v_bits: float
    group: int
    variant: str = "mse"

    @property
    def filename(self) -> str:
        shape = f"d{self.head_dim}_k{_bits(self.k_bits)}_v{_bits(self.v_bits)}_g{self.group}_{self.variant}"
        return f"{slug(self.gpu)}__triton-{self.triton}__{shape}.json"

    def path(self, config_dir: Path = CONFIG_DIR) -> Path:
        return Path(config_dir) / self.kernel / self.filename

    def distance(self, other: TuningKey) -> float:
        """How far another key's winner is expected to be from ours (same kernel and GPU assumed)."""
        return (
            abs(math.log2(self.head_dim / other.head_dim))
            + 0.5 * (abs(self.k_bits - other.k_bits) + abs(self.v_bits - other.v_bits))
            + 0.5 * abs(math.log2(self.group / other.group))
            + (0.0 if self.variant == other.variant else 1.0)
        )


@dataclass(frozen=True)
class TunedEntry:
    key: TuningKey
    config: dict
    path: Path


def save(key: TuningKey, config: dict, *, timings: dict, stamp: dict, config_dir: Path = CONFIG_DIR) -> Path:
    path = key.path(config_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"key": asdict(key), "config": config, "timings_us": timings, "stamp": stamp}
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    load_entries.cache_clear()
    return path


def _parse(path: Path, kernel: str) -> TunedEntry:
    record = json.loads(path.read_text())
    key_fields = {f.name for f in fields(TuningKey)}
    raw_key = record["key"]
    if set(raw_key) != key_fields:
        raise ValueError(f"key fields {sorted(raw_key)} differ from {sorted(key_fields)}")
    key = TuningKey(**raw_key)
    if key.kernel != kernel or key.filename != path.name:
        raise ValueError(f"its content is the key {key.filename} of kernel {key.kernel!r}")
    config = record["config"]
    unknown = set(config) - set(KERNEL_PARAMS[kernel])
    if unknown:
        raise ValueError(f"unknown launch parameters {sorted(unknown)} for kernel {kernel!r}")
    return TunedEntry(key=key, config=dict(config), path=path)


@cache
def load_entries(config_dir: Path = CONFIG_DIR) -> tuple[TunedEntry, ...]:
    """Every valid tuned file under config_dir; invalid ones are skipped with a warning naming the file."""
    entries = []
    for kernel in KERNEL_PARAMS:
        for path in sorted((Path(config_dir) / kernel).glob("*.json")):
            try:
                entries.append(_parse(path, kernel))
            except (OSError, ValueError, KeyError, TypeError) as err:
                logger.warning("ignoring tuned config %s: %s (re-run `%s`)", path, err, TUNE_COMMAND)
    return tuple(entries)


@cache
def lookup(key: TuningKey, config_dir: Path = CONFIG_DIR) -> tuple[dict, str]:
    """(launch config, source) for a key; source is exact | other-triton | nearest | rule. Cached per key."""
    same_gpu = [e for e in load_entries(config_dir) if e.key.kernel == key.kernel and e.key.gpu == key.gpu]
    for entry in same_gpu:
        if entry.key == key:
            return entry.config, "exact"
    for entry in same_gpu:
        if entry.key == TuningKey(**{**asdict(key), "triton": entry.key.triton}):
            source = "other-triton"
            break
    else:
        entry = min(same_gpu, key=lambda e: (key.distance(e.key), e.key.triton != key.triton), default=None)
        source = "nearest"
    if entry is None:
        logger.info("no tuned %s config for %s: using the rule of thumb; run `%s`", key.kernel, key.gpu, TUNE_COMMAND)
        return default_config(key.kernel, key.head_dim), "rule"
    logger.info(
        "no exact tuned %s config for %s: using %s (%s); run `%s` for this GPU",
        key.kernel,
        key.filename,
        entry.path.name,
        source,
        TUNE_COMMAND,
    )
    return entry.config, source
