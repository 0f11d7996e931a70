"""kvpolicy's SGLang plugin: every hook target, in one place.

SGLang 0.5.x loads the functions registered under the entry-point group
``sglang.srt.plugins`` early in every process it starts (the launcher, the
scheduler, the tokenizer and detokenizer managers) and then applies the hooks
they registered with ``HookRegistry`` (``sglang/srt/plugins``). kvpolicy's
entry point is :func:`register`:

* in every process, two launch hooks make ``--kv-policy`` a real flag of
  SGLang's own launcher (``python -m sglang.launch_server`` and ``sglang
  serve``): it appears in ``--help``, and the policy is read and checked right
  after argument parsing, before any model loads
  (:mod:`kvpolicy.sglang_ext.launch`);
* in processes started with a policy (the launcher hands it over through the
  environment), the runtime hooks below capture, compress and shift decode
  positions (:mod:`kvpolicy.sglang_ext.runtime`). Without ``--kv-policy``
  they are not installed and SGLang runs untouched.

The targets are narrow methods whose signatures this module was written
against (SGLang 0.5.23); :data:`RUNTIME_TARGETS` lists them.
"""

from __future__ import annotations

import logging
import os

from kvpolicy.sglang_ext import handoff

log = logging.getLogger("kvpolicy")

_SRT = "sglang.srt"
LAUNCH_TARGETS = {
    "add_cli_args": f"{_SRT}.server_args.ServerArgs.add_cli_args",
    "prepare_server_args": f"{_SRT}.server_args.prepare_server_args",
    # each request, in the HTTP process: a bad per-request policy is a 400
    "validate_request": f"{_SRT}.managers.tokenizer_manager.TokenizerManager._validate_one_request",
}
RUNTIME_TARGETS = {
    # a ForwardBatch was built: note prefill rows to capture, shift decode positions
    "forward_batch": f"{_SRT}.model_executor.forward_batch_info.ForwardBatch.init_new",
    # one attention layer: after it ran (its KV is in the pool), capture queries /
    # column sums in a prefill; in a decode, recompute the rows of requests in the row layout
    # and keep the queries of requests with a decode trigger (decode_window)
    "attention": f"{_SRT}.layers.radix_attention.RadixAttention.forward",
    # SGLang's CPU attention for a prefill: rows that need global() get one pass
    # giving the output and the accumulated attention (capture.CaptureBuffer.extend)
    "extend_attention": f"{_SRT}.layers.attention.torch_native_backend.TorchNativeAttnBackend.forward_extend",
    # a prefill batch's results were processed (prompt checkpointed): compress
    "prefill_done": f"{_SRT}.managers.scheduler_components.batch_result_processor."
                    "SchedulerBatchResultProcessor.process_batch_result_prefill",
    # a decode batch's results were processed: the decode trigger's checks (recompress)
    "decode_done": f"{_SRT}.managers.scheduler_components.batch_result_processor."
                   "SchedulerBatchResultProcessor.process_batch_result_decode",
    # each scheduler step, before it picks the next batch: reopen admission after a compression made room
    "next_batch": f"{_SRT}.managers.scheduler.Scheduler.get_next_batch_to_run",
    # the overlap scheduler: process a compressing prefill's result before its first decode step,
    # and a decode result a decode-time check is due on before the request's next step
    "overlap": f"{_SRT}.managers.scheduler.Scheduler.is_disable_overlap_for_batch",
    # how much of a prompt the radix match may cover: keep the window's queries
    "prefix_limit": f"{_SRT}.managers.schedule_batch.Req._compute_max_prefix_len",
    # a request gave its KV back (finished, aborted, retracted): forget its state
    "release": f"{_SRT}.mem_cache.common.release_kv_cache",
    # /server_info: the pool's counters and each compressed request
    "internal_state": f"{_SRT}.managers.scheduler_components.internal_state."
                      "SchedulerInternalStateController.get_internal_state",
}

_runtime = None


def runtime():
    """The scheduler process's :class:`~kvpolicy.sglang_ext.runtime.Runtime`."""
    global _runtime
    if _runtime is None:
        from kvpolicy.lang import wire
        from kvpolicy.sglang_ext.runtime import Runtime

        _runtime = Runtime(wire.loads(os.environ[handoff.ENV_POLICY_IR]))
    return _runtime


# -- launch hooks ------------------------------------------------------------------


def _after_add_cli_args(result, parser, *args, **kwargs):
    from kvpolicy.sglang_ext import launch

    launch.add_flag(parser)
    return result


def _around_prepare_server_args(original, argv, *args, **kwargs):
    from kvpolicy.sglang_ext import launch

    server_args = original(argv, *args, **kwargs)
    launch.prepare(list(argv), server_args)
    return server_args


def _before_validate_request(manager, obj, *args, **kwargs):
    spec = os.environ.get(handoff.ENV_POLICY)
    params = getattr(obj, "sampling_params", None)
    if not spec or not isinstance(params, dict):
        return None
    from kvpolicy.lang.errors import PolicyError
    from kvpolicy.sglang_ext import launch

    custom = params.get("custom_params")
    if isinstance(custom, dict):
        custom.pop(handoff.REQUEST_IR, None)  # only this process writes it
    try:
        policy = launch.request_policy(_server_policy(spec), custom, launch.cuda_graphs_on(manager.server_args))
    except PolicyError as exc:
        raise ValueError(f"kvpolicy: {exc}") from None
    if handoff.names_a_policy(custom):
        handoff.attach(custom, policy)
    return None


def _server_policy(spec: str):
    global _launch_policy
    if _launch_policy is None or _launch_policy[0] != spec:
        from kvpolicy.lang.registry import load

        _launch_policy = (spec, load(spec))
    return _launch_policy[1]


_launch_policy = None


# -- runtime hooks -----------------------------------------------------------------


def _after_forward_batch(result, cls, batch, model_runner, *args, **kwargs):
    rt = runtime()
    rt.attach(model_runner)
    rt.begin_forward(batch, result)
    rt.shift_positions(batch, result)
    return result


def _around_attention(original, layer, q, k=None, v=None, forward_batch=None, *args, **kwargs):
    result = original(layer, q, k, v, forward_batch, *args, **kwargs)
    rt = _runtime
    if rt is not None and (rt.capture.rows is not None or rt.decode_rows is not None or rt.windows.rows is not None):
        fb = forward_batch if forward_batch is not None else kwargs.get("forward_batch")
        if rt.capture.rows is not None:
            rt.on_attention(layer, q, fb)
        if rt.windows.rows is not None:
            rt.windows.on_attention(layer, q)
        if rt.decode_rows is not None:
            result = rt.attend(layer, q, result, fb)
    return result


def _around_extend_attention(original, backend, q, k, v, layer, forward_batch, save_kv_cache=True, *args,
                             **kwargs):
    rt = _runtime
    if rt is None or args or kwargs or not rt.capture.takes(backend, layer, forward_batch):
        return original(backend, q, k, v, layer, forward_batch, save_kv_cache, *args, **kwargs)
    return rt.capture.extend(backend, q, k, v, layer, forward_batch, save_kv_cache)


def _after_prefill_done(result, processor, batch, *args, **kwargs):
    runtime().compress_batch(processor, batch)
    return result


def _after_decode_done(result, processor, batch, *args, **kwargs):
    rt = _runtime
    if rt is not None:
        rt.recompress_batch(processor, batch)
    return result


def _before_next_batch(scheduler, *args, **kwargs):
    rt = _runtime
    if rt is not None:
        rt.before_step(scheduler)


def _after_overlap(result, scheduler, batch, *args, **kwargs):
    rt = _runtime
    return result if rt is None else rt.sync_before(batch) or result


def _after_prefix_limit(result, req, input_len, *args, **kwargs):
    rt = _runtime
    return result if rt is None else rt.prefix_limit(req, input_len, result)


def _around_release(original, req, tree_cache, *args, **kwargs):
    out = original(req, tree_cache, *args, **kwargs)
    record = _runtime.release(req, tree_cache) if _runtime is not None else None
    if record is not None and not req.finished():
        # retracted: prefilled again later, from scratch, and then
        # compressed again; its KV is exact until then
        req.skip_radix_cache_insert = record.skip_radix_cache_insert
    return out


def _after_internal_state(result, controller, *args, **kwargs):
    scheduler = controller.scheduler
    state = runtime().state(scheduler.token_to_kv_pool_allocator, scheduler.tree_cache)
    state["max_total_num_tokens"] = int(scheduler.max_total_num_tokens)
    state["scheduler"] = scheduler_view(scheduler)
    result.internal_state["kvpolicy"] = state
    return result


def scheduler_view(scheduler) -> dict:
    """Where each request is, read between two scheduler steps: ``waiting``
    (queued, not yet on the model), ``prefilling`` (a chunked prefill with
    chunks to come) and ``running`` (prefilled, decoding: rid -> tokens
    generated so far). What tests and the load harness wait on to act at a
    chosen phase, instead of guessing it from elapsed time."""
    chunked = scheduler.chunked_req
    return {"waiting": [req.rid for req in scheduler.waiting_queue],
            "prefilling": [chunked.rid] if chunked is not None else [],
            "running": {req.rid: len(req.output_ids) for req in scheduler.running_batch.reqs}}


def register() -> None:
    """The ``sglang.srt.plugins`` entry point."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(LAUNCH_TARGETS["add_cli_args"], _after_add_cli_args, HookType.AFTER)
    HookRegistry.register(LAUNCH_TARGETS["prepare_server_args"], _around_prepare_server_args, HookType.AROUND)
    HookRegistry.register(LAUNCH_TARGETS["validate_request"], _before_validate_request, HookType.BEFORE)
    if not os.environ.get(handoff.ENV_POLICY_IR):
        return
    runtime_hooks = [("forward_batch", _after_forward_batch, HookType.AFTER),
                     ("attention", _around_attention, HookType.AROUND),
                     ("extend_attention", _around_extend_attention, HookType.AROUND),
                     ("prefill_done", _after_prefill_done, HookType.AFTER),
                     ("decode_done", _after_decode_done, HookType.AFTER),
                     ("next_batch", _before_next_batch, HookType.BEFORE),
                     ("overlap", _after_overlap, HookType.AFTER),
                     ("prefix_limit", _after_prefix_limit, HookType.AFTER),
                     ("release", _around_release, HookType.AROUND),
                     ("internal_state", _after_internal_state, HookType.AFTER)]
    assert {name for name, _, _ in runtime_hooks} == set(RUNTIME_TARGETS)  # all or none
    for name, fn, kind in runtime_hooks:
        HookRegistry.register(RUNTIME_TARGETS[name], fn, kind)
