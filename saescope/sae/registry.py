"""Architecture name → SAE class and its config class (SAELens-registry style).  Adding an
architecture: one module with an :class:`SAE` subclass and, if it has options of its own, an
:class:`SAEConfig` subclass; plus one :func:`register` line here."""

from __future__ import annotations

from saescope.sae.base import CONFIG_CLASSES, SAE, SAEConfig
from saescope.sae.batchtopk import BatchTopKSAE
from saescope.sae.jumprelu import JumpReLUConfig, JumpReLUSAE
from saescope.sae.matryoshka_batchtopk import MatryoshkaBatchTopKConfig, MatryoshkaBatchTopKSAE
from saescope.sae.matryoshka_jumprelu import MatryoshkaJumpReLUConfig, MatryoshkaJumpReLUSAE
from saescope.sae.relu import ReLUSAE
from saescope.sae.topk import TopKConfig, TopKSAE
from saescope.sae.transcoder import (
    BatchTopKSkipTranscoder,
    BatchTopKSkipTranscoderConfig,
    BatchTopKTranscoder,
    BatchTopKTranscoderConfig,
    JumpReLUSkipTranscoder,
    JumpReLUSkipTranscoderConfig,
    JumpReLUTranscoder,
    JumpReLUTranscoderConfig,
)

ARCHITECTURES: dict[str, type[SAE]] = {}


def register(name: str, sae_class: type[SAE], config_class: type[SAEConfig] = SAEConfig) -> None:
    """Pair ``name`` with its SAE class and config class: :func:`build_sae`, ``SAEConfig(...)``
    and ``SAEConfig.from_dict`` (config.json) then use ``config_class`` for it."""
    ARCHITECTURES[name] = sae_class
    CONFIG_CLASSES[name] = config_class


register("jumprelu", JumpReLUSAE, JumpReLUConfig)
register("topk", TopKSAE, TopKConfig)
register("batchtopk", BatchTopKSAE, TopKConfig)  # the same options as TopK
register("relu", ReLUSAE)
register("matryoshka_jumprelu", MatryoshkaJumpReLUSAE, MatryoshkaJumpReLUConfig)
register("matryoshka_batchtopk", MatryoshkaBatchTopKSAE, MatryoshkaBatchTopKConfig)
register("jumprelu_transcoder", JumpReLUTranscoder, JumpReLUTranscoderConfig)
register("jumprelu_skip_transcoder", JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig)
register("batchtopk_transcoder", BatchTopKTranscoder, BatchTopKTranscoderConfig)
register("batchtopk_skip_transcoder", BatchTopKSkipTranscoder, BatchTopKSkipTranscoderConfig)


def build_sae(cfg: SAEConfig) -> SAE:
    """A freshly initialised SAE of ``cfg.architecture`` (training form unless cfg says otherwise);
    a config of another class is first read into the architecture's own config class."""
    cls = ARCHITECTURES.get(cfg.architecture)
    if cls is None:
        raise ValueError(f"unknown SAE architecture {cfg.architecture!r}; known: {', '.join(ARCHITECTURES)}")
    own = CONFIG_CLASSES[cfg.architecture]
    if type(cfg) is not own:
        cfg = own.from_dict(cfg.to_dict())
    return cls(cfg)
