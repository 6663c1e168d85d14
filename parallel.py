"""
How the training loop's models are placed over the processes: Replicated (one process, or DDP under torchrun: every
rank holds the whole student and the frozen teacher) and Sharded (FSDP2: the student, its gradients and optimizer
states, and the teacher's decoder layers, sharded over the ranks). run.Run asks them to build, wrap, sync,
gather and restore state, and to agree across ranks; nothing else in the loop differs between the two.
"""
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP



class Replicated:
    """One process, or DDP over several (torchrun): every rank holds the whole student and the frozen teacher (never
    wrapped), DDP averages the gradients in backward, and only rank 0 logs and writes. The interface train() uses;
    Sharded is FSDP's."""
    sharded = False

    def __init__(self, distributed, rank, world, device):
        self.distributed, self.rank, self.world, self.device = distributed, rank, world, device
        self.master = rank == 0

    def build(self, make):
        """The models as `make()` builds them on the CPU, on this rank's device."""
        return make().to(self.device)

    def wrap(self, ts, cfg, amp):
        """The module the loop calls. A trained tower's layers above vision_feature_layer get no gradient: DDP is
        told to expect that."""
        if not self.distributed:
            return ts
        return DDP(ts, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                   find_unused_parameters=cfg["train_vision"])

    def sync(self, model, last):
        """The context of one micro-step: gradients are reduced once, after the last micro-step of a step."""
        return model.no_sync() if self.distributed and not last else nullcontext()

    def agree(self, flags):
        """Each flag's maximum over the ranks."""
        return [int(v) for v in self.reduce(flags, op=dist.ReduceOp.MAX)] if self.distributed else flags

    def gather_state(self, ts, optimizer):
        """(the student's weights, the optimizer state), on rank 0 (every rank calls it)."""
        return ts.student.state_dict(), optimizer.state_dict()

    def load_optimizer(self, ts, optimizer, saved):
        optimizer.load_state_dict(saved)

    def reduce(self, values, op=dist.ReduceOp.SUM):
        """A float64 tensor of `values` (host numbers or 0-d device tensors), reduced over the ranks."""
        t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device) for v in values])
        if self.distributed:
            dist.all_reduce(t, op=op)
        return t

    def gather_objects(self, obj):
        """[every rank's `obj`] (picklable objects)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.distributed:
            dist.barrier()


class Sharded(Replicated):
    """FSDP2 (fully_shard) over the processes: the student, its gradients and its optimizer states are sharded (one
    unit per decoder layer, plus the rest), and with fsdp_teacher the frozen teacher's decoder layers too. Rank 0
    builds the models on its CPU; every rank receives its shards. Checkpoints are gathered to rank 0, in the same
    format as DDP's."""
    sharded = True

    def build(self, make):
        ts, self._whole = build_on_rank0(make, self.master)
        return ts

    def wrap(self, ts, cfg, amp):
        shard(ts, amp, cfg["fsdp_teacher"])  # in place: ts is now the FSDP root; its parameters are shards
        load_shards(ts, self._whole, self.device)
        self._whole = None
        return ts

    def sync(self, model, last):
        model.set_requires_gradient_sync(last)
        return nullcontext()

    def gather_state(self, ts, optimizer):
        """Gathered from every rank's shards to rank 0 on the CPU (the other ranks get empty dicts)."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(ts, options=opts)
        return ({k.removeprefix("student."): v for k, v in weights.items()},
                get_optimizer_state_dict(ts, optimizer, options=opts))

    def load_optimizer(self, ts, optimizer, saved):
        """The saved state is whole: rank 0 reads it and sends each rank its shard, tensor by tensor."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(ts, optimizer, saved if self.master else {},
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def build_on_rank0(make, master):
    """FSDP start-up: rank 0 builds the models on its CPU as one process would (every way a model starts, every
    check) and keeps their weights; every rank gets the modules with their parameters on the meta device (buffers,
    tokenizer and image processor included: a few MB), to shard them before any weight takes memory (load_shards).
    Returns (the models, on rank 0 the state dicts of the student wrapper and of the teacher, else None). An error on
    rank 0 is raised on every rank."""
    built = whole = None
    if master:
        try:
            built = make()
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
