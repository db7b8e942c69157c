"""One line instead of the Hub warnings a client cannot act on.

bitsandbytes' CPU backend tries, on import, to fetch an optional kernel from the Hugging
Face Hub (`kernels-community/quantization-bitsandbytes`, through the `kernels` package).
Offline (HF_HUB_OFFLINE, which the quickstart sets, or a device without network) and even
online (the publisher's trust is not established) that fails with two warnings on every
client start, which read like errors and send users looking for a fix that is not needed:
bitsandbytes falls back to its own CPU code. This filter drops those records and logs, once
per process, one line saying what happened.
"""

from __future__ import annotations

import logging

HUB_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")
_MARKERS = ("kernels-community/", "Hugging Face Hub is in offline mode")
SUMMARY = ("bitsandbytes' optional CPU kernel (kernels-community/quantization-bitsandbytes) is not "
           "loaded from the Hugging Face Hub (offline, or its publisher not trusted); bitsandbytes "
           "uses its own CPU code")


class OfflineHubFilter(logging.Filter):
    """Drops the Hub-kernel records; the first one dropped is told in one line on `log`."""

    def __init__(self, log: logging.Logger) -> None:
        super().__init__()
        self.log = log
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not any(marker in record.getMessage() for marker in _MARKERS):
            return True  # another warning of these libraries: let it through
        self.dropped += 1
        if self.dropped == 1:
            self.log.info(SUMMARY)
        return False


def quiet_hub_kernel_warnings(log: logging.Logger) -> OfflineHubFilter:
    """Install the filter on the libraries' loggers (before or after they are imported);
    installing it again keeps the first."""
    for name in HUB_LOGGERS:
        for existing in logging.getLogger(name).filters:
            if isinstance(existing, OfflineHubFilter):
                return existing
    hub_filter = OfflineHubFilter(log)
    for name in HUB_LOGGERS:
        logging.getLogger(name).addFilter(hub_filter)
    return hub_filter
