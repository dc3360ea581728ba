"""Forward passes that start at a layer (evaluation, the KL fine-tune): a clean pass caches
each site's prefix, later passes replay it.

Splicing an SAE at layer L changes nothing before block L, so the spliced forward does not need
to run blocks 0..L−1 again.  :func:`clean_forward` records what *enters* block L (the raw output
of block L−1) for every layer asked for; :func:`replay_prefix` then makes blocks 0..L−1 return
that recording instead of computing, and the model's own forward does the rest.

Why the model's own forward, rather than calling blocks L.. by hand: everything a block needs
besides its input — rotary position embeddings, the causal mask, Gemma 3's per-layer choice of
sliding-window or full attention (``config.layer_types[i]`` and a mask per type), Gemma 2's
soft-capping — is prepared by the model's forward exactly as in a normal pass.  The embedding
lookup, rotary tables and masks are still computed (cheap); the skipped blocks are not.

The vocabulary head is applied separately, by :func:`lm_logits`, on the positions that are
scored and in chunks (see :mod:`saescope.evaluate.lm_scores`), so a 262k-word Gemma vocabulary
never needs a (batch, seq, vocab) tensor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from saescope.sites import adapter_for


def _clone(output):
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, tuple):
        return tuple(_clone(o) for o in output)
    return output


@torch.no_grad()
def clean_forward(model: nn.Module, input_ids_BT: torch.Tensor, layers: Iterable[int]) -> tuple[torch.Tensor, dict]:
    """Run the decoder stack once.

    Returns the final hidden states ``(B, T, D)`` (after the final norm, before the head) and
    ``{L: what enters block L}`` for each ``L >= 1`` in ``layers`` (block L−1's raw output).
    """
    blocks = adapter_for(model).blocks(model)
    prefix: dict[int, object] = {}

    def record(layer: int):
        def hook(module, args, output):
            prefix[layer] = output

        return hook

    wanted = sorted({L for L in layers if L > 0})
    handles = [blocks[L - 1].register_forward_hook(record(L)) for L in wanted]
    try:
        hidden_BTD = model.base_model(input_ids=input_ids_BT, use_cache=False).last_hidden_state
    finally:
        for handle in handles:
            handle.remove()
    return hidden_BTD, prefix


@contextlib.contextmanager
def replay_prefix(model: nn.Module, layer: int, block_output) -> Iterator[None]:
    """Within the block, blocks ``0..layer−1`` do not compute: each returns ``block_output``
    (what :func:`clean_forward` recorded as entering ``layer``), so the forward effectively
    starts at block ``layer``.  Hooks on the skipped blocks would see the recording: never hook
    a site before ``layer`` inside this context.
    """
    blocks = adapter_for(model).blocks(model)

    def skipped(*args, **kwargs):
        return _clone(block_output)  # a copy: a later block may not modify the cache in place

    saved = []
    for block in blocks[:layer]:
        saved.append((block, block.__dict__.get("forward")))  # an instance-level forward (accelerate)
        block.forward = skipped
    try:
        yield
    finally:
        for block, previous in saved:
            if previous is None:
                del block.forward
            else:
                block.forward = previous


@torch.no_grad()
def forward_from(model: nn.Module, input_ids_BT: torch.Tensor, layer: int, block_output) -> torch.Tensor:
    """Final hidden states ``(B, T, D)`` of a forward that starts at block ``layer``."""
    with replay_prefix(model, layer, block_output) if layer > 0 else contextlib.nullcontext():
        return model.base_model(input_ids=input_ids_BT, use_cache=False).last_hidden_state


@contextlib.contextmanager
def matmul_weights_in(model: nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """Within the block, the weights of the model's linear layers (the vocabulary head included)
    are held in ``dtype``; the original parameters come back afterwards (ties included).

    Why: under autocast, a frozen weight (``requires_grad=False``, as saescope loads models) is
    cast again at *every* call — autocast caches only weights that require grad — so Gemma 3's
    262k-word head was re-cast from float32 for each chunk of scored tokens, costing more than
    the product itself.  Holding bf16 copies gives autocast the same numbers without the casts.
    Only for forwards under autocast to ``dtype``: outside it, float32 inputs would meet bf16
    weights.
    """
    if dtype is None:
        yield
        return
    saved = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D") and isinstance(weight, nn.Parameter):
            saved.append((module, weight))
    lowered: dict[int, nn.Parameter] = {}  # one copy per shared parameter
    try:
        for module, weight in saved:
            if id(weight) not in lowered:
                lowered[id(weight)] = nn.Parameter(weight.detach().to(dtype), requires_grad=False)
            module.weight = lowered[id(weight)]
        yield
    finally:
        for module, weight in saved:
            module.weight = weight


def lm_logits(model: nn.Module, hidden_ND: torch.Tensor) -> torch.Tensor:
    """The model's vocabulary logits (float32) from final hidden states, as its own forward
    computes them (including Gemma 2/3's final logit soft-capping)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (not a causal LM?)")
    logits = head(hidden_ND)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


def vocab_size(model: nn.Module) -> int:
    return int(model.get_output_embeddings().weight.shape[0])
