"""The fluency watch's rule: is a generic-text loss still a language model's? (pure)

Fine-tuning on a classification task moves the label scores; it should leave the model's plain
next-token predictions about where the base model has them. A run whose blocks drift far from
their base weights breaks generation without the task's loss saying so (issue 26: Gemma 3
generated garbage while its held-out task loss had risen only 16%). Whoever measures the loss
on the packaged generic text (zorba_edge/engine/fluency.py) judges it here: the simulator on
its own model, the server on the losses its clients report (zorba_server/fluency_watch.py).
Importable without torch (command lines show the default).
"""

from __future__ import annotations

FLUENCY_TOLERANCE = 0.2
"""How far (a fraction of the base model's) the loss on the generic text may rise before the
watch calls the model broken: a classification run should leave it about where it was; broken
generation moves it by far more (docs/learning.md, "Safety of the defaults")."""


def broken(base_loss: float, loss: float, tolerance: float = FLUENCY_TOLERANCE) -> bool:
    """The model's generic-text loss stands more than `tolerance` above the base model's (a
    NaN or infinite loss is broken too)."""
    return not loss == loss or loss > base_loss * (1 + tolerance)
