"""Shared fixtures. Every test draws fresh random inputs from `gen`, a torch.Generator seeded from
the test's id and LRGPTQ_TEST_SEED (default 0): reproducible, and different per test and per run
seed (LRGPTQ_TEST_SEED=7 pytest tests ...). The seed is printed in assertion messages via gen.initial_seed()."""
import os
import sys
import zlib

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # `import reference`, `import util` under any import mode


@pytest.fixture
def gen(request):
    base = int(os.environ.get("LRGPTQ_TEST_SEED", "0"))
    seed = (zlib.crc32(request.node.nodeid.encode()) + 1_000_003 * base) % (2**63)
    g = torch.Generator().manual_seed(seed)
    return g
