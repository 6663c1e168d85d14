"""
The one training loop, shared by the three stages (train_dpt.py, train_dft.py, train_sft.py).

A stage script only chooses defaults (data, which losses, which parameters train); everything else
is here, top to bottom: set-up (plain python or torchrun DDP), models, data, optimizer, the loop
(gradient accumulation, bf16 autocast on GPU, cosine LR with warm-up, clipping, logging, eval) and
checkpoints (a directory per stage, written atomically, resumable bit for bit).
"""

import bisect
import datetime
import json
import math
import os
import pickle
import random
import shutil
import signal
import sys
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from configurator import configure
from data import LLaVADataset, check_dataset, collate, too_many_dropped
from model import (VLM, TeacherStudent, add_lora, cast_weights, enable_checkpointing, find_checkpoint, load_vlm,
                   plain_state_dict, read_weights, set_trainable)

# Defaults shared by the stages; each stage script overrides a few, then config files / --key=value.
DEFAULTS = dict(
    # -- what runs ----------------------------------------------------------------------------------------------
    stage="sft",                  # dpt | dft | sft: which parameters train (model.set_trainable)
    out_dir="out/run",            # the checkpoint directory this stage writes (the next stage's init_from)
    init_from="",                 # where the student starts: a checkpoint directory (a stage's out_dir, or a Hugging
                                  # Face LLaVA one), "backbones" (vision_model + llm_model) or "scratch" (llm / vision)
    vision_model="",              # backbones, scratch: HF id or path of a pretrained vision tower (SigLIP, CLIP),
                                  # or a LLaVA / checkpoint directory, whose tower it takes
    llm_model="",                 # backbones: HF id or path of the causal LM, e.g. Qwen/Qwen1.5-1.8B
    llm={},                       # scratch: HF causal-LM config dict of a new LM (see config/shapes_*.py)
    vision={},                    # scratch without vision_model or a teacher: HF vision config dict of a new tower
    tokenizer="",                 # scratch without a teacher: tokenizer directory (default: <data folder>/tokenizer)
    image_processor="",           # scratch without a teacher: image-processor directory (default: <data folder>/...)
    teacher="",                   # the teacher's checkpoint directory (needed for kd_weight, vat_weight or taf)
    connector="mlp2x_gelu",       # image adapter of a new model: mlp{depth}x_gelu, as LLaVA's
    vision_feature_select_strategy="",  # "": the tower's own (CLIP: "default", CLS dropped; SigLIP: "full");
                                  # "default" on SigLIP drops the first patch, as the reference code does
    # -- data ---------------------------------------------------------------------------------------------------
    data="out/shapes/instruct.json",  # LLaVA .json/.jsonl; several files joined by commas are mixed
    image_folder="",              # the images' root (default: the folder holding the data file)
    val_data="",                  # a separate validation file (default: hold out val_frac of data)
    val_frac=0.02,                # the held-out fraction of data when there is no val_data
    max_length=512,               # tokens per sample; longer text is cut (and counted), a cut image drops the sample
    num_workers=0,                # DataLoader worker processes
    # -- the method (README: what each stage does) --------------------------------------------------------------
    kd_weight=0.0,                # weight of L_KD, the logit distillation (0: no KD)
    vat_weight=0.0,               # weight of L_VAT, the visual attention alignment (0: no VAT)
    kd_temperature=1.0,           # KD's softmax temperature (the loss is scaled by its square)
    taf=False,                    # TAF: the student takes the teacher's connector (frozen) + a new post_connector
    train_llm=None,               # None: the stage decides (the LM trains in DFT and SFT, not in DPT); True / False
    train_vision=False,           # train the vision tower too (a tower learned from scratch; never while distilling)
    student_layers=None,          # the student layers VAT aligns: None (the preset, else "intermediate"), a name
                                  # (early, intermediate, late, all), a (lo, hi) depth fraction or a list of indices
    teacher_layers=None,          # the teacher layers they are matched to (the same forms)
    matching="group",             # group | simple | adaptive: how student layers are matched to teacher layers
    vat_queries="all",            # whose attention is aligned: all rows (the paper's Eq. 2), text rows, or image
                                  # rows (the reference code's form, with vat_pool=column)
    vat_pool="flat",              # flat (the paper's Eq. 2: the maps flattened) | column (the reference code's
                                  # per-column profile, outliers filtered)
    vat_loss="cosine",            # cosine | mse | kl
    vat_layer_reduce="sum",       # sum over the layer pairs (reference code) | mean (the paper's Eq. 2)
    lora_rank=0,                  # >0: LoRA adapters (peft) on the LM instead of training all of it (reference: 128)
    lora_alpha=0.0,               # LoRA's alpha; 0: 2 * lora_rank (the reference's 256 for r 128)
    lora_dropout=0.05,            # dropout on the adapters' input
    lora_targets="all-linear",    # every Linear of the LM's decoder layers; or names, e.g. "q_proj,v_proj"
    # -- optimisation -------------------------------------------------------------------------------------------
    batch_size=16,                # samples per micro-batch per process
    grad_accum=1,                 # micro-batches per step (the batch of a step: batch_size * grad_accum * processes)
    max_steps=1000,               # optimizer steps of this stage
    lr=2e-4,                      # peak learning rate (AdamW)
    min_lr_frac=0.0,              # the cosine schedule ends at lr * min_lr_frac
    warmup_frac=0.03,             # linear warm-up over this fraction of max_steps
    weight_decay=0.0,             # AdamW's, on matrices only (not on biases and norms)
    beta1=0.9,                    # AdamW's beta1
    beta2=0.999,                  # AdamW's beta2
    grad_clip=1.0,                # clip the gradient norm to this (0: no clipping)
    seed=0,                       # weights of new modules, data order
    dtype="auto",                 # auto: bf16 autocast on CUDA, fp32 on CPU; or float32 / bfloat16 / float16 (with a
                                  # gradient scaler). Trainable weights are float32 masters whatever this says.
    grad_ckpt=False,              # gradient checkpointing in the student's LM (less memory, ~30 % more compute)
    compile=False,                # torch.compile the decoders that training runs
    fsdp=False,                   # shard the student (and its optimizer) over the processes with FSDP2 (fully_shard)
    fsdp_teacher=True,            # with fsdp: shard the frozen teacher's decoder layers too (else every rank holds it)
    # -- bookkeeping --------------------------------------------------------------------------------------------
    log_interval=10,              # steps between log lines (losses are the mean over them, over all processes)
    eval_interval=200,            # steps between validation losses (0: none, and no data held out)
    eval_batches=10,              # validation batches per evaluation
    save_interval=500,            # steps between checkpoints (and one at the end, and on Ctrl-C / SIGTERM)
    stop_after=0,                 # >0: save and exit after this many steps of this invocation (pre-emption)
)
# Settings a rerun into an existing out_dir may change; any other difference means another run (see check_resume).
# (Not eval_interval: whether it is 0 decides whether a validation slice is held out of the training data.)
RESUME_FREE = {"log_interval", "eval_batches", "save_interval", "stop_after", "num_workers", "compile", "grad_ckpt"}
AMP_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOSSES = ("lm", "kd", "vat", "total")


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


_OWN_GROUP = False  # whether compute_init created the process group (and compute_cleanup may destroy it)


def compute_init(single_group=False):
    """Plain python: one process (with single_group, in a process group of its own, which FSDP needs).
    torchrun: a process group (nccl on GPU, gloo on CPU). A program that already initialised one (a test running
    several trainings in one launch) keeps it: train() then neither creates nor destroys it."""
    global _OWN_GROUP
    ddp = "RANK" in os.environ or single_group or (dist.is_initialized() and not _OWN_GROUP)
    if ddp and not dist.is_initialized():
        _OWN_GROUP = True
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" in os.environ:
            # a long timeout: the other ranks wait in a barrier while rank 0 writes a multi-GB checkpoint
            dist.init_process_group(backend, timeout=datetime.timedelta(hours=1))
        else:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    if ddp:
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", 0))
    else:
        rank, world, local = 0, 1, 0
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return ddp, rank, world, device


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compute_cleanup():
    """After a successful run only (a rank that died leaves the others in a collective; torchrun ends them). The
    barrier first: a rank that tears down its process group while another is still in the last collective can hang."""
    global _OWN_GROUP
    if dist.is_initialized():
        dist.barrier()
        if _OWN_GROUP:
            dist.destroy_process_group()
            _OWN_GROUP = False


# -----------------------------------------------------------------------------
# checkpoints: a directory, written to a temporary name then swapped in


def save_checkpoint(out_dir, student, train_state, log, weights=None):
    tmp, old = out_dir + ".tmp", out_dir + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp, state_dict=weights)
    torch.save(train_state, os.path.join(tmp, "train_state.pt"))
    with open(os.path.join(tmp, "train_log.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in log)
    if os.path.isdir(out_dir):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)  # the only moment the new checkpoint becomes visible
    shutil.rmtree(old, ignore_errors=True)


def load_train_state(resume_dir, out_dir):
    """train_state.pt of a checkpoint, to the CPU (under torchrun every rank would otherwise load the whole optimizer
    state onto cuda:0), memory-mapped: a rank reads only the tensors it uses (under FSDP rank 0 sends each its shard of
    the optimizer state), and the ranks of a node share the file's pages. A missing or damaged file is an error that
    names it and says what to do."""
    path = os.path.join(resume_dir, "train_state.pt")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as e:
        why = (str(e).splitlines() or [""])[0] or type(e).__name__
        raise ValueError(f"{path}: cannot read the training state ({why}); it is missing or damaged, so the run in "
                         f"{out_dir} cannot resume. Put back a good copy to resume; to start this stage over instead, "
                         f"move {out_dir} away") from e


def rng_state():
    return dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(s):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# -----------------------------------------------------------------------------
# data order: a pure function of (seed, global sample position), so resume and DDP need no state


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


def lr_at(step, cfg):
    warmup = max(1, int(cfg["warmup_frac"] * cfg["max_steps"]))
    if step < warmup:
        return cfg["lr"] * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg["max_steps"] - warmup)
    floor = cfg["lr"] * cfg["min_lr_frac"]
    return floor + (cfg["lr"] - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def to_device(batch, device):
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


# -----------------------------------------------------------------------------
# models


def build_student(cfg, teacher, resume_dir):
    """The student: resumed from out_dir, or started the way init_from says (model.load_vlm)."""
    if resume_dir:
        return VLM.from_pretrained(resume_dir)
    keys = ("vision_model", "llm_model", "llm", "vision", "tokenizer", "image_processor", "connector",
            "vision_feature_select_strategy")
    return load_vlm(cfg["init_from"], teacher=teacher or cfg["teacher"] or None,
                    data_dir=os.path.dirname(os.path.abspath(cfg["data"].split(",")[0])), seed=cfg["seed"],
                    **{k: cfg[k] for k in keys})


def build_model(cfg, resume_dir):
    teacher = None
    if cfg["stage"] != "sft" and (cfg["kd_weight"] > 0 or cfg["vat_weight"] > 0 or cfg["taf"]):
        ckpt = find_checkpoint(cfg["teacher"]) if cfg["teacher"] else None
        if ckpt is None:
            raise FileNotFoundError(f"teacher={cfg['teacher']!r}: no teacher checkpoint; kd_weight/vat_weight/taf "
                                    "need one (train it with train_sft.py config/shapes_teacher.py)")
        teacher = VLM.from_pretrained(ckpt)
    student = build_student(cfg, teacher, resume_dir)
    # Whatever dtype the checkpoint was saved in (transformers 5 follows a bf16 Qwen config), AdamW updates
    # float32 master weights: in bf16, updates smaller than 1/256 of a weight round away. bf16 lives in autocast.
    student.float()
    ts = TeacherStudent(teacher, student, cfg["student_layers"], cfg["teacher_layers"],
                        matching=cfg["matching"], vat_queries=cfg["vat_queries"], vat_pool=cfg["vat_pool"],
                        vat_loss=cfg["vat_loss"], vat_layer_reduce=cfg["vat_layer_reduce"],
                        kd_weight=cfg["kd_weight"], vat_weight=cfg["vat_weight"],
                        kd_temperature=cfg["kd_temperature"])
    if cfg["taf"] and not student.config.taf:
        ts.apply_taf()
    train_llm = cfg["train_llm"]
    if train_llm not in (None, True, False):
        raise ValueError(f"train_llm={train_llm!r}: use None (the stage decides), True or False")
    if cfg["train_vision"] and teacher is not None:
        raise ValueError("train_vision=True with a teacher: KD/VAT/TAF rely on the student sharing the teacher's "
                         "frozen vision tower")
    if cfg["lora_rank"] > 0:
        if not (train_llm if train_llm is not None else cfg["stage"] != "dpt"):
            raise ValueError(f"lora_rank={cfg['lora_rank']}: LoRA adapts the LM, which does not train in this stage "
                             "(DPT trains the image adapter only); set lora_rank=0, or train_llm=1")
        add_lora(student, cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["lora_targets"])
    params = set_trainable(student, cfg["stage"], train_llm, cfg["train_vision"])
    return ts, params


def build(cfg, resume_dir, state, amp):
    """The models as training starts them, on the CPU: built (build_model), LoRA's adapters restored at resume, the
    frozen teacher in the compute dtype."""
    lora = cfg["lora_rank"] > 0
    ts, _ = build_model(cfg, None if lora else resume_dir)
    if lora and amp is not None and not cfg["fsdp"]:
        # LoRA's frozen base LM is held in the compute dtype, as the teacher is: autocast would cast it there at every
        # use anyway, and it is most of the memory. (The tower stays float32: teacher and student must keep equal
        # towers across stages for TAF. FSDP's mixed precision casts for compute itself.)
        for n, p in ts.student.llm.named_parameters():
            if not p.requires_grad:
                p.data = p.data.to(amp)
    if lora and state:
        restore_lora(ts.student, state, resume_dir)
    if ts.teacher is not None and amp is not None:
        cast_weights(ts.teacher, amp)  # frozen: half the memory, and it runs under autocast anyway
    return ts


def build_on_rank0(cfg, resume_dir, state, amp, master):
    """FSDP start-up: rank 0 builds the models on its CPU as one process would (every way a model starts, every
    check) and keeps their weights; every rank gets the modules with their parameters on the meta device (buffers,
    tokenizer and image processor included: a few MB), to shard them before any weight takes memory (load_shards).
    Returns (the models, on rank 0 the state dicts of the student wrapper and of the teacher, else None). An error on
    rank 0 is raised on every rank."""
    built = whole = None
    if master:
        try:
            built = build(cfg, resume_dir, state, amp)
            whole = (built.state_dict(), built.teacher.state_dict() if built.teacher is not None else None)
            for m in (built, built.teacher):
                if m is not None:
                    params_to_meta(m)
        except Exception as e:
            built = e
    box = [built]
    dist.broadcast_object_list(box)
    if isinstance(box[0], Exception):
        raise box[0]
    if not master:
        register_unpickled(box[0])
        if box[0].teacher is not None:
            register_unpickled(box[0].teacher)
    return box[0], whole


def register_unpickled(module):
    """transformers keeps, per model class, which outputs a forward can record (a vision tower's hidden states), and
    fills that table in the model's constructor, which an unpickled model never ran in this process: without it the
    tower would return no hidden states."""
    from transformers import PreTrainedModel
    from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    for m in module.modules():
        if isinstance(m, PreTrainedModel):
            _CAN_RECORD_REGISTRY[m] = m._can_record_outputs


def params_to_meta(module):
    """Replace every parameter of `module` by one on the meta device (no memory), keeping ties and requires_grad;
    buffers stay as they are (some are computed at construction and never saved)."""
    meta = {}
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None:
                if id(p) not in meta:
                    meta[id(p)] = torch.nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)
                m._parameters[name] = meta[id(p)]


def load_shards(ts, whole, device):
    """Give the sharded meta parameters of the student, and the teacher's, their values: every rank allocates its
    shards on `device` (whole tensors where a module is not sharded) and receives rank 0's values tensor by tensor, so
    that no rank holds more than its shards plus the tensor in flight."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    for module, weights in zip((ts, ts.teacher), whole or (None, None)):
        if module is None:
            continue
        buffers = {n: b.to(device) for n, b in module.named_buffers()}
        module.to_empty(device=device)
        with torch.no_grad():
            for n, b in module.named_buffers():
                b.copy_(buffers[n])
        set_model_state_dict(module, weights or {}, options=StateDictOptions(full_state_dict=True,
                                                                              broadcast_from_rank0=True))


def decoder_layers(llm):
    return llm.base_model.layers


def shard(ts, amp, teacher_too):
    """FSDP2: each decoder layer of the student's LM is a unit, the rest (tower, connectors, embeddings, head) is
    the root unit, TeacherStudent, whose forward is the step; bf16 compute with float32 gradient reduction under
    autocast. The frozen teacher's decoder layers are sharded one by one (its forward calls them directly)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32) if amp is not None else MixedPrecisionPolicy()
    for layer in decoder_layers(ts.student.llm):
        fully_shard(layer, mp_policy=mp)
    fully_shard(ts, mp_policy=mp)
    if ts.teacher is not None and teacher_too:
        for layer in decoder_layers(ts.teacher.llm):
            fully_shard(layer, reshard_after_forward=True)  # each its own root: say so, or it stays gathered


def gather_state(ts, optimizer, fsdp):
    """(weights with the student's names, optimizer state): the live ones, or under FSDP gathered from every
    rank's shards to rank 0 on the CPU (every rank must call it; the others get empty dicts)."""
    if not fsdp:
        return ts.student.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(ts, options=opts)
    return {k.removeprefix("student."): v for k, v in weights.items()}, get_optimizer_state_dict(ts, optimizer, options=opts)


def restore_lora(student, state, resume_dir):
    """A LoRA run resumes from its base (init_from, rebuilt) plus the adapters and other trainable weights kept in
    train_state.pt: the checkpoint's merged weights cannot be split back into base and adapters bit for bit. The
    base must still be what it was: the merge must give the checkpoint's weights exactly."""
    missing = [n for n, p in student.named_parameters() if p.requires_grad and n not in state["trainable"]]
    if missing:
        raise ValueError(f"{resume_dir}: train_state.pt lacks the trainable weights {missing[:3]}...; "
                         "it was not written by a LoRA run with these settings")
    with torch.no_grad():
        for n, p in student.named_parameters():
            if n in state["trainable"]:
                p.copy_(state["trainable"][n])
    saved = read_weights(resume_dir)  # one file or shards, as save_pretrained wrote it
    merged = plain_state_dict(student)
    # (a tolerance: the save merged the same numbers, on the CPU, but a different BLAS may round the last bits)
    if any(not torch.allclose(merged[k].float(), v, rtol=1e-5, atol=1e-6) for k, v in saved.items()):
        raise ValueError(f"cannot resume the LoRA run in {resume_dir}: its base weights (init_from) changed since the "
                         "run started, so base + adapters no longer give the checkpoint. Start a new out_dir")


def compile_models(ts, **kwargs):
    """torch.compile what training runs: the LMs' decoders (llm.base_model, called directly so that logits are
    computed only where the losses need them), in place, so state_dict keys and checkpoints do not change."""
    for m in (ts.student, ts.teacher):
        if m is not None:
            m.llm.base_model.compile(**kwargs)


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


def check_out_dir(out_dir):
    """Refuse an out_dir no checkpoint could be written to: the first save comes only after save_interval steps."""
    path = os.path.abspath(out_dir)
    for p in (path, path + ".tmp", path + ".old"):  # the checkpoint swap writes all three (save_checkpoint)
        if os.path.exists(p) and not os.path.isdir(p):
            raise ValueError(f"out_dir={out_dir}: {p} is a file, not a directory; choose another out_dir, or move "
                             "the file away")
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"out_dir={out_dir}: {parent} is a file, not a directory, so no directory can be made "
                         "under it; choose another out_dir")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"out_dir={out_dir}: cannot write in {parent} (no permission); choose an out_dir where "
                         "you can write")


def check_resume(saved, cfg, out_dir):
    """Resume only the same run: every setting outside RESUME_FREE must match the saved one."""
    diff = [k for k in cfg if k in saved and k not in RESUME_FREE and saved[k] != cfg[k]]
    if diff:
        raise ValueError(f"{out_dir} holds a run with other settings (" +
                         "; ".join(f"{k}: {saved[k]!r} there, {cfg[k]!r} now" for k in diff) +
                         "): rerun with its settings to resume or finish it, or choose another out_dir")


def check_world(state, world, out_dir):
    """Resume only on the number of processes that saved the run: the data position, the batch of a step and each
    rank's RNG stream depend on it. (Checkpoints that do not record it hold one RNG state per rank, or one dict.)"""
    rng = state["rng"]
    saved = state.get("world", len(rng) if isinstance(rng, list) else 1)
    if saved != world:
        how = "plain python, or torchrun --nproc_per_node=1" if saved == 1 else f"torchrun --nproc_per_node={saved}"
        raise ValueError(f"{out_dir} was saved by a run on {saved} process{'es' * (saved > 1)} and this one has "
                         f"{world}: resume it on {saved} ({how}), or choose another out_dir")


@contextmanager
def stop_signals():
    """SIGINT (Ctrl-C) and SIGTERM (cluster pre-emption) ask the loop to finish its step, save and exit; the list
    this yields holds the signals received. A second Ctrl-C stops at once."""
    got = []

    def handler(signum, frame):
        if got and signum == signal.SIGINT:
            raise KeyboardInterrupt
        got.append(signum)
    try:
        old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread (an embedding program): leave signals alone
        old = {}
    try:
        yield got
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _quiet_worker(_):
    # A Ctrl-C reaches the DataLoader workers too; they must keep serving while the main process saves.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


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


# -----------------------------------------------------------------------------
# the loop


@torch.no_grad()
def evaluate_loss(model, loader, n_batches, device, autocast, kd, vat):
    model.eval()
    sums, n = {}, 0
    for batch in loader:
        if n == n_batches:
            break
        if "input_ids" not in batch:  # every sample dropped
            continue
        with autocast:
            out = model(to_device(batch, device), kd=kd, vat=vat)
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += 1
    model.train()
    return {k: v / max(1, n) for k, v in sums.items()}


def train(cfg):
    """Run one stage with the resolved config dict `cfg`; returns the last log record."""
    if cfg["dtype"] != "auto" and cfg["dtype"] not in AMP_DTYPES:
        raise ValueError(f"dtype={cfg['dtype']!r}: use auto, float32, bfloat16 or float16")
    if int(os.environ.get("RANK", 0)) == 0:  # the one that writes
        check_out_dir(cfg["out_dir"])
    ddp, rank, world, device = compute_init(single_group=cfg["fsdp"])
    master = rank == 0
    out_dir = cfg["out_dir"]
    resume_dir = find_checkpoint(out_dir)
    state = None
    if resume_dir:
        state = load_train_state(resume_dir, out_dir)
        check_resume(state["config"], cfg, out_dir)
        if state["step"] >= cfg["max_steps"]:
            print0(f"{out_dir} is already trained to step {state['step']} (max_steps={cfg['max_steps']}); nothing to do")
            compute_cleanup()
            return state["log"][-1] if state["log"] else {}
        check_world(state, world, out_dir)
        print0(f"resuming {out_dir} from step {state['step']}")
    amp = AMP_DTYPES[cfg["dtype"]] if cfg["dtype"] != "auto" else (torch.bfloat16 if device.type == "cuda" else None)
    # One seed for building, so that new weights (a TAF post_connector, LoRA's A) are the same whichever rank builds
    # them. Then one seed per rank (dropout).
    torch.manual_seed(cfg["seed"])
    lora = cfg["lora_rank"] > 0
    if cfg["fsdp"]:  # built whole on rank 0's CPU only; every rank gets the modules on the meta device
        ts, whole = build_on_rank0(cfg, resume_dir, state, amp, master)
    else:
        ts = build(cfg, resume_dir, state, amp).to(device)
    student = ts.student
    torch.manual_seed(cfg["seed"] + rank)
    random.seed(cfg["seed"] + rank)
    np.random.seed(cfg["seed"] + rank)
    # The layer pairs the student was distilled on travel with every later checkpoint (SFT has no
    # teacher), so evaluate.py measures alignment where training aligned it.
    distill = (dict(student_layers=ts.student_layers, teacher_layers=ts.teacher_layers, matching=ts.matching)
               if ts.teacher is not None else (student.config.extra or {}).get("distill"))
    kd, vat = cfg["kd_weight"] > 0, cfg["vat_weight"] > 0
    autocast = torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()
    # float16 needs its loss scaled (its range is too small for gradients); bfloat16 does not
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    if lora or cfg["fsdp"]:
        # With a frozen embedding (LoRA, or a frozen LM under FSDP) a text-only micro-batch gives nothing before
        # layer 0 a gradient: that rank's backward would skip the decoder layers' re-gathers (a frozen LM) or reduce
        # layer 0's adapters out of order (LoRA), out of step with a rank that has an image. A gradient on the
        # embedding output takes every rank's backward through every layer in the same order.
        student.llm.enable_input_require_grads()
    if cfg["grad_ckpt"]:
        enable_checkpointing(student.llm)
    if cfg["compile"]:
        compile_models(ts)
    if cfg["fsdp"]:
        shard(ts, amp, cfg["fsdp_teacher"])  # in place: ts is now the FSDP root; its parameters are shards
        load_shards(ts, whole, device)
        whole, model = None, ts
    else:  # a trained tower's layers above vision_feature_layer get no gradient: let DDP expect that
        model = DDP(ts, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=cfg["train_vision"]) if ddp else ts
    params = [p for p in student.parameters() if p.requires_grad]

    # data: every file is read a little before training, so a wrong path or image folder stops here, not
    # after hours of training on nothing
    tok, N_v = student.tokenizer, student.num_image_tokens
    folder = cfg["image_folder"] or None
    placeholder = None

    def load(paths):
        nonlocal placeholder
        parts = [LLaVADataset(p, folder, tok, student.image_processor, N_v, cfg["max_length"]) for p in paths.split(",")]
        for d in parts:
            good, _ = check_dataset(d)
            placeholder = placeholder or good
        return torch.utils.data.ConcatDataset(parts)
    dataset = load(cfg["data"])
    if cfg["val_data"]:
        val_set, train_idx = load(cfg["val_data"]), list(range(len(dataset)))
    else:  # a fixed held-out slice of the training file
        n_val = max(1, int(cfg["val_frac"] * len(dataset))) if cfg["eval_interval"] > 0 else 0
        perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(1234)).tolist()
        val_set, train_idx = torch.utils.data.Subset(dataset, perm[:n_val]), perm[n_val:]
    if not train_idx:
        raise ValueError(f"data={cfg['data']}: {len(dataset)} sample(s), all held out for validation; give more data, "
                         "a separate val_data file, or eval_interval=0")
    print0(validation_note(cfg, dataset, val_set))
    train_set = torch.utils.data.Subset(dataset, train_idx)
    step = state["step"] if state else 0
    sampler = BatchSampler(len(train_set), cfg["batch_size"], cfg["seed"], rank, world, step * cfg["grad_accum"])
    collate_fn = partial(collate, pad_id=tok.pad_token_id)
    loader = iter(torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=collate_fn,
                                              num_workers=cfg["num_workers"], pin_memory=device.type == "cuda",
                                              worker_init_fn=_quiet_worker if cfg["num_workers"] else None))
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=cfg["batch_size"], collate_fn=collate_fn)
    # A micro-batch whose samples were all dropped still runs forward and backward, on this one good sample with
    # weight 0: under DDP every rank must join every gradient all-reduce, or the others wait forever.
    placeholder = collate([placeholder], tok.pad_token_id)
    monitor = DataMonitor(show=master)

    # optimizer (AdamW; no weight decay on biases and norms)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]),
                                  fused=device.type == "cuda")
    log, skipped = [], 0  # skipped: steps in which no rank had a sample (no update; the LR schedule waits)
    if state:
        if cfg["fsdp"]:  # the saved state is whole: rank 0 reads it and sends each rank its shard, tensor by tensor
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(ts, optimizer, state["optimizer"] if master else {},
                                     options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        else:
            optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"][rank] if isinstance(state["rng"], list) else state["rng"])
        log = state["log"]
        skipped = state.get("skipped", 0)
    n_params = sum(p.numel() for p in params)
    print0(f"stage {cfg['stage']}: {n_params / 1e6:.2f}M trainable params, {len(train_set)} train samples, "
           f"world {world}, device {device}, dtype {amp or torch.float32}, kd={kd} vat={vat} taf={student.config.taf}")

    def checkpoint():
        rngs = [None] * world
        if ddp:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        weights, opt_state = gather_state(ts, optimizer, cfg["fsdp"])
        if master:
            # checkpoints are float32, and written (and LoRA-merged) from the CPU
            weights = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype)
                       for k, v in weights.items()}
            student.config.extra = {"stage": cfg["stage"], "step": step, "train_config": cfg, "distill": distill}
            # LoRA: the directory holds the merged model; the adapters (and the rest that trains) stay unmerged
            # in train_state.pt for resume
            trainable = {n: weights[n] for n, p in student.named_parameters() if p.requires_grad} if lora else None
            save_checkpoint(out_dir, student, {"step": step, "optimizer": opt_state, "rng": rngs, "world": world,
                                               "skipped": skipped, "scaler": scaler.state_dict() if scaler else None,
                                               "trainable": trainable,
                                               "config": cfg, "log": log}, log,
                            weights=weights)
        if ddp:
            dist.barrier()

    def all_ranks(values, op=dist.ReduceOp.SUM):
        """A float64 tensor of `values` (host numbers or 0-d device tensors), reduced over the ranks."""
        t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
        if ddp:
            dist.all_reduce(t, op=op)
        return t

    model.train()  # the teacher is not a submodule: it stays in eval()
    bar = tqdm(total=cfg["max_steps"], initial=step, disable=not master, desc=cfg["stage"], dynamic_ncols=True)
    t0, tokens, done_here = time.time(), 0, 0
    sums, n_micro = torch.zeros(len(LOSSES), device=device), 0
    with stop_signals() as signals:
        while step < cfg["max_steps"]:
            lr = lr_at(step - skipped, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            real_here = 0
            for micro in range(cfg["grad_accum"]):
                batch = next(loader)
                monitor.add(batch)
                real = "input_ids" in batch
                real_here += real
                if real:
                    tokens += int(batch["attention_mask"].sum())  # counted on the host, before the copy
                    n_micro += 1
                batch = to_device(batch if real else placeholder, device)
                sync = not ddp or micro == cfg["grad_accum"] - 1  # reduce gradients once, after the last micro-step
                if cfg["fsdp"]:
                    model.set_requires_gradient_sync(sync)
                with (nullcontext() if sync or cfg["fsdp"] else model.no_sync()), autocast:
                    out = model(batch, kd=kd, vat=vat)
                loss = out["total"] * ((1.0 if real else 0.0) / cfg["grad_accum"])
                (scaler.scale(loss) if scaler else loss).backward()
                if real:  # summed on the device; read (one sync) only at log time
                    sums += torch.stack([out[k].detach().float() for k in LOSSES])
            # One tiny collective per step: whether any rank had a sample, and the signals received (a signal may
            # reach the ranks at different steps: they agree, so that all of them stop after the same step).
            flags = [real_here, max(signals, default=0)]
            any_real, got = (int(v) for v in all_ranks(flags, op=dist.ReduceOp.MAX)) if ddp else flags
            if any_real:
                if scaler:
                    scaler.unscale_(optimizer)  # clip the true gradients
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"]) if cfg["grad_clip"] > 0 else None
                if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
                    grad_norm = grad_norm.full_tensor()
                if scaler:
                    scaler.step(optimizer)  # skipped when the gradients overflowed
                    scaler.update()
                else:
                    optimizer.step()
            else:  # every sample of this step was dropped, on every rank: AdamW would still move the weights
                skipped, grad_norm = skipped + 1, None
            optimizer.zero_grad(set_to_none=True)
            step += 1
            done_here += 1
            bar.update(1)

            if step % cfg["log_interval"] == 0 or step == cfg["max_steps"]:
                # every rank's losses, tokens and drops (one collective, one sync)
                tot = all_ranks([*sums, n_micro, tokens, monitor.fetched, monitor.dropped_fetches]).tolist()
                losses, (n, ntok, fetched, n_drop) = tot[:len(LOSSES)], tot[len(LOSSES):]
                dt = time.time() - t0
                rec = {"step": step, "lr": lr, **{k: v / max(1, n) for k, v in zip(LOSSES, losses)},
                       "grad_norm": float(grad_norm) if grad_norm is not None else None,
                       "tok_per_s": ntok / dt, "mem_gb": _memory_gb(device)}
                if n_drop:
                    rec["dropped_frac"] = n_drop / fetched
                if skipped:
                    rec["skipped_steps"] = skipped
                log.append(rec)
                bar.set_postfix(lm=f"{rec['lm']:.3f}", kd=f"{rec['kd']:.3f}", vat=f"{rec['vat']:.3f}")
                if master:
                    bar.write(f"step {step}: " + " ".join(f"{k} {v:.4g}" for k, v in rec.items()
                                                          if k != "step" and v is not None))
                if n_drop * 2 > fetched and fetched >= 2 * cfg["batch_size"] * world:  # every rank sees the sums
                    reasons, first = monitor.reasons, monitor.first
                    if ddp:  # the breakdown and the examples of every rank, as the counts are
                        every = [None] * world
                        dist.all_gather_object(every, (reasons, first))
                        reasons, first = sum((r for r, _ in every), Counter()), [d for _, f in every for d in f]
                    raise ValueError(too_many_dropped(cfg["data"], int(n_drop), int(fetched), first, reasons) +
                                     "\n(counted since this run started, over all ranks; no checkpoint written)")
                t0, tokens, sums, n_micro = time.time(), 0, torch.zeros_like(sums), 0
            if cfg["eval_interval"] > 0 and (step % cfg["eval_interval"] == 0 or step == cfg["max_steps"]) and len(val_set):
                if master or cfg["fsdp"]:  # under FSDP every forward gathers shards: all ranks run the same batches
                    ev = evaluate_loss(ts, val_loader, cfg["eval_batches"], device, autocast, kd, vat)
                if master:
                    log.append({"step": step, **{f"val_{k}": v for k, v in ev.items()}})
                    bar.write(f"step {step}: val " + " ".join(f"{k} {v:.4f}" for k, v in ev.items()))
                if ddp:
                    dist.barrier()
            stop = cfg["stop_after"] > 0 and done_here >= cfg["stop_after"]
            if step % cfg["save_interval"] == 0 or step == cfg["max_steps"] or stop or got:
                checkpoint()
            if got:
                bar.close()
                print0(f"{signal.Signals(got).name}: saved step {step} to {out_dir}; rerun the same command to resume")
                model = None  # DDP's reducer holds the process group: release it first (see compute_cleanup)
                compute_cleanup()
                raise SystemExit(128 + got)
            if stop:
                print0(f"stop_after={cfg['stop_after']}: saved step {step} to {out_dir}; rerun the same command to resume")
                break
    bar.close()
    # each sample once, over all ranks (in a later epoch another rank may meet the same bad sample)
    seen = [(monitor.dropped, monitor.truncated)] * world
    if ddp:
        dist.all_gather_object(seen, (monitor.dropped, monitor.truncated))
    dropped = {k: r for d, _ in seen for k, r in d.items()}
    truncated = set().union(*(t for _, t in seen))
    if dropped or truncated:
        print0(f"data: dropped samples {dict(Counter(dropped.values())) or 'none'}; {len(truncated)} cut at "
               f"max_length={cfg['max_length']}" + (f"; {skipped} step(s) without a sample skipped" if skipped else ""))
    model = None  # DDP's reducer holds the process group: release it first (see compute_cleanup)
    compute_cleanup()
    return log[-1] if log else {}


def _memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource  # peak resident memory of this process (Linux reports kB)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(stage_defaults, argv=None, doc=""):
    """Entry point of the stage scripts: DEFAULTS < stage defaults < config files < --key=value."""
    cfg = dict(DEFAULTS, **stage_defaults)
    cfg = configure(cfg, sys.argv[1:] if argv is None else argv, doc, [__file__])
    return train(cfg)
