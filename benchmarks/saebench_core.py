"""SAEBench's core metrics of released SAEs: saescope's ``saebench`` block beside SAELens's own
evaluation (``sae_lens.evals.run_evals``, in its environment), same SAE, weights and tokens.

    python benchmarks/saebench_core.py                            # layer-6 resid_post of /work/runs/d3
    python benchmarks/saebench_core.py --release RUN/release --sae mlp_out/layer_6/width_2k/average_l0_100

Each SAE folder is copied (the release is only read), exported to SAELens's format and evaluated by
both on the same held-out rows of ``--corpus`` (``--rows`` x ``--seq-len``: SAEBench's default
context is 128; rows with padding are dropped).  SAELens sees the rows through a stand-in for its
ActivationsStore (scripts/saelens_core_eval.py).  saescope runs twice: with ``--zero-ablate-bos``
(SAELens's zero ablation) and with its default (BOS kept clean in the ablation).  Prints one
markdown table per SAE.  Needs the SAELens environment (scripts/peer-envs.sh saelens) and the
embedded Gemma 3 270M (or ``--model``); CPU minutes, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--release", type=Path, default=Path("/work/runs/d3/release"))
    p.add_argument("--sae", action="append", help="SAE folder relative to --release (repeatable; "
                   "default resid_post/layer_6/width_2k/average_l0_100)")
    p.add_argument("--model", default="gemma-3-270m", help="saescope model name or folder")
    p.add_argument("--official-name", default="google/gemma-3-270m", help="TransformerLens's name for the model")
    p.add_argument("--corpus", default="wiki-vital")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-prompts", type=int, default=4, help="rows per SAELens reconstruction batch")
    p.add_argument("--peers", type=Path, default=Path(os.environ.get("SAESCOPE_PEERS", "/work/peers")))
    args = p.parse_args()
    if args.rows % args.batch_prompts:
        p.error("--rows must be a multiple of --batch-prompts")

    import numpy as np

    from saescope import defaults
    from saescope.evaluate.suite import EvalConfig, evaluate
    from saescope.models import load_model
    from saescope.release.export import export_folder
    from saescope.release.load import read_release_folder
    from saescope.tokens import TokenizedCorpus, load_corpus

    python = args.peers / "saelens" / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"no SAELens environment at {python} (bash scripts/peer-envs.sh saelens)")
    names = args.sae or ["resid_post/layer_6/width_2k/average_l0_100"]
    model_folder = defaults.gemma_270m_folder() if args.model == "gemma-3-270m" else Path(args.model)
    model, tokenizer = load_model(args.model)
    special = sorted({t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
                      if t is not None})
    full = load_corpus(args.corpus, tokenizer, seq_len=args.seq_len, max_tokens=args.rows * args.seq_len,
                       split="heldout")
    whole = ~np.isin(full.input_ids, [tokenizer.pad_token_id]).any(1)  # rows without padding
    pick = np.flatnonzero(whole)[: args.rows]
    if len(pick) < args.rows:
        raise SystemExit(f"only {len(pick)} unpadded rows; lower --rows")
    corpus = TokenizedCorpus(*(a[pick] for a in (full.input_ids, full.doc_ids, full.subset_ids, full.keep_mask)),
                             full.subsets, full.name, full.split)
    n_eos = int((corpus.input_ids[:, 1:] == tokenizer.eos_token_id).sum())

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        np.save(tmp / "tokens.npy", corpus.input_ids)
        saes, folders = {}, {}
        for name in names:
            copy = tmp / "release" / name
            shutil.copytree(args.release / name, copy)
            released = read_release_folder(copy, tmp / "release")
            saes[name] = (released.site, released.sae)
            folders[name] = str(export_folder(copy, tmp / "saelens" / name, tmp / "release"))
        spec = {"model": str(model_folder), "official_name": args.official_name, "tokens": str(tmp / "tokens.npy"),
                "special": special, "batch_prompts": args.batch_prompts, "saes": list(folders.values())}
        (tmp / "spec.json").write_text(json.dumps(spec))
        t0 = time.time()
        run = subprocess.run([str(python), str(REPO / "scripts" / "saelens_core_eval.py"), str(tmp / "spec.json")],
                             capture_output=True, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        if run.returncode:
            raise SystemExit(run.stderr[-3000:])
        theirs_all = json.loads(run.stdout.strip().splitlines()[-1])
        t_saelens = time.time() - t0
        t0 = time.time()
        field = evaluate(model, corpus, saes, EvalConfig(zero_ablate_bos=True, progress=False))["saes"]
        default = evaluate(model, corpus, saes, EvalConfig(progress=False))["saes"]
        t_saescope = time.time() - t0

    print(f"{args.model} (TransformerLens logit gap to HF {theirs_all['_info']['tl_vs_hf_max_logit_gap']:.1e}); "
          f"{corpus.name} held-out, {len(corpus)} rows x {args.seq_len} = {corpus.input_ids.size} tokens "
          f"({corpus.n_tokens} kept, {n_eos} EOS inside rows); special tokens {special}; "
          f"SAELens {t_saelens:.0f}s, saescope (two runs) {t_saescope:.0f}s\n")
    for name in names:
        theirs, ours, ours_default = theirs_all[folders[name]], field[name]["saebench"], default[name]["saebench"]
        print(f"### {name} ({theirs['hook_name']})\n")
        print("| category | metric | SAELens run_evals | saescope --zero-ablate-bos | rel. diff | saescope default |")
        print("|---|---|---:|---:|---:|---:|")
        for category, figures in ours.items():
            if category == "token_stats":
                continue
            for key, value in figures.items():
                got = theirs.get(category, {}).get(key, float("nan"))
                rel = abs(value - got) / max(abs(got), 1e-12)
                print(f"| {category} | {key} | {got:.6g} | {value:.6g} | {rel:.1e} | {ours_default[category][key]:.6g} |")
        stats = ours["token_stats"]
        kept = corpus.keep_mask
        print(f"\nPositions: SAELens KL over {int(kept.sum())} non-special positions (each row's last included), "
              f"CE over {int(kept[:, :-1].sum())}; saescope KL and CE over {stats['total_tokens_eval_reconstruction']} "
              f"(positions that predict a next token), reconstruction over {stats['total_tokens_eval_sparsity_variance']} "
              f"(both).\n")

if __name__ == "__main__":
    main()
