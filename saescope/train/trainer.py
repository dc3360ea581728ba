"""Many SAEs per data pass: every site's batch is read once and fed to every SAE of that site.

``Trainer(source, specs, recipe, out_dir, n_steps=...).fit()``:

1. refuses a relaunch whose specs/recipe/length differ from the run already in ``out_dir``;
2. resumes from the last complete checkpoint if there is one; otherwise estimates each site's
   input scale C (E‖x/C‖² = 1) from the first batches of the source;
3. steps every :class:`~saescope.train.sae_trainer.SAETrainer` on each batch, reading batch
   ``step`` via ``source.iter_batches(skip_batches=step)`` so a resumed run sees the same data in
   the same order, and ends with bit-identical weights;
4. an SAE whose batch, loss or gradients go NaN/Inf stops with an error naming its site, step
   and cause (logged, and in the results); the others go on;
5. refits the decoders if the recipe asks (:mod:`saescope.train.refit`), and returns what it
   trained (:class:`TrainedSAE`: the SAE, its C, final metrics, tokens seen, or its error).
   Writing release folders is the release step's job (:func:`saescope.train.run.train_and_release`).

Which batches it reads is spelled out once, in :func:`planned_reads`, so a process that only
serves data to the trainers of other ranks can ask instead of mirroring.  Parallelism enters only
through the :class:`~saescope.train.plan.TrainPlan`; knobs that change no result through :class:`TrainOptions`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from saescope.activations.source import BatchSource, data_identity
from saescope.corpora import canonical_name
from saescope.locks import folder_lock
from saescope.sae.base import SAE, SAEConfig
from saescope.sae.input_norm import InputNorm
from saescope.settings import PAIR_KINDS
from saescope.sites import Site, data_sites, io_sites
from saescope.train.checkpoint import CheckpointDir
from saescope.train.norms import estimate_input_norms, estimate_input_scales  # noqa: F401 (re-exported)
from saescope.train.options import TrainOptions  # noqa: F401 (re-exported)
from saescope.train.plan import TrainPlan
from saescope.train.recipe import Recipe
from saescope.train.refit import check_refittable, refit_trainers
from saescope.train.run_log import NullLog, RunLog
from saescope.train.sae_trainer import NonFiniteError, SAETrainer
from saescope.train.spec import SAESpec, check_recipe_fits


#: the checkpoint entry holding "fisher" input maps' matrices (SAE names start with "layer_")
INPUT_MAPS = "input_maps"


@dataclass
class TrainedSAE:
    """What training made of one spec: the SAE in training form (inputs divided by ``scale``),
    its final metrics (averaged over the run's last steps, normalised units), or its error."""

    spec: SAESpec
    sae: SAE
    scale: float
    metrics: dict[str, float] | None
    tokens_seen: int
    error: str | None
    #: the input map the SAE was trained behind (folded into the release)
    norm: InputNorm | None = None
    #: L0 of the final weights' inference code on the last training batch
    released_l0: float | None = None
    #: a transcoder's target map (its input's is ``norm``), folded into the release too
    target_norm: InputNorm | None = None


def scale_estimate_batches(recipe: Recipe, n_steps: int) -> int:
    """Batches read to estimate C (or the input map): the recipe's tokens, but never more than a
    quarter of what the run trains on (an online source computes the estimate's activations
    once more; a quarter of a run is still ≥ 30k tokens for the CPU presets)."""
    tokens = min(recipe.scale_estimate_tokens, max(1, n_steps // 4) * recipe.batch_size)
    return max(1, math.ceil(tokens / recipe.batch_size))


def planned_reads(recipe: Recipe, n_steps: int, start: int) -> list[tuple[int, int]]:
    """Every pass a run starting at ``start`` makes over its source, in order, as ``(first batch,
    number of batches)``: the scale estimate (fresh runs only), then the training steps.  A run
    whose SAEs all stop reads fewer training batches, never more."""
    reads = [(0, scale_estimate_batches(recipe, n_steps))] if start == 0 else []
    return reads + [(start, n_steps - start)]


class Trainer:
    """Train ``specs`` on ``source`` for ``n_steps`` batches (or ``total_tokens`` tokens).

    Args:
        source: any :class:`~saescope.activations.source.BatchSource` holding every spec's site.
        specs: the SAEs to train (names must be unique).
        recipe: defaults to ``Recipe.for_steps(n_steps)``.
        out_dir: the run folder (``checkpoints/``, ``train_log.jsonl``).
        data_seed: the source's shuffling seed.
        model_name: recorded in the SAEs' metadata (default: ``source.model_name`` if any).
        final_steps: the final metrics (and the released average L0) average this many last steps.
        options: knobs that change no result (:class:`TrainOptions`).
        plan: how this process takes part (:class:`~saescope.train.plan.TrainPlan`; default: alone).
    """

    def __init__(
        self,
        source: BatchSource,
        specs: list[SAESpec],
        recipe: Recipe | None,
        out_dir: str | Path,
        *,
        n_steps: int | None = None, total_tokens: int | None = None,
        data_seed: int = 0,
        model_name: str | None = None,
        final_steps: int = 100,
        options: TrainOptions | None = None,
        plan: TrainPlan | None = None,
        fisher: Callable[[list[Site]], dict[Site, torch.Tensor]] | None = None,
    ):
        if not specs:
            raise ValueError("no SAEs to train")
        names = [s.name for s in specs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate SAEs: {', '.join(duplicates)}")
        missing = sorted(set(data_sites(s.site for s in specs)) - set(source.sites))
        if missing:
            pairs = sorted({s.site.name for s in specs if set(io_sites(s.site)) & set(missing) and s.site not in missing})
            raise ValueError(
                f"the source has no activations for {', '.join(map(str, missing))} "
                f"(it holds {', '.join(map(str, source.sites))})"
                + (f"; {', '.join(pairs)} read(s) and predict(s) them" if pairs else "")
            )
        if (n_steps is None) == (total_tokens is None):
            raise ValueError("give exactly one of n_steps and total_tokens")
        batch_size = (recipe or Recipe()).batch_size
        self.n_steps = n_steps if n_steps is not None else math.ceil(total_tokens / batch_size)
        if self.n_steps < 1:
            raise ValueError(f"a run needs at least one step, got n_steps={self.n_steps}")
        self.recipe = recipe if recipe is not None else Recipe.for_steps(self.n_steps)
        if self.recipe.input_norm == "fisher" and any(s.site.kind not in PAIR_KINDS for s in specs):
            if fisher is None:
                raise ValueError("input_norm 'fisher' needs the model's Fisher metric at each site: train online "
                                 "from the model (--model) or with saescope run, or use input_norm 'diagonal'")
        #: ``fisher(sites)`` → each site's Fisher metric (input_norm "fisher"; called only when a
        #: run starts: a resumed one reads its maps from the checkpoint)
        self.fisher = fisher
        self.options = options or TrainOptions()
        self.plan = plan or TrainPlan()
        #: rows of each batch this process trains on (data parallelism: its share of the batch)
        self.rows_per_step = self.plan.rows_per_step(self.recipe.batch_size)
        check_recipe_fits(specs, self.recipe, self.rows_per_step)
        check_refittable(specs, self.recipe, self.plan)
        self.model_name = model_name if model_name is not None else getattr(source, "model_name", None)
        self.data = data_identity(source)  # of the whole data, before this rank's slice is taken
        self.source = self.plan.local_source(source)
        self.specs = list(specs)
        self.out_dir = Path(out_dir)
        self.device = torch.device(self.options.device)
        self.data_seed = data_seed
        self.final_steps = final_steps
        #: the stored sites read (a transcoder's: its input and target sites)
        self.sites = data_sites(s.site for s in self.specs)
        self.trainers: list[SAETrainer] = []
        self.scales: dict[Site, float] = {}
        #: each site's input map (scalar mode: x / scales[site])
        self.norms: dict[Site, InputNorm] = {}
        #: under input_norm "fisher", the transcoders' maps: diagonal ones (a transcoder's fold
        #: takes per-dimension maps; its sites' SAEs keep the Fisher map)
        self.pair_norms: dict[Site, InputNorm] = {}

    # --- setup -------------------------------------------------------------------------------

    def run_identity(self) -> dict:
        """What makes this run this run; a relaunch on the same folder must match it exactly."""
        return {
            "saes": {s.name: s.to_dict() for s in self.specs},
            "recipe": self.recipe.to_dict(),
            "n_steps": self.n_steps,
            "data_seed": self.data_seed,
            "d_in": {site.name: self.source.d_in[site] for site in self.sites},
            "model": canonical_name(self.model_name) if isinstance(self.model_name, str) else self.model_name,
            "data": self.data,
            **self.plan.identity,
        }

    def _norms_of(self, spec: SAESpec) -> dict[Site, InputNorm]:
        return self.pair_norms if spec.site.kind in PAIR_KINDS and self.pair_norms else self.norms

    def _make_trainer(self, spec: SAESpec) -> SAETrainer:
        x_site, y_site = io_sites(spec.site)
        split = self.recipe.splits_at(spec.site)  # Adam steps per batch (Recipe.kind_splits)
        cfg = SAEConfig(
            d_in=self.source.d_in[x_site],
            d_out=self.source.d_in[y_site],
            d_sae=spec.d_sae,
            architecture=spec.architecture,
            k=spec.k,
            bandwidth=self.recipe.bandwidth,
            threshold_init=self.recipe.threshold_init,
            dead_tokens=self.recipe.dead_window_tokens,  # TopK's AuxK: one notion of "dead"
            target_l0=spec.target_l0,
            prefixes=spec.prefixes,
            max_frequency=self.recipe.max_frequency,
            frequency_coefficient=self.recipe.frequency_coefficient,
            frequency_window=max(1, self.recipe.frequency_window_tokens * split // self.rows_per_step),
            metadata={"model": self.model_name, "site": spec.site.name},
        )
        # Initialise on the CPU from the spec's seed alone, so the same spec starts from the same
        # weights on every device and whatever else was built before it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            sae = self.plan.make_sae(cfg)
        scale = self.scales[x_site] if math.isfinite(self.scales[y_site]) else math.nan
        trainer = SAETrainer(
            sae.to(self.device),
            self.recipe.split(split),
            sparsity_coefficient=spec.sparsity_coefficient or 0.0,
            n_steps=self.n_steps * split * self.recipe.epochs_at(spec.site),
            input_scale=scale if math.isfinite(scale) else 1.0,
            input_norm=self._norms_of(spec)[x_site] if self.recipe.input_norm != "scalar" else None,
            target_scale=self.scales[y_site] if math.isfinite(self.scales[y_site]) else 1.0,
            target_norm=self._norms_of(spec)[y_site] if self.recipe.input_norm != "scalar" else None,
            name=spec.name,
            site=spec.site,
            reduce_grads=self.plan.reduce_grads,
            final_steps=self.final_steps,
        )
        if not math.isfinite(scale):
            trainer.error = (
                f"before step 0, site {spec.site}: the input scale estimated from the first "
                f"{self.recipe.scale_estimate_tokens} tokens is not a finite positive number "
                "(the batches contain NaN/Inf or are all zero)"
            )
        return trainer

    def _estimate_norms(self) -> None:
        """Each site's input map from the run's first batches (input_norm "fisher": SAE sites of
        ``fisher_kinds`` get the Fisher map, other SAE sites and transcoder sites a diagonal one),
        and the scales the trainers read."""
        recipe = self.recipe
        estimate = dict(batch_size=recipe.batch_size, seed=self.data_seed, reduce_sums=self.plan.reduce_sums,
                        power=recipe.input_norm_power,
                        n_tokens=planned_reads(recipe, self.n_steps, 0)[0][1] * recipe.batch_size)
        if recipe.input_norm != "fisher":
            self.norms = estimate_input_norms(self.source, self.sites, mode=recipe.input_norm, **estimate)
        else:
            sae_sites = data_sites(s.site for s in self.specs if s.site.kind not in PAIR_KINDS)
            fisher_sites = [site for site in sae_sites if site.kind in recipe.fisher_kinds]
            diagonal_sites = [site for site in sae_sites if site.kind not in recipe.fisher_kinds]
            pair_sites = data_sites(s.site for s in self.specs if s.site.kind in PAIR_KINDS)
            if fisher_sites:
                self.norms = estimate_input_norms(self.source, fisher_sites, mode="fisher", fisher=self.fisher(
                    fisher_sites), fisher_weight=recipe.fisher_weight, **estimate)
            if diagonal_sites:
                self.norms.update(estimate_input_norms(self.source, diagonal_sites, mode="diagonal", **estimate))
            if pair_sites:
                self.pair_norms = estimate_input_norms(self.source, pair_sites, mode="diagonal", **estimate)
        self.scales = {site: (n.scalar if n.mode == "scalar" else (1.0 if n.is_finite else math.nan))
                       for site, n in {**self.pair_norms, **self.norms}.items()}

    # --- the run -----------------------------------------------------------------------------

    def fit(self) -> list[TrainedSAE]:
        """Train (resuming if possible); return every spec's :class:`TrainedSAE`, in spec order.
        The process that writes holds the run folder's lock meanwhile (a second trainer on the
        same folder is refused, naming this one's pid)."""
        if not (self.plan.writes or self.plan.checkpoints):
            return self._fit()
        with folder_lock(self.out_dir, "training run"):
            return self._fit()

    def _fit(self) -> list[TrainedSAE]:
        ckpt = CheckpointDir(self.out_dir / "checkpoints", keep=self.options.keep_checkpoints)
        ckpt.check_or_write_run(self.run_identity(), owner=self.plan.checkpoints)
        latest = ckpt.latest()
        start = 0
        if latest is not None:
            start, folder = latest
            state, tensors = ckpt.load(folder)
            self.scales = {Site.parse(k): (v if v is not None else float("nan")) for k, v in state["scales"].items()}
            maps = tensors.get(INPUT_MAPS, {})
            self.norms = {Site.parse(k): InputNorm.from_dict(d, self.source.d_in[Site.parse(k)],
                                                             {m: maps[f"{k}:{m}"] for m in ("matrix", "inverse")
                                                              if f"{k}:{m}" in maps})
                          for k, d in state.get("input_norms", {}).items()}
            self.pair_norms = {Site.parse(k): InputNorm.from_dict(d, self.source.d_in[Site.parse(k)])
                               for k, d in state.get("pair_input_norms", {}).items()}
        else:
            self._estimate_norms()
        if self.recipe.input_norm == "scalar" or not self.norms:
            self.norms = {site: InputNorm.from_scale(c, self.source.d_in[site]) for site, c in self.scales.items()}
        self.trainers = [self._make_trainer(spec) for spec in self.specs]
        if latest is not None:
            for t in self.trainers:
                t.load_state(tensors[t.name], state["saes"][t.name])

        log = RunLog(self.out_dir / "train_log.jsonl", resume_step=start, loggers=self.options.loggers,
                     run_name=self.out_dir.name) if self.plan.writes else NullLog()
        try:
            if start == 0:
                log.write({"step": 0, "event": "input_scales",
                           "scales": {s.name: c for s, c in self.scales.items()}})
                for t in self.trainers:
                    if t.error is not None:
                        log.write({"step": 0, "event": "error", "sae": t.name, "site": str(t.site), "error": t.error})
            self._train(start, ckpt, log)
            progress = self.options.progress and self.plan.writes  # the refit: after the last checkpoint
            refit_trainers(self.trainers, self.source, self.recipe, self.data_seed, log, progress)
        finally:
            log.close()
        self.plan.finish(self.trainers)
        return [
            TrainedSAE(spec, t.sae, self.scales[io_sites(spec.site)[0]], t.final_metrics() if t.error is None else None,
                       t.tokens_seen, t.error, self._norms_of(spec)[io_sites(spec.site)[0]], t.released_l0,
                       self._norms_of(spec)[io_sites(spec.site)[1]] if t.sae.is_transcoder else None)
            for spec, t in zip(self.specs, self.trainers)
        ]

    def _train(self, start: int, ckpt: CheckpointDir, log: RunLog) -> None:
        B = self.recipe.batch_size
        by_site: dict[Site, list[SAETrainer]] = {}
        for t in self.trainers:
            by_site.setdefault(t.site, []).append(t)
        splits = {site: self.recipe.splits_at(site) for site in by_site}  # Adam steps per batch
        ends = {site: self.n_steps * self.recipe.epochs_at(site) for site in by_site}  # Recipe.kind_epochs
        last = max(ends.values())
        batches = self.source.iter_batches(B, seed=self.data_seed, skip_batches=start)
        bar = tqdm(total=last * B, initial=start * B, unit="tok", unit_scale=True,
                   desc=f"training {len(self.trainers)} SAEs", disable=not (self.options.progress and self.plan.writes))
        last_time, last_step = time.perf_counter(), start
        try:
            for step in range(start, last):
                live = {site: ts for site, every in by_site.items()
                        if step < ends[site] and (ts := [t for t in every if t.error is None])}
                if not live:
                    break  # every SAE stopped: nothing left to train
                batch = next(batches)
                for site, ts in live.items():
                    xy = [batch[s] for s in dict.fromkeys(io_sites(site))]  # (x,), or a transcoder's (x, y)
                    for s, a in zip(io_sites(site), xy):
                        if a.shape != (self.rows_per_step, self.source.d_in[s]):
                            raise ValueError(f"the source gave {s} a batch of shape {tuple(a.shape)}, "
                                             f"expected ({self.rows_per_step}, {self.source.d_in[s]})")
                    split = splits[site]
                    parts = list(zip(*(a.to(self.device, non_blocking=True).chunk(split) for a in xy)))
                    for t in ts:
                        try:
                            for j, part in enumerate(parts):
                                t.update(step * split + j, *part, return_metrics=False)
                        except NonFiniteError as err:
                            log.write({"step": step, "event": "error", "sae": t.name, "site": str(site),
                                       "error": t.error})
                            tqdm.write(f"saescope train: {err}")
                done = step + 1
                bar.update(B)
                if done % self.options.log_every == 0 or done == last:
                    now = time.perf_counter()
                    rate, last_time, last_step = (done - last_step) * B / max(now - last_time, 1e-9), now, done
                    for t in self.trainers:
                        if t.error is None and done - self.options.log_every < ends[t.site]:  # stepped since
                            log.write({"step": done, "tokens": done * B, "sae": t.name, "site": str(t.site),
                                       **t.pop_metrics(), "tokens_per_s": rate})
                    bar.set_postfix(training=sum(t.error is None for t in self.trainers))
                if done % self.options.checkpoint_every == 0 or done == last:
                    if self.plan.checkpoints:
                        self.save_checkpoint(done, ckpt)
        finally:
            bar.close()

    def save_checkpoint(self, step: int, ckpt: CheckpointDir) -> Path:
        state = {
            "scales": {s.name: c for s, c in self.scales.items()},
            **({"input_norms": {s.name: n.to_dict() for s, n in self.norms.items()}}
               if self.recipe.input_norm != "scalar" else {}),
            **({"pair_input_norms": {s.name: n.to_dict() for s, n in self.pair_norms.items()}}
               if self.pair_norms else {}),
            "saes": {t.name: t.state_meta() for t in self.trainers},
        }
        tensors = {t.name: t.state_tensors() for t in self.trainers}
        maps = {f"{s.name}:{m}": v.contiguous() for s, n in self.norms.items() for m, v in n.matrices().items()}
        if maps:  # a "fisher" map's matrices (its JSON has the rest)
            tensors[INPUT_MAPS] = maps
        # an SAE that stopped (its kind trains fewer epochs) and the maps are linked, not rewritten
        versions = {INPUT_MAPS: "fixed", **{t.name: json.dumps(t.state_meta(), sort_keys=True) for t in self.trainers}}
        return ckpt.save(step, state, tensors, versions=versions)
