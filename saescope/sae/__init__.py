"""SAE architectures.  Importing the package registers the built-in ones
(:mod:`saescope.sae.registry`), so ``SAEConfig(architecture=...)`` always finds its config class."""

from saescope.sae import registry as _registry  # noqa: F401
