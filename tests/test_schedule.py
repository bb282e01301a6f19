"""BitSchedule: the knapsack solver against brute force, YAML round trips, validation errors, and the helpers."""

import itertools
import random
from pathlib import Path

import pytest
import yaml
from tq_serve.kernels.layout import KVLayout

from tq_serve import schedule as schedule_module
from tq_serve.schedule import SCHEDULE_BITS, SCHEDULES_DIR, BitSchedule, ScheduleError, solve_budget

CANDIDATES = [(k, v) for k in (2, 2.5, 3, 4, 16) for v in (2, 3, 3.5, 4)]


def random_tables(num_layers: int, seed: int) -> list[dict[tuple[float, float], float]]:
    # Errors that fall with bits like real ones, with layer-dependent scale and noise, so the optimum is not uniform.
    rng = random.Random(seed)
    tables = []
    for _ in range(num_layers):
        k_scale, v_scale = rng.uniform(0.2, 5), rng.uniform(0.2, 5)
        tables.append({(k, v): k_scale * 4.0**-k + v_scale * 4.0**-v + rng.uniform(0, 0.01) for k, v in CANDIDATES})
    return tables


def brute_force(tables, budget):
    best = None
    for picks in itertools.product(*(list(t) for t in tables)):
        if sum(k + v for k, v in picks) / (2 * len(tables)) <= budget + 1e-9:
            error = sum(t[p] for t, p in zip(tables, picks, strict=True))
            if best is None or error < best[1]:
                best = (picks, error)
    return best


@pytest.mark.parametrize("num_layers", [3, 4])
@pytest.mark.parametrize("budget", [2.0, 2.4, 2.5, 3.0, 3.25, 4.0, 6.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_solver_matches_brute_force(num_layers: int, budget: float, seed: int) -> None:
    tables = random_tables(num_layers, seed)
    picks, error = solve_budget(tables, budget)
    expected_picks, expected_error = brute_force(tables, budget)
    assert error == pytest.approx(expected_error, rel=1e-12)
    assert sum(t[p] for t, p in zip(tables, picks, strict=True)) == pytest.approx(error, rel=1e-12)
    assert sum(k + v for k, v in picks) / (2 * num_layers) <= budget + 1e-9
    assert picks == expected_picks


def test_solver_spends_budget_where_error_falls_most() -> None:
    # Layer 0 is 100x more sensitive: with room for one upgrade, it gets it.
    tables = [{(2, 2): 100.0, (4, 4): 1.0}, {(2, 2): 1.0, (4, 4): 0.01}]
    assert solve_budget(tables, 3.0) == (((4, 4), (2, 2)), 2.0)


def test_solver_breaks_ties_towards_fewer_bits() -> None:
    tables = [{(2, 2): 1.0, (3, 3): 1.0, (4, 4): 1.0}] * 3
    assert solve_budget(tables, 4.0)[0] == ((2, 2),) * 3


def test_solver_refuses_a_budget_below_the_cheapest_candidates() -> None:
    with pytest.raises(ScheduleError, match="below the cheapest"):
        solve_budget(random_tables(3, 0), 1.5)


def test_yaml_round_trip(tmp_path) -> None:
    schedule = BitSchedule(
        name="mixed",
        model="tq-tiny",
        layer_bits=((4, 3), (3.5, 2.5), (16, 16), (2, 2)),
        budget=6.5,
        method="by hand",
        tuning={"calibration": "configs/calibration/python_code.txt", "layer_error": [0.1, 0.2, 0.0, 0.3]},
    )
    path = schedule.save(tmp_path / "mixed.yaml")
    loaded = BitSchedule.load(path, num_layers=4)
    assert loaded == schedule
    assert loaded.tuning == schedule.tuning
    assert loaded.to_yaml() == schedule.to_yaml()
    # Pairs are written one per line and read back with their int/float types, as KVLayout expects them.
    assert "- [3.5, 2.5]\n" in path.read_text()
    assert loaded.layer_bits == ((4, 3), (3.5, 2.5), (16, 16), (2, 2))
    assert yaml.safe_load(path.read_text())["average_bits"] == pytest.approx(loaded.average_bits)


def test_layer_bits_feed_kv_layout_and_average_bits() -> None:
    schedule = BitSchedule(name="s", model="m", layer_bits=((4, 2), (3, 3), (2.5, 3.5)))
    layout = KVLayout(num_layers=3, num_kv_heads=2, head_dim=128, layer_bits=schedule.layer_bits)
    assert layout == schedule.kv_layout(num_kv_heads=2, head_dim=128)
    assert schedule.average_bits == layout.average_bits == 3.0
    # 66 + 34 + 50 + 50 + (42 + 58) bytes per head at d=128 (the half/half split of 2.5 and 3.5 bits).
    assert layout.bytes_per_token == 2 * (66 + 34 + 50 + 50 + 42 + 58)


def test_load_by_name_from_the_schedules_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(schedule_module, "SCHEDULES_DIR", tmp_path)
    BitSchedule.uniform(4, 2.5, name="tiny-2.5").save(tmp_path / "tiny-2.5.yaml")
    # A name with a dot in it, with or without the suffix, and as a Path (what a CLI setting holds).
    for name in ("tiny-2.5", "tiny-2.5.yaml", Path("tiny-2.5")):
        assert BitSchedule.load(name, num_layers=4).layer_bits == ((2.5, 2.5),) * 4
    with pytest.raises(ScheduleError, match=r"known: tiny-2.5\)"):
        BitSchedule.load("tiny-3.0")


def test_committed_schedules_load() -> None:
    for path in SCHEDULES_DIR.glob("*.yaml"):
        schedule = BitSchedule.load(path.stem)
        assert schedule.name == path.stem and schedule.average_bits <= schedule.budget


def test_uniform_helper() -> None:
    schedule = BitSchedule.uniform(6, 3, model="tq-tiny")
    assert schedule.layer_bits == ((3, 3),) * 6
    assert schedule.average_bits == schedule.budget == 3
    mixed = BitSchedule.uniform(4, 4, v_bits=2)
    assert mixed.layer_bits == ((4, 2),) * 4 and mixed.average_bits == 3
    assert BitSchedule.uniform(2, 16).kv_layout(num_kv_heads=1, head_dim=128).bytes_per_token == 2 * 2 * 256


def test_first_last_helper() -> None:
    schedule = BitSchedule.first_last(8, 2.5, edge_bits=4, first=2, last=1)
    assert schedule.layer_bits == ((4, 4), (4, 4)) + ((2.5, 2.5),) * 5 + ((4, 4),)
    assert schedule.average_bits == pytest.approx((3 * 4 + 5 * 2.5) / 8)
    assert BitSchedule.first_last(3, 2, edge_bits=16, first=0, last=0).layer_bits == ((2, 2),) * 3
    with pytest.raises(ScheduleError, match="together <= 3 layers"):
        BitSchedule.first_last(3, 2, edge_bits=4, first=2, last=2)


def test_wrong_layer_count_names_both_counts(tmp_path) -> None:
    path = BitSchedule.uniform(6, 3, name="six").save(tmp_path / "six.yaml")
    with pytest.raises(ScheduleError, match=r"six.yaml.*has 6 layers but the model has 8"):
        BitSchedule.load(path, num_layers=8)


@pytest.mark.parametrize(
    ("pairs", "match"),
    [
        ([[3, 3], [5, 3]], r"layer 1 k_bits \(mse\): unsupported bits 5: supported values are 2, 2.5, 3, 3.5, 4, 16"),
        ([[3, 3], [3, 1]], r"layer 1 v_bits .*unsupported bits 1"),
        ([[3, "x"]], r"layer 0 v_bits .*unsupported bits 'x'"),
        ([[3, 3, 3]], r"layer 0: expected \[k_bits, v_bits\]"),
        ([], r"layer_bits is empty"),
    ],
)
def test_unsupported_bits_name_the_layer_and_value(tmp_path, pairs, match) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "model": "m", "layer_bits": pairs}))
    with pytest.raises(ScheduleError, match=match) as err:
        BitSchedule.load(path)
    assert str(path) in str(err.value)


def test_prod_variant_refuses_fractional_bits() -> None:
    with pytest.raises(ScheduleError, match=r"layer 0 k_bits \(prod\): unsupported bits 2.5"):
        BitSchedule(name="p", model="m", layer_bits=((2.5, 3),), variant="prod")
    with pytest.raises(ScheduleError, match="unsupported variant 'qjl'"):
        BitSchedule(name="p", model="m", layer_bits=((2, 3),), variant="qjl")


def test_budget_exceeded_is_refused(tmp_path) -> None:
    path = tmp_path / "over.yaml"
    path.write_text(yaml.safe_dump({"name": "over", "model": "m", "budget": 3.0, "layer_bits": [[4, 3], [3, 3]]}))
    with pytest.raises(ScheduleError, match=r"over.yaml.*average bits 3.25 exceed its budget 3"):
        BitSchedule.load(path)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("name: [unclosed\nlayer_bits: [[3, 3]]\n", "is not valid YAML"),
        ("- [3, 3]\n- [4]\n", r"layer 1: expected \[k_bits, v_bits\]"),
        ("7\n", "expected a mapping with name, model and layer_bits, got int"),
        ("name: x\nlayer_bits: [[3, 3]]\n", "missing key.*model"),
        ("name: x\nmodel: m\nlayer_bits: [[3, 3]]\nlayers: 1\n", "unknown key.*layers"),
        ("name: x\nmodel: m\nlayer_bits: 3\n", "layer_bits must be a list"),
        ("name: x\nmodel: m\nbudget: lots\nlayer_bits: [[3, 3]]\n", "budget: expected a number, got 'lots'"),
        ("", "got NoneType"),
    ],
)
def test_corrupt_file_names_the_file(tmp_path, text, match) -> None:
    path = tmp_path / "corrupt.yaml"
    path.write_text(text)
    with pytest.raises(ScheduleError, match=match) as err:
        BitSchedule.load(path)
    assert f"bit schedule {path}" in str(err.value)


@pytest.mark.parametrize("text", ["- [3, 2]\n- [16, 4]\n", "layer_bits:\n- [3, '2']\n- ['16', 4]\n"])
def test_a_file_of_bare_pairs_is_a_schedule_named_after_the_file(tmp_path, text) -> None:
    (tmp_path / "pairs.yaml").write_text(text)
    schedule = BitSchedule.load(tmp_path / "pairs.yaml", num_layers=2, variant="prod")
    assert (schedule.name, schedule.model, schedule.variant) == ("pairs", "", "prod")
    assert schedule.layer_bits == ((3, 2), (16, 4))


def test_a_bare_file_that_names_its_variant_keeps_it(tmp_path) -> None:
    (tmp_path / "pairs.yaml").write_text("variant: mse\nlayer_bits:\n- [3, 3]\n")
    assert BitSchedule.load(tmp_path / "pairs.yaml", variant="prod").variant == "mse"


def test_unknown_name_lists_known_schedules() -> None:
    with pytest.raises(ScheduleError, match=r"'no-such-schedule' is neither a file nor a schedule name in "):
        BitSchedule.load("no-such-schedule")
    with pytest.raises(ScheduleError, match="neither a file"):
        BitSchedule.load("missing/dir/file.yaml")


def test_schedule_bits_are_the_documented_set() -> None:
    assert SCHEDULE_BITS == (2, 2.5, 3, 3.5, 4, 16)
