"""Compose policies in Python: the same IR the .kvp files produce.

Run: .venv/bin/python examples/compose.py
"""

import kvpolicy as kp
from kvpolicy.compile.compiler import plan
from kvpolicy.lang.budgets import DEFAULT_MODEL

# A shipped method with the paper's defaults, at another budget.
snap = kp.snapkv(budget=128)

# EMS at 2%, with PyramidKV's layer schedule, and the first two layers uncompressed.
ems = kp.ems(budget="2%").with_layers(kp.pyramid(beta=20)).with_override(range(2), "100%").with_name("ems_pyramid")

# A new policy from parts: Knorm-flavoured SnapKV, pooled across heads like AdaKV.
mine = kp.policy(
    "snap_knorm",
    budget="5%",
    description="SnapKV scores minus a little key norm, budgets pooled across heads",
    keep=dict(sink=4, recent=32),
    scores=dict(
        s=kp.local(32, pool=kp.avg_pool(5)),
        score=kp.zscore("s") - 0.1 * kp.zscore(kp.key_norm()),
    ),
    select=kp.pooled_heads("score", safeguard=0.2),
)

for p in (snap, ems, mine):
    print(p.to_kvp())
    pl = plan(p, DEFAULT_MODEL, prompt_len=4096)
    print(f"# on {DEFAULT_MODEL.name} with a 4096-token prompt: layer budgets {list(pl.layer_budgets)}")
    print(f"# kept {pl.kept_slots} of {pl.total_slots} token slots ({100 * pl.kept_slots / pl.total_slots:.1f}%)\n")
