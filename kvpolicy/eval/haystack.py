"""Offline haystacks and needles (ARCHITECTURE.md § Default model and data).

The haystack is the Python reference prose of the standard library's
``pydoc_data.topics`` (~465 KB), so probes need no download. A probe is a
prompt of a given token length with a needle sentence at a given depth,
ending in a question; the needle's token span is known exactly because the
prompt is assembled from token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from kvpolicy.lang.errors import InputError


@dataclass(frozen=True)
class Needle:
    text: str  # the sentence inserted into the haystack
    question: str
    answer: str  # what a correct answer contains


NEEDLES = (
    Needle(" The secret code for the blue vault is 4829175. ", "What is the secret code for the blue vault?", "4829175"),
    Needle(" The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day. ",
           "What is the best thing to do in San Francisco?", "eat a sandwich and sit in Dolores Park on a sunny day"),
    Needle(" Mira's favourite fruit is the mango from the old market in Lisbon. ",
           "What is Mira's favourite fruit?", "the mango from the old market in Lisbon"),
)


@lru_cache(maxsize=1)
def haystack_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


@dataclass
class Probe:
    input_ids: list[int]
    needle_span: tuple[int, int]  # [start, end) token positions of the needle
    needle: Needle
    length: int
    depth: float


def build_probe(tokenizer, needle: Needle, length: int, depth: float, *, offset: int = 0,
                template: str = "\n\nBased on the content of the book, Question: {question}\nAnswer:") -> Probe:
    """A prompt of about ``length`` tokens: haystack (starting ``offset`` tokens
    in), the needle at ``depth`` (0 = start, 1 = end) of the haystack part, and
    the question (CompressKV's probe format, arXiv 2508.02401 §3.1)."""
    hay = _haystack_ids(tokenizer)
    needle_ids = tokenizer.encode(needle.text, add_special_tokens=False)
    tail_ids = tokenizer.encode(template.format(question=needle.question), add_special_tokens=False)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    room = length - len(bos) - len(needle_ids) - len(tail_ids)
    if room < 1:
        raise InputError(f"a {length}-token probe has no room for the haystack")
    start = offset % max(len(hay) - room, 1)
    body = hay[start:start + room]
    cut = int(round(depth * len(body)))
    ids = bos + body[:cut] + needle_ids + body[cut:] + tail_ids
    span = (len(bos) + cut, len(bos) + cut + len(needle_ids))
    return Probe(ids, span, needle, len(ids), depth)


_HAY: dict[int, list[int]] = {}


def _haystack_ids(tokenizer) -> list[int]:
    key = id(tokenizer)
    if key not in _HAY:
        _HAY[key] = tokenizer.encode(haystack_text(), add_special_tokens=False)
    return _HAY[key]


def rouge1_recall(answer: str, reference: str) -> float:
    """Share of the reference's words (lower-cased, punctuation stripped) found in the answer."""
    norm = lambda s: ["".join(c for c in w if c.isalnum()) for w in s.lower().split()]  # noqa: E731
    ref = [w for w in norm(reference) if w]
    got = set(w for w in norm(answer) if w)
    return sum(w in got for w in ref) / len(ref) if ref else 0.0
