"""Evaluation on a real model: NIAH and perplexity (:mod:`.evaluate`), RULER,
LongBench, budget sweeps, plots, and CompressKV's calibration."""
