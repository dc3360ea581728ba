"""Architecture name → SAE class.  Adding an architecture: one module with an :class:`SAE`
subclass, plus one line here."""

from __future__ import annotations

from saescope.sae.base import SAE, SAEConfig
from saescope.sae.batchtopk import BatchTopKSAE
from saescope.sae.jumprelu import JumpReLUSAE
from saescope.sae.relu import ReLUSAE
from saescope.sae.topk import TopKSAE

ARCHITECTURES: dict[str, type[SAE]] = {
    "jumprelu": JumpReLUSAE,
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "relu": ReLUSAE,
}


def build_sae(cfg: SAEConfig) -> SAE:
    """A freshly initialised SAE of ``cfg.architecture`` (training form unless cfg says otherwise)."""
    cls = ARCHITECTURES.get(cfg.architecture)
    if cls is None:
        raise ValueError(f"unknown SAE architecture {cfg.architecture!r}; known: {', '.join(ARCHITECTURES)}")
    return cls(cfg)
