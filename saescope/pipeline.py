"""``saescope run``: the whole system as one resumable command.

Stages, in order, each one module's job::

    tokens ──▶ activations (online stream, or a harvested store) ──▶ train (every site × λ × width)
           ──▶ eval (held-out tokens, SAEs spliced in) ──▶ canonical SAE per site ──▶ report ──▶ features

``<out>/run.json`` records the configuration and each finished stage with its wall time.  Running
again on a finished folder changes nothing; on a killed one it resumes: finished stages are
skipped, the harvest and the trainer resume from their own atomic shards and checkpoints.  A
folder made with another configuration is refused, naming the settings that differ.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Iterator

from saescope.corpora import canonical_name
from saescope.errors import IntegrityError, UserError
from saescope.jsonio import read_json, write_json
from saescope.locks import folder_lock
from saescope.presets import RunConfig

STAGES = ("train", "eval", "report", "features")
#: settings that do not change any result, so a resumed run may change them
_RUNTIME_ONLY = {"device", "checkpoint_every"}
#: settings naming a model or corpus, compared as resolved paths
_NAMES = {"model", "corpus", "eval_corpus"}


class RunState:
    """``run.json``: the configuration, the data's fingerprints and the finished stages of one run
    folder.  Written as soon as a run starts (not when training ends), so a killed run relaunched
    with another configuration or other data is refused, not resumed on a mixture."""

    def __init__(self, out: Path, cfg: RunConfig):
        self.path = out / "run.json"
        mine = _canonical(cfg.to_dict())
        self.data: dict = {"config": mine, "data": {}, "stages": {}}
        try:
            previous = read_json(self.path)
        except ValueError as err:
            raise IntegrityError(f"{err}; delete {out} to start the run over") from None
        if previous is not None:
            theirs = _canonical(previous.get("config", {}))
            for f in fields(RunConfig):  # a setting newer than the run folder: it ran at the default
                if f.name not in theirs and f.name in mine and f.default is not MISSING:
                    theirs[f.name] = f.default
            differ = sorted(k for k in set(mine) | set(theirs)
                            if k not in _RUNTIME_ONLY and _norm(mine.get(k)) != _norm(theirs.get(k)))
            if differ:
                detail = "; ".join(f"{k}: {theirs.get(k)!r} there, {mine.get(k)!r} now" for k in differ)
                raise UserError(f"{out} holds a run with another configuration ({detail}); "
                                "use another --out or the same settings")
            self.data["data"] = previous.get("data", {})
            self.data["stages"] = previous.get("stages", {})
        if previous != _as_json(self.data):  # a finished run relaunched changes nothing (tuples read back as lists)
            write_json(self.path, self.data)

    def done(self, stage: str) -> bool:
        return stage in self.data["stages"]

    def check_data(self, what: str, fingerprint: str) -> None:
        """Record the fingerprint of one input (``what``: e.g. ``corpus``) on first sight; refuse
        a relaunch whose input's content changed since (the same name, other data)."""
        seen = self.data["data"].get(what)
        if seen is None:
            self.data["data"][what] = fingerprint
            write_json(self.path, self.data)
        elif seen != fingerprint:
            raise UserError(f"{self.path.parent} holds a run whose {what} had content fingerprint {seen}; the "
                            f"{what} read now has {fingerprint} (its files changed); restore them, or use another --out")

    def finish(self, stage: str, seconds: float, **info) -> None:
        self.data["stages"][stage] = {"seconds": round(seconds, 1), **info}
        write_json(self.path, self.data)


def _as_json(value):
    """``value`` as JSON reads it back: tuples become lists."""
    if isinstance(value, dict):
        return {k: _as_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_json(v) for v in value]
    return value


def _norm(value):
    return list(value) if isinstance(value, tuple) else value


def _canonical(config: dict) -> dict:
    """The configuration with model and corpus paths resolved (one folder, however spelled)."""
    return {k: canonical_name(v) if k in _NAMES and isinstance(v, str) else v for k, v in config.items()}


@contextmanager
def _stage(state: RunState, name: str, log) -> Iterator[dict]:
    info: dict = {}
    log(f"[{name}] ...")
    t0 = time.time()
    yield info
    seconds = time.time() - t0
    state.finish(name, seconds, **info)
    log(f"[{name}] done in {seconds:.0f}s")


def run(cfg: RunConfig, out: str | Path, *, progress: bool = True, log=print) -> dict:
    """Run (or resume) every stage; return ``run.json``'s contents.  The run folder is locked
    meanwhile: a second ``saescope run`` on it is refused, naming this one's pid."""
    out = Path(out)
    with folder_lock(out, "run folder"):
        return _run(cfg, out, progress=progress, log=log)


def _run(cfg: RunConfig, out: Path, *, progress: bool, log) -> dict:
    state = RunState(out, cfg)
    if all(state.done(s) for s in _wanted_stages(cfg)):
        log(f"{out} is complete; nothing to do")
        _summarise(out, state, log)
        return state.data

    from saescope.distributed.env import resolve_device
    from saescope.models import load_model
    from saescope.sites import n_layers, select_sites
    from saescope.tokens import load_corpus, model_context_length

    cfg = cfg.replace(device=str(resolve_device(cfg.device)))  # "auto" -> where it runs (no result changes)
    model, tokenizer = load_model(cfg.model, device=cfg.device)
    context = model_context_length(model)
    sites = select_sites(cfg.sites, n_layers(model))
    release = out / "release"

    # The held-out corpus is read first: a missing corpus should fail in a second, not after training.
    eval_corpus = None
    if not state.done("eval") or (cfg.features and not state.done("features")):
        eval_corpus = load_corpus(cfg.eval_corpus, tokenizer, seq_len=cfg.seq_len, max_tokens=cfg.eval_tokens,
                                  split="heldout", seed=cfg.seed, max_context=context)
        state.check_data("eval_corpus", eval_corpus.fingerprint())

    if not state.done("train"):
        with _stage(state, "train", log) as info:
            corpus = load_corpus(cfg.corpus, tokenizer, seq_len=cfg.seq_len, max_tokens=cfg.train_tokens,
                                 split="train", seed=cfg.seed, max_context=context)
            state.check_data("corpus", corpus.fingerprint())
            source = _activation_source(cfg, model, tokenizer, corpus, sites, out, progress)
            fisher = None
            if cfg.input_norm == "fisher":
                from saescope.activations.fisher import fisher_of_sites

                fisher = fisher_of_sites(model, corpus, n_tokens=cfg.fisher_tokens, seed=cfg.seed, progress=progress)
            try:
                info.update(_train(cfg, source, sites, out, progress, fisher=fisher))
            finally:
                if hasattr(source, "close"):
                    source.close()  # the online source's row cache: gigabytes the later stages need

    if not state.done("eval"):
        with _stage(state, "eval", log) as info:
            from saescope.evaluate.suite import EvalConfig, evaluate_release

            summary = evaluate_release(release, model, eval_corpus, EvalConfig(loss_tokens=cfg.eval_loss_tokens, zero_ablation=cfg.zero_ablation,
                                                            dtype=cfg.eval_dtype, progress=progress),
                                       model_name=cfg.model)
            from saescope.release.metrics import choose_canonical, write_canonical

            candidates = ((folder, m["site"], m.get("l0")) for folder, m in summary["saes"].items())
            write_canonical(release, choose_canonical(candidates, cfg.canonical_l0))
            info.update(n_saes=len(summary["saes"]), eval_tokens=eval_corpus.n_tokens)

    if not state.done("report"):
        with _stage(state, "report", log) as info:
            from saescope.report.html import write_report

            info["path"] = str(write_report(out, out / "report"))

    if cfg.features and not state.done("features"):
        with _stage(state, "features", log) as info:
            from saescope.features.collect import collect_release

            info["path"] = str(collect_release(release, model, tokenizer, eval_corpus, out / "features",
                                               max_tokens=cfg.feature_tokens, progress=progress))

    _summarise(out, state, log)
    return state.data


def _wanted_stages(cfg: RunConfig) -> list[str]:
    return [s for s in STAGES if s != "features" or cfg.features]


def _activation_source(cfg, model, tokenizer, corpus, sites, out: Path, progress: bool):
    """The trainer's :class:`~saescope.activations.source.BatchSource`: online, or a harvested store."""
    if cfg.source == "online":
        from saescope.activations.online import OnlineSource

        # the run folder holds the rows of sites trained for more epochs than one (kind_epochs)
        return OnlineSource(model, corpus, sites, site_rows=cfg.site_rows(sites, cfg.n_steps), cache_dir=out)
    from saescope.activations.harvest import HarvestConfig, harvest
    from saescope.activations.store import StoreReader

    store = harvest(model, tokenizer, corpus, sites, out / "store",
                    HarvestConfig(dtype=cfg.store_dtype, model_name=cfg.model, progress=progress))
    return StoreReader(store, sites)


def _train(cfg: RunConfig, source, sites, out: Path, progress: bool, fisher=None) -> dict:
    from saescope.train.recipe import Recipe
    from saescope.train.run import release_results
    from saescope.train.spec import sweep
    from saescope.train.trainer import Trainer, TrainOptions

    specs = sweep(sites, cfg.widths, architecture=cfg.architecture,
                  sparsity_coefficients=cfg.sparsity_coefficients, ks=cfg.ks, kind_ks=cfg.kind_ks,
                  target_l0s=cfg.target_l0s, prefixes=cfg.prefixes, seed=cfg.seed,
                  skip_connection=cfg.skip_connection)
    recipe = Recipe.for_steps(cfg.n_steps, **cfg.recipe_overrides(),
                              scale_estimate_tokens=min(131_072, cfg.train_tokens // 4))
    options = TrainOptions(device=cfg.device, checkpoint_every=cfg.checkpoint_every, progress=progress,
                           release_layout=cfg.layout)
    trainer = Trainer(source, specs, recipe, out, n_steps=cfg.n_steps, data_seed=cfg.seed, model_name=cfg.model,
                      options=options, fisher=fisher)
    results = trainer.fit()
    folders = release_results(trainer, results)
    stopped = {r.spec.name: str(r.error) for r in results if r.error is not None}
    return {"n_saes": len(folders), "stopped": stopped, "steps": cfg.n_steps,
            "tokens": cfg.n_steps * cfg.batch_size}


def _summarise(out: Path, state: RunState, log) -> None:
    stages = state.data["stages"]
    total = sum(s["seconds"] for s in stages.values())
    log("stage times: " + ", ".join(f"{k} {v['seconds']:.0f}s" for k, v in stages.items()) + f" (total {total:.0f}s)")
    log(f"release:  {out / 'release'}  (canonical SAEs: {out / 'release' / 'canonical.json'})")
    if (out / "report" / "report.html").exists():
        log(f"report:   {out / 'report' / 'report.html'}")
    if (out / "features").exists():
        log(f"features: {out / 'features'}  (browse with: saescope browse {out})")
