"""`optvq train`: the paper's training recipe, resumable, from one CPU to many GPUs.

Recipe (paper Sec. 4.1 / 4.2 and the authors' configs): L1 + L2 + LPIPS (weight 3) + quantizer loss
(weight 1, beta 0.25) + a PatchGAN hinge loss with VQGAN's adaptive weight after ``disc_start``
steps; AdamW (weight decay 0.05, none on norms, biases and the codebook, eps 1e-7), gradient norm
clipped at 1, OneCycle (1 % warm-up, cosine), learning rate = base x global batch size
(4.5e-6 x batch). The MNIST / CIFAR-10 presets use L1 + L2 + quantizer loss only.

Distributed: launched by torchrun, each process takes its share of every global batch
(``data.BatchPlan``); DDP averages gradients and the quantizer's Sinkhorn reduces its statistics
across processes, so N processes compute what one process computes on the whole batch.

Read ``Trainer`` top to bottom: ``__init__`` builds everything (nothing is written before it has
succeeded), ``fit`` is the loop, ``train_step`` one optimizer step, ``validate`` one pass over the
validation split; ``save`` and ``resume`` come from ``state.Resumable``.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from optvq_cli.core import device as G
from optvq_cli.core import dist as D
from optvq_cli.core.errors import UserError
from optvq_cli.core.lock import folder_lock
from optvq_cli.core.workers import default_workers
from optvq_cli.model import OptVQModel, build_model, save_model
from optvq_cli.model.vqgan import set_checkpointing
from optvq_cli.sources import SourceOptions
from optvq_cli.train import run as R
from optvq_cli.train.codebook import init_codebook
from optvq_cli.train.config import TrainConfig, check_config, learning_rate, save_config
from optvq_cli.train.data import BatchPlan, Splits, StepBatches, make_loader, open_splits
from optvq_cli.train.losses import PatchDiscriminator, adaptive_weight, generator_loss, hinge_d_loss, l1_loss, l2_loss
from optvq_cli.train.metrics import Window, save_grid, validate
from optvq_cli.train.optim import ema_update, last_layer, make_optimizer, param_groups, step_schedules
from optvq_cli.train.report import TrainResult, format_summary, train_text, val_text
from optvq_cli.train.speed import amp_dtype, describe_speed
from optvq_cli.train.state import Resumable
from optvq_cli.train.stop import StopSignals

# progress(done, total, already_done, stats): the CLI's progress bar, or None for log lines.
Progress = Callable[[int, int, int, str | None], None]


class TrainingDiverged(UserError):
    """Too many non-finite steps in a row; the message names the last good checkpoint."""


@dataclass
class Hooks:
    """Test / research hooks. ``on_step(step, losses, indices)`` after each optimizer step with this
    process's loss terms (floats) and its micro-batches' indices."""

    on_step: Callable[[int, dict[str, float], list[torch.Tensor]], None] | None = None


class Trainer(Resumable):
    """One run of `optvq train` in one process (every torchrun process builds its own)."""

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: Path,
        device: torch.device,
        *,
        resume: bool = False,
        overwrite: bool = False,
        splits: Splits | None = None,
        hooks: Hooks | None = None,
        log: Callable[[str], None] = print,
        locks: ExitStack | None = None,
    ):
        check_config(cfg)
        if cfg.data.path and not resume:  # the saved config must still find the data from another folder
            path = str(Path(cfg.data.path).expanduser().absolute())
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=path))
        self.cfg, self.run_dir, self.device, self.hooks = cfg, run_dir, device, hooks or Hooks()
        self.main, self.world, self.rank = D.is_main(), D.world_size(), D.rank()
        self.say = log if self.main else (lambda msg: None)
        # one run per folder: the main process holds RUN/.optvq.lock, released by the caller's ``locks``
        # (also when start-up fails) or by close()
        self._lock = locks if locks is not None else ExitStack()
        D.on_main_first(lambda: R.check_run_dir(run_dir, resume, overwrite), others=lambda: None)
        if resume and self.main:
            self._lock.enter_context(folder_lock(run_dir))
        self._seed()
        self.model = G.channels_last(build_model(cfg.preset, **cfg.model).to(device).train(), cfg.channels_last)
        self.mcfg = self.model.config
        self.model.compute_dtype = amp_dtype(cfg.amp, device)
        set_checkpointing(self.model, cfg.checkpointing)
        self.splits = splits if splits is not None else self._open_data()
        self.plan = BatchPlan(
            len(self.splits.train), cfg.batch_size, cfg.optim.grad_accum, self.world, self.rank, cfg.seed
        )
        self.total = cfg.steps if cfg.steps is not None else cfg.epochs * self.plan.steps_per_epoch
        self.workers = self._workers()
        self.perceptual, self.disc = self._losses()
        self._optimizers()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False) if cfg.ema > 0 else None
        self._compile()  # after the copy: the average runs uncompiled (validation only)
        self.step = self.skipped = self.bad_in_row = 0
        self.last_saved = -1
        self.val_stats: dict[str, Any] | None = None
        # Start-up succeeded: only now does the run folder change.
        D.on_main_first(lambda: self._write_run_dir(resume), others=lambda: None)
        self.metrics = R.MetricsLog(run_dir, cfg.tensorboard, self.main)
        window = self.resume() if resume else self._fresh_start()
        self.window = Window(self.mcfg.n_codes, device, self.step)
        if window is not None:
            self.window.load(window)
        self._wrap_distributed()
        self._describe()

    # -- building --------------------------------------------------------------------------------

    def _seed(self) -> None:
        random.seed(self.cfg.seed)
        np.random.seed(self.cfg.seed)
        torch.manual_seed(self.cfg.seed)  # the same initial weights in every process
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            self._tf32_before = G.set_tf32(self.cfg.tf32)  # the policy: core.device; close() restores

    def _open_data(self) -> Splits:
        d, channels = self.cfg.data, self.mcfg.in_channels

        def open_data(download: bool) -> Splits:
            return open_splits(
                d.path, d.kind, channels, d.size, augment=d.augment, seed=self.cfg.seed,
                crop_scale=d.crop_scale, val_size=d.val_size, val_fraction=d.val_fraction,
                allow_download=download, source_options=SourceOptions(d.image_column, d.label_column),
            )  # fmt: skip

        splits = D.on_main_first(lambda: open_data(d.download), others=lambda: open_data(False))
        self.say(f"data: {splits.description}")
        return splits

    def _workers(self) -> int:
        if self.cfg.data.workers is not None:
            return self.cfg.data.workers
        return default_workers() if self.splits.kind == "folder" else 0

    def _losses(self) -> tuple[Any, nn.Module | None]:
        loss, perceptual, disc = self.cfg.loss, None, None
        if loss.perceptual > 0:
            from optvq_cli.train.losses import perceptual_loss

            perceptual = D.on_main_first(lambda: perceptual_loss(loss.perceptual_net, loss.lpips_weights, self.device))
        if loss.gan > 0:
            disc = PatchDiscriminator(self.mcfg.out_channels, loss.disc_filters, loss.disc_layers)
            disc = disc.to(self.device).train()
            if self.world > 1 and self.device.type == "cuda":  # batch statistics over the global batch
                disc = nn.SyncBatchNorm.convert_sync_batchnorm(disc)
        return perceptual, disc

    def _optimizers(self) -> None:
        """AdamW + OneCycle for the model (the quantizer at its own rate) and the discriminator."""
        lr, o, m = learning_rate(self.cfg), self.cfg.optim, self.model
        groups = param_groups([m.encoder, m.decoder, m.quant_conv, m.post_quant_conv], lr, o.weight_decay)
        groups += param_groups([m.quantize], lr * o.quantizer_lr_mult, o.weight_decay)
        self.opt, self.sched = make_optimizer(groups, o, self.total)
        self.opt_d = self.sched_d = None
        if self.disc is not None:
            self.opt_d, self.sched_d = make_optimizer(param_groups([self.disc], lr, o.weight_decay), o, self.total)

    def _compile(self) -> None:
        for part in (self.model.encoder, self.model.decoder):
            G.compile_module(part, self.cfg.compile, self.cfg.compile_backend)

    def _write_run_dir(self, resume: bool) -> None:
        if not resume:
            self._lock.enter_context(folder_lock(self.run_dir))  # creates the folder, now that start-up worked
        R.prepare_run_dir(self.run_dir, resume)
        if not resume:
            save_config(self.cfg, self.run_dir)

    def _fresh_start(self) -> None:
        if self.main:
            init_codebook(self.model, self.splits.train, self.cfg, self.device, self.say)
        if self.world > 1:  # every process starts from the main process's codebook
            for p in self.model.quantize.parameters():
                D.broadcast(p.data)
        if self.ema is not None:
            self.ema.load_state_dict(self.model.state_dict())

    def _wrap_distributed(self) -> None:
        self.net, self.dnet = self.model, self.disc
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DDP(self.model, device_ids=ids)
            if self.disc is not None:
                self.dnet = DDP(self.disc, device_ids=ids)

    def _describe(self) -> None:
        cfg, m, plan = self.cfg, self.mcfg, self.plan
        self.say(
            f"model: {cfg.preset} ({self.model.param_counts()['total'] / 1e6:.2f} M parameters), quantizer "
            f"{cfg.quantizer.method} ({m.assign}, {m.heads} head(s), n={m.n_codes}); {self.world} process(es) on "
            f"{self.device}; batch {cfg.batch_size} = {plan.micro} x {self.world} x {cfg.optim.grad_accum}; "
            f"lr {learning_rate(cfg):.3g}; {self.total} steps ({plan.steps_per_epoch} per epoch); "
            f"{describe_speed(cfg, self.device, self.model.compute_dtype)}"
        )

    # -- validation ------------------------------------------------------------------------------

    def validate(self) -> dict[str, Any]:
        bs = self.cfg.val_batch_size or max(1, self.cfg.batch_size // self.world)
        stats, shown = validate(
            self.ema or self.model, self.splits.val, bs, self.device, self.workers, self.cfg.grid_images
        )
        if self.main:
            self.metrics.write({"step": self.step, "split": "val", **stats})
            if shown is not None:
                save_grid(shown[0], shown[1], self.run_dir / R.SAMPLES_DIR / f"{R.ckpt_name(self.step)}.png")
            self.say(val_text(self.step, stats))
        self.val_stats = stats
        return stats

    # -- one optimizer step ----------------------------------------------------------------------

    def _amp(self):
        """The model's autocast for the perceptual network and the discriminator (their losses: fp32)."""
        return G.autocast(self.device, self.model.compute_dtype)

    def _losses_of(self, x: torch.Tensor, disc_on: bool):
        """(loss terms, reconstruction, indices) of one micro-batch."""
        cfg = self.cfg.loss
        rec, q_loss, indices = self.net(x, assign=self.mcfg.assign)
        terms = {"l1": l1_loss(x, rec), "l2": l2_loss(x, rec), "quantizer": q_loss.float()}
        rec_loss = cfg.l1 * terms["l1"] + cfg.l2 * terms["l2"]
        if self.perceptual is not None:
            with self._amp():
                terms["perceptual"] = self.perceptual(x, rec).float()
            rec_loss = rec_loss + cfg.perceptual * terms["perceptual"]
        loss = rec_loss + cfg.quantizer * terms["quantizer"]
        if disc_on:
            self.disc.requires_grad_(False)
            with self._amp():
                terms["gan"] = generator_loss(self.disc(rec.float()).float())
            terms["gan_weight"] = adaptive_weight(rec_loss, terms["gan"], last_layer(self.model), cfg.max_gan_weight)
            loss = loss + cfg.gan * terms["gan_weight"] * terms["gan"]
            self.disc.requires_grad_(True)
        terms["loss"] = loss
        return terms, rec, indices

    def _disc_step(self, x: torch.Tensor, rec: torch.Tensor, sync: bool, accum: int) -> torch.Tensor:
        with nullcontext() if sync else self.dnet.no_sync():
            with self._amp():
                real, fake = self.dnet(x.detach().float()), self.dnet(rec.detach().float())
            loss = hinge_d_loss(real.float(), fake.float())
            (self.cfg.loss.disc * loss / accum).backward()
        return loss

    def train_step(self, batches) -> tuple[bool, dict[str, torch.Tensor], list[torch.Tensor]]:
        """Forward and backward over the step's micro-batches; returns (finite, mean terms,
        indices). Every process agrees on a non-finite loss before any of them calls backward."""
        accum = self.cfg.optim.grad_accum
        disc_on = self.disc is not None and self.step >= self.cfg.loss.disc_start
        step_terms: dict[str, torch.Tensor] = {}
        step_indices: list[torch.Tensor] = []
        for a in range(accum):
            x = G.to_device(next(batches), self.device, self.cfg.channels_last)
            sync = a == accum - 1 or self.world == 1
            with nullcontext() if sync else self.net.no_sync():
                terms, rec, indices = self._losses_of(x, disc_on)
                if D.flag_max(float(not torch.isfinite(terms["loss"]).item())) > 0:
                    for _ in range(accum - 1 - a):  # the step's other micro-batches: skipped too
                        next(batches)
                    return False, step_terms, step_indices
                (terms["loss"] / accum).backward()
            if disc_on:
                terms["disc"] = self._disc_step(x, rec, sync, accum)
            for k, v in terms.items():
                step_terms[k] = step_terms.get(k, 0.0) + v.detach().float() / accum
            self.window.add_batch(x, rec.detach(), indices)
            if self.hooks.on_step is not None:
                step_indices.append(indices.detach().cpu())
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        return bool(torch.isfinite(gnorm).item()), step_terms, step_indices  # gradients are reduced: same everywhere

    def _apply(self, terms: dict[str, torch.Tensor]) -> None:
        self.bad_in_row = 0
        self.opt.step()
        if self.disc is not None and "disc" in terms:
            clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
            torch.nn.utils.clip_grad_norm_(self.disc.parameters(), clip)
            self.opt_d.step()
        if self.ema is not None:
            ema_update(self.ema, self.model, self.cfg.ema)
        self.window.add_terms(terms)

    def _skip(self) -> None:
        """A non-finite step: no update; too many in a row stop the run at the last good checkpoint."""
        self.skipped += 1
        self.bad_in_row += 1
        n = self.step + 1
        self.metrics.write({"step": n, "split": "train", "event": "skipped_step", "skipped": self.skipped})
        self.say(f"step {n}: non-finite loss or gradient; step skipped ({self.bad_in_row} in a row)")
        if self.bad_in_row >= self.cfg.max_bad_steps:
            saved = R.list_checkpoints(self.run_dir)
            where = f"{saved[-1][1]} (step {saved[-1][0]})" if saved else "none written yet"
            raise TrainingDiverged(
                f"training stopped at step {n}: {self.bad_in_row} non-finite steps in a row; "
                f"the last good checkpoint is {where}; lower optim.lr or check the data, then --resume"
            )

    def _zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        if self.opt_d is not None:
            self.opt_d.zero_grad(set_to_none=True)

    # -- the loop --------------------------------------------------------------------------------

    def _log(self, progress: Progress | None, start: int) -> None:
        row = self.window.flush(self.step, self.plan.steps_per_epoch, self.opt.param_groups[0]["lr"], self.skipped)
        if not self.main:
            return
        self.metrics.write(row)
        text = train_text(row)
        if progress is not None:
            progress(self.step, self.total, start, text)
        else:
            self.say(f"step {self.step}: {text}")

    def fit(self, progress: Progress | None = None) -> TrainResult:
        """Train to the last step (or a signal); validate, checkpoint and save the model at the end."""
        cfg, start = self.cfg, self.step
        progress = progress if self.main else None
        batches = iter(make_loader(self.splits.train, StepBatches(self.plan, self.step, self.total), self.workers,
                                   G.pin_memory_for(self.device)))  # fmt: skip
        with StopSignals() as stop:
            while self.step < self.total:
                self._zero_grad()
                finite, terms, indices = self.train_step(batches)
                if finite:
                    self._apply(terms)
                else:
                    self._zero_grad()
                    self._skip()
                step_schedules(self.sched, self.sched_d)
                self.step += 1
                if self.hooks.on_step is not None and finite:
                    self.hooks.on_step(self.step, {k: float(v) for k, v in terms.items()}, indices)
                if progress is not None:
                    progress(self.step, self.total, start, None)
                if self.step % cfg.log_every == 0 or self.step == self.total:
                    self._log(progress, start)
                if cfg.val_every and self.step % cfg.val_every == 0 and self.step < self.total:
                    self.validate()
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.bad_in_row == 0:
                    self.save()  # not in a streak of skipped steps: the newest checkpoint stays a good one
                if D.flag_max(1.0 if stop.requested else 0.0) > 0 and self.step < self.total:
                    self.save()
                    self.say(f"stopped by {stop.requested or 'a signal'} at step {self.step}/{self.total}; "
                             f"continue with --resume {self.run_dir}")  # fmt: skip
                    return self._result("interrupted", None)
        return self.finish(start)

    def finish(self, start: int) -> TrainResult:
        """The end: validation, the last checkpoint, the model directory."""
        stats = self.validate()
        self.save()
        model_dir = self.run_dir / R.MODEL_DIR
        if self.main:
            meta = {
                **self.model_metadata(),
                "val_psnr_y": stats["psnr_y"],
                "val_codebook_usage": stats["codebook_usage"],
            }
            save_model(self.ema or self.model, model_dir, metadata=meta)
            self.say(f"done: {self.step - start} steps, {self.skipped} skipped; model in {model_dir}")
        D.barrier()
        return self._result("completed", model_dir)

    def _result(self, status: str, model_dir: Path | None) -> TrainResult:
        return TrainResult(status, self.step, self.total, self.run_dir, model_dir, self.skipped, self.val_stats)

    def close(self) -> None:
        if hasattr(self, "metrics"):
            self.metrics.close()
        if hasattr(self, "_lock"):
            self._lock.close()
        if getattr(self, "_tf32_before", None) is not None:  # encoding in this process keeps full fp32
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self._tf32_before
            self._tf32_before = None


def train(
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    splits: Splits | None = None,
    hooks: Hooks | None = None,
    log: Callable[[str], None] = print,
    progress: Progress | None = None,
) -> TrainResult:
    """Train (or, with ``resume``, continue) the run in ``run_dir``. Launched by torchrun it joins
    the process group; every process calls this. ``splits`` replaces the data named by
    ``cfg.data`` (tests). ``log`` takes the main process's log lines; ``progress`` is a progress
    callback (see ``Progress``); without one, a log line every ``log_every`` steps.
    Raises UserError for bad input, TrainingDiverged after ``max_bad_steps`` non-finite steps in
    a row."""
    run_dir = Path(run_dir)
    device = D.device_for(cfg.device)
    own_group = D.init_from_env(device)
    trainer = None
    try:
        with ExitStack() as locks:
            trainer = Trainer(cfg, run_dir, device, resume=resume, overwrite=overwrite, splits=splits, hooks=hooks,
                              log=log, locks=locks)  # fmt: skip
            return trainer.fit(progress)
    finally:
        if trainer is not None:
            trainer.close()
        if own_group:
            D.destroy()


__all__ = ["Hooks", "OptVQModel", "Trainer", "TrainResult", "TrainingDiverged", "format_summary", "train"]
