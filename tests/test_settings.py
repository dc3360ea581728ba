"""Flags derived from settings dataclasses: a list flag given twice adds to its list, so
``--kind-k attn_z=85 --kind-k mlp_out=140`` keeps both (argparse alone keeps only the last)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from saescope.cli import build_parser
from saescope.settings import add_flags, kind_value, kind_values, listing, overrides, value_at, whole_number
from saescope.sites import Site


@dataclass(frozen=True)
class _Toy:
    #: a list
    sizes: tuple[int, ...] = field(default=(1,), metadata={"parse": listing(whole_number)})
    #: per kind
    kind_ks: tuple[str, ...] = field(default=(), metadata={"parse": listing(kind_value)})
    #: a scalar
    seed: int = 0


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_flags(parser, _Toy)
    return overrides(_Toy, parser.parse_args(argv))


def test_repeated_list_flag_accumulates():
    assert _parse(["--kind-ks", "attn_z=85", "--kind-ks", "mlp_out=140"]) == {"kind_ks": ("attn_z=85", "mlp_out=140")}
    assert _parse(["--sizes", "2,3", "--sizes", "4"]) == {"sizes": (2, 3, 4)}
    assert _parse(["--sizes", "5"]) == {"sizes": (5,)}
    assert _parse([]) == {}  # not given: no override, the dataclass default stands


def test_repeated_scalar_flag_is_last_wins():
    assert _parse(["--seed", "1", "--seed", "2"]) == {"seed": 2}


def test_run_kind_k_twice_keeps_both_and_a_kind_given_twice_is_refused():
    args = build_parser().parse_args(["run", "--out", "x", "--kind-k", "attn_z=85", "--kind-k", "mlp_out=140"])
    assert args.kind_ks == ("attn_z=85", "mlp_out=140")
    args = build_parser().parse_args(["run", "--out", "x", "--kind-k", "mlp_out=100", "--kind-k", "mlp_out=140"])
    with pytest.raises(ValueError, match="site kind mlp_out given two values"):
        kind_values(args.kind_ks)


def test_run_per_kind_flags_change_only_the_kinds_they_name():
    from saescope.presets import get_preset

    preset = get_preset("default")
    assert dict(i.split("=") for i in preset.kind_splits) == {"mlp_out": "2", "resid_post": "2"}
    cfg = preset.overridden(kind_splits=("mlp_out=4",), kind_ks=("resid_post=90",))
    assert sorted(cfg.kind_splits) == ["mlp_out=4", "resid_post=2"]
    assert sorted(cfg.kind_ks) == sorted([*preset.kind_ks, "resid_post=90"])
    assert preset.overridden(kind_splits=("resid_post=1",)).kind_splits == ("mlp_out=2", "resid_post=1")
    assert preset.overridden(seed=3).kind_splits == preset.kind_splits  # other settings: plain replace
    with pytest.raises(ValueError, match="site kind mlp_out given two values"):
        preset.overridden(kind_ks=("mlp_out=100", "mlp_out=150"))


def test_a_value_by_layer_overrides_its_kinds_and_overlaps_are_refused():
    """``mlp_out@12-17=5`` beside ``mlp_out=3``: the layers it names take 5, the kind's other
    layers 3, other kinds the default; two terms naming one layer of a kind are refused."""
    assert kind_value(" mlp_out@12-17 =05") == "mlp_out@12-17=5"
    values = kind_values(("mlp_out=3", "mlp_out@12-17:5=5", "attn_z@0=2"))
    at = {(layer, kind): value_at(values, Site(layer, kind)) for layer in (0, 11, 12, 13, 17) for kind in
          ("mlp_out", "attn_z", "resid_post")}
    assert [at[(layer, "mlp_out")] for layer in (0, 11, 12, 13, 17)] == [3, 3, 5, 3, 5]
    assert [at[(layer, "attn_z")] for layer in (0, 11)] == [2, 1]
    assert at[(13, "resid_post")] == 1 and value_at(values, Site(13, "resid_post"), 0) == 0
    with pytest.raises(ValueError, match="mlp_out@12-17 and mlp_out@13 both name layer 13 of mlp_out"):
        kind_values(("mlp_out@12-17=4", "mlp_out@13=5"))
    with pytest.raises(ValueError, match="sites mlp_out@3 given two values"):
        kind_values(("mlp_out@3=4", "mlp_out@3=5"))
    for bad in ("mlp_out@=4", "mlp_out@5-2=4", "mlp_out@x=4", "noise@3=2", "mlp_out@3"):
        with pytest.raises(argparse.ArgumentTypeError):
            kind_value(bad)
    args = build_parser().parse_args(["run", "--out", "x", "--kind-epochs", "mlp_out@13=5"])
    assert args.kind_epochs == ("mlp_out@13=5",)


def test_run_a_kind_term_replaces_the_presets_layer_terms_of_that_kind():
    from saescope.presets import get_preset

    preset = get_preset("default").replace(kind_epochs=("mlp_out=3", "mlp_out@13=6", "attn_z@2-4=2"))
    assert preset.overridden(kind_epochs=("mlp_out=1",)).kind_epochs == ("attn_z@2-4=2", "mlp_out=1")
    assert preset.overridden(kind_epochs=("mlp_out@12-14=5",)).kind_epochs == \
        ("mlp_out=3", "attn_z@2-4=2", "mlp_out@12-14=5")
    assert preset.overridden(kind_epochs=("attn_z@5=3",)).kind_epochs == \
        ("mlp_out=3", "mlp_out@13=6", "attn_z@2-4=2", "attn_z@5=3")
