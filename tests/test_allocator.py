"""fast.retain_freed_memory: freed activations stay in the process, so allocating them again does
not page-fault.

The setting is process-wide, so each case runs in a fresh interpreter.
"""
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Allocate and free a 64 MiB tensor many times, as forwards do with their activations, and count the
# minor page faults of the last five. (torch asks for 64-byte aligned blocks, which a freed block of
# exactly that size cannot serve; the heap grows for a few rounds until freed neighbours merge, then
# stays put: the warm-up rounds.)
PROBE = """
import json, resource, sys
import torch
sys.path.insert(0, {root!r})
from fast.allocator import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else False
def churn():
    x = torch.empty(16 * 2**20)  # 64 MiB of float32
    x.fill_(1.0)
    del x
for _ in range(12):
    churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    churn()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({{"applied": applied, "faults": faults}}))
"""


def probe(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT)), mode],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="retain_freed_memory tunes glibc malloc (Linux with glibc only)")
def test_retained_memory_is_reused_without_page_faults():
    default, retained = probe("default"), probe("retain")
    assert default["applied"] is False and retained["applied"] is True
    # glibc's default maps each 64 MiB block afresh: ~16k faults (4 KiB pages) per allocation.
    assert default["faults"] > 5 * 8000, default
    # Retained: the heap keeps the pages, so the repeats reuse them.
    assert retained["faults"] < default["faults"] / 20, (retained, default)


@pytest.mark.real_allocator
def test_retain_is_a_no_op_without_glibc(monkeypatch):
    from fast import allocator

    monkeypatch.setattr(allocator.platform, "system", lambda: "Darwin")
    assert allocator.retain_freed_memory() is False
