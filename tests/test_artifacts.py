"""Calibration artifacts are checked before any policy uses them."""

from __future__ import annotations

import pytest

from kvpolicy.lang.artifacts import ArtifactError, check_artifact, load_artifact, model_artifact_name
from tests.conftest import heads_artifact, layers_artifact


def test_model_artifact_names():
    assert model_artifact_name("SmolLM2-135M-Instruct", "retrieval_heads") == "smollm2-135m-instruct.heads.json"
    assert model_artifact_name("/models/Qwen2.5-7B/", "layer_budgets") == "qwen2.5-7b.layers.json"


def test_valid_artifacts_pass():
    check_artifact(heads_artifact(), "retrieval_heads")
    check_artifact(layers_artifact([0.25] * 4), "layer_budgets")


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(kind="layer_budgets"), "its kind is 'layer_budgets'"),
    (lambda d: d.update(version=2), "version 2 is not 1"),
    (lambda d: d.pop("model"), "'model' must name"),
    (lambda d: d.update(num_layers=0), "'num_layers' must be a positive integer"),
    (lambda d: d["scores"][0].pop(), "'scores' must be 2 lists of 4 finite numbers"),
    (lambda d: d["scores"][1].__setitem__(0, float("nan")), "'scores' must be 2 lists of 4 finite numbers"),
    (lambda d: d["ranked"][0].__setitem__(0, 9), "'ranked'[0] is not a permutation"),
])
def test_malformed_heads(mutate, message):
    data = heads_artifact()
    mutate(data)
    with pytest.raises(ArtifactError, match=message.replace("[", r"\[").replace("(", r"\(")):
        check_artifact(data, "retrieval_heads", "h.json")


def test_malformed_layers():
    with pytest.raises(ArtifactError, match="must sum to 1"):
        check_artifact(layers_artifact([0.5, 0.2]), "layer_budgets")
    with pytest.raises(ArtifactError, match="non-negative"):
        check_artifact(layers_artifact([1.5, -0.5]), "layer_budgets")


def test_load_resolves_relative_to_the_policy_and_env(tmp_path, write_json, monkeypatch):
    write_json("a.heads.json", heads_artifact())
    assert load_artifact("a.heads.json", "retrieval_heads", base_dir=tmp_path)["num_heads"] == 4
    with pytest.raises(ArtifactError, match="not found"):
        load_artifact("a.heads.json", "retrieval_heads")
    monkeypatch.setenv("KVPOLICY_ARTIFACTS", str(tmp_path))
    assert load_artifact("a.heads.json", "retrieval_heads")["model"] == "tiny"
    write_json("broken.json", "{not json")
    with pytest.raises(ArtifactError, match="not readable JSON"):
        load_artifact("broken.json", "retrieval_heads", base_dir=tmp_path)
