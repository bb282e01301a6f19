"""Per-layer bit schedules: which (k_bits, v_bits) each layer's KV cache uses, and how to choose them.

A schedule is a YAML file in configs/schedules/:

    name: tq-tiny-3.0
    model: tq-tiny            # the model it was tuned for (an alias or a directory)
    variant: mse              # TurboQuant variant of every compressed layer
    budget: 3.0               # the average-bits budget it was made for (null: none)
    average_bits: 3.0         # informational; recomputed from layer_bits on load
    method: ...               # how it was made (uniform, first-last, tune_schedule ...)
    tuning: {...}             # optional provenance: calibration text, metric, per-layer errors
    layer_bits:               # [k_bits, v_bits], layer 0 first
    - [4, 3]
    - [3, 2.5]

A hand-written file may hold just the pairs: a plain list of [k_bits, v_bits], or a mapping with `layer_bits` (and
optionally `variant`); `BitSchedule.load` names it after the file. Every bits value goes through the one bits parser,
`kernels.layout.parse_bits`.

Average bits count K and V of every layer alike, 16 for an uncompressed (raw bf16) layer: the same quantity as
`KVLayout.average_bits`, and the one the budget bounds.

`solve_budget` picks one candidate per layer minimising the summed error under the budget: a multiple-choice
knapsack, solved exactly by dynamic programming over the cost in half bits (every supported bits value is a multiple
of 0.5, so the discretization loses nothing).

Importable without sglang or ray: only pyyaml, numpy, tq_serve.kernels and tq_serve.registry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tq_serve.kernels.layout import VARIANTS, KVLayout, parse_bits
from tq_serve.registry import REPO_ROOT

SCHEDULES_DIR = REPO_ROOT / "configs" / "schedules"
SCHEDULE_BITS = (2, 2.5, 3, 3.5, 4, 16)
"""Bits a schedule may give a layer's K or V: TurboQuant at 2-4 bits, or 16 = raw bf16 (an uncompressed layer)."""
PROD_BITS = (2, 3, 4, 16)
"""The prod variant spends one bit on QJL signs and has no fractional split (see kernels/layout.py)."""

# Costs are counted in half bits so that every candidate costs an integer (see module docstring).
_UNITS_PER_BIT = 2
_BUDGET_SLACK = 1e-9

LayerBits = tuple[tuple[float, float], ...]
_BARE_KEYS = {"layer_bits", "variant"}  # a hand-written file of pairs; any other key makes it a full schedule


class ScheduleError(ValueError):
    """A schedule that cannot be read, or does not fit the model: the message names the file, layer and value."""


def _bits(value: object, where: str, supported: Sequence[float] = SCHEDULE_BITS) -> float:
    """A bits value from YAML or code -> int or float member of `supported`, or a ScheduleError naming `where`."""
    try:
        bits = parse_bits(value)
    except ValueError:
        bits = None
    if isinstance(value, bool) or bits not in supported:
        choices = ", ".join(map(str, supported))
        raise ScheduleError(f"{where}: unsupported bits {value!r}: supported values are {choices}")
    return bits


def average_bits(layer_bits: LayerBits) -> float:
    """Mean bits per stored coordinate over K and V of every layer (16 for a raw layer)."""
    return sum(k + v for k, v in layer_bits) / (2 * len(layer_bits))


@dataclass(frozen=True, kw_only=True)
class BitSchedule:
    """Per-layer (k_bits, v_bits) for one model, with where it came from. Frozen; validated on construction."""

    name: str
    model: str
    layer_bits: LayerBits
    variant: str = "mse"
    budget: float | None = None
    """The average-bits budget the schedule was made for; a schedule above its budget is refused."""
    method: str = ""
    """How it was made, in words."""
    tuning: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """Provenance of a tuned schedule (calibration text, metric, errors); free-form, kept on round trips."""

    def __post_init__(self) -> None:
        if not self.layer_bits:
            raise ScheduleError(f"schedule {self.name!r}: layer_bits is empty; give one [k_bits, v_bits] per layer")
        if self.variant not in VARIANTS:
            raise ScheduleError(
                f"schedule {self.name!r}: unsupported variant {self.variant!r}: supported values are "
                f"{', '.join(VARIANTS)}"
            )
        supported = PROD_BITS if self.variant == "prod" else SCHEDULE_BITS
        pairs = []
        for layer, pair in enumerate(self.layer_bits):
            if not isinstance(pair, Sequence) or isinstance(pair, str) or len(pair) != 2:
                raise ScheduleError(f"schedule {self.name!r} layer {layer}: expected [k_bits, v_bits], got {pair!r}")
            pairs.append(
                tuple(
                    _bits(bits, f"schedule {self.name!r} layer {layer} {kind}_bits ({self.variant})", supported)
                    for kind, bits in zip("kv", pair, strict=True)
                )
            )
        object.__setattr__(self, "layer_bits", tuple(pairs))
        if self.budget is not None:
            object.__setattr__(self, "budget", _number(self.budget, f"schedule {self.name!r} budget"))
            if self.average_bits > self.budget + _BUDGET_SLACK:
                raise ScheduleError(
                    f"schedule {self.name!r}: average bits {self.average_bits:g} exceed its budget {self.budget:g}"
                )

    @property
    def num_layers(self) -> int:
        return len(self.layer_bits)

    @property
    def average_bits(self) -> float:
        return average_bits(self.layer_bits)

    def check_layers(self, num_layers: int) -> BitSchedule:
        """Self if it has one pair per model layer, else a ScheduleError naming both counts."""
        if self.num_layers != num_layers:
            made_for = f" (for model {self.model})" if self.model else ""
            raise ScheduleError(
                f"schedule {self.name!r}{made_for} has {self.num_layers} layers but the model has {num_layers}: "
                "give one [k_bits, v_bits] per layer"
            )
        return self

    def kv_layout(self, *, num_kv_heads: int, head_dim: int, norm_dtype: str = "float16") -> KVLayout:
        """The packed layout of this schedule for a model shape: its bytes per token set the cache capacity."""
        return KVLayout(
            num_layers=self.num_layers,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            layer_bits=self.layer_bits,
            variant=self.variant,
            norm_dtype=norm_dtype,
        )

    @classmethod
    def uniform(
        cls,
        num_layers: int,
        bits: float,
        *,
        v_bits: float | None = None,
        model: str = "",
        variant: str = "mse",
        name: str | None = None,
    ) -> BitSchedule:
        """Every layer at (bits, v_bits or bits)."""
        v_bits = bits if v_bits is None else v_bits
        return cls(
            name=name or f"uniform-k{bits:g}-v{v_bits:g}",
            model=model,
            layer_bits=((bits, v_bits),) * num_layers,
            variant=variant,
            budget=(bits + v_bits) / 2,
            method=f"uniform: k_bits {bits:g}, v_bits {v_bits:g} in every layer",
        )

    @classmethod
    def first_last(
        cls,
        num_layers: int,
        bits: float,
        *,
        edge_bits: float,
        first: int = 1,
        last: int = 1,
        model: str = "",
        variant: str = "mse",
        name: str | None = None,
    ) -> BitSchedule:
        """The first `first` and last `last` layers at edge_bits (K and V), the others at bits.

        The usual hand-made schedule: the first layers see raw token embeddings and the last ones write the logits,
        and both are commonly reported as the most sensitive to KV quantization.
        """
        if first < 0 or last < 0 or first + last > num_layers:
            raise ScheduleError(f"first ({first}) and last ({last}) must be >= 0 and together <= {num_layers} layers")
        edge = set(range(first)) | set(range(num_layers - last, num_layers))
        layer_bits = tuple((edge_bits, edge_bits) if i in edge else (bits, bits) for i in range(num_layers))
        return cls(
            name=name or f"first{first}-last{last}-{edge_bits:g}-rest-{bits:g}",
            model=model,
            layer_bits=layer_bits,
            variant=variant,
            budget=average_bits(layer_bits),
            method=f"first {first} and last {last} layers at {edge_bits:g} bits, the others at {bits:g}",
        )

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "model": self.model,
            "variant": self.variant,
            "budget": self.budget,
            "average_bits": round(self.average_bits, 6),
            "method": self.method,
        }
        if self.tuning:
            data["tuning"] = dict(self.tuning)
        data["layer_bits"] = [list(pair) for pair in self.layer_bits]
        return data

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_ScheduleDumper, sort_keys=False, width=120)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "schedule") -> BitSchedule:
        """From the YAML mapping; `source` (a file name) prefixes every error."""
        if not isinstance(data, Mapping):
            kind = type(data).__name__
            raise ScheduleError(f"{source}: expected a mapping with name, model and layer_bits, got {kind}")
        missing = [key for key in ("name", "model", "layer_bits") if key not in data]
        if missing:
            raise ScheduleError(f"{source}: missing key(s) {', '.join(missing)}")
        unknown = set(data) - {"name", "model", "variant", "budget", "average_bits", "method", "tuning", "layer_bits"}
        if unknown:
            raise ScheduleError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}")
        if not isinstance(data["layer_bits"], list):
            raise ScheduleError(f"{source}: layer_bits must be a list of [k_bits, v_bits], one per layer")
        tuning = data.get("tuning") or {}
        if not isinstance(tuning, Mapping):
            raise ScheduleError(f"{source}: tuning must be a mapping, got {type(tuning).__name__}")
        try:
            return cls(
                name=str(data["name"]),
                model=str(data["model"]),
                layer_bits=tuple(data["layer_bits"]),
                variant=data.get("variant", "mse"),
                budget=data.get("budget"),
                method=str(data.get("method") or ""),
                tuning=tuning,
            )
        except ScheduleError as err:
            raise ScheduleError(f"{source}: {err}") from None

    @classmethod
    def load(cls, path_or_name: str | Path, *, num_layers: int | None = None, variant: str = "mse") -> BitSchedule:
        """A schedule file, or the name of one in configs/schedules/ (`tq-tiny-3.0`); checked against num_layers.

        A file of bare pairs (a list, or a mapping of just `layer_bits` and `variant`) is named after the file, for no
        model, and gets `variant` unless it names its own. Every failure is a ScheduleError that names the file:
        missing, unreadable, not YAML, or not a schedule.
        """
        path = resolve_schedule_path(path_or_name)
        try:
            text = path.read_text()
        except OSError as err:
            raise ScheduleError(f"cannot read bit schedule {path}: {err.strerror}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ScheduleError(f"bit schedule {path} is not valid YAML: {err}") from None
        if isinstance(data, list):
            data = {"layer_bits": data}
        if isinstance(data, Mapping) and set(data) <= _BARE_KEYS:
            data = {"name": path.stem, "model": "", "variant": variant, **data}
        schedule = cls.from_dict(data, source=f"bit schedule {path}")
        if num_layers is not None:
            try:
                schedule.check_layers(num_layers)
            except ScheduleError as err:
                raise ScheduleError(f"bit schedule {path}: {err}") from None
        return schedule


def resolve_schedule_path(path_or_name: str | Path) -> Path:
    """An existing file as given, else configs/schedules/<name>[.yaml]; a ScheduleError lists the known names."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    if path.parent == Path("."):
        for named in (SCHEDULES_DIR / f"{path.name}.yaml", SCHEDULES_DIR / path.name):
            if named.is_file():
                return named
    known = ", ".join(sorted(p.stem for p in SCHEDULES_DIR.glob("*.yaml"))) or "none"
    raise ScheduleError(
        f"bit schedule {str(path_or_name)!r} is neither a file nor a schedule name in "
        f"{_display(SCHEDULES_DIR)}/ (known: {known})"
    )


def _display(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def _number(value: object, where: str) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ScheduleError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(number) or isinstance(value, bool):
        raise ScheduleError(f"{where}: expected a finite number, got {value!r}")
    return number


class _ScheduleDumper(yaml.SafeDumper):
    """Writes each [k_bits, v_bits] pair on one line, everything else in block style."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = len(data) == 2 and all(isinstance(x, int | float) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_ScheduleDumper.add_representer(list, _represent_list)


def solve_budget(
    errors: Sequence[Mapping[tuple[float, float], float]], budget: float
) -> tuple[tuple[tuple[float, float], ...], float]:
    """Choose one (k_bits, v_bits) per layer minimising the summed error with average bits <= budget.

    errors[layer] maps each candidate (k_bits, v_bits) of that layer to its error. Exact multiple-choice knapsack:
    dp[c] = least error of the layers so far at total cost c (in half bits), one vectorized pass per candidate.
    Ties go to the cheaper choice. Returns (layer_bits, total error); a ScheduleError when no choice fits.
    """
    num_layers = len(errors)
    if num_layers == 0 or any(not table for table in errors):
        raise ScheduleError("every layer needs at least one candidate (k_bits, v_bits) with its error")
    capacity = math.floor(_UNITS_PER_BIT * 2 * num_layers * budget + _BUDGET_SLACK)
    cheapest = sum(min(k + v for k, v in table) for table in errors) * _UNITS_PER_BIT
    if cheapest > capacity:
        raise ScheduleError(
            f"budget {budget:g} average bits is below the cheapest schedule of the candidates "
            f"({cheapest / (_UNITS_PER_BIT * 2 * num_layers):g})"
        )
    dp = np.zeros(capacity + 1)  # no layers yet: no error at any budget
    choice = np.zeros((num_layers, capacity + 1), dtype=np.int64)
    candidates = []
    for layer, table in enumerate(errors):
        # Cheapest first, so that the strict `<` below keeps the cheaper of equal-error choices.
        options = sorted(table.items(), key=lambda item: (item[0][0] + item[0][1], item[0]))
        candidates.append([pair for pair, _ in options])
        best = np.full(capacity + 1, np.inf)
        for index, (pair, error) in enumerate(options):
            cost = round((pair[0] + pair[1]) * _UNITS_PER_BIT)
            if cost > capacity:
                continue
            shifted = np.full(capacity + 1, np.inf)
            shifted[cost:] = dp[: capacity + 1 - cost] + float(error)
            better = shifted < best
            best[better] = shifted[better]
            choice[layer, better] = index
        dp = best
    # The zero start absorbs unspent budget, so dp[c] is the least error at cost <= c: non-increasing in c, and the
    # first index that reaches the minimum is the cheapest optimal schedule.
    total = float(dp.min())
    cost = int(np.flatnonzero(dp == total)[0])
    picks = []
    for layer in range(num_layers - 1, -1, -1):
        pair = candidates[layer][choice[layer, cost]]
        picks.append(pair)
        cost -= round((pair[0] + pair[1]) * _UNITS_PER_BIT)
    return tuple(reversed(picks)), total
