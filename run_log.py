"""
What a training run leaves behind: checkpoints (Checkpointer: the student's weights and config in out_dir, and
train_state.pt, from which a rerun resumes bit for bit) and the log (Logger: the loss terms, learning rate, gradient
norm, throughput and memory every log_interval steps, the validation losses, the progress bar).
"""

import random
import time
from collections import Counter

import numpy as np
import torch
from tqdm import tqdm

from checkpoint import save_checkpoint
from data import too_many_dropped
from run_data import to_device

LOSSES = ("lm", "kd", "vat", "total")
PRIVILEGED_LOSSES = ("look", "readout")  # logged too while a teacher trains with privileged supervision


def due(step, interval, cfg):
    """Every `interval` steps, and at the last one."""
    return step % interval == 0 or step == cfg["max_steps"]


def rng_state():
    return dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(s):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


class Checkpointer:
    """Saves out_dir (checkpoint.save_checkpoint): the student's weights in float32, LoRA's adapters merged, its
    config with what this stage was (train_config) and the layer pairs it was distilled on (distill: they travel with
    every later checkpoint, as SFT has no teacher, so evaluate.py measures alignment where training aligned it), and
    train_state.pt with what a resume needs (step, optimizer, every rank's RNG, the log; under LoRA the unmerged
    trainable weights too)."""

    def __init__(self, cfg, par, ts, optimizer, scaler):
        self.cfg, self.par, self.ts, self.optimizer, self.scaler = cfg, par, ts, optimizer, scaler
        self.lora = cfg["lora_rank"] > 0
        self.distill = (ts.pairs.note(ts.vat_settings.matching) if ts.teacher is not None
                        else (ts.student.config.extra or {}).get("distill"))

    def save(self, step, skipped, log):
        """Every rank calls it; rank 0 writes."""
        cfg, student = self.cfg, self.ts.student
        rngs = self.par.gather_objects(rng_state())
        weights, opt_state = self.par.gather_state(self.ts, self.optimizer)
        if self.par.master:
            # checkpoints are float32, and written (and LoRA-merged) from the CPU
            weights = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype)
                       for k, v in weights.items()}
            student.config.extra = {"stage": cfg["stage"], "step": step, "train_config": cfg, "distill": self.distill}
            # LoRA: the directory holds the merged model; the adapters (and the rest that trains) stay unmerged
            # in train_state.pt for resume
            trainable = {n: weights[n] for n, p in student.named_parameters() if p.requires_grad} if self.lora else None
            save_checkpoint(cfg["out_dir"], student,
                            {"step": step, "optimizer": opt_state, "rng": rngs, "world": self.par.world,
                             "skipped": skipped, "scaler": self.scaler.state_dict() if self.scaler else None,
                             "trainable": trainable, "config": cfg, "log": log,
                             # the readout head is no part of the model: only a resume reads it
                             "privileged": self.ts.privileged.state_dict() if self.ts.privileged else None},
                            log, weights=weights)
        self.par.barrier()


class Logger:
    """The log: every log_interval steps one record with each loss term (the mean over the steps and over all ranks;
    None when none of them had a sample),
    the learning rate, the gradient norm, tokens/s and memory; the validation losses; the progress bar. It also stops
    a run in which most samples read so far were dropped."""

    def __init__(self, cfg, par, monitor, log, step):
        self.cfg, self.par, self.monitor, self.log = cfg, par, monitor, log
        self.bar = tqdm(total=cfg["max_steps"], initial=step, disable=not par.master, desc=cfg["stage"],
                        dynamic_ncols=True)
        self.t0, self.tokens = time.time(), 0
        self.names = LOSSES + (PRIVILEGED_LOSSES if cfg["look_weight"] > 0 or cfg["readout_weight"] > 0 else ())
        self.sums, self.n_micro = torch.zeros(len(self.names), device=par.device), 0

    def fetched(self, batch):
        """Count a micro-batch from the loader; True when it holds a sample to train on."""
        self.monitor.add(batch)
        real = "input_ids" in batch
        if real:
            self.tokens += int(batch["attention_mask"].sum())  # counted on the host, before the copy
            self.n_micro += 1
        return real

    def losses(self, out):
        self.sums += torch.stack([out[k].detach().float() for k in self.names])  # on the device: no sync until logged

    def step(self, step, lr, grad_norm, skipped):
        cfg, monitor = self.cfg, self.monitor
        self.bar.update(1)
        if not due(step, cfg["log_interval"], cfg):
            return
        # every rank's losses, tokens and drops (one collective, one sync)
        tot = self.par.reduce([*self.sums, self.n_micro, self.tokens, monitor.fetched, monitor.dropped_fetches])
        tot = tot.tolist()
        losses, (n, ntok, fetched, n_drop) = tot[:len(self.names)], tot[len(self.names):]
        dt = time.time() - self.t0
        # steps in which no rank had a sample have no loss: None, not 0 (a loss curve must not dip to zero)
        rec = {"step": step, "lr": lr, **{k: v / n if n else None for k, v in zip(self.names, losses)},
               "grad_norm": float(grad_norm) if grad_norm is not None else None,
               "tok_per_s": ntok / dt, "mem_gb": _memory_gb(self.par.device)}
        if n_drop:
            rec["dropped_frac"] = n_drop / fetched
        if skipped:
            rec["skipped_steps"] = skipped
        self.log.append(rec)
        if n:
            self.bar.set_postfix(lm=f"{rec['lm']:.3f}", kd=f"{rec['kd']:.3f}", vat=f"{rec['vat']:.3f}")
        if self.par.master:
            self.bar.write(f"step {step}: " + " ".join(f"{k} {v:.4g}" for k, v in rec.items()
                                                       if k != "step" and v is not None))
        if n_drop * 2 > fetched and fetched >= 2 * cfg["batch_size"] * self.par.world:  # every rank sees the sums
            every = self.par.gather_objects((monitor.reasons, monitor.first))  # the breakdown, as the counts
            reasons, first = sum((r for r, _ in every), Counter()), [d for _, f in every for d in f]
            raise ValueError(too_many_dropped(cfg["data"], int(n_drop), int(fetched), first, reasons) +
                             "\n(counted since this run started, over all ranks; no checkpoint written)")
        self.t0, self.tokens, self.sums, self.n_micro = time.time(), 0, torch.zeros_like(self.sums), 0

    def validation(self, step, ev):
        if self.par.master:
            self.log.append({"step": step, **{f"val_{k}": v for k, v in ev.items()}})
            self.bar.write(f"step {step}: val " + " ".join(f"{k} {v:.4f}" for k, v in ev.items()))

    def close(self):
        self.bar.close()


@torch.no_grad()
def evaluate_loss(model, loader, n_batches, device, autocast, with_kd, with_vat):
    model.eval()
    sums, n = {}, 0
    for batch in loader:
        if n == n_batches:
            break
        if "input_ids" not in batch:  # every sample dropped
            continue
        with autocast:
            out = model(to_device(batch, device), with_kd=with_kd, with_vat=with_vat)
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += 1
    model.train()
    return {k: v / max(1, n) for k, v in sums.items()}


def _memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource  # peak resident memory of this process (Linux reports kB)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

