"""Device profiling: memory readings, a missing NVIDIA driver, devices, and the timing probe."""

from __future__ import annotations

import sys

import psutil
import pytest
import torch

from zorba_common.memory_model import MemorySettings
from zorba_edge.client import profiling
from zorba_edge.client.assembly import memory_profile, time_forward
from zorba_edge.client.errors import DeviceError
from zorba_edge.client.profiling import (
    resolve_device,
    survey,
    time_call,
)
from zorba_edge.model.loading import LoadConfig


def test_host_memory_counts_free_memory_plus_what_this_process_holds() -> None:
    reading = profiling.read_host_memory()
    rss = psutil.Process().memory_info().rss
    assert reading.device == "cpu" and reading.source == "psutil"
    assert rss < reading.available_bytes <= reading.total_bytes + rss
    assert reading.available_bytes >= psutil.virtual_memory().available * 0.5


def test_a_missing_nvidia_driver_is_a_note_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import pynvml

    def no_driver() -> None:
        raise pynvml.NVMLError_LibraryNotFound()

    monkeypatch.setattr(pynvml, "nvmlInit", no_driver)
    reading, note = profiling.read_nvml_memory(0)
    assert reading is None and note is not None and "no NVIDIA driver" in note
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    found = survey("cpu")
    assert found.accelerator is None
    assert any("no NVIDIA driver" in n for n in found.notes)
    assert found.reading_for("cpu") is found.host


def test_without_pynvml_the_profile_still_works(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    reading, note = profiling.read_nvml_memory(0)
    assert reading is None and "not installed" in (note or "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "pynvml not installed" in survey("cpu").notes[0]


def test_nvml_reading_maps_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert profiling._nvml_index(0) == 3 and profiling._nvml_index(1) == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1234")
    assert profiling._nvml_index(0) == "GPU-1234"


def test_devices_resolve_or_explain() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "mps") or resolve_device("auto").startswith("cuda")
    with pytest.raises(DeviceError, match="not a device"):
        resolve_device("toaster:0")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA device"):
            resolve_device("cuda")


def test_time_call_takes_the_median_after_warm_up() -> None:
    ticks = iter([0.0, 1.0, 10.0, 13.0, 20.0, 22.0])  # durations 1, 3, 2
    calls = []
    timing = time_call(lambda: calls.append(1), repeats=3, warmup=2, clock=lambda: next(ticks))
    assert len(calls) == 5
    assert timing.forward_s == 2.0 and timing.step_time_s == 4.0


def test_the_probe_times_a_real_forward_pass() -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 50))

    class LM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> object:
            return type("Out", (), {"logits": self.net(input_ids)})()

    timing = time_forward(LM(), 50, "cpu", repeats=2, batch_size=2, seq_len=4)
    assert 0 < timing.forward_s < 5 and timing.step_time_s == 2 * timing.forward_s


def test_the_snapshot_counts_against_no_budget_on_any_device() -> None:
    cpu = memory_profile(LoadConfig(frozen_dtype="fp32"), runtime_bytes=123)
    assert cpu.snapshot_dtype is None and cpu.runtime_bytes == 123  # spilled to disk
    assert cpu.frozen_other_dtype == cpu.embed_dtype == "fp32"
    cuda = memory_profile(LoadConfig(device="cuda:0"), runtime_bytes=None)
    assert cuda.snapshot_dtype is None
    assert cuda.runtime_bytes == MemorySettings().runtime_bytes
