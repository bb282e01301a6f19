"""Settings: flags > TQ_* variables > YAML preset > defaults; resolution against the model's shape."""

import dataclasses
import json
import logging
import typing
from pathlib import Path

import pytest
from pydantic import ValidationError
from tq_serve.kernels.layout import NORM_DTYPES
from tq_serve.kernels.rotation import ROTATIONS

from tq_serve.kv_config import TurboQuantConfig
from tq_serve.registry import ModelRegistry
from tq_serve.schedule import BitSchedule
from tq_serve.settings import (
    CPU_DEFAULT_MAX_TOTAL_TOKENS,
    PRESETS_DIR,
    ServeSettings,
    load_settings,
    resolve,
)

TINY = {"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 256}


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
    with pytest.raises(ValidationError, match=r"kv_bits[\s\S]*supported values are 2, 2.5, 3, 3.5, 4 \(16: plain"):
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


def resolve_cpu(model_dir: Path, *argv: str):
    return resolve(settings("--model", str(model_dir), "--device", "cpu", *argv))


def test_schedule_as_a_list_or_under_layer_bits(model_dir, tmp_path):
    (tmp_path / "a.yaml").write_text("- [4, 2]\n- [3.5, '2.5']\n- [2, 16]\n- [3, 3]\n")
    (tmp_path / "b.yaml").write_text("layer_bits:\n  - [4, 2]\n  - [3.5, 2.5]\n  - [2, 16]\n  - [3, 3]\n")
    a = resolve_cpu(model_dir, "--kv-schedule", str(tmp_path / "a.yaml")).kv_cache
    b = resolve_cpu(model_dir, "--kv-schedule", str(tmp_path / "b.yaml")).kv_cache
    assert a.layer_bits == b.layer_bits == ((4, 2), (3.5, 2.5), (2, 16), (3, 3))
    assert (a.schedule.name, a.kv_bits, a.variant) == ("a", None, "mse")


@pytest.mark.parametrize(
    "text, message",
    [("- [4, 4, 4]\n" * 4, r"layer 0: expected \[k_bits, v_bits\]"), ("- [4, 7]\n" * 4, "unsupported bits 7")],
)
def test_malformed_schedules_are_rejected(model_dir, tmp_path, text, message):
    (tmp_path / "s.yaml").write_text(text)
    with pytest.raises(ValueError, match=message):
        resolve_cpu(model_dir, "--kv-schedule", str(tmp_path / "s.yaml"))


def test_resolve_builds_the_packed_layout(model_dir):
    cfg = resolve(settings("--model", str(model_dir), "--kv-bits", "3", "--device", "cpu"))
    assert cfg.kv_layout.layer_bits == ((3, 3),) * 4
    # head_dim 64 at 3 bits: 24 code bytes + a 2-byte fp16 norm per vector; K and V, 2 KV heads, 4 layers.
    assert cfg.kv_layout.bytes_per_token == (24 + 2) * 2 * 2 * 4
    assert cfg.max_total_tokens == CPU_DEFAULT_MAX_TOTAL_TOKENS


def test_kv_cache_bf16_is_plain_sglang(model_dir):
    cfg = resolve_cpu(model_dir, "--kv-cache", "bf16")
    assert (cfg.kv_cache, cfg.kv_layout) == (None, None)


def test_kv_bits_16_is_an_alias_of_kv_cache_bf16_and_says_so(model_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="tq_serve.settings"):
        cfg = resolve_cpu(model_dir, "--kv-bits", "16")
    assert cfg.kv_cache is None
    assert "--kv-bits 16 is an alias of --kv-cache bf16" in caplog.text


def test_raw_16_bit_layers_of_a_schedule_stay_in_the_turboquant_cache(model_dir, tmp_path):
    (tmp_path / "s.yaml").write_text("- [16, 16]\n- [4, 4]\n- [4, 4]\n- [16, 4]\n")
    cfg = resolve_cpu(model_dir, "--kv-schedule", str(tmp_path / "s.yaml"))
    assert cfg.kv_cache.layer_bits[0] == (16, 16) and cfg.kv_layout.k(0).is_raw


@pytest.mark.parametrize("baseline", [["--kv-cache", "bf16"], ["--kv-bits", "16"]])
def test_a_schedule_with_the_bf16_baseline_is_refused(model_dir, baseline):
    with pytest.raises(ValueError, match="--kv-schedule configures the TurboQuant cache"):
        resolve_cpu(model_dir, *baseline, "--kv-schedule", "tq-tiny-3.0")


def test_schedule_with_the_wrong_layer_count_names_both_counts(model_dir, tmp_path):
    (tmp_path / "s.yaml").write_text("- [4, 4]\n" * 3)
    with pytest.raises(ValueError, match=r"bit schedule .*s.yaml: schedule 's' has 3 layers but the model has 4"):
        resolve_cpu(model_dir, "--kv-schedule", str(tmp_path / "s.yaml"))


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


def test_a_bad_layer_in_a_full_schedule_is_named(model_dir, tmp_path):
    (tmp_path / "s.yaml").write_text("name: s\nmodel: tiny\nlayer_bits:\n- [4, 4]\n- [4, 5]\n")
    with pytest.raises(ValueError, match="layer 1 v_bits"):
        resolve_cpu(model_dir, "--kv-schedule", str(tmp_path / "s.yaml"))


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


# -- every option of the KV-cache config is a flag, a TQ_* variable and a preset key ---------------------------------

# (flag arguments, the same as a TQ_* variable and a preset key, the TurboQuantConfig they must produce)
KV_OPTIONS = [
    (["--kv-bits", "3"], ("KV_BITS", "3"), TurboQuantConfig(kv_bits=3)),
    (["--kv-variant", "prod"], ("KV_VARIANT", "prod"), TurboQuantConfig(variant="prod")),
    (["--kv-rotation", "hadamard"], ("KV_ROTATION", "hadamard"), TurboQuantConfig(rotation="hadamard")),
    (["--kv-norm-correction"], ("KV_NORM_CORRECTION", "true"), TurboQuantConfig(norm_correction=True)),
    (["--kv-norm-dtype", "float32"], ("KV_NORM_DTYPE", "float32"), TurboQuantConfig(norm_dtype="float32")),
    (["--seed", "7"], ("SEED", "7"), TurboQuantConfig(seed=7)),
    (["--batch-invariant-cpu"], ("BATCH_INVARIANT_CPU", "true"), TurboQuantConfig(batch_invariant_cpu=True)),
    (["--triton-interpreter"], ("TRITON_INTERPRETER", "true"), TurboQuantConfig(use_triton_interpreter=True)),
]


@pytest.mark.parametrize("flags, env, expected", KV_OPTIONS, ids=[o[0][0] for o in KV_OPTIONS])
def test_every_kv_option_is_a_flag_a_variable_and_a_preset_key(model_dir, tmp_path, monkeypatch, flags, env, expected):
    by_flag = resolve_cpu(model_dir, *flags).kv_cache
    (tmp_path / "p.yaml").write_text(f"{env[0].lower()}: {env[1]}\n")
    by_preset = resolve_cpu(model_dir, "--config", str(tmp_path / "p.yaml")).kv_cache
    monkeypatch.setenv(f"TQ_{env[0]}", env[1])
    by_variable = resolve_cpu(model_dir).kv_cache
    assert by_flag == by_preset == by_variable == expected


def test_the_kv_options_cover_every_field_of_the_config():
    covered = {name for _, _, config in KV_OPTIONS for name in _changed_fields(config)}
    assert covered == {f.name for f in dataclasses.fields(TurboQuantConfig)} - {"schedule"}  # --kv-schedule: above


def _changed_fields(config: TurboQuantConfig) -> set[str]:
    default = TurboQuantConfig()
    return {f.name for f in dataclasses.fields(config) if getattr(config, f.name) != getattr(default, f.name)}


def test_the_settings_offer_the_choices_the_kernels_support():
    fields = ServeSettings.model_fields
    assert set(typing.get_args(fields["kv_rotation"].annotation)) == set(ROTATIONS)
    assert set(typing.get_args(fields["kv_norm_dtype"].annotation)) == set(NORM_DTYPES)


def test_a_schedule_that_names_its_variant_overrides_kv_variant(model_dir, tmp_path):
    BitSchedule.uniform(4, 3, model="tiny", name="p", variant="prod").save(tmp_path / "p.yaml")
    (tmp_path / "plain.yaml").write_text("- [3, 3]\n" * 4)
    named = resolve_cpu(model_dir, "--kv-schedule", str(tmp_path / "p.yaml"), "--kv-variant", "mse").kv_cache
    plain = resolve_cpu(model_dir, "--kv-schedule", str(tmp_path / "plain.yaml"), "--kv-variant", "prod").kv_cache
    assert (named.variant, plain.variant) == ("prod", "prod")


def test_triton_interpreter_needs_a_cpu(model_dir):
    with pytest.raises(ValueError, match="--triton-interpreter runs the Triton kernels on a CPU"):
        resolve(settings("--model", str(model_dir), "--device", "cuda", "--triton-interpreter"))


# -- SGLang's own options: first-class flags, variables and preset keys; the pass-through ----------------------------

SGLANG_OPTIONS = [
    (["--context-length", "8192"], ("CONTEXT_LENGTH", "8192"), "context_length", 8192),
    (["--tp-size", "2"], ("TP_SIZE", "2"), "tp_size", 2),
    (["--chunked-prefill-size", "512"], ("CHUNKED_PREFILL_SIZE", "512"), "chunked_prefill_size", 512),
    (["--served-model-name", "coder"], ("SERVED_MODEL_NAME", "coder"), "served_model_name", "coder"),
]


@pytest.mark.parametrize("flags, env, field, expected", SGLANG_OPTIONS, ids=[o[0][0] for o in SGLANG_OPTIONS])
def test_sglang_options_are_flags_variables_and_preset_keys(
    model_dir, tmp_path, monkeypatch, flags, env, field, expected
):
    by_flag = resolve_cpu(model_dir, *flags)
    (tmp_path / "p.yaml").write_text(f"{env[0].lower()}: {env[1]}\n")
    by_preset = resolve_cpu(model_dir, "--config", str(tmp_path / "p.yaml"))
    monkeypatch.setenv(f"TQ_{env[0]}", env[1])
    by_variable = resolve_cpu(model_dir)
    assert getattr(by_flag, field) == getattr(by_preset, field) == getattr(by_variable, field) == expected


@pytest.mark.parametrize(
    "flags",
    [["--context-length", "8"], ["--tp-size", "0"], ["--chunked-prefill-size", "0"], ["--chunked-prefill-size", "-2"]],
)
def test_sglang_options_are_validated(flags):
    with pytest.raises(ValidationError):
        settings(*flags)


def test_served_model_name_defaults_to_the_model(model_dir):
    assert resolve_cpu(model_dir).served_model_name == str(model_dir)
    assert resolve_cpu(model_dir, "--served-model-name", "x").summary()["served_model_name"] == "x"


def test_pass_through_arguments_repeat_or_follow_a_double_dash(model_dir, tmp_path, monkeypatch):
    s = settings("--sglang-arg=--schedule-policy=lpm", "--sglang-arg=--random-seed=3", "--", "--stream-interval", "2")
    assert s.sglang_arg == ["--schedule-policy=lpm", "--random-seed=3", "--stream-interval", "2"]
    assert resolve_cpu(model_dir, "--", "--random-seed", "3").sglang_args == ("--random-seed", "3")
    (tmp_path / "p.yaml").write_text("sglang_arg: ['--random-seed=4']\n")
    assert settings("--config", str(tmp_path / "p.yaml")).sglang_arg == ["--random-seed=4"]
    monkeypatch.setenv("TQ_SGLANG_ARG", '["--random-seed=5"]')
    assert settings().sglang_arg == ["--random-seed=5"]


def test_context_beyond_the_models_config_is_an_override(model_dir):
    (model_dir / "config.json").write_text(json.dumps({**TINY, "max_position_embeddings": 1024}))
    assert not resolve_cpu(model_dir, "--context-length", "1024").context_override
    assert resolve_cpu(model_dir, "--context-length", "8192").context_override


def test_boundary_layers_keep_the_first_and_last_layers_raw(model_dir):
    cfg = resolve_cpu(model_dir, "--kv-bits", "3", "--kv-boundary-layers", "1")
    assert cfg.kv_layout.layer_bits == ((16, 16), (3, 3), (3, 3), (16, 16))
    assert cfg.kv_cache.schedule.name == "boundary1-3"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--kv-boundary-layers", "2"], "leaving none at --kv-bits"),
        (["--kv-boundary-layers", "1", "--kv-schedule", "x.yaml"], "drop one of them"),
    ],
)
def test_boundary_layers_that_do_not_fit_are_refused(model_dir, flags, message):
    with pytest.raises(ValueError, match=message):
        resolve_cpu(model_dir, *flags)
