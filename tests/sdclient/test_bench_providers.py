"""The provider queue benchmark's quick variant: a 1 s queue, SDClient within its targets."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import huggingface_hub
import pytest

BENCH = Path(__file__).parents[2] / "benchmarks" / "bench_providers.py"


@pytest.fixture(autouse=True)
def _fake_hub_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    # Where the tests run with HF_HUB_OFFLINE=1, huggingface_hub refuses every request; the
    # benchmark's fake Hub is on 127.0.0.1.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_providers", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_one_second_queue_meets_the_targets(capsys: pytest.CaptureFixture[str]):
    assert _load().main(["--queue-s", "1", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") == 4 and "FAIL" not in out
    assert "SDClient / AsyncInferenceClient" in out


def test_the_queue_time_is_wall_time():
    bench = _load()
    results = asyncio.run(bench.run(0.6, 1, ["wavespeed"]))
    runs = results["wavespeed"]
    assert min(runs["sdclient"].seconds) >= 0.6 and min(runs["hf_async"].seconds) >= 0.6
    assert max(runs["sdclient"].polls) >= 1
