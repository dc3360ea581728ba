"""saescope: JumpReLU sparse autoencoders on every site of a transformer, the Gemma Scope way.

``import saescope`` is light: torch, transformers and numpy load only when a name that needs
them is first used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Names only, never a submodule's name (``evaluate``, ``release``): binding a function there would
# shadow the submodule.
_LAZY = {
    "Site": "saescope.sites",
    "select_sites": "saescope.sites",
    "load_model": "saescope.models",
    "SAEConfig": "saescope.sae.base",
    "SAE": "saescope.sae.base",
    "JumpReLUSAE": "saescope.sae.jumprelu",
    "JumpReLUConfig": "saescope.sae.jumprelu",
    "TopKSAE": "saescope.sae.topk",
    "TopKConfig": "saescope.sae.topk",
    "BatchTopKSAE": "saescope.sae.batchtopk",
    "ReLUSAE": "saescope.sae.relu",
    "build_sae": "saescope.sae.registry",
    "load_sae": "saescope.release.load",
    "load_release": "saescope.release.load",
    "save_sae": "saescope.release.save",
    "splice": "saescope.evaluate.splice",
    "load_corpus": "saescope.tokens",
    "harvest": "saescope.activations.harvest",
    "HarvestConfig": "saescope.activations.harvest",
    "InMemorySource": "saescope.activations.source",
    "ActivationStore": "saescope.activations.store",
    "StoreReader": "saescope.activations.store",
    "OnlineSource": "saescope.activations.online",
    "Recipe": "saescope.train.recipe",
    "SAESpec": "saescope.train.spec",
    "Trainer": "saescope.train.trainer",
    "TrainOptions": "saescope.train.trainer",
    "train_and_release": "saescope.train.run",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'saescope' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
