"""The KV-cache spec from the command line to SGLang's processes.

`python -m tq_serve --dry-run` prints, beside the resolved summary, the environment entries the server hands to
SGLang (server.sglang_environment: the function `launch` applies before SGLang starts its processes). Each test reads
that output back the way an SGLang process does: with the plug-in's own loader (TurboQuantConfig.from_env, what
register() calls), and in the `sglang` test through SGLang's own plug-in loading in a fresh process. The expected spec
is built from the options and the schedule file directly, not through the settings.
"""

import json
import os
import subprocess
import sys

import pytest
import yaml

from tq_serve.cpu_support import cpu_environment
from tq_serve.schedule import SCHEDULES_DIR, BitSchedule
from tq_serve.sglang_plugin.config import ENV_VAR, TurboQuantConfig

SCHEDULE = "tq-tiny-3.0"

# name -> (flags, the TurboQuantConfig the plug-in must see)
CASES = {
    "schedule-hadamard-norm-correction": (
        ["--kv-schedule", SCHEDULE, "--kv-rotation", "hadamard", "--kv-norm-correction", "--seed", "5"],
        TurboQuantConfig(
            schedule=BitSchedule.load(SCHEDULES_DIR / f"{SCHEDULE}.yaml"),
            rotation="hadamard",
            norm_correction=True,
            seed=5,
        ),
    ),
    "prod": (
        ["--kv-bits", "3", "--kv-variant", "prod", "--kv-norm-dtype", "float32", "--batch-invariant-cpu"],
        TurboQuantConfig(kv_bits=3, variant="prod", norm_dtype="float32", batch_invariant_cpu=True),
    ),
    "defaults": ([], TurboQuantConfig(kv_bits=4, variant="mse", rotation="qr")),
}


def dry_run(*flags: str) -> dict:
    """`python -m tq_serve --dry-run FLAGS` as a user runs it; its `key: json` lines as a dict."""
    done = subprocess.run(
        [sys.executable, "-m", "tq_serve", "--device", "cpu", "--dry-run", *flags],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return {key: json.loads(value) for key, value in (line.split(": ", 1) for line in done.stdout.splitlines())}


@pytest.fixture(scope="module")
def printed() -> dict[str, dict]:
    """One dry run per case, shared by the tests below (each starts a Python with torch: seconds)."""
    return {name: dry_run(*flags) for name, (flags, _) in CASES.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_the_plugin_deserialises_the_spec_the_options_asked_for(printed, name):
    environment = printed[name]["sglang_environment"]
    assert list(environment) == [ENV_VAR]  # one serialised object, nothing else
    seen = TurboQuantConfig.from_env(environment)
    assert seen == CASES[name][1]


def test_the_schedule_arrives_as_the_file_wrote_it(printed):
    seen = TurboQuantConfig.from_env(printed["schedule-hadamard-norm-correction"]["sglang_environment"])
    written = yaml.safe_load((SCHEDULES_DIR / f"{SCHEDULE}.yaml").read_text())
    assert [list(pair) for pair in seen.layer_bits] == written["layer_bits"]
    assert (seen.schedule.name, seen.variant, seen.kv_bits) == (written["name"], written["variant"], None)
    assert (seen.rotation, seen.norm_correction, seen.seed) == ("hadamard", True, 5)


def test_the_summary_and_the_handed_over_spec_agree(printed):
    for name in CASES:
        summary, seen = printed[name], TurboQuantConfig.from_env(printed[name]["sglang_environment"])
        layout = seen.kv_layout(num_layers=len(summary["layer_bits"]), num_kv_heads=2, head_dim=128)  # tq-tiny
        assert [list(pair) for pair in layout.layer_bits] == summary["layer_bits"]
        assert layout.bytes_per_token == summary["bytes_per_token"]
        assert (seen.variant, seen.rotation, seen.norm_dtype) == (
            summary["variant"],
            summary["rotation"],
            summary["norm_dtype"],
        )


@pytest.mark.parametrize("baseline", [["--kv-cache", "bf16"], ["--kv-bits", "16"]])
def test_the_bf16_baseline_hands_over_no_turboquant_config(baseline):
    out = dry_run(*baseline)
    assert out["sglang_environment"] == {ENV_VAR: None}  # removed from SGLang's environment, even if inherited
    assert (out["kv_cache"], out["attention_backend"]) == ("bf16", "torch_native")


# SGLang's scheduler processes run its plug-in loader, which calls our register(); this is that, in a fresh process
# whose environment is the caller's plus exactly what the dry run printed.
SGLANG_VIEW = """
from tq_serve.cpu_support import apply_cpu_support
apply_cpu_support()
from sglang.srt.plugins import load_plugins
from tq_serve.sglang_plugin import registered_config
load_plugins()
print("REGISTERED", registered_config().to_json())
"""


@pytest.mark.sglang
@pytest.mark.slow
@pytest.mark.parametrize("name", ["schedule-hadamard-norm-correction", "prod"])
def test_an_sglang_process_registers_the_plugin_with_the_spec(printed, name):
    environ = os.environ | cpu_environment(os.environ) | printed[name]["sglang_environment"]
    done = subprocess.run([sys.executable, "-c", SGLANG_VIEW], env=environ, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("REGISTERED "))
    assert TurboQuantConfig.from_json(line.removeprefix("REGISTERED ")) == CASES[name][1]
