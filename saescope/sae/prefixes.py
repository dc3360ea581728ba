"""Matryoshka prefixes: the nested dictionary widths m₁ < m₂ < … < F of a Matryoshka SAE, whose
first mₖ latents must each reconstruct the input on their own (Bussmann et al. 2025; Gemma Scope
2 trains its SAEs this way).  Shared by :mod:`saescope.sae.matryoshka_jumprelu` and
:mod:`saescope.sae.matryoshka_batchtopk`."""

from __future__ import annotations


def default_prefixes(d_sae: int) -> tuple[int, ...]:
    """F/16 and F/4 (then F itself): three nested dictionaries, each 4× the last."""
    return tuple(m for m in (d_sae // 16, d_sae // 4) if 1 <= m < d_sae)


def check_prefixes(prefixes, d_sae: int) -> tuple[int, ...]:
    """The prefix widths below ``d_sae`` as a tuple (``()``: :func:`default_prefixes`); a last
    entry equal to ``d_sae`` is allowed and dropped.  Raises ValueError unless they are whole
    numbers, strictly increasing, within [1, d_sae)."""
    values = tuple(int(m) for m in prefixes)
    if any(int(m) != m for m in prefixes):
        raise ValueError(f"Matryoshka prefixes must be whole numbers, got {list(prefixes)}")
    if values and values[-1] == d_sae:
        values = values[:-1]
    if not values:
        return default_prefixes(d_sae)
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"Matryoshka prefixes must be strictly increasing, got {list(values)}")
    if values[0] < 1 or values[-1] >= d_sae:
        raise ValueError(f"Matryoshka prefixes must lie in [1, d_sae = {d_sae}), got {list(values)}")
    return values


def blocks(prefixes: tuple[int, ...], d_sae: int) -> list[tuple[int, int]]:
    """The latent blocks [0, m₁), [m₁, m₂), …, [m_K, F)."""
    edges = (0, *prefixes, d_sae)
    return list(zip(edges[:-1], edges[1:]))


def prefix_mses(x_BD, parts_BD: list, b_dec_D):
    """Each prefix's reconstruction b_dec + Σ_{j≤k} part_j and its ‖x − x̂ₖ‖² (summed over D, mean
    over B), from each block's decoder output ``parts_BD`` (without b_dec).  Returns
    ``(x̂ of the full width, [mse₁, …, mse_K+1])``: the Matryoshka loss is their sum."""
    x_hat_BD = b_dec_D.expand_as(x_BD)
    mses = []
    for part_BD in parts_BD:
        x_hat_BD = x_hat_BD + part_BD
        mses.append((x_hat_BD - x_BD).pow(2).sum(dim=-1).mean())
    return x_hat_BD, mses
