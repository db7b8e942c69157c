"""`--model ORG/NAME`: a model id found in the local Hugging Face cache, never downloaded.

A lab that already uses transformers has its models in `~/.cache/huggingface/hub` (or
`HF_HUB_CACHE`); naming them by id is what `from_pretrained` users type. Devices of a
federation must not fetch weights mid-run (and many have no network), so the id is looked up
with `local_files_only` and a model that is not there is named with the command that fetches it.
"""

from __future__ import annotations

import re
from pathlib import Path

from zorba_common.errors import ModelSourceError

# ORG/NAME as the Hub spells repository ids: no leading "/", ".", "~", exactly one slash.
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def looks_like_model_id(spec: str) -> bool:
    return _REPO_ID.fullmatch(spec) is not None and not spec.endswith(".gguf")


def cached_model_path(model_id: str, cache_dir: str | Path | None = None) -> Path:
    """The cached snapshot of `model_id`: its directory (config.json + safetensors) or its one
    .gguf file. ModelSourceError when it is not cached, or holds neither."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    where = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    try:
        snapshot = Path(snapshot_download(model_id, cache_dir=cache_dir, local_files_only=True))
    except LocalEntryNotFoundError:
        raise ModelSourceError(
            f"{model_id}: no such file or directory, and not in the local Hugging Face cache "
            f"({where}). Nothing is downloaded here: fetch it once with `hf download {model_id}` "
            "(HF_HUB_CACHE picks the cache), or pass a model directory or a .gguf file") from None
    if (snapshot / "config.json").is_file():
        return snapshot
    ggufs = sorted(snapshot.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if ggufs:
        names = ", ".join(p.name for p in ggufs)
        raise ModelSourceError(
            f"{model_id} in the Hugging Face cache holds several GGUF files ({names}): pass one "
            f"as --model {snapshot}/<file>")
    raise ModelSourceError(
        f"{model_id} is in the Hugging Face cache ({snapshot}) but holds neither a config.json "
        "nor a .gguf file: download the model's weights too (`hf download` without --include)")
