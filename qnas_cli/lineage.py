"""What a fine-tuned supernet may still be used for: only the subnet it was fine-tuned for.

``qnas finetune`` trains one subnet's weight slices inside a copy of its supernet. Those slices
are shared with every other subnet (the channel prefixes, the centre of each kernel, the head and
the classifier), so after the fine-tune the other subnets are no longer what the supernet was
trained to hold, and a search over it would rank subnets that nothing trained. Its sidecar says
whom it serves (``finetuned_for``: the architecture key), and the commands that would read any
other subnet from it refuse, pointing at the original supernet (``finetune.supernet``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import UserError

FINETUNED_FOR = "finetuned_for"  # sidecar (and payload) key: the architecture key a supernet was fine-tuned for


def finetuned_for(meta: dict[str, Any]) -> str | None:
    """The architecture key a supernet (its sidecar ``meta``) was fine-tuned for; None for a trained supernet."""
    value = meta.get(FINETUNED_FOR) if isinstance(meta, dict) else None
    return value if isinstance(value, str) else None


def original_supernet(meta: dict[str, Any]) -> str:
    """Where the supernet a fine-tuned one started from lies, as its lineage records it."""
    ref = meta.get("finetune", {}).get("supernet", {}) if isinstance(meta.get("finetune"), dict) else {}
    return str(ref.get("path", "the supernet it was fine-tuned from")) if isinstance(ref, dict) else "the original supernet"


def check_serves(meta: dict[str, Any], arch_key: str, path: Path | str) -> None:
    """Refuse to take ``arch_key`` from a supernet fine-tuned for another subnet."""
    owner = finetuned_for(meta)
    if owner is not None and owner != arch_key:
        raise UserError(f"{path} was fine-tuned for the subnet {owner} alone (qnas finetune): its other subnets changed "
                        f"with it; take {arch_key} from the original supernet {original_supernet(meta)}")


def check_searchable(meta: dict[str, Any], path: Path | str) -> None:
    """Refuse to search a fine-tuned supernet: every subnet but one is what nothing trained."""
    owner = finetuned_for(meta)
    if owner is not None:
        raise UserError(f"{path} was fine-tuned for one subnet ({owner}) by qnas finetune, which changed the weights "
                        f"its other subnets share: search the original supernet {original_supernet(meta)} instead")
