"""Settings: flags > TQ_* variables > YAML preset > defaults; resolution against the model's shape."""

import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from tq_serve.registry import ModelRegistry
from tq_serve.schedule import BitSchedule
from tq_serve.settings import (
    CPU_DEFAULT_MAX_TOTAL_TOKENS,
    PRESETS_DIR,
    ServeSettings,
    load_kv_schedule,
    load_settings,
    resolve,
)

TINY = {"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 256}


@pytest.fixture(autouse=True)
def no_tq_environment(monkeypatch):
    for name in [n for n in os.environ if n.startswith("TQ_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    path = tmp_path / "tiny"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(TINY))
    (path / "model.safetensors").write_bytes(b"")
    return path


def settings(*argv: str) -> ServeSettings:
    return load_settings(list(argv))


def test_defaults_serve_the_bundled_model_on_localhost():
    s = settings()
    assert (s.model, s.host, s.port, s.kv_bits, s.kv_variant, s.device) == (
        "tq-tiny",
        "127.0.0.1",
        30000,
        4,
        "mse",
        "auto",
    )


def test_settings_are_frozen():
    with pytest.raises(ValidationError):
        settings().port = 1


@pytest.mark.parametrize("value, parsed", [("2", 2), ("2.5", 2.5), ("3.5", 3.5), ("16", 16)])
def test_kv_bits_from_the_command_line(value, parsed):
    assert settings("--kv-bits", value).kv_bits == parsed


@pytest.mark.parametrize("value", ["1", "5", "3.2", "x"])
def test_unsupported_kv_bits_are_rejected(value):
    with pytest.raises(ValidationError, match="kv_bits"):
        settings("--kv-bits", value)


def test_flags_beat_environment_beat_preset(tmp_path, monkeypatch):
    preset = tmp_path / "mine.yaml"
    preset.write_text("kv_bits: 2\nport: 31000\nkv-variant: prod\n")
    monkeypatch.setenv("TQ_PORT", "32000")
    monkeypatch.setenv("TQ_KV_BITS", "3")
    s = settings("--config", str(preset), "--kv-bits", "4")
    assert (s.kv_bits, s.port, s.kv_variant) == (4, 32000, "prod")


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
def test_every_shipped_preset_loads(preset):
    assert settings("--preset", preset).preset == preset


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown preset 'nope': known presets are .*cpu-dev"):
        settings("--preset", "nope")


def test_unknown_key_in_a_preset_is_an_error(tmp_path):
    (tmp_path / "bad.yaml").write_text("kv_bitz: 3\n")
    with pytest.raises(ValidationError, match="kv_bitz"):
        settings("--config", str(tmp_path / "bad.yaml"))


def test_schedule_as_a_list_or_under_layer_bits(tmp_path):
    (tmp_path / "a.yaml").write_text("- [4, 2]\n- [3.5, '2.5']\n")
    (tmp_path / "b.yaml").write_text("layer_bits:\n  - [4, 2]\n  - [3.5, 2.5]\n")
    assert load_kv_schedule(tmp_path / "a.yaml") == load_kv_schedule(tmp_path / "b.yaml") == ((4, 2), (3.5, 2.5))


@pytest.mark.parametrize(
    "text, message", [("- [4, 4, 4]\n", "list of \\[k_bits, v_bits\\] pairs"), ("- [4, 7]\n", "unsupported bits 7")]
)
def test_malformed_schedules_are_rejected(tmp_path, text, message):
    (tmp_path / "s.yaml").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_kv_schedule(tmp_path / "s.yaml")


def test_resolve_builds_the_packed_layout(model_dir):
    cfg = resolve(settings("--model", str(model_dir), "--kv-bits", "3", "--device", "cpu"))
    assert cfg.kv_layout.layer_bits == ((3, 3),) * 4
    # head_dim 64 at 3 bits: 24 code bytes + a 2-byte fp16 norm per vector; K and V, 2 KV heads, 4 layers.
    assert cfg.kv_layout.bytes_per_token == (24 + 2) * 2 * 2 * 4
    assert cfg.max_total_tokens == CPU_DEFAULT_MAX_TOTAL_TOKENS


def test_sixteen_bits_means_plain_bf16_sglang(model_dir):
    assert resolve(settings("--model", str(model_dir), "--kv-bits", "16", "--device", "cpu")).kv_layout is None


def test_schedule_with_the_wrong_layer_count_names_both_counts(model_dir, tmp_path):
    (tmp_path / "s.yaml").write_text("- [4, 4]\n" * 3)
    with pytest.raises(
        ValueError, match=r"bit schedule .*s.yaml does not fit .*: layer_bits has 3 entries .* 4 layers"
    ):
        resolve(settings("--model", str(model_dir), "--kv-schedule", str(tmp_path / "s.yaml"), "--device", "cpu"))


def test_a_tuned_schedule_file_sets_layer_bits_and_its_variant(model_dir, tmp_path):
    schedule = BitSchedule(name="mix", model="tiny", layer_bits=((4, 3), (3, 2), (2, 2), (4, 4)), variant="prod")
    schedule.save(tmp_path / "mix.yaml")
    cfg = resolve(settings("--model", str(model_dir), "--kv-schedule", str(tmp_path / "mix.yaml"), "--device", "cpu"))
    assert cfg.kv_layout.layer_bits == schedule.layer_bits
    assert cfg.kv_layout.variant == "prod"


def test_a_schedule_name_resolves_in_configs_schedules(model_dir, monkeypatch, tmp_path):
    monkeypatch.setattr("tq_serve.schedule.SCHEDULES_DIR", tmp_path)
    BitSchedule.uniform(4, 3, model="tiny", name="three").save(tmp_path / "three.yaml")
    cfg = resolve(settings("--model", str(model_dir), "--kv-schedule", "three", "--device", "cpu"))
    assert cfg.kv_layout.layer_bits == ((3, 3),) * 4
    with pytest.raises(ValueError, match="neither a file nor a schedule name .*known: three"):
        resolve(settings("--model", str(model_dir), "--kv-schedule", "four", "--device", "cpu"))


def test_a_bad_layer_in_a_full_schedule_is_named(tmp_path):
    (tmp_path / "s.yaml").write_text("name: s\nmodel: tiny\nlayer_bits:\n- [4, 4]\n- [4, 5]\n")
    with pytest.raises(ValueError, match="layer 1 v_bits"):
        load_kv_schedule(tmp_path / "s.yaml")


def test_head_dim_the_kernels_do_not_support_is_named(tmp_path):
    path = tmp_path / "odd"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(TINY | {"head_dim": 48}))
    (path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"--kv-bits 4 does not fit .*unsupported head_dim 48: supported values"):
        resolve(settings("--model", str(path), "--device", "cpu"))


def test_prod_needs_integer_bits(model_dir):
    with pytest.raises(ValueError, match="unsupported bits 2.5 for variant 'prod'"):
        resolve(settings("--model", str(model_dir), "--kv-bits", "2.5", "--kv-variant", "prod", "--device", "cpu"))


def test_model_path_points_an_alias_at_local_weights(model_dir):
    cfg = resolve(settings("--model-path", str(model_dir), "--device", "cpu"), ModelRegistry.load())
    assert (cfg.model.name, cfg.model.path) == ("tq-tiny", model_dir.resolve())
