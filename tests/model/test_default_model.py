"""The embedded default model: converted from the packaged GGUF, loaded by
transformers, and its shipped calibration artifacts fit it."""

from __future__ import annotations

import pytest
import torch

import kvpolicy as kp
from kvpolicy.cli import main
from kvpolicy.exec.pipeline import compile_pipeline
from kvpolicy.lang.budgets import DEFAULT_MODEL


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    pytest.importorskip("transformers", reason="the model path needs transformers (installed by `make test`)")
    import os

    from kvpolicy.hf.models import prepare_default_model

    old = os.environ.get("KVPOLICY_CACHE")
    os.environ["KVPOLICY_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        yield prepare_default_model()
    finally:
        if old is None:
            os.environ.pop("KVPOLICY_CACHE")
        else:
            os.environ["KVPOLICY_CACHE"] = old


@pytest.mark.slow
def test_prepared_model_loads_and_answers(prepared):
    from kvpolicy.hf.models import load_model

    assert (prepared / "model.safetensors").is_file() and (prepared / "tokenizer.json").is_file()
    lm, tok, shape = load_model(str(prepared))
    assert shape == DEFAULT_MODEL
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = lm.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_model_prepare_is_idempotent(prepared, capsys):
    assert main(["model", "prepare"]) == 0
    assert capsys.readouterr().out.strip() == str(prepared)


def test_shipped_compresskv_compiles_for_the_default_model():
    pipe = compile_pipeline(kp.load("compresskv"), DEFAULT_MODEL, 4096)
    assert sum(pipe.plan.layer_budgets) == 30 * 256
    heads = next(iter(pipe.retrieval.values()))
    assert len(heads) == 30 and all(len(h) == 4 and len(set(h)) == 4 for h in heads)
    torch.manual_seed(0)
    q, k, v = torch.randn(9, 4096, 64), torch.randn(3, 4096, 64), torch.randn(3, 4096, 64)
    out = pipe.compress(5, pipe.capture(q, k, v))
    assert out.counts.tolist() == [pipe.plan.layer_budgets[5]] * 3
