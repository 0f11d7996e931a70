"""A policy on a transformers model: loading the embedded model
(:mod:`.models`) and prefill / compress / decode (:mod:`.generate`)."""
