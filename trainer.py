"""
The one training loop, shared by the three stages (train_dpt.py, train_dft.py, train_sft.py).

train(cfg) reads as the run: start-up (processes, resume point, models), data, optimizer, then the loop (gradient
accumulation, autocast, cosine LR with warm-up, clipping, logging, validation, checkpoints). The helpers follow it
in the order it calls them. What differs between one process / DDP and FSDP is behind one small interface
(Replicated, Sharded); the data order is a pure function of the seed and the sample position (BatchSampler), so
resume and DDP need no data-loader state; checkpoints are directories, written atomically (checkpoint.py), from
which a rerun resumes bit for bit (Checkpointer).
"""

import bisect
import fcntl
import math
import os
import random
import signal
import sys
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

import attention_distill as ad
from checkpoint import find_checkpoint, load_train_state, plain_state_dict, read_weights, save_checkpoint
from common import cast_weights, compute_cleanup, compute_init, print0, resolve_dtype
from configurator import configure
from data import LLaVADataset, check_dataset, collate, too_many_dropped
from model import VLM, TeacherStudent, load_vlm
from parallel import Replicated, Sharded
from stages import add_lora, set_trainable, stage, trains_llm

# Defaults shared by the stages; each stage script overrides a few (stages.stage_defaults), then config files and
# --key=value.
DEFAULTS = dict(
    # -- what runs ----------------------------------------------------------------------------------------------
    stage="sft",                  # dpt | dft | sft: the stage's recipe (stages.STAGES: losses, what trains, teacher)
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
    connector="mlp2x_gelu",       # the connector of a new model: mlp{depth}x_gelu, as LLaVA's
    vision_feature_select_strategy="",  # "": the tower's own (CLIP: "default", CLS dropped; SigLIP: "full");
                                  # "default" on SigLIP drops the first patch, as the reference code does
    # -- data ---------------------------------------------------------------------------------------------------
    data="out/shapes/instruct.json",  # LLaVA .json/.jsonl; several files joined by commas are mixed
    image_folder="",              # the images' root (default: the folder holding the data file)
    val_data="",                  # a separate validation file (default: hold out val_frac of data)
    val_frac=0.02,                # the held-out fraction of data when there is no val_data
    max_length=512,               # tokens per sample; longer text is cut (and counted), a cut image drops the sample
    num_workers=0,                # DataLoader worker processes
    # -- the method (stages.py: what each stage does; attention_distill.VATSettings: the VAT settings) ----------
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
    # -- privileged supervision, for training the shapes teacher only (privileged.py; never in a distilling stage) -
    look_weight=0.0,              # weight of the attention supervision: chosen heads told where to look (0: off)
    readout_weight=0.0,           # weight of the training-only readout of where the looked-at objects are (0: off)
    scenes="",                    # the world's scenes.json the targets come from ("": next to the first data file)
    privileged={},                # which layers and heads (privileged.PrivilegedSettings), e.g. dict(np_layers=[1])
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
LOSSES = ("lm", "kd", "vat", "total")
PRIVILEGED_LOSSES = ("look", "readout")  # logged too while a teacher trains with privileged supervision


def train(cfg):
    """Run one stage with the resolved config dict `cfg`; returns the last log record. The process that writes
    (rank 0) holds out_dir's lock for the whole run (out_dir_lock): one writer per out_dir."""
    check_settings(cfg)
    writer = int(os.environ.get("RANK", 0)) == 0  # the one that writes
    if writer:
        check_out_dir(cfg["out_dir"])
    with out_dir_lock(cfg["out_dir"]) if writer else nullcontext():
        return run_stage(cfg)


def run_stage(cfg):
    """The stage itself, from the resume point to the last step (train() checks and locks out_dir first)."""
    amp = autocast_dtype(cfg["dtype"])  # None: float32 throughout
    distributed, rank, world, device = compute_init(single_group=cfg["fsdp"])
    par = (Sharded if cfg["fsdp"] else Replicated)(distributed, rank, world, device)
    out_dir, resume_dir, state = cfg["out_dir"], *resume_point(cfg)
    if state and state["step"] >= cfg["max_steps"]:
        print0(f"{out_dir} is already trained to step {state['step']} (max_steps={cfg['max_steps']}); nothing to do")
        compute_cleanup()
        return state["log"][-1] if state["log"] else {}
    if state:
        check_world(state, world, out_dir)
        print0(f"resuming {out_dir} from step {state['step']}")

    # models: one seed while building, so that new weights (a TAF post_connector, LoRA's A) are the same whichever
    # rank builds them; then one seed per rank (dropout)
    torch.manual_seed(cfg["seed"])
    ts = par.build(lambda: build(cfg, resume_dir, state, amp))
    seed_everything(cfg["seed"] + rank)
    model = par.wrap(prepare(ts, cfg), cfg, amp)
    params = [p for p in ts.parameters() if p.requires_grad]  # the student's (and a privileged readout's)
    kd, vat = cfg["kd_weight"] > 0, cfg["vat_weight"] > 0
    autocast = torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()

    data = load_data(cfg, ts.student, state["step"] if state else 0, rank, world, device)
    optimizer, scaler = make_optimizer(params, cfg, device, amp)
    step, skipped, log = restore(state, par, ts, optimizer, scaler) if state else (0, 0, [])
    print0(f"stage {cfg['stage']}: {sum(p.numel() for p in params) / 1e6:.2f}M trainable params, {data.n_train} train "
           f"samples, world {world}, device {device}, dtype {amp or torch.float32}, kd={kd} vat={vat} "
           f"taf={ts.student.config.taf}")
    checkpointer = Checkpointer(cfg, par, ts, optimizer, scaler)
    logger = Logger(cfg, par, data.monitor, log, step)

    model.train()  # the teacher is not a submodule: it stays in eval()
    done_here = 0
    with stop_signals() as signals:
        while step < cfg["max_steps"]:
            lr = lr_at(step - skipped, cfg)  # skipped: steps in which no rank had a sample; the schedule waits
            for g in optimizer.param_groups:
                g["lr"] = lr
            real_here = 0
            for micro in range(cfg["grad_accum"]):
                batch = next(data.train)
                real = logger.fetched(batch)
                real_here += real
                # A micro-batch whose samples were all dropped still runs forward and backward, on a placeholder
                # sample at weight 0: under DDP every rank must join every gradient all-reduce.
                batch = to_device(batch if real else data.placeholder, device)
                with par.sync(model, last=micro == cfg["grad_accum"] - 1), autocast:
                    out = model(batch, kd=kd, vat=vat)
                loss = out["total"] * ((1.0 if real else 0.0) / cfg["grad_accum"])
                (scaler.scale(loss) if scaler else loss).backward()
                if real:
                    logger.losses(out)
            # One tiny collective per step: whether any rank had a sample, and the signals received (a signal may
            # reach the ranks at different steps: they agree, so that all of them stop after the same step).
            any_real, got = par.agree([real_here, max(signals, default=0)])
            if any_real:
                grad_norm = update(optimizer, scaler, params, cfg["grad_clip"])
            else:  # every sample of this step was dropped, on every rank: AdamW would still move the weights
                skipped, grad_norm = skipped + 1, None
            optimizer.zero_grad(set_to_none=True)
            step += 1
            done_here += 1
            logger.step(step, lr, grad_norm, skipped)
            if cfg["eval_interval"] > 0 and due(step, cfg["eval_interval"], cfg) and data.n_val:
                # under FSDP every forward gathers shards: all ranks run the same batches
                ev = evaluate_loss(ts, data.val, cfg["eval_batches"], device, autocast, kd, vat) \
                    if par.master or par.sharded else None
                logger.validation(step, ev)
                par.barrier()
            stop = cfg["stop_after"] > 0 and done_here >= cfg["stop_after"]
            if due(step, cfg["save_interval"], cfg) or stop or got:
                checkpointer.save(step, skipped, log)
            if got:
                logger.close()
                print0(f"{signal.Signals(got).name}: saved step {step} to {out_dir}; rerun the same command to resume")
                model = None  # DDP's reducer holds the process group: release it first (see compute_cleanup)
                compute_cleanup()
                raise SystemExit(128 + got)
            if stop:
                print0(f"stop_after={cfg['stop_after']}: saved step {step} to {out_dir}; rerun the same command to "
                       "resume")
                break
    logger.close()
    report_drops(data.monitor, par, cfg, skipped)
    model = None  # DDP's reducer holds the process group: release it first (see compute_cleanup)
    compute_cleanup()
    return log[-1] if log else {}


def main(stage_defaults, argv=None, doc=""):
    """Entry point of the stage scripts: DEFAULTS < stage defaults < config files < --key=value."""
    cfg = dict(DEFAULTS, **stage_defaults)
    cfg = configure(cfg, sys.argv[1:] if argv is None else argv, doc, [__file__])
    return train(cfg)


def due(step, interval, cfg):
    """Every `interval` steps, and at the last one."""
    return step % interval == 0 or step == cfg["max_steps"]


# -----------------------------------------------------------------------------
# start-up: settings, out_dir, the resume point


def autocast_dtype(name):
    """The dtype a step computes in under autocast, from the `dtype` setting (auto: bfloat16 on CUDA); None for
    float32 (no autocast). Trainable weights stay float32 masters whatever it is."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(name, device, allowed=("auto", "float32", "bfloat16", "float16"))
    return None if dtype == torch.float32 else dtype


def check_settings(cfg):
    """Refuse, before anything is built, numbers that cannot work and losses the stage has no teacher for."""
    at_least = dict(batch_size=1, grad_accum=1, max_steps=1, log_interval=1, save_interval=1, max_length=1,
                    eval_interval=0, eval_batches=1, stop_after=0, num_workers=0, lora_rank=0)
    for key, low in at_least.items():
        if cfg[key] < low:
            raise ValueError(f"{key}={cfg[key]}: must be at least {low}")
    if not cfg["lr"] >= 0:
        raise ValueError(f"lr={cfg['lr']}: must be at least 0")
    if not cfg["kd_temperature"] > 0:
        raise ValueError(f"kd_temperature={cfg['kd_temperature']}: must be above 0")
    if not 0 <= cfg["val_frac"] < 1:
        raise ValueError(f"val_frac={cfg['val_frac']}: the held-out fraction lies in [0, 1)")
    privileged = [f"{k}={cfg[k]}" for k in ("look_weight", "readout_weight") if cfg[k]]
    if privileged and (stage(cfg["stage"])["teacher"] or cfg["fsdp"]):
        raise ValueError(f"{', '.join(privileged)}: privileged supervision is for training a teacher (train_sft.py "
                         "config/shapes_teacher.py), on one process or DDP; a distilling stage's student never gets "
                         f"it (stage {cfg['stage']}{', fsdp=True' if cfg['fsdp'] else ''}): set them to 0")
    if not stage(cfg["stage"])["teacher"]:
        asked = [f"{k}={cfg[k]}" for k in ("kd_weight", "vat_weight") if cfg[k]] + (["taf=True"] if cfg["taf"] else [])
        if asked:
            raise ValueError(f"stage {cfg['stage']} loads no teacher, so {', '.join(asked)} cannot apply: leave "
                             "them out (TAF comes with the checkpoint of the stage that applied it), or run a "
                             "distilling stage (train_dpt.py / train_dft.py)")


def resume_point(cfg):
    """(the checkpoint directory this run resumes from, its train_state.pt), or (None, None) for a new run. Only the
    same run resumes (check_resume)."""
    resume_dir = find_checkpoint(cfg["out_dir"])
    if not resume_dir:
        return None, None
    state = load_train_state(resume_dir, cfg["out_dir"])
    check_resume(state["config"], cfg, cfg["out_dir"])
    return resume_dir, state


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


@contextmanager
def out_dir_lock(out_dir):
    """Hold <out_dir>.lock (an flock) while the run lives: a second run writing the same out_dir (the same command
    twice) is refused at start; the two would replace each other's checkpoint swap. The OS drops the lock when the
    process ends, however it ends, so a crashed or killed run leaves nothing stuck (the empty file stays)."""
    path = os.path.abspath(out_dir) + ".lock"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        f = open(path, "a")
    except OSError as e:
        raise ValueError(f"out_dir={out_dir}: cannot open the lock file {path} ({e.strerror}); move it away") from e
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ValueError(f"out_dir={out_dir}: another run is writing it now (it holds {out_dir}.lock); wait for it to "
                         "end, or choose another out_dir") from None
    try:
        yield
    finally:
        f.close()  # releases the lock


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


def seed_everything(seed):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


# -----------------------------------------------------------------------------
# models


def build_student(cfg, teacher, resume_dir):
    """The student: resumed from out_dir, or started the way init_from says (model.load_vlm)."""
    return VLM.from_pretrained(resume_dir) if resume_dir else load_vlm(cfg, teacher)


def build_model(cfg, resume_dir):
    """(TeacherStudent, the trainable parameters): the teacher when the stage loads one (stages.STAGES) and a loss or
    TAF needs it, the student, TAF applied to a new student, LoRA's adapters, the stage's trainable set."""
    teacher = None
    if stage(cfg["stage"])["teacher"] and (cfg["kd_weight"] > 0 or cfg["vat_weight"] > 0 or cfg["taf"]):
        ckpt = find_checkpoint(cfg["teacher"]) if cfg["teacher"] else None
        if ckpt is None:
            raise FileNotFoundError(f"teacher={cfg['teacher']!r}: no teacher checkpoint; kd_weight/vat_weight/taf "
                                    "need one (train it with train_sft.py config/shapes_teacher.py)")
        teacher = VLM.from_pretrained(ckpt)
    student = build_student(cfg, teacher, resume_dir)
    # Whatever dtype the checkpoint was saved in (transformers 5 follows a bf16 Qwen config), AdamW updates
    # float32 master weights: in bf16, updates smaller than 1/256 of a weight round away. bf16 lives in autocast.
    student.float()
    ts = TeacherStudent(teacher, student, ad.VATSettings.from_config(cfg), kd_weight=cfg["kd_weight"],
                        vat_weight=cfg["vat_weight"], kd_temperature=cfg["kd_temperature"],
                        privileged=privileged_losses(cfg, student))
    if cfg["taf"] and not student.config.taf:
        ts.apply_taf()
    llm_trains = trains_llm(cfg["stage"], cfg["train_llm"])
    if cfg["train_vision"] and teacher is not None:
        raise ValueError("train_vision=True with a teacher: KD/VAT/TAF rely on the student sharing the teacher's "
                         "frozen vision tower")
    if cfg["lora_rank"] > 0:
        if not llm_trains:
            raise ValueError(f"lora_rank={cfg['lora_rank']}: LoRA adapts the LM, which does not train in this stage "
                             "(DPT trains the connector only); set lora_rank=0, or train_llm=1")
        add_lora(student, cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["lora_targets"])
    params = set_trainable(student, cfg["stage"], cfg["train_llm"], cfg["train_vision"])
    return ts, params


def scenes_path(cfg):
    return cfg["scenes"] or os.path.join(os.path.dirname(os.path.abspath(cfg["data"].split(",")[0])), "scenes.json")


def privileged_losses(cfg, student):
    """The teacher's privileged supervision (privileged.Privileged), or None when off."""
    if not (cfg["look_weight"] > 0 or cfg["readout_weight"] > 0):
        return None
    from privileged import Privileged, PrivilegedSettings, world_meta
    return Privileged(PrivilegedSettings.from_config(cfg["privileged"]), student.llm.config.hidden_size,
                      world_meta(scenes_path(cfg))["grid"], cfg["look_weight"], cfg["readout_weight"])


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


def prepare(ts, cfg):
    """What the student needs switched on before it is wrapped: with a frozen embedding (LoRA, or a frozen LM under
    FSDP) a text-only micro-batch gives nothing before layer 0 a gradient: that rank's backward would skip the
    decoder layers' re-gathers (a frozen LM) or reduce layer 0's adapters out of order (LoRA), out of step with a
    rank that has an image. A gradient on the embedding output takes every rank's backward through every layer in
    the same order. Then gradient checkpointing and torch.compile, when asked for."""
    if cfg["lora_rank"] > 0 or cfg["fsdp"]:
        ts.student.llm.enable_input_require_grads()
    if cfg["grad_ckpt"]:
        enable_checkpointing(ts.student.llm)
    if cfg["compile"]:
        compile_models(ts)
    return ts


def enable_checkpointing(llm):
    """Gradient checkpointing per decoder layer, non-reentrant: a reentrant first pass runs without a graph, and
    the VAT maps computed from it would have no gradient."""
    if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name is deprecated
        llm.activation_checkpointing_enable({"use_reentrant": False})
    else:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def compile_models(ts, **kwargs):
    """torch.compile what training runs: the LMs' decoders (llm.base_model, called directly so that logits are
    computed only where the losses need them), in place, so state_dict keys and checkpoints do not change."""
    for m in (ts.student, ts.teacher):
        if m is not None:
            m.llm.base_model.compile(**kwargs)


# -----------------------------------------------------------------------------
# data: every file is read a little before training, so a wrong path or image folder stops here, not after hours of
# training on nothing


class Data(NamedTuple):
    train: object       # this rank's micro-batches, from the resumed position on (an endless iterator)
    val: object         # a DataLoader over the validation samples
    n_train: int
    n_val: int
    placeholder: dict   # one good sample as a batch: what an all-dropped micro-batch runs on, at weight 0
    monitor: object     # DataMonitor: what the loader fetched, dropped and cut


def load_data(cfg, student, step, rank, world, device):
    tok, folder, placeholder = student.tokenizer, cfg["image_folder"] or None, None
    annotate = None
    if cfg["look_weight"] > 0 or cfg["readout_weight"] > 0:  # the teacher's privileged targets, per position
        from privileged import PrivilegedSettings, SceneTargets
        annotate = SceneTargets(scenes_path(cfg), tok, student.num_image_tokens,
                                PrivilegedSettings.from_config(cfg["privileged"]).captions)

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


# -----------------------------------------------------------------------------
# optimizer and schedule


def make_optimizer(params, cfg, device, amp):
    """AdamW, no weight decay on biases and norms; and float16's gradient scaler (its range is too small for
    gradients; bfloat16 needs none)."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]),
                                  fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    return optimizer, scaler


def lr_at(step, cfg):
    warmup = max(1, int(cfg["warmup_frac"] * cfg["max_steps"]))
    if step < warmup:
        return cfg["lr"] * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg["max_steps"] - warmup)
    floor = cfg["lr"] * cfg["min_lr_frac"]
    return floor + (cfg["lr"] - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def update(optimizer, scaler, params, grad_clip):
    """Clip the gradient norm (the true one: float16's scale taken off first) and step; returns the norm."""
    if scaler:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip > 0 else None
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
        grad_norm = grad_norm.full_tensor()
    if scaler:
        scaler.step(optimizer)  # skipped when the gradients overflowed
        scaler.update()
    else:
        optimizer.step()
    return grad_norm


def restore(state, par, ts, optimizer, scaler):
    """Resume from train_state.pt: the optimizer (and gradient scaler) state and this rank's RNG; returns (step,
    skipped steps, log)."""
    if ts.privileged is not None and state.get("privileged"):
        ts.privileged.load_state_dict(state["privileged"])
    par.load_optimizer(ts, optimizer, state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"][par.rank] if isinstance(state["rng"], list) else state["rng"])
    return state["step"], state.get("skipped", 0), state["log"]


# -----------------------------------------------------------------------------
# checkpoints and the log


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
        self.distill = (ts.pairs.note(ts.vat.matching) if ts.teacher is not None
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


def _memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource  # peak resident memory of this process (Linux reports kB)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

