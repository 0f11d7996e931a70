"""The language's data and rules, below everything else: the IR
(:mod:`.ir`, a leaf), errors, the wire form, artifacts, validation, budget
arithmetic and the model shape (:mod:`.budgets`), and the Python composition
API (:mod:`.combinators`, :mod:`.compose`, :mod:`.registry`). Nothing here
imports the text front end except the registry and compose, which parse on
demand (ARCHITECTURE.md § Import rules)."""
