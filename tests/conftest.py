"""Shared test setup: offline (HF_HUB_OFFLINE=1), CPU, the repository and data/ importable, the tiny-sd fixtures."""

import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "data")):
    if p not in sys.path:
        sys.path.insert(0, p)

import pytest  # noqa: E402

# The embedded tiny Stable Diffusion folder; TEST_TINY_SD points the tests at another build (e.g. a smoke build).
TINY_SD = os.environ.get("TEST_TINY_SD", os.path.join(ROOT, "data", "tiny-sd"))


@pytest.fixture(scope="session")
def tiny_sd() -> str:
    return TINY_SD


@pytest.fixture(scope="session")
def tiny_model(tiny_sd):
    import common

    return common.load_model(tiny_sd, device="cpu")


from common import tiny_judge_accuracies as judge_accuracies  # noqa: E402,F401  (the efficacy tests use it)
