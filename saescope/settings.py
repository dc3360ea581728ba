"""One config surface: settings are dataclass fields, each documented once, and command-line
flags are derived from them (a field's ``#:`` comment, or ``metadata={"help": ...}``, becomes the
flag's help; ``metadata={"flag": ...}`` renames the flag).  :class:`TrainSettings` holds what
``saescope train`` and ``saescope run`` share, so such a setting is written exactly once.  Light:
no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
from dataclasses import dataclass, field
from typing import Any


def whole_number(text: str) -> int:
    """Whole numbers written as 20000, 20_000 or 2e4."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value != int(value):
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
    return int(value)


def width(text: str) -> int:
    """Widths as Gemma Scope names them: 16k = 16384, 1m = 2**20; or plain numbers."""
    t = text.strip().lower()
    for suffix, factor in (("k", 1024), ("m", 2**20)):
        if t.endswith(suffix) and t[:-1].isdigit():
            return int(t[:-1]) * factor
    return whole_number(t)


def listing(kind):
    """A comma-separated list of ``kind`` (argparse ``type=``), as a tuple."""
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(v) for v in text.split(",") if v.strip())
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of numbers, got {text!r}") from None
    return parse


def optional(kind):
    """``kind``, or ``none`` for None."""
    return lambda text: None if text.strip().lower() == "none" else kind(text)


_PARSERS = {"int": whole_number, "float": float, "str": str, "tuple[int, ...]": listing(whole_number),
            "tuple[float, ...]": listing(float), "int | None": optional(whole_number),
            "float | None": optional(float), "str | None": optional(str)}


def field_docs(cls) -> dict[str, str]:
    """Each field's ``#:`` comment (joined lines), read from the source of ``cls`` and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        pending: list[str] = []
        for line in inspect.getsource(klass).splitlines():
            stripped = line.strip()
            if stripped.startswith("#:"):
                pending.append(stripped[2:].strip())
            elif m := re.match(r"(\w+)\s*:", stripped):
                if pending:
                    docs[m.group(1)] = " ".join(pending)
                pending = []
            else:
                pending = []
    return docs


def add_flags(parser, cls, *, shown: Any = None, exclude: tuple[str, ...] = ()) -> None:
    """One flag per field of dataclass ``cls`` (not in ``exclude``), defaulting to None so that
    :func:`overrides` tells what was given; ``shown``: an instance whose values the help names
    as the defaults."""
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude or f.metadata.get("flag") is False:
            continue
        name = "--" + f.metadata.get("flag", f.name).replace("_", "-")
        help_ = f.metadata.get("help") or docs.get(f.name, "")
        default = getattr(shown, f.name) if shown is not None else None
        if default is not None and default != ():
            text = ",".join(map(str, default)) if isinstance(default, tuple) else default
            help_ = f"{help_} (default {text})"
        if f.type == "bool":
            parser.add_argument(name, dest=f.name, action=argparse.BooleanOptionalAction, help=help_)
            continue
        parse = f.metadata.get("parse") or _PARSERS[f.type]
        parser.add_argument(name, dest=f.name, type=parse, choices=f.metadata.get("choices"), help=help_)


def overrides(cls, args) -> dict[str, Any]:
    """The fields of ``cls`` given on the command line (flags added with ``defaults=None``)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if getattr(args, f.name, None) is not None}


#: names ``Recipe`` shares with :class:`TrainSettings` (the settings a user is expected to change)
RECIPE_FIELDS = ("lr", "batch_size", "dtype", "b_dec_init", "input_norm", "input_norm_power", "lr_decay_fraction",
                 "adam_beta1")


@dataclass(frozen=True)
class TrainSettings:
    """What ``saescope train`` and ``saescope run`` share: what to train, for how long, how."""

    #: site selection, e.g. 'all', 'resid_post@0-5', 'layer_12/attn_z'
    sites: str = "all"
    #: SAE architecture: jumprelu, relu, topk or batchtopk
    architecture: str = field(default="jumprelu", metadata={"flag": "arch"})
    #: SAE widths, e.g. 4096,16k
    widths: tuple[int, ...] = field(default=(16_384,), metadata={"parse": listing(width)})
    #: λ sweep (jumprelu, relu): several L0s per site
    sparsity_coefficients: tuple[float, ...] = field(default=(1e-3,), metadata={"flag": "l0_coefficients"})
    #: k sweep (topk, batchtopk): latents per token
    ks: tuple[int, ...] = field(default=(), metadata={"flag": "k"})
    #: training tokens per SAE (saescope train from a store: default the whole store once)
    train_tokens: int | None = field(default=None, metadata={"flag": "tokens"})
    #: tokens per sequence
    seq_len: int = 1024
    #: activations per training step
    batch_size: int = 4_096
    #: learning rate (the paper's 7e-5 suits billions of tokens; short runs need a larger one)
    lr: float = 7e-5
    #: training precision: float32 (the paper) or bfloat16 autocast with fp32 weights
    dtype: str = field(default="float32", metadata={"choices": ("float32", "bfloat16")})
    #: b_dec at step 0: zeros (the paper) or mean (the first batch's mean: short runs)
    b_dec_init: str = field(default="zeros", metadata={"choices": ("zeros", "mean")})
    #: input map folded into the release: scalar (the paper's C), centred (C about the mean) or
    #: diagonal (per dimension; for massive dimensions such as Gemma 3's)
    input_norm: str = field(default="scalar", metadata={"choices": ("scalar", "centred", "diagonal")})
    #: diagonal input map only: divide dimension d by σ_d to this power (1: standardise)
    input_norm_power: float = 1.0
    #: cosine lr decay to 0 over this final fraction of the run (0: none, the paper)
    lr_decay_fraction: float = 0.0
    #: Adam β1 (the paper: 0)
    adam_beta1: float = 0.0
    #: initialisation, data-order and corpus-split seed
    seed: int = 0
    #: cpu, cuda, cuda:1, ... or auto (cuda if available); changes no result
    device: str = "auto"
    #: steps between checkpoints; changes no result
    checkpoint_every: int = 1_000

    def recipe_overrides(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in RECIPE_FIELDS}
