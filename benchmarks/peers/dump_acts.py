"""Dump an saescope activation store to one shuffled float32 ``.npy`` per site, for the peer
libraries' training scripts (train_saelens.py, train_sparsify.py).

Runs in the main environment (saescope importable)::

    python3 benchmarks/peers/dump_acts.py --store /work/data/l6/store --out /work/data/l6/acts \
        [--sites all] [--seed 0] [--force]

writes ``OUT/<layer>.<kind>.npy`` (e.g. ``layer_6.resid_post.npy``, shape (n_tokens, d_in)),
every site permuted by the *same* permutation ``np.random.default_rng(seed).permutation(n)``,
so row ``i`` of every file is the same token; ``OUT/order.npy`` (int64) gives the store row of
each output row (index ``tokens.safetensors`` with it for token ids, positions, documents), and
``OUT/dump.json`` the provenance.  Shards are read with saescope's ``ActivationStore.read``
(SHA-256 checked).  A site whose file exists from the same store and seed is skipped unless
``--force``.  Memory: one site's float32 rows (1 GiB for 262,144 x 1,024).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from saescope.sites import Site
from saescope.activations.store import ActivationStore


def site_file(site: Site) -> str:
    return site.name.replace("/", ".") + ".npy"


def dump_site(store: ActivationStore, site: Site, order: np.ndarray, path: Path, chunk: int = 16384) -> None:
    import torch

    n, d = store.n_tokens, store.d_in[site]
    x = torch.empty(n, d, dtype=torch.float32)
    for index, group in enumerate(store.shards):
        a = group["row_start"]
        store.read(site, index, out=x[a : a + group["rows"]])
    x = x.numpy()
    tmp = path.with_name(path.name + ".tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, d))
    for a in range(0, n, chunk):
        out[a : a + chunk] = x[order[a : a + chunk]]
    out.flush()
    del out
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True, help="saescope activation store (…/store)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--sites", default="all", help="'all' or comma-separated names like layer_6/mlp_out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rewrite files that exist")
    args = ap.parse_args(argv)

    store = ActivationStore(args.store)
    store.require_complete()
    if store.dtype != "float32":
        print(f"note: store dtype {store.dtype}; rows are written as float32")
    rows = sum(g["rows"] for g in store.shards)
    if rows != store.n_tokens:
        raise SystemExit(f"store lists {rows} rows in its shards but n_tokens = {store.n_tokens}")
    sites = store.sites if args.sites == "all" else [Site.parse(s) for s in args.sites.split(",")]
    missing = [s.name for s in sites if s not in store.d_in]
    if missing:
        raise SystemExit(f"sites not in {args.store}: {', '.join(missing)}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(args.seed).permutation(store.n_tokens).astype(np.int64)
    key = {"store": str(Path(args.store).resolve()), "tokens_sha256": store.manifest["tokens_sha256"],
           "n_tokens": store.n_tokens, "seed": args.seed}
    meta_path = out / "dump.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    same = {k: meta.get(k) for k in key} == key
    if not same:
        meta = {**key, "order": "order.npy: store row of each output row", "sites": {}}
    np.save(out / "order.npy", order)
    for site in sites:
        path = out / site_file(site)
        if same and path.exists() and site.name in meta["sites"] and not args.force:
            print(f"{path}: exists (same store and seed), skipped")
            continue
        t0 = time.perf_counter()
        dump_site(store, site, order, path)
        meta["sites"][site.name] = {"file": path.name, "shape": [store.n_tokens, store.d_in[site]]}
        meta_path.write_text(json.dumps(meta, indent=1))
        print(f"{path}: ({store.n_tokens}, {store.d_in[site]}) float32 in {time.perf_counter() - t0:.1f} s",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
