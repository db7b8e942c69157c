"""The client turns bitsandbytes' Hub-kernel warnings (offline, untrusted) into one line."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from zorba_edge.client.hub_warnings import HUB_LOGGERS, SUMMARY, OfflineHubFilter, quiet_hub_kernel_warnings

OFFLINE = ("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' "
           "because Hugging Face Hub is in offline mode.")
FAILED = ("Failed to load CPU gemm_4bit_forward from kernels-community: Version 1 of "
          "'kernels-community/quantization-bitsandbytes' is not available in the local cache")


@pytest.fixture
def hub_filter() -> Iterator[OfflineHubFilter]:
    # A filter an earlier test's client installed (one per process, by design) is set aside,
    # so this test sees a fresh one and its count; it is put back afterwards.
    earlier = {name: [f for f in logging.getLogger(name).filters if isinstance(f, OfflineHubFilter)]
               for name in HUB_LOGGERS}
    for name, filters in earlier.items():
        for f in filters:
            logging.getLogger(name).removeFilter(f)
    installed = quiet_hub_kernel_warnings(logging.getLogger("zorba_edge.client"))
    yield installed
    for name in HUB_LOGGERS:
        logging.getLogger(name).removeFilter(installed)
        for f in earlier[name]:
            logging.getLogger(name).addFilter(f)


def test_the_hub_kernel_warnings_become_one_line(hub_filter: OfflineHubFilter,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    kernels, bnb = (logging.getLogger(name) for name in reversed(HUB_LOGGERS))
    for _ in range(2):
        kernels.warning(OFFLINE)
        bnb.warning(FAILED)
    bnb.warning("an unrelated bitsandbytes warning")
    messages = [(r.name, r.getMessage()) for r in caplog.records]
    assert messages == [("zorba_edge.client", SUMMARY), (HUB_LOGGERS[0], "an unrelated bitsandbytes warning")]
    assert hub_filter.dropped == 4


def test_installing_twice_keeps_one_filter(hub_filter: OfflineHubFilter) -> None:
    assert quiet_hub_kernel_warnings(logging.getLogger("other")) is hub_filter
    assert sum(isinstance(f, OfflineHubFilter) for f in logging.getLogger(HUB_LOGGERS[0]).filters) == 1
