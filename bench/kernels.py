"""Triton kernels against their pure-torch references, side by side in one run,
and against the causal prefill attention they follow (SDPA over the same N).

    python bench/kernels.py                      # CUDA: N = 4096 .. 32768, H=32, H_kv=8, d=128, bf16
    python bench/kernels.py --device cpu         # interpreted, tiny sizes: a crash test, not a speed figure

Prints, per case and N: kernel and reference time (median of ``--repeats``),
the speed-up, the kernel's time as a fraction of the prefill attention's, the
achieved bandwidth (bytes the case must move / kernel time) and its share of
the device's peak (a table below; n/a for devices not in it), and the largest
difference from the reference. Writes the same to
``bench/results/kernels_<device-name>.json``.

Cases (the interface bench/kernels_select.py, or any ``--extra FILE``, provides)
------------------------------------------------------------------------------
A case is a plain dict (no class to import, so the extra file needs nothing
from here)::

    name       str                    row label; several rows may share it (one per N)
    kernel     callable(*args)        the Triton kernel's Python entry point
    reference  callable(*args) | None its pure-torch reference, same arguments
    bytes      int                    bytes the kernel must move at least (inputs read
                                      once + outputs written once): bandwidth = bytes / time
    make_args  () -> tuple            builds the arguments on the device (called once)
    n          int, optional          the prompt length the row is for (printed)
    prefill    (H, H_kv, N, d), optional   the prefill this kernel follows: the
                                      row reports kernel time / causal SDPA time

An extra file defines ``cases(device: str, scale: str) -> list[dict]``;
``device`` is ``"cuda"`` or ``"cpu"``, ``scale`` is ``"full"`` (GPU sizes) or
``"tiny"`` (the interpreter's smoke sizes). Results of a case whose output is a
tuple are compared element by element (``None`` elements skipped).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import time
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUIRED = ("name", "kernel", "reference", "bytes", "make_args")

# HBM peak bandwidth, bytes/s (NVIDIA datasheets); first match in the device name wins
PEAK_BANDWIDTH = [
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100 NVL", 3.9e12),
    ("H100", 3.35e12),  # SXM5, HBM3
]

TINY = {"n": [48, 100], "heads": 4, "kv_heads": 2, "head_dim": 32, "window": 8}
FULL = {"n": [4096, 8192, 16384, 32768], "heads": 32, "kv_heads": 8, "head_dim": 128, "window": 32}


def peak_bandwidth(device_name: str) -> float | None:
    for key, peak in PEAK_BANDWIDTH:
        if key.lower() in device_name.lower():
            return peak
    return None


def attention_cases(device: str, dtype, shape: dict) -> list[dict]:
    """The cases of kvpolicy.kernels.attention, one per kernel and prompt length."""
    import torch

    from kvpolicy.exec.reference import attention as R
    from kvpolicy.kernels import attention as K
    from kvpolicy.lang import ir

    H, H_kv, d, w = shape["heads"], shape["kv_heads"], shape["head_dim"], shape["window"]
    n_rep = H // H_kv
    es = torch.empty((), dtype=dtype).element_size()
    pool = ir.Pool("avg", 7)
    cases = []
    for N in shape["n"]:
        def make(N=N, values=False, window=False):
            g = torch.Generator().manual_seed(N)
            q = torch.randn(H, w if window else N, d, generator=g).to(dtype).to(device)
            k = torch.randn(H_kv, N, d, generator=g).to(dtype).to(device)
            if values:
                return q, k, torch.randn(H_kv, N, d, generator=g).to(dtype).to(device), n_rep
            return q, k, n_rep

        q_win, q_all, kv = H * w * d * es, H * N * d * es, H_kv * N * d * es
        common = {"n": N, "prefill": (H, H_kv, N, d)}
        cases += [
            dict(name="window_attention", kernel=K.window_attention, reference=R.window_attention,
                 bytes=q_win + kv + H * w * N * 4, make_args=partial(make, window=True), **common),
            dict(name="window_scores", kernel=partial(K.window_scores, pool=pool),
                 reference=partial(K.window_scores_reference, pool=pool),
                 bytes=q_win + kv + H_kv * N * 4, make_args=partial(make, window=True), **common),
            dict(name="accumulated_attention", kernel=K.accumulated_attention, reference=R.accumulated_attention,
                 bytes=q_all + kv + H * N * 4, make_args=make, **common),
            dict(name="attention_with_column_sums", kernel=K.attention_with_column_sums,
                 reference=R.attention_with_column_sums,
                 bytes=q_all + 2 * kv + H * N * d * 4 + H * N * 4, make_args=partial(make, values=True), **common),
        ]
    return cases


def load_extra(path: Path, device: str, scale: str) -> list[dict]:
    spec = importlib.util.spec_from_file_location(f"bench_extra_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cases = list(module.cases(device, scale))
    for c in cases:
        missing = [k for k in REQUIRED if k not in c]
        if missing:
            raise ValueError(f"{path}: case {c.get('name', '?')!r} lacks {', '.join(missing)}")
    return cases


def timer(device: str, repeats: int):
    import torch

    def run(fn, args) -> tuple[float, object]:
        out = fn(*args)  # warm-up (compiles on the first call)
        times = []
        for _ in range(repeats):
            if device == "cuda":
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(*args)
                stop.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(stop) / 1e3)
            else:
                t0 = time.perf_counter()
                fn(*args)
                times.append(time.perf_counter() - t0)
        return statistics.median(times), out

    return run


def max_abs_diff(a, b) -> float | None:
    import torch

    if isinstance(a, tuple):
        diffs = [max_abs_diff(x, y) for x, y in zip(a, b, strict=True) if x is not None]
        return max(diffs) if diffs else None
    if not isinstance(a, torch.Tensor):
        return None
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def main(argv: list[str] | None = None) -> dict:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--scale", choices=["full", "tiny"], help="sizes (default: full on cuda, tiny on cpu)")
    ap.add_argument("--n", type=int, nargs="+", help="prompt lengths (default: by scale)")
    ap.add_argument("--heads", type=int)
    ap.add_argument("--kv-heads", type=int)
    ap.add_argument("--head-dim", type=int)
    ap.add_argument("--window", type=int)
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                    help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-reference", action="store_true", help="time the kernels only")
    ap.add_argument("--extra", default=str(HERE / "kernels_select.py"),
                    help="a file with cases(device, scale) to add (default bench/kernels_select.py if present; "
                         "'none' for none)")
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    a = ap.parse_args(argv)

    device = a.device
    if device == "cpu":  # before triton is first imported (see kvpolicy.kernels)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from kvpolicy import kernels

    mode = kernels.require(device)
    scale = a.scale or ("full" if device == "cuda" else "tiny")
    shape = dict(FULL if scale == "full" else TINY)
    for key in ("n", "heads", "kv_heads", "head_dim", "window"):
        if getattr(a, key) is not None:
            shape[key] = getattr(a, key)
    dtype = getattr(torch, a.dtype or ("bfloat16" if device == "cuda" else "float32"))

    cases = attention_cases(device, dtype, shape)
    extra = Path(a.extra) if a.extra != "none" else None
    if extra is not None and extra.exists():
        cases += load_extra(extra, device, scale)
    elif extra is not None and a.extra != str(HERE / "kernels_select.py"):
        raise SystemExit(f"--extra {extra}: no such file")

    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = peak_bandwidth(name) if mode == "compiled" else None
    note = ("compiled" if mode == "compiled" else "interpreted, not a speed figure (Triton's interpreter; "
            "run on a GPU for timings)")
    run = timer(device, a.repeats)

    prefill_times: dict[tuple, float] = {}

    def prefill(shape4) -> float:
        if shape4 not in prefill_times:
            H, H_kv, N, d = shape4
            g = torch.Generator().manual_seed(0)
            q = torch.randn(1, H, N, d, generator=g).to(dtype).to(device)
            k, v = (torch.randn(1, H_kv, N, d, generator=g).to(dtype).to(device) for _ in range(2))
            sdpa = partial(torch.nn.functional.scaled_dot_product_attention, is_causal=True, enable_gqa=True)
            prefill_times[shape4] = run(sdpa, (q, k, v))[0]
        return prefill_times[shape4]

    print(f"# {name}: {note}")
    print(f"# shape {shape}, {dtype}; peak bandwidth "
          f"{f'{peak / 1e12:.2f} TB/s' if peak else 'n/a'}")
    header = f"{'case':<28}{'N':>7}{'kernel ms':>11}{'ref ms':>10}{'speed-up':>9}{'/prefill':>9}" \
             f"{'GB/s':>9}{'of peak':>8}{'max diff':>10}"
    print(header)
    rows = []
    for case in cases:
        args = case["make_args"]()
        t_kernel, out = run(case["kernel"], args)
        t_ref = diff = None
        if case["reference"] is not None and not a.no_reference:
            try:
                t_ref, expected = run(case["reference"], args)
                diff = max_abs_diff(out, expected)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
        t_pre = prefill(tuple(case["prefill"])) if case.get("prefill") else None
        bps = case["bytes"] / t_kernel
        row = {"name": case["name"], "n": case.get("n"), "kernel_s": t_kernel, "reference_s": t_ref,
               "speedup": t_ref / t_kernel if t_ref else None, "prefill_s": t_pre,
               "vs_prefill": t_kernel / t_pre if t_pre else None, "bytes": case["bytes"], "bytes_per_s": bps,
               "of_peak": bps / peak if peak else None, "max_abs_diff": diff}
        rows.append(row)

        def fmt(x, f):
            return "n/a" if x is None else format(x, f)

        print(f"{row['name']:<28}{fmt(row['n'], 'd'):>7}{t_kernel * 1e3:>11.3f}"
              f"{fmt(t_ref and t_ref * 1e3, '.3f'):>10}{fmt(row['speedup'], '.2f'):>9}"
              f"{fmt(row['vs_prefill'], '.2f'):>9}{bps / 1e9:>9.1f}{fmt(row['of_peak'], '.1%'):>8}"
              f"{fmt(diff, '.1e'):>10}")

    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    path = out_dir / f"kernels_{slug}.json"
    data = {"device": name, "mode": mode, "note": note, "peak_bytes_per_s": peak,
            "dtype": str(dtype).removeprefix("torch."), "scale": scale, "shape": shape, "repeats": a.repeats,
            "torch": torch.__version__, "results": rows}
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"# wrote {path}")
    return dict(data, path=str(path))


if __name__ == "__main__":
    main()
