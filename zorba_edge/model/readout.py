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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


class LabelReadout(nn.Module):
    """Trainable output rows for `token_ids`, in fp32, initialised from the model's head."""

    token_ids: torch.Tensor
    """The label tokens, sorted: row i of `rows` is token `token_ids[i]`'s."""

    def __init__(self, head: nn.Module, token_ids: Sequence[int]) -> None:
        super().__init__()
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

    def _replace_label_logits(self, _module: nn.Module, inputs: tuple[torch.Tensor, ...],
                              logits: torch.Tensor) -> torch.Tensor:
        hidden = inputs[0]
        label_logits = hidden.to(torch.float32) @ self.rows.T
        out = logits.clone()
        out[..., self.token_ids] = label_logits.to(out.dtype)
        return out

    @torch.no_grad()
    def head_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """A copy of the head's `weight` with the label rows replaced: what an export writes as
        the (untied) output matrix."""
        out = weight.detach().clone()
        out[self.token_ids] = self.rows.to(out.dtype)
        return out
