"""The peak memory of a phase of this process, as the memory model's calibration needs it.

On Linux the kernel keeps the resident high-water mark (VmHWM) and lets a process reset it
(`/proc/self/clear_refs`, value 5), so a round's peak is exact and costs nothing. Elsewhere
the current RSS is sampled at the probe's calls (a lower bound, said so in its `exact`).
On an accelerator the budget a client declares is the device's memory, so the peak is
the device-side peak of torch's allocator there, not the host's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import psutil
import torch


class PeakMemoryProbe:
    """reset() at the start of a phase, peak_bytes() at its end (or as often as convenient)."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self._status = Path("/proc/self/status")
        self._clear_refs = Path("/proc/self/clear_refs")
        self.exact = sys.platform.startswith("linux") and self._can_reset()
        self._sampled_peak = 0

    def _can_reset(self) -> bool:
        try:
            self._clear_refs.write_text("5")
            return True
        except OSError:
            return False

    def _host_rss_field(self, field: str) -> int:
        for line in self._status.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} missing from {self._status}")

    def reset(self) -> None:
        if self.exact:
            self._clear_refs.write_text("5")
        self._sampled_peak = psutil.Process().memory_info().rss
        if self.device.type == "cuda":
            torch.cuda.init()  # resetting the stats of a device not yet initialised raises
            torch.cuda.reset_peak_memory_stats(self.device)

    def sample(self) -> None:
        """Record the current RSS (only needed where the kernel keeps no high-water mark)."""
        self._sampled_peak = max(self._sampled_peak, psutil.Process().memory_info().rss)

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_reserved(self.device)
        self.sample()
        return self._host_rss_field("VmHWM") if self.exact else self._sampled_peak
