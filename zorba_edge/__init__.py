"""zorba-edge: zeroth-order federated fine-tuning of LLMs with heterogeneous block activation."""

__version__ = "0.1.0"
