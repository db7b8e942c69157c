"""Transitional: the group committer lives in `zorba_server.storage.committer` now. The
coordinator imports it from here until it takes a `Store`; then this file goes."""

from zorba_server.storage.committer import Committer

__all__ = ["Committer"]
