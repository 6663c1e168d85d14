"""
Run: what every stage's training shares, behind a few methods, so that a stage script (train_dpt.py, train_dft.py,
train_sft.py) shows its settings, its models and its losses, and none of the machinery:

    with Run(cfg, distills=True) as run:        # settings checked, out_dir locked, processes, device, resume point
        model = run.build(make, train_llm=True)   # make(resume_dir) -> TeacherStudent; LoRA, what trains, DDP/FSDP
        for batch in run.batches():               # this rank's micro-batches, on the device, under autocast
            run.step(model(batch))                # backward; after the last micro-batch of a step: clip, AdamW,
                                                  # LR schedule, log, validation, checkpoint, signals, stop_after
    run.result                                    # the last log record

What differs between one process / DDP and FSDP is behind parallel.py (Replicated, Sharded); what the run reads is
run_data.py; what it writes (checkpoints, the log) is run_log.py. Only the same run resumes an out_dir (check_resume),
on the same number of processes (check_world), bit for bit.
"""

import fcntl
import math
import os
import random
import signal
from contextlib import ExitStack, contextmanager, nullcontext

import numpy as np
import torch

from attention_distill import VATSettings
from checkpoint import find_checkpoint, load_train_state
from common import compute_cleanup, compute_init, print0, resolve_dtype
from configurator import configure
from parallel import Replicated, Sharded
from run_data import load_data, report_drops, to_device
from run_log import Checkpointer, Logger, due, evaluate_loss, set_rng_state
from run_models import prepare, ready

# The settings every stage shares, each with what it does (--help prints these comments). What a stage decides for
# itself (its data, out_dir, where its student starts, its losses' weights, batch, steps, learning rate) is set in its
# script's settings block only, which overrides some of these too (a teacher, TAF, the layers VAT aligns); then
# config files and --key=value.
DEFAULTS = dict(
    # -- what runs ----------------------------------------------------------------------------------------------
    vision_model="",              # backbones, scratch: HF id or path of a pretrained vision tower (SigLIP, CLIP),
                                  # or a LLaVA / checkpoint directory, whose tower it takes
    llm_model="",                 # backbones: HF id or path of the causal LM, e.g. Qwen/Qwen1.5-1.8B
    llm={},                       # scratch: HF causal-LM config dict of a new LM (e.g. train_dpt.py's)
    vision={},                    # scratch without vision_model or a teacher: HF vision config dict of a new tower
    tokenizer="",                 # scratch without a teacher: tokenizer directory (default: <data folder>/tokenizer)
    image_processor="",           # scratch without a teacher: image-processor directory (default: <data folder>/...)
    teacher="",                   # the teacher's checkpoint directory (needed for kd_weight, vat_weight or taf)
    connector="mlp2x_gelu",       # the connector of a new model: mlp{depth}x_gelu, as LLaVA's
    vision_feature_select_strategy="",  # "": the tower's own (CLIP: "default", CLS dropped; SigLIP: "full");
                                  # "default" on SigLIP drops the first patch, as the reference code does
    # -- data ---------------------------------------------------------------------------------------------------
    image_folder="",              # the images' root (default: the folder holding the data file)
    val_data="",                  # a separate validation file (default: hold out val_frac of data)
    val_frac=0.02,                # the held-out fraction of data when there is no val_data
    num_workers=0,                # DataLoader worker processes
    # -- the method (the weights are each stage's; attention_distill.VATSettings: the VAT settings) --------
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
    grad_accum=1,                 # micro-batches per step (the batch of a step: batch_size * grad_accum * processes)
    min_lr_frac=0.0,              # the cosine schedule ends at lr * min_lr_frac
    beta1=0.9,                    # AdamW's beta1
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
    eval_batches=10,              # validation batches per evaluation
    stop_after=0,                 # >0: save and exit after this many steps of this invocation (pre-emption)
)
# Settings a rerun into an existing out_dir may change; any other difference means another run (see check_resume).
# (Not eval_interval: whether it is 0 decides whether a validation slice is held out of the training data.)
RESUME_FREE = {"log_interval", "eval_batches", "save_interval", "stop_after", "num_workers", "compile", "grad_ckpt"}


def configure_stage(defaults, argv, doc, script):
    """A stage script's settings: run.DEFAULTS < the script's block (`defaults`) < config files < --key=value. Each
    value is checked against the type of the shared default (the shapes DFT's student_layers=[1, 2] still takes a
    name, a depth range or None)."""
    cfg = configure(dict(defaults), argv, doc, [__file__, script], kinds=DEFAULTS)
    if cfg["stage"] != defaults["stage"]:  # one recipe per command
        raise ValueError(f"stage={cfg['stage']}: {os.path.basename(script)} runs stage {defaults['stage']}; run "
                         f"train_{cfg['stage']}.py for that one")
    return cfg


class Run:
    """One stage's training run. The process that writes (rank 0) holds out_dir's lock from __enter__ to __exit__
    (out_dir_lock): one writer per out_dir. `distills`: whether the stage loads a teacher (DPT, DFT); a stage without
    one refuses KD, VAT and TAF, and only it may train with privileged supervision (a teacher in training)."""

    def __init__(self, cfg, distills):
        check_settings(cfg, distills)
        self.cfg, self.writer = cfg, int(os.environ.get("RANK", 0)) == 0
        if self.writer:
            check_out_dir(cfg["out_dir"])
        self._stack = ExitStack()
        self.model = self.result = None

    def __enter__(self):
        if self.writer:
            self._stack.enter_context(out_dir_lock(self.cfg["out_dir"]))
        cfg = self.cfg
        self.amp = autocast_dtype(cfg["dtype"])  # None: float32 throughout
        distributed, self.rank, self.world, self.device = compute_init(single_group=cfg["fsdp"])
        self.par = (Sharded if cfg["fsdp"] else Replicated)(distributed, self.rank, self.world, self.device)
        self.resume_dir, self.state = resume_point(cfg)
        self.finished = bool(self.state and self.state["step"] >= cfg["max_steps"])
        if self.finished:
            print0(f"{cfg['out_dir']} is already trained to step {self.state['step']} (max_steps={cfg['max_steps']}); "
                   "nothing to do")
            compute_cleanup()
            self.result = self.state["log"][-1] if self.state["log"] else {}
        elif self.state:
            check_world(self.state, self.world, cfg["out_dir"])
            print0(f"resuming {cfg['out_dir']} from step {self.state['step']}")
        return self

    def __exit__(self, *exc):
        self._stack.close()  # releases the lock, however the run ended
        return False

    def build(self, make, train_llm):
        """The models, ready to train; returns what the loop calls: model(batch, **flags) -> the losses.
        make(resume_dir) builds the stage's TeacherStudent on the CPU (resume_dir: out_dir's checkpoint when resuming,
        else None); then LoRA's adapters, the trainable set (the LM trains when the stage says, `train_llm`, unless the
        train_llm setting says otherwise), the frozen teacher in the compute dtype, DDP or FSDP, the optimizer, the
        data and, resuming, the optimizer's state and the RNG. One seed while building, so that new weights (a TAF
        post_connector, LoRA's A) are the same whichever rank builds them; then one seed per rank (dropout)."""
        if self.finished:
            return None
        cfg, par = self.cfg, self.par
        torch.manual_seed(cfg["seed"])
        self.ts = ts = par.build(lambda: ready(make, cfg, self.resume_dir, self.state, self.amp, train_llm))
        seed_everything(cfg["seed"] + self.rank)
        self.model = par.wrap(prepare(ts, cfg), cfg, self.amp)
        self.params = [p for p in ts.parameters() if p.requires_grad]  # the student's (and a privileged readout's)
        self.data = load_data(cfg, ts.student, self.state["step"] if self.state else 0, self.rank, self.world,
                              self.device)
        self.optimizer, self.scaler = make_optimizer(self.params, cfg, self.device, self.amp)
        self.steps, self.skipped, self.log = restore(self.state, par, ts, self.optimizer, self.scaler) \
            if self.state else (0, 0, [])
        print0(f"stage {cfg['stage']}: {sum(p.numel() for p in self.params) / 1e6:.2f}M trainable params, "
               f"{self.data.n_train} train samples, world {self.world}, device {self.device}, dtype "
               f"{self.amp or torch.float32}, kd={cfg['kd_weight'] > 0} vat={cfg['vat_weight'] > 0} "
               f"taf={ts.student.config.taf}")
        self.checkpointer = Checkpointer(cfg, par, ts, self.optimizer, self.scaler)
        self.logger = Logger(cfg, par, self.data.monitor, self.log, self.steps)
        return self.forward

    def forward(self, batch, **flags):  # the Run, not the script, holds DDP's wrapper: it is dropped before
        return self.model(batch, **flags)  # the process group ends (its reducer holds the group: compute_cleanup)

    def batches(self):
        """This rank's micro-batches, on the device, each inside the context its forward runs in (autocast; under DDP
        gradients reduced only after a step's last micro-batch), until max_steps, a signal or stop_after. Between
        steps: clipping, AdamW, the LR schedule, the log, validation and checkpoints."""
        if self.finished:
            return
        cfg, par, data, logger = self.cfg, self.par, self.data, self.logger
        self.model.train()  # the teacher is not a submodule: it stays in eval()
        done_here = 0
        with stop_signals() as signals:
            while self.steps < cfg["max_steps"]:
                lr = lr_at(self.steps - self.skipped, cfg)  # skipped: steps in which no rank had a sample; it waits
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                self.real_here = 0
                for micro in range(cfg["grad_accum"]):
                    batch = next(data.train)
                    self.real = logger.fetched(batch)
                    self.real_here += self.real
                    # A micro-batch whose samples were all dropped still runs forward and backward, on a placeholder
                    # sample at weight 0: under DDP every rank must join every gradient all-reduce.
                    batch = to_device(batch if self.real else data.placeholder, self.device)
                    self._in_step = ExitStack()
                    self._in_step.enter_context(par.sync(self.model, last=micro == cfg["grad_accum"] - 1))
                    self._in_step.enter_context(self.autocast())
                    yield batch
                # One tiny collective per step: whether any rank had a sample, and the signals received (a signal may
                # reach the ranks at different steps: they agree, so that all of them stop after the same step).
                any_real, got = par.agree([self.real_here, max(signals, default=0)])
                if any_real:
                    grad_norm = update(self.optimizer, self.scaler, self.params, cfg["grad_clip"])
                else:  # every sample of this step was dropped, on every rank: AdamW would still move the weights
                    self.skipped, grad_norm = self.skipped + 1, None
                self.optimizer.zero_grad(set_to_none=True)
                self.steps += 1
                done_here += 1
                step = self.steps
                logger.step(step, lr, grad_norm, self.skipped)
                if cfg["eval_interval"] > 0 and due(step, cfg["eval_interval"], cfg) and data.n_val:
                    # under FSDP every forward gathers shards: all ranks run the same batches
                    ev = evaluate_loss(self.ts, data.val, cfg["eval_batches"], self.device, self.autocast(),
                                       cfg["kd_weight"] > 0, cfg["vat_weight"] > 0) \
                        if par.master or par.sharded else None
                    logger.validation(step, ev)
                    par.barrier()
                stop = cfg["stop_after"] > 0 and done_here >= cfg["stop_after"]
                if due(step, cfg["save_interval"], cfg) or stop or got:
                    self.checkpointer.save(step, self.skipped, self.log)
                if got:
                    logger.close()
                    print0(f"{signal.Signals(got).name}: saved step {step} to {cfg['out_dir']}; rerun the same command "
                           "to resume")
                    self.model = None  # DDP's reducer holds the process group: release it first
                    compute_cleanup()
                    raise SystemExit(128 + got)
                if stop:
                    print0(f"stop_after={cfg['stop_after']}: saved step {step} to {cfg['out_dir']}; rerun the same "
                           "command to resume")
                    break
        logger.close()
        report_drops(data.monitor, par, cfg, self.skipped)
        self.model = None  # DDP's reducer holds the process group: release it first
        compute_cleanup()
        self.result = self.log[-1] if self.log else {}

    def autocast(self):
        """The compute dtype's autocast (None: float32, no autocast)."""
        return torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None else nullcontext()

    def step(self, losses):
        """Backward of one micro-batch's losses (a placeholder's at weight 0), its share of the step's gradient. Call
        it once per micro-batch that batches() yields, before asking for the next."""
        self._in_step.close()  # the forward's autocast ends here: backward runs outside it
        loss = losses["total"] * ((1.0 if self.real else 0.0) / self.cfg["grad_accum"])
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if self.real:
            self.logger.losses(losses)


# -----------------------------------------------------------------------------
# start-up: settings, out_dir, the resume point


def autocast_dtype(name):
    """The dtype a step computes in under autocast, from the `dtype` setting (auto: bfloat16 on CUDA); None for
    float32 (no autocast). Trainable weights stay float32 masters whatever it is."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(name, device, allowed=("auto", "float32", "bfloat16", "float16"))
    return None if dtype == torch.float32 else dtype


def check_settings(cfg, distills):
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
    VATSettings.from_config(cfg)  # an unknown matching or VAT form, in any stage
    privileged = [f"{k}={cfg[k]}" for k in ("look_weight", "readout_weight") if cfg[k]]
    if privileged and (distills or cfg["fsdp"]):
        raise ValueError(f"{', '.join(privileged)}: privileged supervision is for training a teacher (train_sft.py "
                         "config/shapes_teacher.py), on one process or DDP; a distilling stage's student never gets "
                         f"it (stage {cfg['stage']}{', fsdp=True' if cfg['fsdp'] else ''}): set them to 0")
    if not distills:
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


