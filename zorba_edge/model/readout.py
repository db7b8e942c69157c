"""The label readout: the LM head's rows for a task's label tokens, held as their own tensor.

A classification run scores each label by its words' log-probabilities after the prompt
(engine/losses.py), so the only head weights its loss sees through the softmax's label
columns are the rows of the label tokens: for one-token labels the cross-entropy over the
label scores is a softmax over `h . w_label` (the vocabulary's normaliser cancels), a linear
probe on the final hidden state h. Those rows are a tiny, separate set of parameters
(labels x hidden: 1,152 for SmolLM2's two labels) with a high signal share: zeroth-order
steps on them alone rose to 0.77-0.79 held-out accuracy, 0.11-0.13 above the bias floor,
where steps over every transformer block had stood near it (docs/learning.md, "The label
readout").

`LabelReadout` holds a copy of those rows and, attached to a model, replaces the head's
output at the label columns by `h @ rows.T`: the vocabulary's other columns, and the input
embeddings of a model whose head is tied to them, keep their base weights. The rows start
equal to the head's, so an attached, unmoved readout changes no logit.

In a run the rows are one more column of the coefficient table (`zorba_common.readout`): block
R = num_blocks, its one tensor `readout.rows`, moved by alpha[:, R] as every block by its column.
The body is not perturbed by a direction on the rows, so the head's inputs at one forward give
the loss of any rows: `recording` keeps them (`HeadCall`) and `zorba_edge.engine.losses`'
`cached_classification_loss` scores rows from them without a forward.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

READOUT_TENSOR = "readout.rows"
"""The name of block R's one tensor (the directions' hash orders a block's tensors by name)."""


@dataclass(frozen=True)
class HeadCall:
    """What one call of the LM head saw, enough to recompute its label columns for any rows."""

    hidden: torch.Tensor
    """(batch, positions, hidden) fp32: the head's input at the positions it ran at."""
    lse_other: torch.Tensor
    """(batch, positions) fp32: logsumexp of the final logits over every column but the labels'."""


class LabelReadout(nn.Module):
    """Trainable output rows for `token_ids`, in fp32, initialised from the model's head.

    `softcap`: the model's final logit soft-capping (Gemma 2's `final_logit_softcapping`), which
    the model applies after the head: the cached path applies it too."""

    token_ids: torch.Tensor
    """The label tokens, sorted: row i of `rows` is token `token_ids[i]`'s."""

    def __init__(self, head: nn.Module, token_ids: Sequence[int], softcap: float | None = None) -> None:
        super().__init__()
        self.softcap = softcap
        self._recording: list[HeadCall] | None = None
        ids = sorted(set(int(t) for t in token_ids))
        weight = getattr(head, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError("the model's output head has no 2-D weight: a label readout needs a "
                             "linear LM head")
        if getattr(head, "bias", None) is not None:
            raise ValueError("the model's LM head has a bias: a label readout replaces rows of a "
                             "bias-free head only")
        if not ids or ids[0] < 0 or ids[-1] >= weight.shape[0]:
            raise ValueError(f"label token ids {ids} are not rows of a head with "
                             f"{weight.shape[0]} rows")
        self.register_buffer("token_ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        self.rows = nn.Parameter(weight.detach()[ids].to(torch.float32).clone(), requires_grad=False)

    def attach(self, head: nn.Module) -> RemovableHandle:
        """Make `head`'s output at the label columns `h @ rows.T`; remove the handle to undo."""
        return head.register_forward_hook(self._replace_label_logits)

    @torch.no_grad()
    def reset_(self, head: nn.Module) -> None:
        """The rows back to `head`'s (the base model's: the run never moves the head)."""
        weight = head.weight
        assert isinstance(weight, torch.Tensor)  # __init__ refused a head without one
        self.rows.copy_(weight.detach()[self.token_ids].to(torch.float32))

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Block R's named tensors, as a `BlockTensors` entry holds a block's."""
        return [(READOUT_TENSOR, self.rows)]

    @contextmanager
    def recording(self) -> Iterator[list[HeadCall]]:
        """Within the block, every head call appends its `HeadCall` to the list yielded."""
        calls: list[HeadCall] = []
        self._recording = calls
        try:
            yield calls
        finally:
            self._recording = None

    def _replace_label_logits(self, _module: nn.Module, inputs: tuple[torch.Tensor, ...],
                              logits: torch.Tensor) -> torch.Tensor:
        hidden = inputs[0]
        label_logits = hidden.to(torch.float32) @ self.rows.T
        if self._recording is not None:
            self._recording.append(self._head_call(hidden, logits))
        out = logits.clone()
        out[..., self.token_ids] = label_logits.to(out.dtype)
        return out

    def _head_call(self, hidden: torch.Tensor, logits: torch.Tensor) -> HeadCall:
        other = capped(logits.detach().to(torch.float32), self.softcap)
        other[..., self.token_ids] = float("-inf")
        return HeadCall(hidden.detach().to(torch.float32).clone(), other.logsumexp(dim=-1))

    @torch.no_grad()
    def head_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """A copy of the head's `weight` with the label rows replaced: what an export writes as
        the (untied) output matrix."""
        out = weight.detach().clone()
        out[self.token_ids] = self.rows.to(out.dtype)
        return out


def capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """The model's final soft-capping of logits (cap x tanh(logits / cap)), or them as they are."""
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def attach_readout(model: nn.Module, token_ids: Sequence[int]) -> tuple[LabelReadout, RemovableHandle]:
    """A readout of `model`'s head for `token_ids`, attached (the handle detaches it)."""
    head = model.get_output_embeddings()  # type: ignore[operator]
    if head is None:
        raise ValueError("the model has no output head: a label readout needs an LM head")
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    readout = LabelReadout(head, token_ids, softcap=softcap)
    return readout, readout.attach(head)
