"""
What a training run reads: the LLaVA files read and checked before training starts (a wrong path or image folder
stops here, not after hours of training on nothing), the validation slice held out, and this rank's micro-batches
in an order that is a pure function of the seed and the sample position (BatchSampler), so that resume and DDP need
no data-loader state. DataMonitor counts what the loader dropped and cut; run.Run asks it when to give up.
"""

import bisect
import os
import signal
from collections import Counter
from functools import partial
from typing import NamedTuple

import torch
from tqdm import tqdm

from common import print0
from data import LLaVADataset, check_dataset, collate


class Data(NamedTuple):
    train: object       # this rank's micro-batches, from the resumed position on (an endless iterator)
    val: object         # a DataLoader over the validation samples
    n_train: int
    n_val: int
    placeholder: dict   # one good sample as a batch: what an all-dropped micro-batch runs on, at weight 0
    monitor: object     # DataMonitor: what the loader fetched, dropped and cut


def load_data(cfg, student, step, rank, world, device):
    """This rank's training micro-batches from micro-step `step * grad_accum` on, the validation loader and the
    placeholder sample (Data)."""
    tok, folder, placeholder = student.tokenizer, cfg["image_folder"] or None, None
    annotate = None
    if cfg["look_weight"] > 0 or cfg["readout_weight"] > 0:  # the teacher's privileged targets, per position
        from privileged import PrivilegedSettings, SceneTargets
        settings = PrivilegedSettings.from_config(cfg["privileged"])
        annotate = SceneTargets(scenes_path(cfg), tok, student.num_image_tokens, settings.captions,
                                settings.place_words)

    def read(paths):
        nonlocal placeholder
        parts = [LLaVADataset(p, folder, tok, student.image_processor, student.num_image_tokens, cfg["max_length"],
                              annotate=annotate) for p in paths.split(",")]
        for d in parts:
            good, _ = check_dataset(d)
            placeholder = placeholder or good
        return torch.utils.data.ConcatDataset(parts)
    dataset = read(cfg["data"])
    if cfg["val_data"]:
        val_set, train_idx = read(cfg["val_data"]), list(range(len(dataset)))
    else:  # a fixed held-out slice of the training file
        n_val = max(1, int(cfg["val_frac"] * len(dataset))) if cfg["eval_interval"] > 0 else 0
        perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(1234)).tolist()
        val_set, train_idx = torch.utils.data.Subset(dataset, perm[:n_val]), perm[n_val:]
    if not train_idx:
        raise ValueError(f"data={cfg['data']}: {len(dataset)} sample(s), all held out for validation; give more data, "
                         "a separate val_data file, or eval_interval=0")
    print0(validation_note(cfg, dataset, val_set))
    train_set = torch.utils.data.Subset(dataset, train_idx)
    sampler = BatchSampler(len(train_set), cfg["batch_size"], cfg["seed"], rank, world, step * cfg["grad_accum"])
    collate_fn = partial(collate, pad_id=tok.pad_token_id)
    loader = iter(torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=collate_fn,
                                              num_workers=cfg["num_workers"], pin_memory=device.type == "cuda",
                                              worker_init_fn=_quiet_worker if cfg["num_workers"] else None))
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=cfg["batch_size"], collate_fn=collate_fn)
    return Data(loader, val_loader, len(train_set), len(val_set), collate([placeholder], tok.pad_token_id),
                DataMonitor(show=rank == 0))


class BatchSampler:
    """
    Yields the index lists of this rank's micro-batches from micro-step `start` on. Global sample
    position p = ((step * grad_accum + micro) * world + rank) * batch_size + i, read from the
    permutation of epoch p // N. One process with grad_accum = 2 sees exactly the samples that two
    DDP ranks with grad_accum = 1 see, in the same groups.
    """

    def __init__(self, n, batch_size, seed, rank=0, world=1, start=0):
        self.n, self.bs, self.seed, self.rank, self.world, self.start = n, batch_size, seed, rank, world, start
        self._perm = {}

    def _index(self, p):
        epoch = p // self.n
        if epoch not in self._perm:
            self._perm = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))}
        return int(self._perm[epoch][p % self.n])

    def __iter__(self):
        micro = self.start
        while True:
            first = (micro * self.world + self.rank) * self.bs
            yield [self._index(p) for p in range(first, first + self.bs)]
            micro += 1


def to_device(batch, device):
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else
                to_device(v, device) if isinstance(v, dict) else v) for k, v in batch.items()}


def _quiet_worker(_):
    # A Ctrl-C reaches the DataLoader workers too; they must keep serving while the main process saves.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def validation_note(cfg, dataset, val_set):
    """The start-up line that says where the validation loss comes from: a held-out slice costs training samples."""
    if cfg["eval_interval"] <= 0:
        return "validation: none (eval_interval=0); every sample trains"
    if cfg["val_data"]:
        return f"validation: the {len(val_set)} samples of val_data={cfg['val_data']}"
    per_file = Counter(bisect.bisect_right(dataset.cumulative_sizes, i) for i in val_set.indices)
    files = [p.path for p in dataset.datasets]
    return (f"validation: {len(val_set)} samples held out of the training data (val_frac={cfg['val_frac']}): " +
            ", ".join(f"{per_file[k]} of {f}" for k, f in enumerate(files)) + "; they do not train")


class DataMonitor:
    """Counts, for this process, what the data loader fetched, dropped (each fetch, and by reason; and once per
    sample, by reason) and cut at max_length; prints the first drops of each reason."""

    def __init__(self, show=True, max_shown=5):
        self.fetched = self.dropped_fetches = 0
        self.reasons = Counter()  # dropped fetches by reason: they add up to dropped_fetches
        self.dropped, self.truncated = {}, set()
        self.show, self.max_shown, self.shown = show, max_shown, Counter()
        self.first = []

    def add(self, batch):
        n_kept = len(batch["input_ids"]) if "input_ids" in batch else 0
        self.fetched += n_kept + len(batch["dropped"])
        self.dropped_fetches += len(batch["dropped"])
        self.reasons.update(d.reason for d in batch["dropped"])
        self.truncated.update(batch["truncated"])
        for d in batch["dropped"]:
            if d.key in self.dropped:
                continue
            self.dropped[d.key] = d.reason
            if len(self.first) < 3:
                self.first.append(d)
            self.shown[d.reason] += 1
            if self.show and self.shown[d.reason] <= self.max_shown:
                more = " (further ones are only counted)" if self.shown[d.reason] == self.max_shown else ""
                tqdm.write(f"skipping {d.message}{more}")


def report_drops(monitor, par, cfg, skipped):
    """What the loader dropped and cut, each sample once, over all ranks (in a later epoch another rank may meet the
    same bad sample)."""
    seen = par.gather_objects((monitor.dropped, monitor.truncated))
    dropped = {k: r for d, _ in seen for k, r in d.items()}
    truncated = set().union(*(t for _, t in seen))
    if dropped or truncated:
        print0(f"data: dropped samples {dict(Counter(dropped.values())) or 'none'}; {len(truncated)} cut at "
               f"max_length={cfg['max_length']}" + (f"; {skipped} step(s) without a sample skipped" if skipped else ""))




def scenes_path(cfg):
    """The world's scenes.json, where privileged supervision's targets come from."""
    return cfg["scenes"] or os.path.join(os.path.dirname(os.path.abspath(cfg["data"].split(",")[0])), "scenes.json")
