"""Evaluation cost on the embedded Gemma 3 270M, per part, and the estimate for a whole release.

    python benchmarks/eval.py                                  # 2 x 256 tokens, CPU
    python benchmarks/eval.py --tokens 8192 --seq-len 1024 --device cuda

Random JumpReLU SAEs (``--width`` latents) stand in for trained ones: costs do not depend on
the weights.  Measures, on the same batch:

* the reconstruction pass: one forward (stopped after the last layer, no head) with every
  site's SAEs observing — ``--saes-per-site`` SAEs at each of the 54 sites;
* the clean pass for loss metrics: a full forward plus the clean reference (head, softmax, pᵀW);
* one spliced forward (and its CE/KL) at a shallow, a middle and the last layer, per kind;
* the vocabulary head with its log-sum-exp alone.

Then estimates ``saescope eval`` on ``--plan-tokens`` tokens with loss metrics on
``--plan-loss-tokens`` of them, with and without zero ablation.  Timings on a shared machine are
noise; run it on a quiet one.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=512, help="tokens per measured batch")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--saes-per-site", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--plan-tokens", type=int, default=8192)
    p.add_argument("--plan-loss-tokens", type=int, default=8192)
    p.add_argument("--chunks", default="128,512",
                   help="scored tokens per head chunk to compare (EvalConfig.chunk_tokens; comma-separated)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the chunk comparison")
    args = p.parse_args()

    import numpy as np
    import torch

    from saescope.evaluate.batch import Accumulators, Batch, ZeroHook, position_bins, scored_positions
    from saescope.forward import lm_logits
    from saescope.evaluate.splice import SpliceHook
    from saescope.models import load_model
    from saescope.sae.base import SAEConfig
    from saescope.sae.jumprelu import JumpReLUSAE
    from saescope.sites import SITE_KINDS, Site, n_layers, site_width
    from saescope.tokens import load_corpus

    model, tokenizer = load_model("gemma-3-270m", device=args.device)
    corpus = load_corpus("wiki-vital", tokenizer, seq_len=args.seq_len, max_tokens=args.tokens, split="heldout")
    rows = np.arange(len(corpus))
    n_tok = corpus.input_ids.size
    L = n_layers(model)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(f"Gemma 3 270M on {args.device}, {torch.get_num_threads()} threads; batch {n_tok} tokens "
          f"({len(corpus)} x {args.seq_len}); SAE width {args.width}")

    def timed(fn, repeats=2):
        fn()  # warm-up
        sync()
        t = time.perf_counter()
        for _ in range(repeats):
            out = fn()
        sync()
        return (time.perf_counter() - t) / repeats, out

    def sae_for(site):
        sae = JumpReLUSAE(SAEConfig(d_in=site_width(model, site), d_sae=args.width, threshold_init=0.01))
        sae.fold_input_scale(1.0)
        return sae.to(args.device)

    sites = [Site(layer, kind) for layer in range(L) for kind in SITE_KINDS]
    observed = {s: [(sae, Accumulators(sae, len(corpus.subsets) + 1, len(position_bins(args.seq_len)), args.device)) for sae in (sae_for(s) for _ in range(args.saes_per_site))]
                for s in sites}
    scored = scored_positions(corpus)

    def recon_pass():
        Batch(model, corpus, rows, scored).observe(observed, with_loss=False, chunk=256)

    t_recon, _ = timed(recon_pass)
    print(f"reconstruction pass, {len(sites) * args.saes_per_site} SAEs: {t_recon:.2f}s = "
          f"{t_recon / n_tok * 1e3:.2f} ms/token")

    probe = {Site(layer, kind) for layer in sorted({1, L // 2, L - 1}) for kind in SITE_KINDS}
    batch = Batch(model, corpus, rows, scored)
    t_clean, _ = timed(lambda: batch.observe({s: [] for s in probe}, with_loss=True, chunk=256))
    hidden_MD = torch.randn(int(scored.sum()), model.config.hidden_size, device=args.device)
    t_head, _ = timed(lambda: [torch.logsumexp(lm_logits(model, hidden_MD[s:s + 256]), -1)
                               for s in range(0, len(hidden_MD), 256)])
    print(f"clean pass for loss metrics: {t_clean:.2f}s = {t_clean / n_tok * 1e3:.2f} ms/token "
          f"(head + logsumexp alone {t_head / n_tok * 1e3:.2f} ms/token)")

    # the head's chunk size, side by side on the same scored rows: one CleanReference and one score
    from saescope.evaluate.lm_scores import CleanReference
    from saescope.forward import clean_forward

    with torch.no_grad():  # the real final hidden states: the softmax's speed depends on the logits
        real_MD = clean_forward(model, batch.ids_BT, set())[0][batch.scored_BT]
    targets_M = batch.next_token_M
    chunks = [int(c) for c in args.chunks.split(",")]
    per_chunk: dict[int, list[float]] = {c: [] for c in chunks}
    for _ in range(args.rounds):
        for c in chunks:
            t = time.perf_counter()
            CleanReference(model, real_MD, targets_M, c).score(real_MD)
            sync()
            per_chunk[c].append((time.perf_counter() - t) / len(real_MD) / 2 * 1e3)
    for c, ms in per_chunk.items():
        print(f"head chunk {c:5d} scored tokens: {min(ms):.2f} / {np.median(ms):.2f} / {max(ms):.2f} ms "
              f"per scored token per pass (min / median / max of {args.rounds} rounds)")

    spliced = {}
    for site in sorted(probe):
        seconds, _ = timed(lambda site=site: batch.run(site, SpliceHook(sae_for(site), record=False)))
        spliced[site] = seconds
        print(f"spliced forward {site.name:22s} {seconds:.2f}s = {seconds / n_tok * 1e3:.2f} ms/token")
    t_zero, _ = timed(lambda: batch.run(Site(L // 2, "mlp_out"), ZeroHook(skip_bos=True)))
    print(f"zero-ablation forward layer_{L // 2}/mlp_out: {t_zero / n_tok * 1e3:.2f} ms/token")

    # a forward from layer l costs about a + b·(L − l): fit on the measured depths
    layers = sorted({s.layer for s in probe})
    mean = {layer: np.mean([v for s, v in spliced.items() if s.layer == layer]) for layer in layers}
    b, a = np.polyfit([L - layer for layer in layers], [mean[layer] for layer in layers], 1)
    per_site_sum = sum(a + b * (L - layer) for layer in range(L)) * len(SITE_KINDS)  # one forward per site
    loss_scale = args.plan_loss_tokens / n_tok
    recon = t_recon * args.plan_tokens / n_tok
    clean = t_clean * loss_scale
    saes = per_site_sum * args.saes_per_site * loss_scale
    zero = per_site_sum * loss_scale
    print(f"\nestimate: {len(sites) * args.saes_per_site} SAEs, {args.plan_tokens} tokens, loss metrics on "
          f"{args.plan_loss_tokens}: reconstruction {recon:.0f}s + clean {clean:.0f}s + spliced {saes:.0f}s "
          f"+ zero ablation {zero:.0f}s = {recon + clean + saes + zero:.0f}s "
          f"({recon + clean + saes:.0f}s without zero ablation)")


if __name__ == "__main__":
    main()
