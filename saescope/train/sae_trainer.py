"""One SAE, its Adam optimiser and its schedules: ``SAETrainer.update(step, x_BD)``.

This is the seam people writing their own loops use (as dictionary_learning's trainers), and the
unit :class:`saescope.train.trainer.Trainer` runs many of per data pass.  A transcoder's step is
``update(step, x_BD, y_BD)``: input and target, each behind its own map.  A step is:

1. divide the raw batch by the site's scale C (so E‖x‖² = 1, the units ε and θ₀ assume); at
   step 0, b_dec and (target-L0 SAEs, ``threshold_init_mode="quantile"``) θ from this batch;
2. loss at this step's λ (warmed up over ``target_l0_warmup_steps`` for a target-L0 SAE), backward;
3. ``reduce_grads(sae)`` if given — the data-parallel seam: an all-reduce of the gradients
   across ranks goes here, before anything reads them;
4. refuse to step if the batch, the loss or a gradient is NaN/Inf (:class:`NonFiniteError`:
   the weights are untouched, so the last checkpoint and the in-memory SAE stay sound);
5. remove the gradient component parallel to each decoder row, Adam step at this step's lr,
   renormalise decoder rows, keep JumpReLU's θ positive (``sae.clamp_threshold_``, if the
   architecture has it).

Metrics are accumulated on the device without synchronising; :meth:`SAETrainer.pop_metrics`
turns them into floats (averages since the last pop).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from saescope.precision import autocast_dtype
from saescope.sae.base import SAE
from saescope.sae.input_norm import InputNorm
from saescope.sites import Site
from saescope.train.recipe import Recipe

#: rows of each batch the training FVU is measured on under a full input map (Fisher)
METRIC_ROWS = 256
# Metric sums accumulated per step, in this order (index into the accumulator tensors).
_SUMS = ("steps", "loss", "mse", "l0", "aux", "resid_ss", "total_ss", "rows")


class NonFiniteError(RuntimeError):
    """A batch, loss or gradient was NaN/Inf: this SAE stops; the run goes on."""

    def __init__(self, name: str, site: Site, step: int, cause: str):
        self.name, self.site, self.step, self.cause = name, site, step, cause
        super().__init__(f"SAE {name} stopped at step {step} on site {site}: {cause}")


class SAETrainer:
    """Trains one SAE (or transcoder).  ``sae`` is in training form (an SAE: ``centre_input=True``;
    a transcoder never centres) on ``device``.

    Args:
        sae: the model to train.
        recipe: optimiser and schedule settings.
        sparsity_coefficient: the target λ (reached after the recipe's warm-up); for TopK-style
            SAEs, whatever coefficient their ``loss`` takes (e.g. the auxiliary-loss weight).
        n_steps: the run's length (for an optional lr decay and the final-metrics window).
        input_scale: C for this SAE's site; batches are divided by it.
        input_norm: instead of ``input_scale``, any :class:`~saescope.sae.input_norm.InputNorm`
            (e.g. per-dimension); metrics are then still reported in raw units.
        target_scale, target_norm: a transcoder's map of its target y, as ``input_scale`` and
            ``input_norm`` are of its input (metrics are measured on y).
        name, site: for error messages and logs.
        reduce_grads: called with the SAE after backward, before the gradients are read
            (data-parallel all-reduce).
        final_steps: the last ``final_steps`` steps also accumulate into the "final" metrics,
            from which the released SAE's average L0 is named.
    """

    def __init__(
        self,
        sae: SAE,
        recipe: Recipe,
        *,
        sparsity_coefficient: float,
        n_steps: int,
        input_scale: float = 1.0,
        input_norm: InputNorm | None = None,
        target_scale: float = 1.0,
        target_norm: InputNorm | None = None,
        name: str = "sae",
        site: Site | None = None,
        reduce_grads: Callable[[SAE], None] | None = None,
        final_steps: int = 100,
    ):
        if not input_scale > 0:
            raise ValueError(f"input_scale must be > 0, got {input_scale}")
        if recipe.b_dec_init == "mean" and reduce_grads is not None:
            raise ValueError("b_dec_init='mean' reads one rank's batch; use 'zeros' with data-parallel training")
        #: Gemma Scope 2's target L0 (None: λ·L0, or an architecture that sets its own sparsity)
        self.target_l0 = getattr(sae.cfg, "target_l0", None)
        self.quantile_init = recipe.threshold_init_mode == "quantile" and self.target_l0 is not None
        if self.quantile_init and reduce_grads is not None:
            raise ValueError("threshold_init_mode='quantile' reads one rank's batch; use 'fixed' with data-parallel "
                             "training")
        self.sae = sae
        self.recipe = recipe
        self.sparsity_coefficient = float(sparsity_coefficient)
        self.n_steps = n_steps
        self.input_scale = float(input_scale)
        if input_norm is not None and input_norm.mode == "scalar":
            self.input_scale, input_norm = input_norm.scalar, None
        #: a non-scalar input map (None: divide by ``input_scale``)
        self.input_norm = input_norm
        self.target_scale = float(target_scale)
        if target_norm is not None and target_norm.mode == "scalar":
            self.target_scale, target_norm = target_norm.scalar, None
        #: a transcoder's non-scalar target map (None: divide by ``target_scale``)
        self.target_norm = target_norm
        self.name = name
        self.site = site
        self.reduce_grads = reduce_grads
        self.final_steps = final_steps
        self.error: str | None = None  # set when the SAE stopped (NaN/Inf)
        #: L0 of the final weights' inference code on the last batch (the released SAE's L0)
        self.released_l0: float | None = None
        #: the decoder refit's figures, once it ran (saescope.train.refit)
        self.refit: dict[str, float] | None = None

        self.device = next(sae.parameters()).device
        #: bf16 autocast only where bf16 runs natively (saescope.precision)
        self.autocast = autocast_dtype(recipe.dtype, self.device) is not None
        self.optimizer = torch.optim.Adam(
            sae.parameters(), lr=recipe.lr, betas=(recipe.adam_beta1, recipe.adam_beta2), eps=recipe.adam_eps,
            fused=True,  # one kernel per step: ~4x faster than the default on CPU, and on CUDA
        )
        self.tokens_seen = 0
        self.log_sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=self.device)
        self.final_sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=self.device)
        #: sums over the ``final_steps`` steps right after the λ warm-up: the L0 that λ at full
        #: strength started from (:func:`saescope.train.l0_check.l0_warnings` compares it with the end)
        self.response_sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=self.device)
        warmup = recipe.target_l0_warmup_steps if self.target_l0 is not None else recipe.sparsity_warmup_steps
        self.response_window = (warmup, warmup + final_steps)
        self._last_step = -1

    # --- one step ----------------------------------------------------------------------------

    def training_input(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Raw activations in the units this SAE trains on (its input map applied)."""
        x_BD = x_BD.to(self.device, torch.float32, non_blocking=True)
        return self.input_norm.apply(x_BD) if self.input_norm is not None else x_BD / self.input_scale

    def update(self, step: int, x_BD: torch.Tensor, y_BD: torch.Tensor | None = None, *,
               return_metrics: bool = True) -> dict[str, float] | None:
        """One optimiser step on raw activations ``x_BD`` (a transcoder: predicting raw ``y_BD``).
        Returns this step's metrics as floats (one device sync) unless ``return_metrics`` is
        False.  Raises :class:`NonFiniteError`."""
        if self.error is not None:
            raise RuntimeError(f"SAE {self.name} already stopped: {self.error}")
        sae, recipe = self.sae, self.recipe
        if (y_BD is None) == bool(getattr(sae, "is_transcoder", False)):
            raise ValueError(f"{self.name}: a transcoder trains on (x, y) pairs, an SAE on x alone")
        x_BD = raw_BD = x_BD.to(self.device, torch.float32, non_blocking=True)
        x_BD = self.training_input(x_BD)
        target = {}
        if y_BD is not None:
            y_BD = raw_BD = y_BD.to(self.device, torch.float32, non_blocking=True)
            y_BD = self.target_norm.apply(y_BD) if self.target_norm is not None else y_BD / self.target_scale
            target = {"target_BD": y_BD}
        lr = recipe.lr_at(step, self.n_steps)
        coefficient = self.sparsity_coefficient * recipe.sparsity_factor_at(step, self.target_l0 is not None)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if step == 0 and self.recipe.b_dec_init == "mean":
            with torch.no_grad():
                self.sae.b_dec.copy_((x_BD if y_BD is None else y_BD).mean(dim=0))
        if step == 0 and self.quantile_init:
            sae.init_threshold_at_l0_(x_BD, self.target_l0, recipe.threshold_min)

        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = sae.loss(x_BD, coefficient, **target)
        self.optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        if self.reduce_grads is not None:
            self.reduce_grads(sae)
        self._check_finite(step, (x_BD,) if y_BD is None else (x_BD, y_BD), out.total)

        if recipe.decoder_unit_norm:
            sae.remove_parallel_decoder_grad_()
        self.optimizer.step()
        if recipe.decoder_unit_norm:
            sae.normalize_decoder_()
        if hasattr(sae, "clamp_threshold_"):  # JumpReLU: θ must stay positive
            sae.clamp_threshold_(recipe.threshold_min)

        step_sums = self._accumulate(x_BD if y_BD is None else y_BD, out, step, raw_BD)
        if step == self.n_steps - 1:  # the released SAE's L0, on the last batch
            if hasattr(sae, "calibrate_threshold_"):  # BatchTopK
                sae.calibrate_threshold_(x_BD)
            self.released_l0 = sae.mean_l0(x_BD)
        self._last_step = step
        if not return_metrics:
            return None
        return self._as_metrics(step_sums, step)

    def _check_finite(self, step: int, batches: tuple[torch.Tensor, ...], total: torch.Tensor) -> None:
        """One sync: are the batch (a transcoder's: x and y), the loss and every gradient finite?
        If not, say which.  The probe is one sum per tensor (a NaN or Inf anywhere makes it
        non-finite; ~40x cheaper on CPU than a mask per element); only when a sum is not finite
        are the elements checked, so a sum that merely overflows is no error."""
        grads = {n: p.grad for n, p in self.sae.named_parameters() if p.grad is not None}
        probes = [b.sum() for b in batches] + [total.detach().float()] + [g.sum() for g in grads.values()]
        if bool(torch.isfinite(torch.stack(probes)).all()):
            return
        flags = [torch.stack([torch.isfinite(b).all() for b in batches]).all(), torch.isfinite(total.detach())]
        flags += [torch.isfinite(g).all() for g in grads.values()]
        if bool(torch.stack(flags).all()):
            return
        self.optimizer.zero_grad(set_to_none=True)
        if not flags[0]:
            n_nan = sum(int(torch.isnan(b).sum()) for b in batches)
            n_inf = sum(int(torch.isinf(b).sum()) for b in batches)
            cause = f"the batch contains non-finite values ({n_nan} NaN, {n_inf} Inf)"
        elif not flags[1]:
            cause = f"the loss is {float(total):g}"
        else:
            bad = [n for n, f in zip(grads, flags[2:]) if not f]
            cause = f"non-finite gradient in {', '.join(bad)}"
        self.error = f"step {step}, site {self.site}: {cause}"
        raise NonFiniteError(self.name, self.site, step, cause)

    @torch.no_grad()
    def _accumulate(self, x_BD: torch.Tensor, out, step: int, raw_BD: torch.Tensor) -> torch.Tensor:
        """Metric sums of a step on ``x_BD``, the normalised batch (a transcoder's: its target),
        whose raw values are ``raw_BD``."""
        B = x_BD.shape[0]
        x_hat_BD = out.x_hat_BD.float()
        err_BD, dev_BD = x_BD - x_hat_BD, x_BD - x_BD.mean(dim=0)
        norm = self.target_norm if getattr(self.sae, "is_transcoder", False) else self.input_norm
        rows = B
        if norm is not None and norm.matrix_DD is not None:
            # FVU in raw units, as eval reports it.  A full map costs a D x D product per row, as
            # much as the SAE's encoder, so it is measured on ~METRIC_ROWS evenly spaced rows.
            stride = max(1, B // METRIC_ROWS)
            err_BD, dev_BD = norm.to_raw(err_BD[::stride]), (raw_BD - raw_BD.mean(dim=0))[::stride]
            rows = err_BD.shape[0]
        elif norm is not None:
            err_BD, dev_BD = norm.to_raw(err_BD), norm.to_raw(dev_BD)
        resid_ss = err_BD.pow(2).sum()
        # FVU's denominator is the variance about the batch mean, not about zero.
        total_ss = dev_BD.pow(2).sum()
        parts = [torch.ones((), device=self.device), out.total.detach(), out.mse, out.l0, out.aux, resid_ss, total_ss,
                 torch.full((), rows, device=self.device)]
        step_sums = torch.stack([p.to(torch.float64) for p in parts])
        self.log_sums += step_sums
        if step >= self.n_steps - self.final_steps:
            self.final_sums += step_sums
        if self.response_window[0] <= step < self.response_window[1]:
            self.response_sums += step_sums
        self.tokens_seen += B
        self.sae.update_dead_(out.fired_F, B)  # the SAE's counter is the only one (SAE.tokens_since_fired_F)
        return step_sums

    # --- metrics -----------------------------------------------------------------------------

    def dead_fraction(self) -> torch.Tensor:
        """Fraction of latents that did not fire in the last ``dead_window_tokens`` tokens (or, in
        a run shorter than that, at all so far)."""
        window = min(self.recipe.dead_window_tokens, max(self.tokens_seen, 1))
        return (self.sae.tokens_since_fired_F >= window).double().mean()

    def _as_metrics(self, sums: torch.Tensor, step: int) -> dict[str, float]:
        values = torch.cat([sums, self.dead_fraction().reshape(1)]).tolist()
        named = dict(zip(_SUMS + ("dead_fraction",), values))
        n = max(named["steps"], 1.0)
        return {
            "loss": named["loss"] / n,
            "mse": named["mse"] / n,
            "l0": named["l0"] / n,
            "aux": named["aux"] / n,
            "fvu": named["resid_ss"] / named["total_ss"] if named["total_ss"] > 0 else float("nan"),
            #: ‖x − x̂‖² in raw activation units (mean over tokens)
            "mse_raw": named["resid_ss"] / named["rows"] * self._raw_factor() if named["rows"] > 0 else float("nan"),
            "dead_fraction": named["dead_fraction"],
            "lr": self.recipe.lr_at(step, self.n_steps),
            "sparsity_coefficient": self.sparsity_coefficient * self.recipe.sparsity_factor_at(step, self.target_l0
                                                                                                 is not None),
            **({"target_l0": self.target_l0} if self.target_l0 is not None else {}),
        }

    def _raw_factor(self) -> float:
        """From squared errors in the measured units to raw ones (per-dimension maps: already raw)."""
        if getattr(self.sae, "is_transcoder", False):
            return self.target_scale**2 if self.target_norm is None else 1.0
        return self.input_scale**2 if self.input_norm is None else 1.0

    def pop_metrics(self) -> dict[str, float]:
        """Averages since the last call (MSE and FVU in normalised units; FVU is unit-free)."""
        metrics = self._as_metrics(self.log_sums, self._last_step)
        metrics["steps_averaged"] = float(self.log_sums[0])
        self.log_sums.zero_()
        return metrics

    def final_metrics(self) -> dict[str, float]:
        """Averages over the run's last ``final_steps`` steps; ``l0_after_warmup``: the mean L0
        of the ``final_steps`` steps right after the λ warm-up (absent when the run ended first
        or those steps overlap the last ones)."""
        metrics = self._as_metrics(self.final_sums, self._last_step)
        metrics["steps_averaged"] = float(self.final_sums[0])
        lo, hi = self.response_window
        if hi <= self.n_steps - self.final_steps and float(self.response_sums[0]) > 0:
            metrics["l0_after_warmup"] = float(self.response_sums[3] / self.response_sums[0])
            metrics["l0_after_warmup_steps"] = [lo, hi]
        return {**metrics, **(self.refit or {})}

    # --- checkpoint state --------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything needed to continue bit-identically, as named CPU tensors (safetensors)."""
        # state_dict: parameters *and* buffers (the dead-latent counter, BatchTopK's threshold)
        tensors = {f"sae.{n}": t.detach() for n, t in self.sae.state_dict().items()}
        names = {p: n for n, p in self.sae.named_parameters()}
        for param, state in self.optimizer.state.items():
            for key, value in state.items():
                if not isinstance(value, torch.Tensor):
                    raise TypeError(f"optimizer state {key!r} is not a tensor; cannot checkpoint it safely")
                tensors[f"adam.{names[param]}.{key}"] = value.reshape(-1) if value.ndim == 0 else value
        tensors["log_sums"] = self.log_sums
        tensors["final_sums"] = self.final_sums
        tensors["response_sums"] = self.response_sums
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    def state_meta(self) -> dict:
        return {"tokens_seen": self.tokens_seen, "error": self.error, "last_step": self._last_step,
                "released_l0": self.released_l0}

    @torch.no_grad()
    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        own = self.sae.state_dict()
        missing = sorted(f"sae.{n}" for n in own if f"sae.{n}" not in tensors)
        if missing:
            raise ValueError(f"checkpoint for {self.name} lacks {', '.join(missing)}")
        for n, t in own.items():
            t.copy_(tensors[f"sae.{n}"])
        params = dict(self.sae.named_parameters())
        self.optimizer.state.clear()
        for key, value in tensors.items():
            if not key.startswith("adam."):
                continue
            pname, skey = key[len("adam.") :].rsplit(".", 1)
            param = params[pname]
            if skey == "step":  # Adam keeps its step count as a 0-d float tensor on the CPU
                self.optimizer.state[param][skey] = value.reshape(())
            else:
                self.optimizer.state[param][skey] = value.to(param.device)
        self.log_sums = tensors["log_sums"].to(self.device)
        self.final_sums = tensors["final_sums"].to(self.device)
        if "response_sums" in tensors:  # (checkpoints written before it existed lack it)
            self.response_sums = tensors["response_sums"].to(self.device)
        self.tokens_seen = int(meta["tokens_seen"])
        self.error = meta["error"]
        self._last_step = int(meta["last_step"])
        self.released_l0 = meta.get("released_l0")
