"""SGLang integration (``--kv-policy``), importable as ``kvpolicy.sglang_ext``.

``hooks`` (the plugin SGLang loads: every hook target), ``launch`` (the
``--kv-policy`` flag, checked before a model loads), ``runtime`` (the
scheduler side: capture, compression in the pool, positions),
``invariants`` (what must hold between steps), ``launch_server`` (``kvpolicy
serve``) and ``server`` (a loopback client for tests and benches; never
imported by the scheduler). See ARCHITECTURE.md.
"""
