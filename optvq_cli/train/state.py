"""The training state of a ``Trainer``: what a checkpoint holds beyond the weights (optimizers,
schedules, counters, the sampler's place, each process's RNG state and log window), how ``save``
writes it and how ``resume`` puts it back so a resumed run continues exactly. The files
themselves (layout, atomic writes, reading) are ``run.py``'s."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from optvq_cli.core import dist as D
from optvq_cli.core.errors import UserError
from optvq_cli.train import run as R
from optvq_cli.train.config import save_config
from optvq_cli.train.optim import load_schedule


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class Resumable:
    """The save / resume half of ``loop.Trainer`` (which builds every attribute used here)."""

    def resume(self) -> dict[str, Any] | None:
        """Load the newest checkpoint; returns the log window in progress (or None)."""
        ckpt_step, path = R.list_checkpoints(self.run_dir)[-1]
        ck = R.read_checkpoint(path)
        st = ck["state"]
        self._check_resumable(st)
        self.model.load_state_dict(ck["model"])
        for module, key in ((self.disc, "disc"), (self.ema, "ema")):
            if module is not None and ck[key] is not None:
                module.load_state_dict(ck[key])
        self.opt.load_state_dict(st["optimizer"])
        load_schedule(self.sched, st["scheduler"])
        if self.opt_d is not None and st.get("disc_optimizer") is not None:
            self.opt_d.load_state_dict(st["disc_optimizer"])
            load_schedule(self.sched_d, st["disc_scheduler"])
        ranks = st["ranks"]
        set_rng_state(ranks[self.rank]["rng"] if self.rank < len(ranks) else ranks[0]["rng"])
        self.step, self.skipped, self.bad_in_row = st["step"], st["skipped"], st["bad_in_row"]
        self.metrics.truncate_after(self.step)
        if st["total_steps"] != self.total:  # --steps / --epochs on a resume: the saved config follows
            if self.main:
                save_config(self.cfg, self.run_dir)
            self.say(f"schedule extended from {st['total_steps']} to {self.total} steps")
        self.say(f"resumed {self.run_dir} at step {self.step}/{self.total} from {path.name}")
        # the log window in progress, so the next metrics row is unchanged
        return ranks[self.rank]["window"] if len(ranks) == self.world else None

    def _check_resumable(self, st: dict[str, Any]) -> None:
        s = st["sampler"]
        if (s["n"], s["global_batch"]) != (len(self.splits.train), self.cfg.batch_size):
            raise UserError(
                f"--resume {self.run_dir}: the checkpoint was made with {s['n']} training images and batch "
                f"{s['global_batch']}; now {len(self.splits.train)} and {self.cfg.batch_size}: use the same data"
            )
        if self.total < st["step"]:
            raise UserError(
                f"--resume {self.run_dir}: the run is at step {st['step']}; to extend it, give --steps above that"
            )

    def state_dict(self) -> dict[str, Any]:
        """The training state of this step (a collective: the RNG state of every process)."""
        step, plan = self.step, self.plan
        return {
            "format": R.STATE_FORMAT,
            "optvq_format": R.STATE_VERSION,
            "step": step,
            "total_steps": self.total,
            "skipped": self.skipped,
            "bad_in_row": self.bad_in_row,
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "disc_optimizer": self.opt_d.state_dict() if self.opt_d is not None else None,
            "disc_scheduler": self.sched_d.state_dict() if self.sched_d is not None else None,
            "ranks": D.all_gather_object({"rng": rng_state(), "window": self.window.state()}),
            "sampler": {
                "epoch": step // plan.steps_per_epoch,
                "batch": step % plan.steps_per_epoch,
                "n": plan.n,
                "global_batch": plan.global_batch,
                "seed": plan.seed,
            },
            "world_size": self.world,
        }

    def model_metadata(self) -> dict[str, Any]:
        return {
            "trained_with": "optvq train",
            "preset": self.cfg.preset,
            "quantizer": self.cfg.quantizer.method,
            "step": self.step,
            "total_steps": self.total,
            "weights": "ema" if self.ema is not None else "raw",
        }

    def save(self) -> None:
        """A checkpoint of this step (every process calls it; the main process writes)."""
        state = self.state_dict()
        if self.main and self.step != self.last_saved:
            parts = {"model": self.model, "disc": self.disc, "ema": self.ema, "state": state}
            R.write_checkpoint(self.run_dir, self.step, parts, self.cfg.keep_checkpoints, self.model_metadata())
        self.last_saved = self.step
        D.barrier()
