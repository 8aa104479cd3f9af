"""Shared test set-up: the repository root on sys.path, and no access to a real torch hub cache."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _isolated_torch_home(tmp_path_factory, monkeypatch):
    """Every test sees an empty torch hub cache, so nothing can silently use downloaded weights."""
    home = tmp_path_factory.mktemp("torch_home")
    monkeypatch.setenv("TORCH_HOME", str(home))
    import torch.hub

    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    yield


@pytest.fixture(autouse=True)
def malloc_tuning_calls(request, monkeypatch) -> list:
    """predict.py and main.py tune glibc malloc for their whole process on the CPU
    (fast.retain_freed_memory); tests that run them in this process record the call instead, so the
    test process keeps the default allocator. Every loaded module holding the function (`from fast
    import retain_freed_memory`) gets the recorder, and so do later imports from `fast`.
    Tests marked `real_allocator` get the real function."""
    calls: list = []
    if request.node.get_closest_marker("real_allocator") is None:
        import fast.allocator

        real = fast.allocator.retain_freed_memory
        for module in list(sys.modules.values()):
            if getattr(module, "__dict__", {}).get("retain_freed_memory") is real:
                monkeypatch.setattr(module, "retain_freed_memory", lambda: calls.append(True) or True)
    return calls


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


def pytest_configure(config):
    # Two cores are shared by everything; one intra-op thread per test process keeps timings stable.
    os.environ.setdefault("OMP_NUM_THREADS", "2")
