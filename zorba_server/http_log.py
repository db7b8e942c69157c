"""aiohttp's own request-handling log, as an operator wants it: malformed HTTP is one WARNING
line naming the source, not a 10-line traceback at ERROR per request (issue 27).

aiohttp logs every request it cannot parse with `log_exception(...)` on the logger a server is
given (`web.AppRunner(logger=...)`); `http_logger()` is such a logger with a filter that turns
those records into one line. Real failures inside aiohttp still log in full.
"""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import HttpProcessingError

HTTP_LOGGER = "zorba_server.http"


class MalformedRequests(logging.Filter):
    """One WARNING line for a request aiohttp could not parse (any HttpProcessingError)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            source = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            detail = " ".join(str(exc.message or exc).split())  # aiohttp points at the byte over lines
            record.msg, record.args = "malformed HTTP from %s: %s", (source, detail)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info, record.exc_text = None, None
        return True


def http_logger() -> logging.Logger:
    """The logger to hand to aiohttp's request handler (the filter is added once)."""
    logger = logging.getLogger(HTTP_LOGGER)
    if not any(isinstance(f, MalformedRequests) for f in logger.filters):
        logger.addFilter(MalformedRequests())
    return logger
