"""Flags derived from settings dataclasses: a list flag given twice adds to its list, so
``--kind-k attn_z=85 --kind-k mlp_out=140`` keeps both (argparse alone keeps only the last)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from saescope.cli import build_parser
from saescope.settings import add_flags, kind_value, kind_values, listing, overrides, whole_number


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
