"""What this device can offer a run: which accelerator, how much memory, how fast a step is.

Memory is measured where the model will live: host RAM through psutil for `cpu`; VRAM
through NVML (pynvml) for `cuda`, falling back to torch's `mem_get_info`; the Metal
allocator's recommended limit for `mps`. The figure is the memory *this process* may use:
what is free plus what the process already holds (the interpreter and libraries count in
the memory model's runtime term, so they belong to the budget too). A missing NVIDIA
driver is the normal state of most edge devices: it becomes a note, never an error.

The step time comes from a short timing probe: a ZO step is two forward passes (the
perturbations are cheap by comparison), so step_time_s ~ 2 x the median forward.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil
import torch

from zorba_edge.client.byte_sizes import format_size
from zorba_edge.client.errors import DeviceError
from zorba_edge.model.progress import Progress

PROFILE_STEP_FORWARDS = 2
"""Forward passes in the profile's step (`DeviceProfile.step_time_s`): an antithetic step's."""

DEFAULT_MARGIN_FRACTION = 0.10
"""Default safety margin: a tenth of the measured memory..."""
MIN_DEFAULT_MARGIN = 256 * 2**20
"""...but at least this much (allocator fragmentation, other programs starting up)."""


@dataclass(frozen=True)
class MemoryReading:
    """Memory available to this process on one device."""

    device: str
    """`cpu`, `cuda:0`, `mps`."""
    available_bytes: int
    """Free memory plus what this process already holds there."""
    total_bytes: int
    source: str
    """How it was measured (`psutil`, `nvml`, `torch.cuda`, `torch.mps`)."""


@dataclass(frozen=True)
class DeviceSurvey:
    """Every memory this device has, and what could not be measured (with why)."""

    host: MemoryReading
    accelerator: MemoryReading | None
    notes: tuple[str, ...] = ()

    def reading_for(self, device: str) -> MemoryReading:
        """The reading that bounds a model held on `device`."""
        if torch.device(device).type == "cpu" or self.accelerator is None:
            return self.host
        return self.accelerator


@dataclass(frozen=True)
class Budget:
    """The bytes this client declares: measured memory less a margin, or the user's cap."""

    measured_bytes: int
    margin_bytes: int
    cap_bytes: int | None
    budget_bytes: int

    @property
    def limited_by(self) -> str:
        if self.cap_bytes is not None and self.cap_bytes <= self.measured_bytes - self.margin_bytes:
            return "--memory-budget"
        return "measured free memory"

    def describe(self) -> str:
        text = (f"{format_size(self.budget_bytes)} (measured {format_size(self.measured_bytes)}"
                f" - margin {format_size(self.margin_bytes)}")
        if self.cap_bytes is not None:
            text += f", cap {format_size(self.cap_bytes)}"
        return text + f"; limited by {self.limited_by})"


def compute_budget(measured_bytes: int, *, margin_bytes: int | None = None,
                   margin_fraction: float | None = None, cap_bytes: int | None = None) -> Budget:
    """min(measured - margin, cap). The margin is a size, a fraction, or the default."""
    if margin_bytes is None and margin_fraction is None:
        margin = max(int(measured_bytes * DEFAULT_MARGIN_FRACTION), MIN_DEFAULT_MARGIN)
    else:
        margin = (margin_bytes or 0) + int(measured_bytes * (margin_fraction or 0.0))
    budget = max(measured_bytes - margin, 0)
    if cap_bytes is not None:
        budget = min(budget, cap_bytes)
    return Budget(measured_bytes, margin, cap_bytes, budget)


# ------------------------------------------------------------------------------ devices


def resolve_device(spec: str) -> str:
    """`auto` -> the best accelerator present; otherwise check that `spec` exists here."""
    if spec == "auto":
        if torch.cuda.is_available():
            return "cuda:0"
        if _mps_available():
            return "mps"
        return "cpu"
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise DeviceError(
            f"--device {spec!r} is not a device: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--device {spec}: this torch build sees no CUDA device (torch "
                f"{torch.__version__}, CUDA {torch.version.cuda or 'not compiled in'}); use "
                "--device cpu or auto")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise DeviceError(
                f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here")
        return f"cuda:{index}"
    if device.type == "mps":
        if not _mps_available():
            raise DeviceError(f"--device {spec}: Apple MPS is not available here; use --device cpu")
        return "mps"
    raise DeviceError(
        f"--device {spec}: the {device.type} device type is not supported; use cpu, cuda or mps")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def process_rss() -> int:
    return int(psutil.Process().memory_info().rss)


def read_host_memory() -> MemoryReading:
    vm = psutil.virtual_memory()
    return MemoryReading("cpu", int(vm.available) + process_rss(), int(vm.total), "psutil")


def _nvml_index(cuda_index: int) -> int | str:
    """NVML numbers every GPU; CUDA only those in CUDA_VISIBLE_DEVICES, in that order."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not visible:
        return cuda_index
    entries = [v.strip() for v in visible.split(",") if v.strip()]
    entry = entries[cuda_index]
    return int(entry) if entry.isdigit() else entry


def read_nvml_memory(cuda_index: int) -> tuple[MemoryReading | None, str | None]:
    """(reading, None) through NVML, or (None, why not) when there is no driver or library."""
    try:
        import pynvml
    except ImportError:
        return None, "pynvml (nvidia-ml-py) is not installed: VRAM read through torch instead"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return None, f"no NVIDIA driver found (NVML: {exc}); VRAM not read through NVML"
    try:
        which = _nvml_index(cuda_index)
        handle = (pynvml.nvmlDeviceGetHandleByIndex(which) if isinstance(which, int)
                  else pynvml.nvmlDeviceGetHandleByUUID(which))
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        held = torch.cuda.memory_reserved(cuda_index) if torch.cuda.is_initialized() else 0
        reading = MemoryReading(f"cuda:{cuda_index}", int(info.free) + int(held),
                                int(info.total), "nvml")
        return reading, None
    except (pynvml.NVMLError, IndexError) as exc:
        return None, f"NVML could not read GPU {cuda_index} ({exc}); VRAM read through torch"
    finally:
        pynvml.nvmlShutdown()


def read_cuda_memory(cuda_index: int) -> tuple[MemoryReading, tuple[str, ...]]:
    reading, note = read_nvml_memory(cuda_index)
    if reading is not None:
        return reading, ()
    free, total = torch.cuda.mem_get_info(cuda_index)
    held = torch.cuda.memory_reserved(cuda_index)
    return MemoryReading(f"cuda:{cuda_index}", int(free) + int(held), int(total), "torch.cuda"), (
        (note,) if note else ())


def read_mps_memory(host: MemoryReading) -> MemoryReading:
    """Apple silicon shares RAM with the GPU: Metal's working-set limit, within free RAM."""
    limit = int(torch.mps.recommended_max_memory())
    return MemoryReading("mps", min(limit, host.available_bytes), limit, "torch.mps")


def survey(device: str) -> DeviceSurvey:
    """Measure the memory of `device` (resolved) and of the host."""
    host = read_host_memory()
    kind = torch.device(device).type
    if kind == "cuda":
        accelerator, notes = read_cuda_memory(torch.device(device).index or 0)
        return DeviceSurvey(host, accelerator, notes)
    if kind == "mps":
        return DeviceSurvey(host, read_mps_memory(host))
    if torch.cuda.is_available():
        return DeviceSurvey(host, None, ("a CUDA device is present: --device cuda would use it",))
    return DeviceSurvey(host, None, (_no_cuda_note(),))


def _no_cuda_note() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
    except ImportError:
        return "no CUDA device (pynvml not installed); training on the CPU"
    except Exception as exc:  # pynvml.NVMLError and its many subclasses
        return f"no NVIDIA driver ({exc}); training on the CPU"
    pynvml.nvmlShutdown()
    return ("an NVIDIA driver is present but this torch build has no CUDA "
            f"(torch {torch.__version__})")


# ------------------------------------------------------------------------------ timing


@dataclass(frozen=True)
class StepTiming:
    forward_s: float
    """Median seconds of one forward pass with loss, on the probe batch."""
    repeats: int

    @property
    def step_time_s(self) -> float:
        """A ZO step is two forward passes."""
        return PROFILE_STEP_FORWARDS * self.forward_s


def time_call(fn: Callable[[], object], *, repeats: int = 3, warmup: int = 1,
              synchronize: Callable[[], None] | None = None,
              clock: Callable[[], float] = time.perf_counter,
              progress: Progress | None = None) -> StepTiming:
    """Median wall time of `fn()` over `repeats` calls after `warmup` untimed ones.

    `progress` counts the calls, warm-up included (warmup + repeats in all)."""
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    total = warmup + repeats
    for done in range(1, warmup + 1):
        fn()
        if progress is not None:
            progress(done, total)
    if synchronize is not None:
        synchronize()
    times = []
    for done in range(warmup + 1, total + 1):
        started = clock()
        fn()
        if synchronize is not None:
            synchronize()
        times.append(clock() - started)
        if progress is not None:
            progress(done, total)
    # A floor of 1 µs: the wire schema needs a positive step time, and a timer may read 0.
    return StepTiming(max(statistics.median(times), 1e-6), repeats)


def synchronizer(device: str) -> Callable[[], None] | None:
    """Accelerators run asynchronously: wait for them before reading the clock."""
    kind = torch.device(device).type
    if kind == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if kind == "mps":
        return torch.mps.synchronize
    return None
