"""From a policy and a model shape to a plan: per-layer budgets, protected
tokens, stage order, and ``explain``'s text (:mod:`.compiler`)."""
