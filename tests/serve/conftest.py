"""Real SGLang servers on loopback, with the embedded default model.

Three servers for the whole session: one without ``--kv-policy`` (the
reference outputs), one with EMS at 10% and chunked prefill (per-request
``custom_params`` pick other shipped policies on it), and one under memory
pressure (a 1024-slot pool, chunks of 256, admission that overcommits) that
SGLang must retract and evict on. Each starts in about a minute on a 2-core
CPU. The two with a policy run every scheduler step under SGLang's strict
allocator checks and kvpolicy's own (``server.STRICT_CHECKS``): a leak, a
double free or compressed KV in the radix tree stops them. If SGLang is
missing, these tests fail with the reason: ``make test`` installs it.
"""

from __future__ import annotations

import pytest

from kvpolicy.hf.models import prepare_default_model
from kvpolicy.sglang_ext import server as srv

# --sleep-on-idle: an idle scheduler otherwise spins, and two servers share 2 cores here
SERVER_FLAGS = ["--max-total-tokens", "8192", "--max-running-requests", "4", "--sleep-on-idle"]
EMS_10 = "policy ems10\nextends ems\nbudget 10%\n"
# Small enough that three requests decoding a few hundred tokens each do not
# fit: SGLang evicts the radix tree, then retracts. Admission reserves little
# for future tokens (conservativeness 0.05 for running requests, at most 32
# tokens for a new one: server.OVERCOMMIT), so it overcommits.
PRESSURE_POOL = 1024
PRESSURE_FLAGS = ["--max-total-tokens", str(PRESSURE_POOL), "--max-running-requests", "4",
                  "--chunked-prefill-size", "256", "--schedule-conservativeness", "0.05", "--sleep-on-idle"]


@pytest.fixture(scope="session")
def model_dir():
    return prepare_default_model()


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def plain_server(model_dir, tmp_path_factory):
    server = srv.start(model_dir, tmp_path_factory.mktemp("plain") / "server.log", extra=SERVER_FLAGS)
    yield server
    server.stop()


def ems10_server(model_dir, tmp, extra, env):
    """A server with EMS at 10% as its launch policy and the strict checks on."""
    policy = tmp / "ems10.kvp"
    policy.write_text(EMS_10)
    return srv.start(model_dir, tmp / "server.log", policy=str(policy), extra=extra,
                     env={**srv.STRICT_CHECKS, **env})


#: the operator's policy folder of the EMS server: requests may pick these by name
FOLDER_POLICIES = {"tight": "policy tight\nextends snapkv\nbudget 5%\n",
                   "layered": "policy layered\nextends snapkv\nbudget 15%\nlayers pyramid(beta=10)\n",
                   # recompressed every 16 decoded tokens to 96 slots
                   "rolling": "policy rolling\nextends snapkv\nbudget 96 tokens\ntrigger prefill, every 16 tokens\n"}


@pytest.fixture(scope="session")
def ems_server(model_dir, tmp_path_factory):
    # chunks of 1024: the 1.5k-2k-token prompts below are prefilled in two
    # chunks, so capture across chunks is what these tests exercise; SGLang's
    # metrics on (kvpolicy's counters join them); a policy folder
    tmp = tmp_path_factory.mktemp("ems")
    folder = tmp / "policies"
    folder.mkdir()
    for name, text in FOLDER_POLICIES.items():
        (folder / f"{name}.kvp").write_text(text)
    server = ems10_server(model_dir, tmp, SERVER_FLAGS + ["--chunked-prefill-size", "1024", "--enable-metrics",
                                                          "--kv-policy-dir", str(folder)], {})
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pressure_server(model_dir, tmp_path_factory):
    server = ems10_server(model_dir, tmp_path_factory.mktemp("pressure"), PRESSURE_FLAGS, srv.OVERCOMMIT)
    yield server
    server.stop()
