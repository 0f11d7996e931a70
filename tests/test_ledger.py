"""The serving ledger's bookkeeping of compressions during decoding
(``sglang_ext/ledger.py``), without a server: what ``/server_info``'s
records and totals say after a decode trigger's checks."""

from __future__ import annotations

from types import SimpleNamespace

from kvpolicy.sglang_ext.ledger import Ledger, Record


def record(slots_kept: int, freed: int, released: int, offset: int, seconds: float) -> Record:
    return Record("r", "rolling", 80, slots_kept, [slots_kept * 3] * 2, "rank-slot", freed, released, offset,
                  seconds, False)


def test_a_first_compression_during_decoding_becomes_the_record_and_later_ones_update_it():
    ledger, req = Ledger(), SimpleNamespace(rid="r")
    rec, first = ledger.recompressed(req, record(96, 32, 80, 16, 0.5), released_own_prompt=False)
    assert first and ledger.records["r"] is rec and ledger.requests["r"] is req
    assert rec.decode_compressions == 1
    t = ledger.totals
    assert (t.requests_compressed, t.prompt_tokens, t.slots_kept, t.decode_compressions) == (1, 80, 96, 1)
    assert (t.slots_freed, t.decode_slots_freed, t.compression_seconds) == (32, 32, 0.5)  # its seconds once

    again, first = ledger.recompressed(req, record(96, 16, 0, 32, 0.25), released_own_prompt=False)
    assert not first and again is rec
    assert (rec.slots_kept, rec.position_offset, rec.decode_compressions) == (96, 32, 2)
    assert (rec.slots_freed, rec.slots_released_to_tree, rec.seconds) == (48, 80, 0.75)
    assert (t.requests_compressed, t.decode_compressions, t.decode_slots_freed) == (1, 2, 48)
    assert t.compression_seconds == 0.75
