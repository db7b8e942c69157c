"""bitsandbytes-backed frozen layers that compute in the activations' dtype.

Imported only when nf4 or int8 is asked for (see quantize.py for why the forward is ours).
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
import torch.nn.functional as F
from bitsandbytes.functional import dequantize_4bit, int8_vectorwise_dequant
from torch import nn

NF4_BLOCKSIZE = 64


class FrozenLinear4bit(bnb.nn.Linear4bit):
    """nf4 storage (Params4bit); forward dequantises to x's dtype and runs F.linear."""

    weight: bnb.nn.Params4bit  # nn.Linear declares a plain Tensor; ours carries quant_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize_4bit(self.weight.data, self.weight.quant_state).to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)


class FrozenLinear8bit(bnb.nn.Linear8bitLt):
    """LLM.int8 row-wise storage (Int8Params); forward dequantises to x's dtype, F.linear."""

    weight: bnb.nn.Int8Params  # nn.Linear declares a plain Tensor; ours carries SCB

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = int8_vectorwise_dequant(self.weight.data, self.weight.SCB).to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)


def nf4_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    compute_dtype: torch.dtype,
    device: torch.device,
) -> FrozenLinear4bit:
    """Quantise a (out, in) weight to nf4 on `device`."""
    out_features, in_features = weight.shape
    layer = FrozenLinear4bit(
        in_features,
        out_features,
        bias=bias is not None,
        compute_dtype=compute_dtype,
        # Plain fp32 absmax (0.0625 bytes/param, as the memory model assumes): double
        # quantisation would save 0.047 bytes/param and cost a second dequantisation per call.
        compress_statistics=False,
        quant_type="nf4",
        device="meta",
    )
    # Params4bit quantises when moved to a real device.
    layer.weight = bnb.nn.Params4bit(
        weight,
        requires_grad=False,
        blocksize=NF4_BLOCKSIZE,
        compress_statistics=False,
        quant_type="nf4",
        module=layer,
    ).to(device)  # type: ignore[misc]  # bitsandbytes binds to()'s self to nn.Module
    if bias is not None:  # built with bias=False otherwise, so it is None already
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


def int8_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, device: torch.device
) -> FrozenLinear8bit:
    """Quantise a (out, in) weight to int8 with one scale per output row on `device`."""
    out_features, in_features = weight.shape
    layer = FrozenLinear8bit(
        in_features,
        out_features,
        bias=bias is not None,
        has_fp16_weights=False,
        threshold=0.0,
        device="meta",
    )
    int8 = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    layer.weight = int8.to(device)  # type: ignore[misc]  # as in nf4_linear
    if bias is not None:  # built with bias=False otherwise, so it is None already
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer
