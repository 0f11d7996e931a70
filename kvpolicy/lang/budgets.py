"""Layer budgets: how many tokens each KV head of each layer keeps.

``B`` is the policy's budget in tokens per KV head (resolved against the prompt
length when it is a percentage); a schedule spreads ``L * B`` over the layers;
per-layer overrides then replace single layers; every budget is finally
clipped to the prompt (a budget at or above the prompt keeps it unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvpolicy.lang import ir
from kvpolicy.lang.artifacts import ArtifactError, load_artifact, model_artifact_name
from kvpolicy.lang.errors import PolicyError


@dataclass(frozen=True)
class ModelShape:
    """What the compiler needs to know about a model's attention."""

    num_layers: int
    num_kv_heads: int
    num_q_heads: int
    name: str | None = None

    def __post_init__(self) -> None:
        if min(self.num_layers, self.num_kv_heads, self.num_q_heads) < 1:
            raise PolicyError("a model needs at least one layer, one KV head and one query head")
        if self.num_q_heads % self.num_kv_heads:
            raise PolicyError(
                f"{self.num_q_heads} query heads do not split evenly over {self.num_kv_heads} KV heads"
            )

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA ``n_rep``); query head ``h`` reads KV head ``h // n_rep``."""
        return self.num_q_heads // self.num_kv_heads


# SmolLM2-135M-Instruct (ARCHITECTURE.md § Default model and data): 30 layers, 9 query heads, 3 KV heads.
DEFAULT_MODEL = ModelShape(num_layers=30, num_kv_heads=3, num_q_heads=9, name="SmolLM2-135M-Instruct")


def layer_budgets(policy: ir.Policy, shape: ModelShape, prompt_len: int, *, base_dir: Path | None = None) -> tuple[int, ...]:
    """Tokens per KV head for each layer, for a prompt of ``prompt_len`` tokens."""
    if prompt_len < 1:
        raise PolicyError("the prompt needs at least one token")
    L, T = shape.num_layers, prompt_len
    B = policy.budget.tokens_for(T)
    w = policy.protect.total
    if B >= T:
        scheduled = [T] * L
    else:
        sch = policy.layers
        if isinstance(sch, ir.Uniform):
            scheduled = [B] * L
        elif isinstance(sch, ir.Pyramid):
            scheduled = pyramid(B, w, L, T, sch.beta)
        elif isinstance(sch, ir.Explicit):
            if len(sch.weights) != L:
                raise PolicyError(
                    f"the explicit layer list has {len(sch.weights)} entries but the model has {L} layers",
                    file=policy.source,
                )
            scheduled = proportional(sch.weights, L * B)
        elif isinstance(sch, ir.Adaptive):
            shares = _layer_shares(policy, sch, shape, base_dir)
            scheduled = adaptive(shares, B)
        else:
            raise TypeError(f"unknown layer schedule {sch!r}")
    for ov in policy.overrides:
        for i in ov.layers:
            if i >= L:
                raise PolicyError(f"layer {i} is overridden but the model has only {L} layers (0-{L - 1})",
                                  file=policy.source)
            scheduled[i] = ov.budget.tokens_for(T)
    floor = min(w, T)  # protected tokens are always kept
    return tuple(max(floor, min(b, T)) for b in scheduled)


def pyramid(B: int, w: int, L: int, T: int, beta: float) -> list[int]:
    """PyramidKV (arXiv 2406.02069, KVCache-Factory's ``PyramidKVCluster``):
    ``c = B - w``; ``min = c // beta``; ``max = 2c - min``; if ``max > T - w``
    then ``max = T - w`` and ``min = 2c - max``; ``step = (max - min) // (L - 1)``;
    ``B_l = max - l * step + w``. The mean is ``B`` up to integer division."""
    c = B - w
    if c <= 0 or L == 1:
        return [B] * L
    lo = int(c // beta)
    hi = 2 * c - lo
    if hi > T - w:
        hi = T - w
        lo = 2 * c - hi
    step = (hi - lo) // (L - 1)
    return [hi - l * step + w for l in range(L)]


def proportional(weights, total: int) -> list[int]:
    """Integers proportional to ``weights`` that sum to ``total`` exactly
    (largest remainder)."""
    s = float(sum(weights))
    raw = [w * total / s for w in weights]
    out = [int(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (out[i] - raw[i], i))
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out


def adaptive(shares, B: int, base: int = 32) -> list[int]:
    """CompressKV's allocation from eviction-error shares (arXiv 2508.02401 §3.3):
    ``B_l = clip(m + round(share_l * (L*B - m*L)), m, 3B)`` with ``m = min(base, B)``,
    then +1 to the highest-share layers below the cap (or -1 to the lowest-share
    layers above the floor) until ``sum B_l = L*B``."""
    L = len(shares)
    m = min(base, B)
    total = L * B
    out = [min(max(m + round(s * (total - m * L)), m), 3 * B) for s in shares]
    by_share = sorted(range(L), key=lambda i: (-shares[i], i))
    while (diff := total - sum(out)) != 0:
        if diff > 0:
            room = [i for i in by_share if out[i] < 3 * B]
        else:
            room = [i for i in reversed(by_share) if out[i] > m]
        # m <= B <= 3B, so a layer with room always exists while the sum is off
        assert room, "adaptive budgets cannot reach the total"
        for i in room[: abs(diff)]:
            out[i] += 1 if diff > 0 else -1
    return out


def policy_artifact(policy: ir.Policy, name: str | None, kind: str, shape: ModelShape,
                    base_dir: Path | None = None) -> dict:
    """Load an artifact a policy refers to (``name=None``: the model's own),
    checked against the model's layer count; errors name the policy file."""
    if name is None:
        if shape.name is None:
            what = "retrieval()" if kind == "retrieval_heads" else "layers adaptive()"
            raise PolicyError(f"{what} without a path uses the model's own calibration artifact, "
                              "so the model must be named", file=policy.source)
        name = model_artifact_name(shape.name, kind)
    if base_dir is None and policy.source:
        base_dir = Path(policy.source).parent
    try:
        data = load_artifact(name, kind, base_dir=base_dir)
    except ArtifactError as exc:
        raise PolicyError(str(exc), file=policy.source) from None
    if data["num_layers"] != shape.num_layers:
        raise PolicyError(f"artifact '{name}' has {data['num_layers']} layers, the model has {shape.num_layers}",
                          file=policy.source)
    return data


def _layer_shares(policy: ir.Policy, sch: ir.Adaptive, shape: ModelShape, base_dir: Path | None) -> list[float]:
    data = policy_artifact(policy, sch.artifact, "layer_budgets", shape, base_dir)
    return [float(s) for s in data["shares"]]


def pooled_head_floor(policy: ir.Policy, layer_budget: int) -> int:
    """AdaKV's guaranteed per-head budget: ``w + floor(alpha * c)`` with
    ``c = B_l - w`` (arXiv 2407.11550, safeguard alpha)."""
    sel = policy.selection
    w = policy.protect.total
    alpha = sel.safeguard if sel is not None and sel.safeguard is not None else 0.0
    return w + int(alpha * max(layer_budget - w, 0))
