"""`python -m tq_serve` on bad input: one clear line on stderr and a non-zero exit, before SGLang starts."""

import json
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tq_serve.__main__ import EXIT_BAD_INPUT, EXIT_CANNOT_START, main
from tq_serve.settings import ServeSettings, load_settings
from tq_serve.sglang_plugin import compat

TINY = {"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 256}


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    path = tmp_path / "tiny"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(TINY))
    (path / "model.safetensors").write_bytes(b"")
    return path


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tq_serve: error: "), err
    for fragment in fragments:
        assert fragment in lines[0]


def test_help_lists_the_settings():
    done = subprocess.run([sys.executable, "-m", "tq_serve", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for flag in (
        "--model",
        "--model-path",
        "--preset",
        "--config",
        "--api-key",
        "--port",
        "--kv-bits",
        "--kv-schedule",
    ):
        assert flag in done.stdout
    assert "TQ_<FLAG>" in done.stdout


def test_unknown_model_as_a_user_sees_it():
    done = subprocess.run(
        [sys.executable, "-m", "tq_serve", "--model", "gpt-9"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == EXIT_BAD_INPUT
    assert_one_error_line(done.stderr, "unknown model 'gpt-9'", "tq-tiny", "llama-3.1-8b")


def test_bad_bits(capsys):
    code, _, err = run_main(capsys, "--kv-bits", "5")
    assert code == EXIT_BAD_INPUT
    assert_one_error_line(err, "--kv-bits", "supported values are 2, 2.5, 3, 3.5, 4 (16: plain SGLang")


def test_bits_that_do_not_fit_the_model(capsys, model_dir):
    code, _, err = run_main(capsys, "--model", str(model_dir), "--kv-bits", "3.5", "--kv-variant", "prod")
    assert code == EXIT_BAD_INPUT
    assert_one_error_line(err, "--kv-bits 3.5 does not fit", "variant 'prod'")


def test_schedule_layer_count_mismatch(capsys, model_dir, tmp_path):
    (tmp_path / "s.yaml").write_text("- [4, 4]\n" * 32)
    code, _, err = run_main(capsys, "--model", str(model_dir), "--kv-schedule", str(tmp_path / "s.yaml"))
    assert code == EXIT_BAD_INPUT
    assert_one_error_line(err, "schedule 's' has 32 layers but the model has 4")


def test_port_in_use(capsys, model_dir):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        code, _, err = run_main(capsys, "--model", str(model_dir), "--device", "cpu", "--port", str(port))
    assert code == EXIT_CANNOT_START
    assert_one_error_line(err, f"cannot listen on 127.0.0.1:{port}", "--port")


def test_unsupported_sglang_version(capsys, model_dir, monkeypatch):
    monkeypatch.setattr(compat, "installed_sglang_version", lambda: "0.5.22")
    code, _, err = run_main(capsys, "--model", str(model_dir), "--device", "cpu")
    assert code == EXIT_CANNOT_START
    assert_one_error_line(err, "SGLang 0.5.22 is installed", "supports sglang==0.5.23 only")


def test_dry_run_prints_the_resolved_configuration(capsys, model_dir):
    code, out, _ = run_main(capsys, "--model", str(model_dir), "--kv-bits", "2", "--device", "cpu", "--dry-run")
    assert code == 0
    assert 'kv_cache: "turboquant"' in out and "layer_bits: [[2, 2], [2, 2], [2, 2], [2, 2]]" in out
    assert 'url: "http://127.0.0.1:30000/v1"' in out and 'attention_backend: "turboquant"' in out


@pytest.mark.parametrize("baseline", [["--kv-cache", "bf16"], ["--kv-bits", "16"]])
def test_bf16_baseline_uses_sglangs_own_backend(capsys, model_dir, baseline):
    code, out, _ = run_main(capsys, "--model", str(model_dir), *baseline, "--device", "cpu", "--dry-run")
    assert code == 0
    assert 'kv_cache: "bf16"' in out and 'attention_backend: "torch_native"' in out


README = Path(__file__).resolve().parents[1] / "README.md"


def readme_command_lines() -> list[list[str]]:
    """The arguments of every `python -m tq_serve ...` line in the README's code blocks (comments dropped)."""
    commands = []
    for line in README.read_text().splitlines():
        words = shlex.split(line.split("#")[0]) if line.startswith("    python -m tq_serve") else []
        if words[:3] == ["python", "-m", "tq_serve"] and "--help" not in words:
            commands.append(words[3:])
    return commands


@pytest.mark.parametrize("argv", readme_command_lines(), ids=" ".join)
def test_every_readme_command_line_parses(argv):
    load_settings(argv)


def test_every_flag_in_the_readmes_flag_table_exists():
    tabled = re.findall(r"^\| `--([a-z-]+)` \|", README.read_text(), flags=re.M)
    assert len(tabled) >= 10  # the KV-cache flags
    assert set(tabled) <= {name.replace("_", "-") for name in ServeSettings.model_fields}


@pytest.mark.parametrize(
    "passthrough, fragment",
    [
        (["--sglang-arg=--schedule-polcy=lpm"], "unknown SGLang server argument --schedule-polcy=lpm"),
        (["--", "--max-prefill-tokens", "many"], "argument --max-prefill-tokens"),
        (["--", "--port", "5"], "--port is set by tq_serve"),
        (["--", "--kv-cache-dtype", "fp8_e5m2"], "--kv-cache-dtype is set by tq_serve"),
    ],
)
def test_a_wrong_pass_through_argument_exits_2_naming_it(capsys, model_dir, passthrough, fragment):
    code, _, err = run_main(capsys, "--model", str(model_dir), "--device", "cpu", "--dry-run", *passthrough)
    assert code == EXIT_BAD_INPUT
    assert_one_error_line(err, fragment)


def test_pass_through_arguments_reach_sglangs_server_args(capsys, model_dir):
    code, out, _ = run_main(
        capsys, "--model", str(model_dir), "--device", "cpu", "--dry-run", "--", "--schedule-policy", "lpm"
    )
    assert code == 0 and 'sglang_server_args: {"schedule_policy": "lpm"}' in out
