"""Model registry: aliases -> local directories (repo path, --model-path, Hugging Face cache), clear errors."""

import json
from pathlib import Path

import huggingface_hub.constants
import pytest

from tq_serve.registry import ModelNotFoundError, ModelRegistry, ModelShape

LLAMA_8B = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096}


def make_model_dir(path: Path, config: dict = LLAMA_8B) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes(b"")
    return path


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    (tmp_path / "models.yaml").write_text(
        "default: local\n"
        "models:\n"
        "  local: {path: models/local, obtain: run make-local}\n"
        "  hub: {hf_id: org/hub-model, obtain: run hf download org/hub-model}\n"
    )
    return ModelRegistry.load(tmp_path / "models.yaml", root=tmp_path)


def test_shipped_registry_has_the_documented_aliases():
    registry = ModelRegistry.load()
    assert registry.default == "tq-tiny"
    assert registry.entries["tq-tiny"].path.parts[-2:] == ("models", "tq-tiny")
    assert registry.entries["llama-3.1-8b"].hf_id == "meta-llama/Llama-3.1-8B-Instruct"
    assert all(entry.obtain for entry in registry.entries.values())


def test_alias_resolves_to_its_repo_path(registry, tmp_path):
    make_model_dir(tmp_path / "models" / "local")
    model = registry.resolve("local")
    assert model.path == (tmp_path / "models" / "local").resolve()
    assert model.shape == ModelShape(num_layers=32, num_kv_heads=8, head_dim=128)


def test_model_path_overrides_the_alias_location(registry, tmp_path):
    elsewhere = make_model_dir(tmp_path / "elsewhere")
    assert registry.resolve("hub", model_path=elsewhere).path == elsewhere.resolve()


def test_a_model_directory_works_without_an_alias(registry, tmp_path):
    path = make_model_dir(tmp_path / "some-model", {"num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 64})
    model = registry.resolve(str(path))
    assert model.shape == ModelShape(num_layers=2, num_kv_heads=4, head_dim=64)


def test_hf_id_is_found_in_the_hugging_face_cache(registry, tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    repo = cache / "models--org--hub-model"
    make_model_dir(repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert registry.resolve("hub").path == (repo / "snapshots" / "abc123").resolve()


def test_unknown_model_names_the_known_aliases(registry):
    with pytest.raises(ModelNotFoundError, match=r"unknown model 'nope': known models are local, hub"):
        registry.resolve("nope")


@pytest.mark.parametrize("alias, how", [("local", "run make-local"), ("hub", "run hf download org/hub-model")])
def test_missing_weights_say_how_to_obtain_them(registry, tmp_path, monkeypatch, alias, how):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelNotFoundError, match=f"no config.json and weights found.*to obtain them, {how}"):
        registry.resolve(alias)


def test_config_without_weights_is_not_a_model(registry, tmp_path):
    path = tmp_path / "models" / "local"
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(LLAMA_8B))
    with pytest.raises(ModelNotFoundError, match="no config.json and weights"):
        registry.resolve("local")


def test_shape_falls_back_to_the_yaml_without_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    registry = ModelRegistry.load()
    assert registry.shape("llama-3.1-8b") == ModelShape(num_layers=32, num_kv_heads=8, head_dim=128)
    with pytest.raises(ModelNotFoundError):
        registry.shape("tq-tiny", model_path=tmp_path / "nothing")


def test_every_shipped_hub_alias_records_its_shape_architecture_and_stand_in():
    for alias, entry in ModelRegistry.load().entries.items():
        if entry.hf_id is not None:
            assert entry.shape is not None and entry.architecture and entry.tiny and entry.obtain, alias


@pytest.mark.parametrize(
    "entry, message",
    [
        ("{hf_id: a/b, colour: red}", r"unknown keys \['colour'\]"),
        ("{description: nothing}", "give a repo-relative `path` or a Hugging Face `hf_id`"),
        ("{hf_id: a/b, shape: {num_layers: 2, head_dim: 64}}", "shape must give exactly"),
        ("{hf_id: a/b, shape: {num_layers: 2, num_kv_heads: 0, head_dim: 64}}", "shape values must be positive"),
        ("{hf_id: a/b, tiny: nope}", "unknown tiny architecture 'nope'"),
    ],
)
def test_malformed_registry_entries_are_named(tmp_path, entry, message):
    (tmp_path / "models.yaml").write_text(f"models:\n  bad: {entry}\n")
    with pytest.raises(ValueError, match=f"model 'bad': {message}"):
        ModelRegistry.load(tmp_path / "models.yaml", root=tmp_path)


def test_context_length_is_read_as_sglang_reads_it(registry, tmp_path):
    path = make_model_dir(tmp_path / "m", {**LLAMA_8B, "max_position_embeddings": 4096})
    assert registry.resolve(str(path)).context_length == 4096
    path = make_model_dir(tmp_path / "y", {**LLAMA_8B, "max_position_embeddings": 4096, "rope_scaling": {"factor": 4}})
    assert registry.resolve(str(path)).context_length == 16384


def test_a_multimodal_config_reads_its_text_config(registry, tmp_path):
    path = make_model_dir(tmp_path / "mm", {"text_config": {**LLAMA_8B, "head_dim": 256}})
    assert registry.resolve(str(path)).shape == ModelShape(num_layers=32, num_kv_heads=8, head_dim=256)
