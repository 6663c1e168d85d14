"""
Checkpoint directories, read and written.

A checkpoint is a directory: config.json (everything needed to rebuild the model), the weights (model.safetensors, or
shards listed in model.safetensors.index.json, as on the hub), the tokenizer and image-processor files, and, when a
training stage wrote it, train_state.pt (step, optimizer, every rank's RNG, the log: what resume needs) and
train_log.jsonl. A Hugging Face LLaVA directory (LlavaForConditionalGeneration) is accepted wherever one of ours is,
through an explicit key table.

Here: what a directory is, decided once per load (open_checkpoint / vlm_checkpoint give a Checkpoint, which then reads
its settings and weights without asking again), weights in and out (one file or shards; strict loading into a model
built on the meta device, tied weights kept tied; LoRA adapters merged into plain weights), the atomic checkpoint swap
a training stage saves with, train_state.pt, and the LLaVA key table in both directions (model.VLM.from_pretrained
imports with it, export_hf.py exports with it).
"""
import errno
import json
import os
import pickle
import re
import shutil
from contextlib import contextmanager

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import AutoConfig

from common import why

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"  # {"weight_map": {tensor name: shard file}}, as on the hub
SHARD_BYTES = 5 * 2**30  # the hub's usual shard size: a 7B model in float32 becomes 6 files
ACCEPTED = ("a CompoDistill checkpoint (a stage's out_dir: config.json with 'vision' and 'llm', model.safetensors) or "
            "a Hugging Face LLaVA directory (LlavaForConditionalGeneration: config.json with model_type 'llava', "
            "model.safetensors or model.safetensors.index.json with its shards, tokenizer and image processor)")


# -----------------------------------------------------------------------------
# what a directory holds


def read_json(file):
    """A checkpoint's JSON file; a damaged one is an error that names it and says what to do."""
    again = "the file is damaged: copy or download the checkpoint again, or rerun the stage that wrote it"
    try:
        with open(file, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{file}: not UTF-8 text ({e}); {again}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e}); {again}") from e


def has_weights(path):
    """True when directory `path` holds safetensors weights: one file, or an index and its shards."""
    return any(os.path.isfile(os.path.join(path, f)) for f in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME))


def find_checkpoint(path):
    """`path` if it holds weights; else `path`.old if that does (a stage killed between the two renames of its
    checkpoint swap leaves the previous checkpoint there); else None."""
    for p in (path, path + ".old"):
        if os.path.isdir(p) and has_weights(p):
            return p
    return None


def open_checkpoint(path):
    """The whole VLM in directory `path` (or in `path`.old, see find_checkpoint), asked once what it is: one of ours
    or a Hugging Face LLaVA one (a Checkpoint, which reads the rest). Anything else is an error that says what was
    found there and what is accepted."""
    path = find_checkpoint(path) or path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such directory; expected {ACCEPTED}")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json (found: {_listing(path)}); expected {ACCEPTED}")
    return _classify(path, read_json(cfg_path))


def vlm_checkpoint(path):
    """open_checkpoint(path) when `path` is a directory whose config.json describes a whole VLM (ours or LLaVA), else
    None: a hub id, a vision model's or an LM's directory. `path`.old is not looked at: this asks what a vision_model
    setting names, not where a stage left its checkpoint."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        return None
    cfg = read_json(cfg_path)
    return _classify(path, cfg) if _kind(cfg) else None


def _kind(cfg):
    """"ours", "llava" or None for a parsed config.json."""
    if "vision" in cfg and "llm" in cfg:
        return "ours"
    return "llava" if cfg.get("model_type") == "llava" else None


def _listing(path):
    return ", ".join(sorted(os.listdir(path))[:12]) or "nothing"


def _classify(path, cfg):
    """The Checkpoint of directory `path` whose config.json parsed to `cfg`: the one place a directory's kind is
    decided."""
    kind = _kind(cfg)
    if kind is None:
        raise ValueError(f"{os.path.join(path, 'config.json')} describes model_type {cfg.get('model_type')!r} "
                         f"(architectures {cfg.get('architectures')}), which is neither kind of checkpoint this "
                         f"project loads: expected {ACCEPTED}. A separate vision tower and causal LM enter with "
                         "init_from=backbones (vision_model=..., llm_model=...)")
    if not has_weights(path):
        raise FileNotFoundError(f"{path}: a {'LLaVA' if kind == 'llava' else 'CompoDistill'} config.json but no "
                                f"weights (found: {_listing(path)}); expected {WEIGHTS_NAME}, or {WEIGHTS_INDEX_NAME} "
                                "and the shards it lists")
    return Checkpoint(path, kind, cfg)


class Checkpoint:
    """A whole VLM's directory whose kind is known: `path` (where the files are read), `kind` ("ours": a stage's
    out_dir; "llava": a LlavaForConditionalGeneration directory) and `config` (its config.json as read). Built by
    open_checkpoint / vlm_checkpoint; the loaders take it from there without asking again."""

    def __init__(self, path, kind, config):
        self.path, self.kind, self.config = path, kind, config

    def settings(self):
        """model.VLMConfig's fields: our config.json (keys of older checkpoints renamed), or a LLaVA one read as
        ours (llava_settings)."""
        if self.kind == "llava":
            return llava_settings(self.path)
        d = dict(self.config)
        if "drop_first_patch" in d:  # written before the setting took LLaVA's name
            d["vision_feature_select_strategy"] = "default" if d.pop("drop_first_patch") else ""
        return d

    def load_into(self, module, dtype, tower_only=False):
        """Give `module` (built under params_on_meta from settings()) this checkpoint's weights, strictly (see
        load_weights), in `dtype`: the whole VLM, or with tower_only its vision tower alone, read alone (a 7B LLaVA's
        LM is never read for its tower). A LLaVA checkpoint's names go through LLAVA_KEYS; the tower's nesting is
        matched to the one this transformers builds."""
        part = "vision_tower." if tower_only else ""
        rename = llava_key_to_ours if self.kind == "llava" else (lambda k: k)
        if tower_only:
            tensors = read_weights(self.path, keep=lambda k: (rename(k) or "").startswith(part))
            tensors = {rename(k): t for k, t in tensors.items()}
        else:
            tensors = read_weights(self.path)
            if self.kind == "llava":
                tensors = llava_to_ours(tensors, module, self.path)
        nested = any(k.startswith("vision_tower.vision_model.") for k in (part + n for n in module.state_dict()))
        tensors = {match_tower_nesting(k, nested).removeprefix(part): t for k, t in tensors.items()}
        return load_weights(module, tensors, f"{self.path} (its vision tower)" if tower_only else self.path, dtype)


# -----------------------------------------------------------------------------
# weights: one safetensors file or shards


def _read_safetensors(file, keep=None):
    """name -> tensor of one safetensors file (only the names `keep` accepts, when given). A damaged file (cut short
    by an interrupted copy, an error page saved in its place) is an error that names it."""
    try:
        with safe_open(file, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if keep is None or keep(k)}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: cannot read the weights ({why(e)}); "
                         "the file is damaged or not safetensors: copy or download the checkpoint again, or rerun the "
                         "stage that wrote it") from e


def read_weights(path, keep=None):
    """name -> tensor from model.safetensors, or from every shard that model.safetensors.index.json lists; with
    `keep` (name -> bool), only the tensors it accepts are read."""
    if os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
        return _read_safetensors(os.path.join(path, WEIGHTS_NAME), keep)
    index = os.path.join(path, WEIGHTS_INDEX_NAME)
    weight_map = read_json(index)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: no 'weight_map' (tensor name -> shard file); the file is damaged: copy or "
                         "download the checkpoint again")
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        if not os.path.isfile(os.path.join(path, shard)):
            raise FileNotFoundError(f"{index} lists the shard {shard}, which is not in {path}: copy or download "
                                    "every shard of the checkpoint")
        if keep is None or any(keep(k) for k, v in weight_map.items() if v == shard):
            tensors.update(_read_safetensors(os.path.join(path, shard), keep))
    if keep is not None:
        weight_map = {k: v for k, v in weight_map.items() if keep(k)}
    if tensors.keys() != weight_map.keys():
        raise ValueError(f"{index} and its shards disagree on the tensor names (in the index only: "
                         f"{sorted(weight_map.keys() - tensors.keys())[:5]}, in the shards only: "
                         f"{sorted(tensors.keys() - weight_map.keys())[:5]}); the download is incomplete or mixed")
    return tensors


def write_weights(tensors, path, max_shard_bytes=None):
    """Write name -> tensor as model.safetensors, or, past max_shard_bytes (default SHARD_BYTES), as
    model-0000i-of-0000n.safetensors plus model.safetensors.index.json (the layout of hub checkpoints). Earlier weight
    files in `path` are removed first, so a directory never mixes two models."""
    max_shard_bytes = max_shard_bytes or SHARD_BYTES
    for f in os.listdir(path):
        if f == WEIGHTS_INDEX_NAME or re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", f):
            os.remove(os.path.join(path, f))
    shards, size = [{}], 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += n
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(path, WEIGHTS_INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def unique_state_dict(module, weights=None):
    """`weights` (default: the module's state dict) with each tensor once: a weight tied to another (an LM head
    sharing the input embedding) is kept under its first name only, as safetensors cannot store one tensor twice."""
    first, names = {}, set()
    for name, p in module.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), name)
        names.add(name)
    tied = names - set(first.values())
    return {k: v for k, v in (module.state_dict() if weights is None else weights).items() if k not in tied}


def plain_state_dict(module, state_dict=None):
    """`module`'s weights (its state_dict, or the given one with the same names, e.g. gathered from FSDP shards)
    with LoRA adapters merged into their base weights, W + scale * B @ A, in float32, under the plain names
    (q_proj.weight, not q_proj.base_layer.weight): what a later stage, evaluate.py or transformers loads without
    peft. Without adapters: the weights as they are."""
    sd = dict(module.state_dict() if state_dict is None else state_dict)
    for name, m in module.named_modules():
        if hasattr(m, "lora_A") and hasattr(m, "base_layer"):  # a peft LoRA layer
            a, b = sd.pop(f"{name}.lora_A.default.weight"), sd.pop(f"{name}.lora_B.default.weight")
            w = sd.pop(f"{name}.base_layer.weight")
            sd[f"{name}.weight"] = w.float() + m.scaling["default"] * (b.float() @ a.float())
            if f"{name}.base_layer.bias" in sd:
                sd[f"{name}.bias"] = sd.pop(f"{name}.base_layer.bias")
    return sd


@contextmanager
def params_on_meta():
    """Build modules with their parameters on the meta device: no memory and no random init for weights that a
    checkpoint is about to replace (a 7B LM would otherwise be initialised once for nothing). Buffers stay real: some
    are computed at construction and never saved (rotary frequencies, position ids). While it is open, every module
    built in this process registers its parameters this way."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)
    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def load_weights(model, tensors, source, dtype=torch.float32):
    """Give `model` (built under params_on_meta) the weights `tensors`, strictly: every weight of the model must be
    there and every tensor must have a place. Tied weights (an LM head sharing the embedding) may be stored under
    either name and stay one parameter. The loaded tensors are cast to `dtype` (floating point only); buffers built
    from the config (rotary frequencies) stay as built, float32, as transformers keeps them: in bfloat16 the rotary
    angles of late positions would be off by radians."""
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    expected = set(model.state_dict())
    recomputed = {n for n, _ in model.named_buffers()} - expected  # non-persistent: rebuilt from the config
    unexpected = sorted(k for k in tensors if k not in expected and k not in recomputed)
    state = {k: t for k, t in tensors.items() if k in expected}
    for names in aliases.values():
        found = [n for n in names if n in state]
        for n in names if found else ():
            state[n] = state[found[0]]
    missing = sorted(expected - state.keys())
    if unexpected or missing:
        raise ValueError(f"{source}: the weights do not fit the model its config describes: "
                         f"{len(missing)} missing {missing[:8]}, {len(unexpected)} unexpected {unexpected[:8]}")
    state = {k: t.to(dtype) if t.is_floating_point() else t for k, t in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    for names in aliases.values():  # assign gave each name its own Parameter: tie them again
        p = model.get_parameter(names[0])
        for n in names[1:]:
            owner, _, leaf = n.rpartition(".")
            setattr(model.get_submodule(owner), leaf, p)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    assert not left, f"parameters left without weights: {left[:8]}"
    return model


def match_tower_nesting(key, nested):
    """CLIP and SigLIP towers of older transformers versions keep their weights under `vision_model.`, newer ones do
    not: rename a vision_tower.* key to the nesting of the tower this transformers builds."""
    if not key.startswith("vision_tower."):
        return key
    rest = key.removeprefix("vision_tower.").removeprefix("vision_model.")
    return "vision_tower." + ("vision_model." if nested else "") + rest


# -----------------------------------------------------------------------------
# a training stage's checkpoint: written to a temporary name, then swapped in


def save_checkpoint(out_dir, model, train_state, log, weights=None):
    """Write `model` (its save_pretrained, with `weights` in place of its own when given), train_state.pt and
    train_log.jsonl to out_dir.tmp, then swap it in: out_dir -> out_dir.old, out_dir.tmp -> out_dir. A run killed at
    any point leaves a whole checkpoint under out_dir or, between the two renames, under out_dir.old
    (find_checkpoint looks there). A write that fails removes out_dir.tmp; a full disk is an error (ValueError) that
    says so and names the room a save needs: two checkpoints, as the new one is written before the old one goes."""
    tmp, old = out_dir + ".tmp", out_dir + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, state_dict=weights)
        torch.save(train_state, os.path.join(tmp, "train_state.pt"))
        with open(os.path.join(tmp, "train_log.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in log)
    except (OSError, RuntimeError, SafetensorError) as e:
        full = disk_full(e, out_dir)
        shutil.rmtree(tmp, ignore_errors=True)  # a partial checkpoint: its space back, nothing half-written left
        if not full:
            raise
        size = max(_dir_bytes(out_dir), _tensor_bytes([model.state_dict() if weights is None else weights,
                                                       train_state]))
        prev = find_checkpoint(out_dir)
        raise ValueError(f"out_dir={out_dir}: the disk is full: the checkpoint could not be written to {tmp} "
                         f"({why(e)}); {_human(shutil.disk_usage(_existing(out_dir)).free)} free there; a save needs "
                         "room for two checkpoints (the new one is written before the old one is removed), about "
                         f"{_human(2 * size)} here. Free some space, or choose an out_dir on a disk with room; " +
                         (f"the previous checkpoint in {prev} is intact" if prev else "no checkpoint was written "
                          "before this one")) from e
    if os.path.isdir(out_dir):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)  # the only moment the new checkpoint becomes visible
    shutil.rmtree(old, ignore_errors=True)


FULL_BYTES = 16 * 2**20  # less free than this after a failed write: the disk is full, whatever the writer said


def disk_full(error, path):
    """Whether a failed write at `path` failed for want of space: ENOSPC / EDQUOT anywhere in the error's chain, or
    its text (safetensors reports the OS error in words), or a disk left with almost nothing free (torch.save says
    only "unexpected pos" or "iostream error")."""
    e = error
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(s in str(e) for s in ("No space left on device", "Disk quota exceeded", "StorageFull")):
            return True
        e = e.__cause__ or e.__context__
    try:
        return shutil.disk_usage(_existing(path)).free < FULL_BYTES
    except OSError:
        return False


def _existing(path):
    """`path`, or its nearest ancestor that exists."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _dir_bytes(path):
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def _tensor_bytes(obj):
    """The bytes of every tensor in nested dicts / lists / tuples."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _human(n):
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def load_train_state(resume_dir, out_dir):
    """train_state.pt of a checkpoint, to the CPU (under torchrun every rank would otherwise load the whole optimizer
    state onto cuda:0), memory-mapped: a rank reads only the tensors it uses (under FSDP rank 0 sends each its shard of
    the optimizer state), and the ranks of a node share the file's pages. A missing or damaged file is an error that
    names it and says what to do."""
    path = os.path.join(resume_dir, "train_state.pt")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path}: cannot read the training state ({why(e)}); it is missing or damaged, so the run in "
                         f"{out_dir} cannot resume. Put back a good copy to resume; to start this stage over instead, "
                         f"move {out_dir} away") from e


# -----------------------------------------------------------------------------
# Hugging Face LLaVA (LlavaForConditionalGeneration) <-> ours, by an explicit key mapping

# (our prefix, the hub's prefix, transformers 5's prefix). Hub checkpoints (llava-hf/*) use the second form, and so
# does save_pretrained in transformers 5; the third is transformers 5's module tree, which some checkpoints carry.
# LLaVA's projector is our mlp2x_gelu connector: linear_1, GELU, linear_2.
LLAVA_KEYS = [
    ("llm.model.", "language_model.model.", "model.language_model."),
    ("llm.lm_head.", "language_model.lm_head.", "lm_head."),
    ("connector.0.", "multi_modal_projector.linear_1.", "model.multi_modal_projector.linear_1."),
    ("connector.2.", "multi_modal_projector.linear_2.", "model.multi_modal_projector.linear_2."),
    ("vision_tower.", "vision_tower.", "model.vision_tower."),
]


def llava_key_to_ours(key):
    """Our name for a LLaVA checkpoint's tensor, or None if the table has no row for it."""
    for ours, hub, tf5 in LLAVA_KEYS:
        for prefix in (hub, tf5):
            if key.startswith(prefix):
                return ours + key[len(prefix):]
    return None


def ours_to_llava_key(key):
    """The hub name (what llava-hf checkpoints and older transformers versions use) of one of our tensors."""
    for ours, hub, _ in LLAVA_KEYS:
        if key.startswith(ours):
            return match_tower_nesting(hub + key[len(ours):], nested=True) if ours == "vision_tower." else \
                hub + key[len(ours):]
    raise ValueError(f"{key}: no LLaVA name for this tensor (LLaVA holds a vision tower, a 2-layer projector and a "
                     "causal LM)")


def llava_to_ours(tensors, model, source):
    """Rename a LLaVA checkpoint's tensors to ours; a tensor without a row in LLAVA_KEYS is an error that names it."""
    if model.llm.base_model_prefix != "model" or model.llm.get_output_embeddings() is not model.llm.lm_head:
        raise ValueError(f"{source}: LLaVA import maps the LM as `model` + `lm_head` (Llama, Qwen, Mistral, ...); "
                         f"{type(model.llm).__name__} is laid out otherwise")
    out, unmapped = {}, []
    for key, t in tensors.items():
        ours = llava_key_to_ours(key)
        if ours is None:
            unmapped.append(key)
        else:
            out[ours] = t
    if unmapped:
        raise ValueError(f"{source}: {len(unmapped)} tensors of this LLaVA checkpoint map to nothing of ours: "
                         f"{sorted(unmapped)[:8]} (known prefixes: "
                         f"{', '.join(p for row in LLAVA_KEYS for p in row[1:])})")
    return out


def llava_settings(path):
    """model.VLMConfig's fields for a LLaVA directory: its vision and text configs, the projector as mlp2x_gelu, its
    image token, vision_feature_layer and vision_feature_select_strategy (and, for a student exported by export_hf.py,
    the layer pairs it was distilled on)."""
    c = AutoConfig.from_pretrained(path)
    problems = []
    if c.projector_hidden_act != "gelu":
        problems.append(f"projector_hidden_act is {c.projector_hidden_act!r}, not 'gelu'")
    if not c.multimodal_projector_bias:
        problems.append("the projector has no biases (multimodal_projector_bias=false)")
    if not isinstance(c.vision_feature_layer, int):
        problems.append(f"vision_feature_layer is {c.vision_feature_layer} (several layers concatenated); one layer "
                        "is supported")
    if problems:
        raise ValueError(f"{path}/config.json: this LLaVA checkpoint does not fit our VLM (a vision tower's one "
                         f"feature layer -> mlp2x_gelu -> LM): {'; '.join(problems)}")
    text = c.text_config.to_dict()
    # LLaVA ties the LM head to the embedding when its own config says so (it inherits the text config's flag)
    text["tie_word_embeddings"] = bool(c.tie_word_embeddings or text.get("tie_word_embeddings"))
    extra = {"imported_from": "llava", "source": os.path.abspath(path)}
    ours = getattr(c, "compodistill", None) or {}  # what export_hf.py keeps of a distilled student
    if ours.get("distill"):
        extra["distill"] = ours["distill"]
    return dict(vision=c.vision_config.to_dict(), llm=text, connector="mlp2x_gelu", image_token_id=c.image_token_index,
                vision_feature_layer=c.vision_feature_layer,
                vision_feature_select_strategy=c.vision_feature_select_strategy, extra=extra)
