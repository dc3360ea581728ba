"""Harvest speed against a bare forward pass, store size, and reader speed.

    python benchmarks/harvest.py                      # Gemma 3 270M, all 54 sites, 16k tokens
    python benchmarks/harvest.py --tokens 4096 --seq-len 512 --device cuda

Prints:
* tokens/s of a bare forward that stops after the last block (``run_to_layer``, no hooks, no
  logits), of a full forward with logits, and of ``harvest`` writing every site to disk (same
  batches; with the writer inline and in a background thread), and the ratio harvest / bare
  forward (target <= 1.15);
* the store's bytes per token;
* batches/s of the shuffled reader at batch 4096 (one site, and every site at once), and of the
  online source for one site.

Timings are only meaningful on a quiet machine: the bare forward is timed before and after the
harvests and the fastest run is the baseline.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from saescope.activations.harvest import HarvestConfig, harvest
from saescope.models import load_model
from saescope.sites import Site, n_layers, run_to_layer, select_sites
from saescope.activations.store import StoreReader, human_bytes
from saescope.activations.online import OnlineSource
from saescope.tokens import load_corpus, model_context_length


def timed_forwards(model, input_ids, batch_seqs: int, *, logits: bool) -> float:
    """Seconds for forwards over every batch (to the last block only, unless ``logits``)."""
    device = next(model.parameters()).device
    last = n_layers(model) - 1
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(input_ids), batch_seqs):
            ids = torch.as_tensor(input_ids[i : i + batch_seqs]).to(device)
            if logits:
                model(input_ids=ids, use_cache=False).logits.sum().item()
            else:
                run_to_layer(model, last, input_ids=ids)
    sync()
    return time.perf_counter() - start


def reader_rate(reader, batch_size: int, n_batches: int) -> tuple[float, float]:
    """(seconds to the first batch, batches/s after it)."""
    start = time.perf_counter()
    it = reader.iter_batches(batch_size, seed=0)
    next(it)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return first, n_batches / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--corpus", default="wiki-vital")
    p.add_argument("--sites", default="all")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-seqs", type=int, default=4)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--device", default="auto")
    p.add_argument("--reader-batches", type=int, default=20)
    p.add_argument("--out", type=Path, default=None, help="where to put the store (default: a temporary folder)")
    args = p.parse_args()

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {device}, torch threads {torch.get_num_threads()}")
    model, tokenizer = load_model(args.model, device=device)
    corpus = load_corpus(
        args.corpus, tokenizer, seq_len=args.seq_len, max_tokens=args.tokens, max_context=model_context_length(model)
    )
    sites = select_sites(args.sites, n_layers(model))
    positions = corpus.input_ids.size
    print(f"{args.model}: {len(sites)} sites; {len(corpus)} sequences x {args.seq_len} = {positions} positions, "
          f"{corpus.n_tokens} kept tokens; batch {args.batch_seqs} sequences")

    timed_forwards(model, corpus.input_ids[: args.batch_seqs], args.batch_seqs, logits=False)  # warm-up
    bare_before = timed_forwards(model, corpus.input_ids, args.batch_seqs, logits=False)
    full = timed_forwards(model, corpus.input_ids, args.batch_seqs, logits=True)

    root = args.out or Path(tempfile.mkdtemp(prefix="saescope-bench-"))
    store_path = root / "store"
    warm = type(corpus)(*(getattr(corpus, f)[:1] for f in ("input_ids", "doc_ids", "subset_ids", "keep_mask")),
                        corpus.subsets, corpus.name)
    harvest(model, tokenizer, warm, sites, root / "warm-up", HarvestConfig(progress=False))  # first-call costs
    shutil.rmtree(root / "warm-up")
    bare_runs = [bare_before]
    harvest_s = {}
    for threaded in (False, True):
        shutil.rmtree(store_path, ignore_errors=True)
        cfg = HarvestConfig(
            dtype=args.dtype, batch_seqs=args.batch_seqs, progress=False, model_name=args.model, writer_thread=threaded
        )
        start = time.perf_counter()
        store = harvest(model, tokenizer, corpus, sites, store_path, cfg)
        harvest_s[threaded] = time.perf_counter() - start
        bare_runs.append(timed_forwards(model, corpus.input_ids, args.batch_seqs, logits=False))
    bare = min(bare_runs)

    print(f"bare forward (to last block, no hooks): {positions / bare:9.0f} positions/s  ({bare:.2f}s; "
          f"runs {', '.join(f'{t:.2f}s' for t in bare_runs)})")
    print(f"full forward with logits:               {positions / full:9.0f} positions/s  ({full:.2f}s)  "
          f"= {full / bare:.2f}x the bare forward")
    for threaded, seconds in harvest_s.items():
        how = "writer thread" if threaded else "inline writer"
        print(f"harvest {len(sites)} sites, {args.dtype}, {how}: {positions / seconds:9.0f} positions/s  "
              f"({seconds:.2f}s; {corpus.n_tokens / seconds:.0f} kept tokens/s)  "
              f"RATIO vs bare forward = {seconds / bare:.3f}  (target <= 1.15)")
    print(f"RATIO harvest (default: writer thread) / bare forward = {harvest_s[True] / bare:.3f}  (target <= 1.15)")

    size = sum(f["bytes"] for g in store.shards for f in g["files"].values())
    print(f"store: {human_bytes(size)}, {size / store.n_tokens:.0f} bytes per token "
          f"({sum(store.d_in.values())} floats per token), {len(store.shards)} shard groups")

    batch = 4096
    one = [Site(n_layers(model) // 2, "resid_post")]
    for label, reader in (
        (f"reader, 1 site ({one[0]})", StoreReader(store_path, sites=one)),
        (f"reader, all {len(sites)} sites", StoreReader(store_path)),
    ):
        n = max(2, args.reader_batches if len(reader.sites) == 1 else args.reader_batches // 5)
        first, rate = reader_rate(reader, batch, n)
        print(f"{label}: batch {batch}: {rate:.1f} batches/s ({rate * batch:.0f} tokens/s); first batch "
              f"{first:.2f}s (incl. checksums, buffer {reader.buffer_tokens} tokens)")
    online = OnlineSource(model, corpus, one, seqs_per_forward=args.batch_seqs, buffer_tokens=16384)
    first, rate = reader_rate(online, batch, 2)
    print(f"online source, 1 site: batch {batch}: {rate:.2f} batches/s ({rate * batch:.0f} tokens/s)")

    if args.out is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
