"""Precisions a block can be held in, and the layers that hold a frozen block's weights.

Names: `fp32`, `bf16`, `fp16` (plain dtypes) and `nf4`, `int8` (bitsandbytes). The
*compute* dtype of every layer is the dtype of the activations flowing through it, which is
the training dtype (fp32 by default): a frozen layer only *stores* its weight compressed and
expands it to the activation dtype for each matmul.

Why not let bitsandbytes pick its own kernels: ZO training measures
`L(theta + mu z) - L(theta - mu z)` with mu around 1e-3, so every layer downstream of a
perturbed block must carry a 1e-3 relative change through. On CPUs with AVX512-BF16,
`bnb.nn.Linear4bit` in eval mode repacks its weight and multiplies in bf16, and
`bnb.nn.Linear8bitLt` in eval mode quantises its *inputs* to int8; both round that change
away. Measured on a 1536x576 layer on an AVX512-BF16 CPU: for two inputs 2e-3 apart, the
difference of the outputs is 150% off the unquantised layer's on the nf4 bf16 path, and 9%
off (the nf4 weight error itself) when the same nf4 weights are used in fp32; the test
`test_quantised_layers_carry_a_small_input_change_through` pins this. So the frozen layers are
subclasses of the bitsandbytes modules that keep their storage and quantisation (Params4bit
/ Int8Params) but compute `F.linear(x, dequantised_weight.to(x.dtype))`: the same result on
every device, in train or eval mode.

The documented CPU path: nf4 and int8 need bitsandbytes, which runs on Linux and Windows
CPUs (and CUDA). Where it cannot be imported (macOS) they raise DTypeError suggesting bf16,
rather than silently falling back: the scheduler budgets memory from the precision the
client declared, and a silent fp32/bf16 fallback would break that budget.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from zorba_common.errors import DTypeError

PLAIN_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
QUANTIZED = ("nf4", "int8")
PRECISIONS: tuple[str, ...] = (*PLAIN_DTYPES, *QUANTIZED)


def check_precision(name: str, what: str, allowed: tuple[str, ...] = PRECISIONS) -> str:
    """`name` if it is one of `allowed`, else DTypeError listing the valid names."""
    if name not in allowed:
        raise DTypeError(f"{what}={name!r} is not a precision: use one of {', '.join(allowed)}")
    return name


def torch_dtype(name: str) -> torch.dtype:
    return PLAIN_DTYPES[check_precision(name, "dtype", tuple(PLAIN_DTYPES))]


def require_bitsandbytes(precision: str) -> None:
    """DTypeError when a quantised precision is asked for and bitsandbytes is unusable."""
    if precision not in QUANTIZED:
        return
    try:
        import bitsandbytes  # noqa: F401
    except Exception as error:  # bitsandbytes fails with several error types off-platform
        raise DTypeError(
            f"frozen_dtype={precision!r} needs bitsandbytes, which cannot be imported here "
            f"({type(error).__name__}: {error}). Use frozen_dtype='bf16' (half the memory of "
            "fp32, no extra dependency) on this device."
        ) from error


class CastLinear(nn.Module):
    """A frozen Linear whose weight is stored in one dtype and used in the activations' dtype.

    With `chunk_rows`, the weight is widened `chunk_rows` output rows at a time: an LM head
    held in bf16 (Gemma 3's is 262k x 640) would otherwise need its whole fp32 copy, as
    large as the memory the narrow storage saved, for every forward pass. The activations
    are never narrowed, so the logits keep the precision the ZO loss difference needs.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 chunk_rows: int | None = None) -> None:
        super().__init__()
        if chunk_rows is not None and chunk_rows < 1:
            raise ValueError(f"chunk_rows={chunk_rows}: must be at least 1")
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.chunk_rows = chunk_rows
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.chunk_rows
        if self.weight.dtype == x.dtype or rows is None or rows >= self.out_features:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.weight.to(x.dtype), bias)
        out = x.new_empty(*x.shape[:-1], self.out_features)
        for start in range(0, self.out_features, rows):
            stop = min(start + rows, self.out_features)
            bias = None if self.bias is None else self.bias[start:stop].to(x.dtype)
            out[..., start:stop] = F.linear(x, self.weight[start:stop].to(x.dtype), bias)
        return out

    def extra_repr(self) -> str:
        chunks = "" if self.chunk_rows is None else f", chunk_rows={self.chunk_rows}"
        return f"in={self.in_features}, out={self.out_features}, storage={self.weight.dtype}{chunks}"


def plain_layer(
    template: nn.Module, weights: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """A copy of the (meta) `template` layer holding `weights` in `dtype`, no grads.

    The tensors are moved, not copied, when they already have that dtype and device.
    """
    layer = copy.deepcopy(template)
    layer.load_state_dict(
        {k: v.to(device=device, dtype=dtype) for k, v in weights.items()}, assign=True
    )
    return layer.requires_grad_(False)


def frozen_layer(
    template: nn.Module,
    weights: dict[str, torch.Tensor],
    precision: str,
    compute_dtype: torch.dtype,
    device: torch.device,
) -> nn.Module:
    """The frozen form of a Linear-like `template` layer: plain, cast or quantised."""
    if precision in PLAIN_DTYPES and PLAIN_DTYPES[precision] == compute_dtype:
        return plain_layer(template, weights, compute_dtype, device)
    weight = weights["weight"]
    if isinstance(template, Conv1D):  # Conv1D keeps its weight as (in, out)
        weight = weight.t()
    weight = weight.contiguous()
    bias = weights.get("bias")
    if bias is not None:
        bias = bias.to(device=device, dtype=compute_dtype)
    if precision in PLAIN_DTYPES:
        return CastLinear(weight.to(device=device, dtype=PLAIN_DTYPES[precision]), bias)
    require_bitsandbytes(precision)
    from zorba_edge.model import bnb_layers

    if precision == "nf4":
        return bnb_layers.nf4_linear(weight, bias, compute_dtype, device)
    return bnb_layers.int8_linear(weight, bias, device)


def _quant_state_tensors(state: Any) -> list[torch.Tensor]:
    """Tensors a bitsandbytes QuantState keeps beside the packed weight (nested included)."""
    found = []
    for name in ("absmax", "code", "offset"):
        value = getattr(state, name, None)
        if isinstance(value, torch.Tensor):
            found.append(value)
    nested = getattr(state, "state2", None)
    if nested is not None:
        found.extend(_quant_state_tensors(nested))
    return found


def held_bytes(module: nn.Module) -> int:
    """Bytes of weights `module` holds as stored: parameters plus quantisation statistics.

    Buffers (rotary tables, causal masks) are runtime overhead, not weights, and are left out.
    """
    tensors: list[torch.Tensor] = []
    for param in module.parameters():
        tensors.append(param)
        tensors.extend(_quant_state_tensors(getattr(param, "quant_state", None)))
        scb = getattr(param, "SCB", None)
        if isinstance(scb, torch.Tensor):
            tensors.append(scb)
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in tensors:
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total
