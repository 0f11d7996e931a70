"""SGLang integration (``--kv-policy``), importable as ``kvpolicy.sglang_ext``.

Empty until the serving work lands; nothing imports from here yet.
"""
