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
import math
import re
from dataclasses import dataclass, field
from typing import Any


def whole_number(text: str) -> int:
    """Whole numbers written as 20000, 20_000 or 2e4 (not inf or nan: they would fail deep in a run)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value != int(value):
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
    return int(value)


def finite(text: str) -> float:
    """A float that is neither nan nor ±inf (which would train a NaN SAE and exit 0)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def at_least(low: float, kind=whole_number, *, high: float | None = None, below: bool = False):
    """``kind`` within [low, high] (or [low, high) with ``below``): checked while parsing, so
    ``--batch-size 0`` is a usage error instead of a ZeroDivisionError after the model loads."""
    def parse(text: str):
        value = kind(text)
        if value < low or (high is not None and (value >= high if below else value > high)):
            span = f">= {low}" if high is None else f"in [{low}, {high}{')' if below else ']'}"
            raise argparse.ArgumentTypeError(f"must be {span}, got {text!r}")
        return value
    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


#: a count of at least one (tokens, steps, batch sizes, widths)
positive_int = at_least(1)


def width(text: str) -> int:
    """Widths as Gemma Scope names them: 16k = 16384, 1m = 2**20; or plain numbers."""
    t = text.strip().lower()
    for suffix, factor in (("k", 1024), ("m", 2**20)):
        if t.endswith(suffix) and t[:-1].isdigit():
            return int(t[:-1]) * factor
    return positive_int(t)


def listing(kind):
    """A comma-separated list of ``kind`` (argparse ``type=``), as a tuple."""
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(v) for v in text.split(",") if v.strip())
        except argparse.ArgumentTypeError as err:
            raise argparse.ArgumentTypeError(f"in {text!r}: {err}") from None
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of numbers, got {text!r}") from None
    return parse


def positive(kind=finite):
    """``kind`` above zero (a target L0 of 0 or below means nothing)."""
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value
    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def fraction(text: str) -> float:
    """A number strictly between 0 and 1 (a share of tokens)."""
    value = finite(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {text!r}")
    return value


def site_kind(text: str) -> str:
    """One of :data:`SITE_KINDS`."""
    if text.strip() not in SITE_KINDS:
        raise argparse.ArgumentTypeError(f"expected site kinds among {', '.join(SITE_KINDS)}, got {text!r}")
    return text.strip()


def layer_list(spec: str, n_layers: int | None = None) -> list[int]:
    """A layer range as ``--sites`` writes it (``7``, ``0-5``, ``0-17:2``) -> its layers; with
    ``n_layers``, refused past the model's last layer."""
    m = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", spec.strip())
    if not m:
        raise ValueError(f"bad layer range {spec!r}: use '7', '0-5' or '0-17:2'")
    start = int(m.group(1))
    stop = int(m.group(2)) if m.group(2) is not None else start
    step = int(m.group(3)) if m.group(3) is not None else 1
    if step < 1 or stop < start:
        raise ValueError(f"bad layer range {spec!r}")
    if n_layers is not None and stop >= n_layers:
        raise ValueError(f"layer {stop} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    return list(range(start, stop + 1, step))


def kind_value(text: str) -> str:
    """``kind=N`` or ``kind@LAYERS=N`` (a site kind, optionally some of its layers as
    ``--sites`` writes them, and a positive whole number), e.g. ``attn_z=85``,
    ``mlp_out@12-17=5``; kept as written."""
    name, sep, value = text.strip().partition("=")
    kind, at, layers = name.strip().partition("@")
    if not sep or kind not in KNOWN_KINDS:
        raise argparse.ArgumentTypeError(f"expected kind=N or kind@LAYERS=N with a kind among "
                                         f"{', '.join(KNOWN_KINDS)}, got {text!r}")
    if at:
        try:
            layer_list(layers)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None
    positive_int(value)
    return f"{kind}{at}{layers.strip()}={int(value)}"


def kind_values(items) -> dict[str, int]:
    """``('attn_z=85', 'mlp_out@12-17=5', ...)`` -> ``{'attn_z': 85, 'mlp_out@12-17': 5, ...}``
    (each item as :func:`kind_value` checks), refusing two values for one kind or one layer."""
    out: dict[str, int] = {}
    layers_of: dict[str, dict[int, str]] = {}
    for item in items:
        name, _, value = kind_value(item).partition("=")
        if name in out:
            what = "sites" if "@" in name else "site kind"
            raise ValueError(f"{what} {name} given two values ({out[name]} and {value})")
        kind, at, layers = name.partition("@")
        for layer in layer_list(layers) if at else ():
            seen = layers_of.setdefault(kind, {})
            if layer in seen:
                raise ValueError(f"{seen[layer]} and {name} both name layer {layer} of {kind}")
            seen[layer] = name
        out[name] = int(value)
    return out


def value_at(values: dict[str, int], site, default: int = 1) -> int:
    """The value :func:`kind_values` gives ``site`` (a :class:`~saescope.sites.Site`): a term
    naming its layer, else its kind's, else ``default``."""
    for name, value in values.items():
        kind, at, layers = name.partition("@")
        if at and kind == site.kind and site.layer in layer_list(layers):
            return value
    return values.get(site.kind, default)


def check_kind_splits(kind_splits, rows: int, what: str, name: str = "kind_splits") -> dict[str, int]:
    """``kind_values(kind_splits)``, refusing a split that does not divide ``rows`` (``what``
    names them in the message, ``name`` the setting)."""
    splits = kind_values(kind_splits)
    for kind, n in splits.items():
        if rows % n:
            raise ValueError(f"{name} {kind}={n} does not divide {what}")
    return splits


def optional(kind):
    """``kind``, or ``none`` for None."""
    return lambda text: None if text.strip().lower() == "none" else kind(text)


_PARSERS = {"int": whole_number, "float": finite, "str": str, "tuple[int, ...]": listing(whole_number),
            "tuple[float, ...]": listing(finite), "int | None": optional(whole_number),
            "float | None": optional(finite), "str | None": optional(str)}


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
        action = _Extend if f.type.startswith("tuple") else "store"
        parser.add_argument(name, dest=f.name, type=parse, choices=f.metadata.get("choices"), help=help_,
                            action=action)


class _Extend(argparse.Action):
    """A list flag given twice adds to its list (``--kind-k attn_z=85 --kind-k mlp_out=140``)
    instead of argparse's silent last-one-wins."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, (getattr(namespace, self.dest, None) or ()) + tuple(values))


def overrides(cls, args) -> dict[str, Any]:
    """The fields of ``cls`` given on the command line (flags added with ``defaults=None``)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if getattr(args, f.name, None) is not None}


#: the site kinds (saescope.sites documents them); here, torch-free, so ``--kind`` choices and
#: usage errors need no torch import.  SITE_KINDS: Gemma Scope's three SAE sites per layer (what
#: the selection ``all`` means); KNOWN_KINDS adds ``mlp_in`` (the MLP's input, after the pre-MLP
#: norm) and ``transcoder`` (a pair site: it reads ``mlp_in`` and predicts ``mlp_out``)
SITE_KINDS: tuple[str, ...] = ("resid_post", "attn_z", "mlp_out")
KNOWN_KINDS: tuple[str, ...] = SITE_KINDS + ("mlp_in", "transcoder")
#: pair kinds -> (the kind read, the kind predicted), both at the pair's layer
PAIR_KINDS: dict[str, tuple[str, str]] = {"transcoder": ("mlp_in", "mlp_out")}

#: how a release names and writes its folders (saescope.release.gemma_scope_2 has the second)
RELEASE_LAYOUTS: tuple[str, ...] = ("saescope", "gemma-scope-2")

#: names ``Recipe`` shares with :class:`TrainSettings` (the settings a user is expected to change)
RECIPE_FIELDS = ("lr", "batch_size", "kind_splits", "kind_epochs", "dtype", "b_dec_init", "input_norm",
                 "input_norm_power", "fisher_weight", "fisher_tokens", "fisher_kinds", "lr_decay_fraction",
                 "adam_beta1", "threshold_init_mode", "max_frequency", "frequency_coefficient", "refit_tokens")


@dataclass(frozen=True)
class TrainSettings:
    """What ``saescope train`` and ``saescope run`` share: what to train, for how long, how."""

    #: site selection, e.g. 'all' (the three SAE kinds), 'resid_post@0-5', 'layer_12/attn_z',
    #: 'transcoder@0-17' (transcoders: docs/transcoders.md)
    sites: str = "all"
    #: SAE architecture: jumprelu, relu, topk, batchtopk, matryoshka_jumprelu or matryoshka_batchtopk
    #: (transcoder sites: jumprelu or batchtopk, trained as jumprelu_transcoder / batchtopk_transcoder)
    architecture: str = field(default="jumprelu", metadata={"flag": "arch"})
    #: transcoder sites: train skip (affine) transcoders, prediction f·W_dec + b_dec + x·W_skip
    skip_connection: bool = False
    #: SAE widths, e.g. 4096,16k
    widths: tuple[int, ...] = field(default=(16_384,), metadata={"parse": listing(width)})
    #: λ sweep (jumprelu, relu): several L0s per site
    sparsity_coefficients: tuple[float, ...] = field(
        default=(1e-3,), metadata={"flag": "l0_coefficients", "parse": listing(at_least(0, finite))})
    #: k sweep (topk, batchtopk): latents per token
    ks: tuple[int, ...] = field(default=(), metadata={"flag": "k", "parse": listing(positive_int)})
    #: k per site kind (or kind@LAYERS), in place of --k at those sites (kinds differ in how many
    #: latents a token needs), e.g. attn_z=85,mlp_out=120; in run, a preset's other kinds keep theirs
    kind_ks: tuple[str, ...] = field(default=(), metadata={"flag": "kind_k", "parse": listing(kind_value)})
    #: target L0s (jumprelu family): one SAE per target, trained with Gemma Scope 2's
    #: λ·(2/L*)·(L0 − L*)² (λ: the one --l0-coefficients value), e.g. 20,60,150
    target_l0s: tuple[float, ...] = field(default=(), metadata={"flag": "target_l0", "parse": listing(positive())})
    #: Matryoshka nested widths below the SAE width, e.g. 128,512 (default: width/16, width/4)
    prefixes: tuple[int, ...] = field(default=(), metadata={"parse": listing(width)})
    #: high-frequency latent penalty (jumprelu family): penalise latents firing on more than this
    #: share of tokens, e.g. 0.1 (none: off)
    max_frequency: float | None = field(default=None, metadata={"parse": optional(fraction)})
    #: weight of the frequency penalty relative to λ
    frequency_coefficient: float = field(default=1.0, metadata={"parse": at_least(0, finite)})
    #: JumpReLU θ at step 0: fixed (θ₀ = 0.001, the paper) or quantile (target-L0 SAEs fire L* per
    #: token from step 0: θ from the first batch's pre-activation quantiles)
    threshold_init_mode: str = field(default="fixed", metadata={"flag": "threshold_init",
                                                                "choices": ("fixed", "quantile")})
    #: training tokens per SAE (saescope train from a store: default the whole store once)
    train_tokens: int | None = field(default=None, metadata={"flag": "tokens", "parse": optional(positive_int)})
    #: tokens per sequence
    seq_len: int = field(default=1024, metadata={"parse": at_least(2)})
    #: activations per training step
    batch_size: int = field(default=4_096, metadata={"parse": positive_int})
    #: Adam steps per batch at a site kind or kind@LAYERS, e.g. mlp_out=2: its SAEs take each batch as 2 equal
    #: parts (twice the steps on the same tokens, about the same FLOPs); =1 undoes a preset's
    kind_splits: tuple[str, ...] = field(default=(), metadata={"flag": "kind_split", "parse": listing(kind_value)})
    #: passes over the training tokens at a site kind or kind@LAYERS, e.g. mlp_out=3,mlp_out@13=5:
    #: those SAEs go on through more epochs, each reshuffled, while the rest stop; =1 undoes a preset's
    kind_epochs: tuple[str, ...] = field(default=(), metadata={"flag": "kind_epochs", "parse": listing(kind_value)})
    #: learning rate (the paper's 7e-5 suits billions of tokens; short runs need a larger one)
    lr: float = field(default=7e-5, metadata={"parse": at_least(1e-12, finite)})
    #: training precision: float32 (the paper) or bfloat16 autocast with fp32 weights
    dtype: str = field(default="float32", metadata={"choices": ("float32", "bfloat16")})
    #: b_dec at step 0: zeros (the paper) or mean (the first batch's mean: short runs)
    b_dec_init: str = field(default="zeros", metadata={"choices": ("zeros", "mean")})
    #: input map folded into the release: scalar (the paper's C), centred (C about the mean),
    #: diagonal (per dimension; for massive dimensions such as Gemma 3's) or fisher (a full map
    #: weighing each direction by what an error there costs the LM loss; needs the model)
    input_norm: str = field(default="scalar", metadata={"choices": ("scalar", "centred", "diagonal", "fisher")})
    #: diagonal input map (and fisher's diagonal part): divide dimension d by σ_d to this power
    input_norm_power: float = 1.0
    #: fisher input map: the Fisher metric's share of the map (the rest: the diagonal map's)
    fisher_weight: float = field(default=0.5, metadata={"parse": at_least(0, finite, high=1)})
    #: fisher input map: training tokens its Fisher metric is averaged over
    fisher_tokens: int = field(default=4_096, metadata={"parse": positive_int})
    #: fisher input map: the SAE site kinds behind it (the others get the diagonal map)
    fisher_kinds: tuple[str, ...] = field(default=("resid_post", "attn_z", "mlp_out"),
                                          metadata={"parse": listing(site_kind)})
    #: cosine lr decay to 0 over this final fraction of the run (0: none, the paper)
    lr_decay_fraction: float = field(default=0.0, metadata={"parse": at_least(0, finite, high=1)})
    #: after training, refit each SAE's decoder by least squares to its own codes on this many
    #: tokens from the run's start (jumprelu, batchtopk; 0: off, the paper)
    refit_tokens: int = field(default=0, metadata={"parse": at_least(0)})
    #: Adam β1 (the paper: 0)
    adam_beta1: float = field(default=0.0, metadata={"parse": at_least(0, finite, high=1, below=True)})
    #: initialisation, data-order and corpus-split seed
    seed: int = field(default=0, metadata={"parse": at_least(0)})
    #: cpu, cuda, cuda:1, ... or auto (cuda if available); changes no result
    device: str = "auto"
    #: steps between checkpoints; changes no result
    checkpoint_every: int = field(default=1_000, metadata={"parse": positive_int})
    #: release folders: saescope (<kind>/layer_L/width_W/average_l0_K) or gemma-scope-2
    #: (<site>/layer_L_width_W_l0_small|medium|big[_affine], lowercase keys)
    layout: str = field(default="saescope", metadata={"choices": RELEASE_LAYOUTS})

    def recipe_overrides(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in RECIPE_FIELDS}

    def site_rows(self, sites, n_steps: int) -> dict:
        """Rows of the activation stream the trainer reads per site (``n_steps`` batches per
        epoch, ``kind_epochs``): an online source leaves a site out of the epochs past them."""
        epochs = kind_values(self.kind_epochs)
        return {site: n_steps * self.batch_size * value_at(epochs, site) for site in sites}
