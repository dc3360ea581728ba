"""Feature-browser figures: time to build the feature data, its size, and latent-card latency.

    python benchmarks/features.py --run RUN                 # a run with RUN/release (e.g. `saescope run --preset quick`)
    python benchmarks/features.py --synthetic               # random JumpReLU SAEs on Gemma 3 270M, quick-preset shape

``--synthetic`` stands in for the quick preset when no trained run is at hand: 54 sites x
``--per-site`` SAEs of ``--width`` latents, thresholds set so each latent fires on ~2% of tokens.
Prints: collection time (model pass, logit effects, writing), database size, card latency over
HTTP (p50/p95 of random latents, server + JSON), and, if Chromium is installed, the time from a
click to a rendered card in the real page.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path


def synthetic_saes(model, tokenizer, corpus, per_site: int, width: int, device: str):
    import torch

    from saescope.sae.base import SAEConfig
    from saescope.sae.jumprelu import JumpReLUSAE
    from saescope.sites import SITE_KINDS, Site, capture, n_layers, site_width

    sites = [Site(layer, kind) for layer in range(n_layers(model)) for kind in SITE_KINDS]
    calib = capture(model, sites, torch.as_tensor(corpus.input_ids[:2], device=device))
    saes = {}
    g = torch.Generator().manual_seed(0)
    for site in sites:
        x = calib[site].reshape(-1, calib[site].shape[-1])[1:].float()
        for i in range(per_site):
            d_in = site_width(model, site)
            sae = JumpReLUSAE(SAEConfig(d_in=d_in, d_sae=width, threshold_init=1.0)).to(device)
            with torch.no_grad():
                W = torch.randn(width, d_in, generator=g).to(device)
                sae.W_dec.copy_(W / W.norm(dim=1, keepdim=True))
                sae.W_enc.copy_(sae.W_dec.T)
                sae.fold_input_scale(1.0)
                sae.threshold.copy_((x @ sae.W_enc).quantile(0.98, dim=0).clamp_min(1e-3))
            saes[f"{site.kind}/layer_{site.layer}/width_{width}/average_l0_{i}"] = (site, sae)
    return saes


def card_latency(db_path: Path, n: int = 200) -> tuple[float, float, int, int]:
    """Serve the database; time ``n`` random latent-card GETs.  Returns p50, p95 (ms), bytes, sae."""
    import logging

    from werkzeug.serving import make_server

    from saescope.features.server import create_app

    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    app = create_app(db_path)
    saes = app.config["store"].saes()
    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_port}"
    rng = random.Random(0)
    times, size = [], 0
    for _ in range(n):
        s = rng.choice(saes)
        t0 = time.perf_counter()
        with urllib.request.urlopen(f"{base}/api/sae/{s['sae']}/latent/{rng.randrange(s['d_sae'])}") as r:
            size = max(size, len(r.read()))
        times.append(1000 * (time.perf_counter() - t0))
    times.sort()
    page = browser_card_ms(base, saes[len(saes) // 2]["sae"])
    httpd.shutdown()
    return statistics.median(times), times[int(0.95 * len(times))], size, page


def browser_card_ms(base: str, sae: int):
    """Click-to-rendered time of one card in headless Chromium, or None without a browser."""
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    profile = tempfile.mkdtemp()
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    try:
        t0 = time.perf_counter()
        driver.get(f"{base}/#sae={sae}&latent=7")
        WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.body.dataset.cardMs"))
        first_page = 1000 * (time.perf_counter() - t0)
        clicks = []
        for latent in (11, 123, 200, 301, 450):
            driver.execute_script("document.body.dataset.cardMs = ''; showLatent(arguments[0]);", latent)
            WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.body.dataset.cardMs"))
            clicks.append(float(driver.execute_script("return document.body.dataset.cardMs")))
        return first_page, statistics.median(clicks)
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a run folder with release/")
    parser.add_argument("--synthetic", action="store_true", help="random SAEs on Gemma 3 270M instead")
    parser.add_argument("--per-site", type=int, default=2, help="synthetic SAEs per site (quick preset: 2)")
    parser.add_argument("--width", type=int, default=512, help="synthetic SAE width (quick preset: 512)")
    parser.add_argument("--tokens", type=int, default=4096, help="feature tokens (quick preset: 4096)")
    parser.add_argument("--device", default="cuda" if shutil.which("nvidia-smi") else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="where to write features (default: a temp dir)")
    args = parser.parse_args()
    if bool(args.run) == args.synthetic:
        parser.error("give --run RUN or --synthetic")

    from saescope.features.collect import (
        FeatureConfig,
        collect_features,
        first_tokens,
        load_release_saes,
    )
    from saescope.features.store import FeatureStore
    from saescope.models import load_model
    from saescope.tokens import load_corpus

    t0 = time.perf_counter()
    if args.run:
        saes, models = load_release_saes(args.run / "release", device=args.device)
        model_name = models.pop() if len(models) == 1 else "gemma-3-270m"
    else:
        model_name = "gemma-3-270m"
    model, tokenizer = load_model(model_name, device=args.device)
    corpus = first_tokens(load_corpus("wiki-vital", tokenizer, seq_len=1024, max_tokens=args.tokens, split="heldout"), args.tokens)
    if args.synthetic:
        saes = synthetic_saes(model, tokenizer, corpus, args.per_site, args.width, args.device)
    print(f"setup: {len(saes)} SAEs, {corpus.n_tokens} tokens, model {model_name} on {args.device}: {time.perf_counter() - t0:.1f}s")

    out = args.out or Path(tempfile.mkdtemp()) / "features"
    t0 = time.perf_counter()
    path = collect_features(model, tokenizer, corpus, saes, out, FeatureConfig(model_name=model_name, progress=False))
    total = time.perf_counter() - t0
    timings = FeatureStore(path).meta["timings"]
    n_latents = sum(sae.cfg.d_sae for _, sae in saes.values())
    print(f"collect: {total:.1f}s total (model pass + collectors {timings['pass_s']:.1f}s, logit effects "
          f"{timings['logits_s']:.1f}s, writing {timings['write_s']:.1f}s) for {n_latents} latents")
    print(f"size: {path.stat().st_size / 2**20:.1f} MiB ({path.stat().st_size / n_latents:.0f} bytes per latent)")
    p50, p95, size, page = card_latency(path)
    print(f"card over HTTP: p50 {p50:.1f} ms, p95 {p95:.1f} ms, up to {size / 1024:.1f} KiB of JSON")
    if page:
        print(f"in Chromium: first page load to rendered card {page[0]:.0f} ms; later cards {page[1]:.1f} ms (fetch + render)")
    else:
        print("in Chromium: skipped (no chromium/chromedriver)")


if __name__ == "__main__":
    main()
