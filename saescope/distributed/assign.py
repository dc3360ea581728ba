"""Who trains what under site parallelism: SAE specs dealt to ranks by FLOPs.

Pure and deterministic (every rank computes the same answer), so it needs no communication.  A
spec is anything with ``site``, ``d_sae`` and ``name`` (:class:`saescope.train.spec.SAESpec`).
"""

from __future__ import annotations

from saescope.sites import Site

def spec_cost(spec, d_in: int) -> int:
    """FLOPs per token of one training step, up to a constant shared by every SAE: d_in × d_sae
    (the five D×F matrix products of a JumpReLU step are ~10·D·F; other architectures differ by
    a constant factor close to 1)."""
    return d_in * spec.d_sae


def _deal(units: list[tuple[int, tuple, list]], world_size: int) -> tuple[list[list], int]:
    """Longest-processing-time-first: each ``(cost, sort key, items)`` unit, largest first, goes
    to the least-loaded rank.  Returns every rank's items and the busiest rank's load."""
    loads = [0] * world_size
    ranks: list[list] = [[] for _ in range(world_size)]
    for cost, _, items in sorted(units, key=lambda u: (-u[0], u[1])):
        target = min(range(world_size), key=lambda r: (loads[r], r))
        loads[target] += cost
        ranks[target].extend(items)
    return ranks, max(loads)


def assign_specs(specs: list, world_size: int, *, d_in: dict[Site, int],
                 split_sites: str = "auto") -> list[list]:
    """Deal ``specs`` to ``world_size`` ranks, balancing FLOPs (Σ d_in·d_sae per rank).

    ``split_sites``: ``"never"`` keeps all SAEs of a site on one rank (each site's activations
    are read, or received, by one process only); ``"always"`` deals SAEs one by one; ``"auto"``
    (default) keeps sites whole unless splitting them lowers the busiest rank's load by more
    than 10% (e.g. fewer sites than ranks, or one site with a wide λ sweep).  Pure and
    deterministic: every rank computes the same answer.  Each rank's list keeps the input order.
    """
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    if split_sites not in ("auto", "never", "always"):
        raise ValueError(f"split_sites must be auto, never or always, got {split_sites!r}")
    missing = sorted({s.site for s in specs} - set(d_in))
    if missing:
        raise ValueError(f"no input width known for {', '.join(map(str, missing))}")
    order = {s.name: i for i, s in enumerate(specs)}
    by_site: dict[Site, list] = {}
    for spec in specs:
        by_site.setdefault(spec.site, []).append(spec)
    whole = [(sum(spec_cost(s, d_in[site]) for s in group), (site,), group) for site, group in by_site.items()]
    single = [(spec_cost(s, d_in[s.site]), (s.site, s.name), [s]) for s in specs]
    by_whole, load_whole = _deal(whole, world_size)
    if split_sites == "never":
        chosen = by_whole
    else:
        by_single, load_single = _deal(single, world_size)
        chosen = by_single if split_sites == "always" or load_single < 0.9 * load_whole else by_whole
    return [sorted(r, key=lambda s: order[s.name]) for r in chosen]
