"""``saescope harvest``: write the activations of every requested site to an activation store.

One forward pass per batch of sequences captures every site (stopping after the deepest layer
needed, no logits); only tokens that are not BOS, EOS or padding are stored.  The store goes to
``OUT/store``: one folder per site (``layer_12/resid_post/shard_00000.npy`` ...), per-token
metadata (``tokens.safetensors``) and ``manifest.json`` with a SHA-256 per shard.

Relaunching the same command resumes an interrupted harvest at its last finished shard group,
and does nothing once the store is complete.  A folder holding a store of another model, corpus
or site set is refused.

Sites: ``all``; a kind (``resid_post``, ``attn_z``, ``mlp_out``, ``mlp_in``, ``transcoder``);
either with ``@LAYERS`` (``resid_post@6``, ``all@0-5``, ``mlp_out@0-17:2``); or names like
``layer_12/attn_z``; comma-separated.  ``all`` is the three SAE kinds; a transcoder site
(``transcoder@6``) stores the two sites a transcoder trains on, ``layer_6/mlp_in`` and
``layer_6/mlp_out`` (docs/transcoders.md).
"""

from __future__ import annotations

import argparse

import time
from pathlib import Path

from saescope.commands import at_least, positive_int as _int


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "harvest",
        help="write activations of every requested site to an activation store on disk",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="gemma-3-270m",
                   help="model: gemma-3-270m (embedded default), a save_pretrained folder, a .gguf file or a hub id")
    p.add_argument("--corpus", default="wiki-vital",
                   help="corpus: wiki-vital (embedded default), a .txt/.jsonl/.parquet file or folder, hf:<dataset>; "
                        "join with '+'")
    p.add_argument("--sites", default="all", help="site selection (see above; default all)")
    p.add_argument("--tokens", type=_int, default=None,
                   help="kept tokens to harvest (BOS/EOS/padding not counted; default: the whole corpus)")
    p.add_argument("--seq-len", type=at_least(2), default=1024, help="tokens per sequence (default 1024)")
    p.add_argument("--split", choices=("train", "heldout"), default="train",
                   help="document-level split of the corpus (default train)")
    p.add_argument("--seed", type=at_least(0), default=0, help="corpus shuffle / split seed (default 0)")
    p.add_argument("--out", type=Path, required=True, help="run folder; the store is written to OUT/store")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="stored activations: float32 (default, exact) or bfloat16 (half the disk)")
    p.add_argument("--batch-seqs", type=_int, default=4, help="sequences per forward pass (default 4)")
    p.add_argument("--shard-tokens", type=_int, default=2**15,
                   help="tokens per shard file, the unit of resumption (default 32768)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--distributed", action="store_true",
                   help="require a torchrun launch (detected anyway): each rank harvests its share of the shard "
                        "groups on its own GPU into the same store (docs/distributed.md)")
    p.set_defaults(func=run)


def run(args) -> int:
    from saescope.outputs import writable_folder

    writable_folder(args.out)  # before torch: a wrong --out fails at once

    from saescope.distributed.env import resolve_device
    from saescope.activations.harvest import HarvestConfig, harvest
    from saescope.models import load_model
    from saescope.sites import n_layers, select_sites
    from saescope.activations.store import human_bytes
    from saescope.tokens import load_corpus, model_context_length
    from saescope.distributed.env import init_distributed, launched_by_torchrun, shutdown

    device = str(resolve_device(args.device))
    env = None
    if args.distributed or launched_by_torchrun():  # torchrun: one process per GPU, one store
        env = init_distributed(args.device, required=True)
        device = env.device
    model, tokenizer = load_model(args.model, device=device)
    sites = select_sites(args.sites, n_layers(model))
    corpus = load_corpus(
        args.corpus,
        tokenizer,
        seq_len=args.seq_len,
        max_tokens=args.tokens,
        split=args.split,
        seed=args.seed,
        max_context=model_context_length(model),
    )
    cfg = HarvestConfig(
        dtype=args.dtype,
        batch_seqs=args.batch_seqs,
        shard_tokens=args.shard_tokens,
        model_name=args.model,
        progress=not args.no_progress,
    )
    start = time.perf_counter()
    try:
        store = harvest(model, tokenizer, corpus, sites, args.out / "store", cfg, env=env)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        if env is None or str(err).startswith(str(env)):
            raise
        raise RuntimeError(f"{env}: {err}") from err
    finally:
        if env is not None:
            shutdown()
    if env is not None and not env.is_main:
        return 0
    elapsed = time.perf_counter() - start
    size = sum(f["bytes"] for g in store.shards for f in g["files"].values())
    print(
        f"saescope harvest: {store.path}: {len(store.sites)} sites x {store.n_tokens} tokens, "
        f"{human_bytes(size)} ({size / max(1, store.n_tokens):.0f} bytes/token), {elapsed:.1f}s"
    )
    return 0
