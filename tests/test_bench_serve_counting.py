"""``bench/serve.py`` counts a streamed request's tokens from each chunk's
running usage, not from the chunks that carry text."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def load_bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "serve.py"
    spec = importlib.util.spec_from_file_location("bench_serve", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


class FakeServer:
    """Chunks as SGLang streams them with ``continuous_usage_stats``: one
    without text (a token held back mid-character), one with two tokens, and
    the final usage chunk without choices."""

    def __init__(self):
        self.options = None

    def completion_chunks(self, ids, max_tokens, timeout, ignore_eos, stream_options):
        self.options = stream_options
        for text, count in [("a", 1), ("", 2), ("bc", 4), ("d", 5)]:
            yield {"choices": [{"text": text}], "usage": {"completion_tokens": count}}
        yield {"choices": [], "usage": {"completion_tokens": 5}}


def test_stream_counts_tokens_from_usage():
    server = FakeServer()
    result = load_bench().stream(server, [1, 2, 3], 5)
    assert len(result["tokens"]) == 5  # chunks with text: 3
    assert result["tokens"] == sorted(result["tokens"]) and result["tokens"][0] >= result["sent"]
    assert server.options == {"include_usage": True, "continuous_usage_stats": True}
