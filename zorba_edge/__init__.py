"""zorba-edge: zeroth-order federated fine-tuning of LLMs with heterogeneous block activation."""

from zorba_common import __version__

__all__ = ["__version__"]
