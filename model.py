"""
The model: a LLaVA-style VLM and the teacher/student wrapper that computes CompoDistill's losses.

VLM: image -> vision tower (frozen, features of `vision_feature_layer`) -> connector
(`mlp{depth}x_gelu`) [-> post_connector under TAF] -> N_v visual tokens written into the text
embeddings where the input has image-token ids -> Hugging Face causal LM.

The data pipeline has already expanded each "<image>" into N_v image-token ids, so every sample's
image positions are known before the model runs; the same positions drive splicing, label masking
and attention capture.

TeacherStudent: a frozen teacher and a trainable student; one forward returns
{lm, kd, vat, total}. Only the logits at supervised positions are ever computed, and the shared
frozen vision tower (plus the teacher connector under TAF) runs once for both models.
"""

import copy
import inspect
from contextlib import contextmanager, nullcontext
import json
import os
import re
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer,
                          DynamicCache)
from transformers.models.auto.modeling_auto import MODEL_MAPPING

import attention_distill as ad


@dataclass
class VLMConfig:
    vision: dict | str                 # HF vision-model config (dict with model_type) or a model id / path
    llm: dict | str                    # HF causal-LM config (dict with model_type) or a model id / path
    connector: str = "mlp2x_gelu"      # mlp{depth}x_gelu, as in LLaVA
    taf: bool = False                  # student sees images through the teacher connector + post_connector
    teacher_hidden_size: int = 0       # width of the teacher connector (TAF only)
    image_token: str = "<image>"
    image_token_id: int = -1
    vision_feature_layer: int = -2     # SigLIP's second-to-last layer, as LLaVA
    # LLaVA's name: "default" drops the tower's first feature (CLIP's CLS token; on SigLIP, which has none, the
    # first patch, as the reference code does: 728 tokens, not 729), "full" keeps them all. "" picks when the
    # model is built: "default" for a tower with a CLS token, else "full".
    vision_feature_select_strategy: str = ""
    extra: dict = field(default_factory=dict)  # free-form notes (e.g. the training stage that wrote it)

    def save(self, path):
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(asdict(self), f, indent=2)

    @classmethod
    def load(cls, path):
        d = _read_json(os.path.join(path, "config.json"))
        if "drop_first_patch" in d:  # checkpoints written before the LLaVA name
            d["vision_feature_select_strategy"] = "default" if d.pop("drop_first_patch") else ""
        return cls(**d)


def _hf_config(spec):
    """A transformers config from a dict {model_type, ...} or from an id / path."""
    if isinstance(spec, dict):
        spec = dict(spec)
        return AutoConfig.for_model(spec.pop("model_type"), **spec)
    return AutoConfig.from_pretrained(spec)


def _vision_config(cfg):
    # A full CLIP / SigLIP checkpoint holds text and vision configs; the tower is the vision part.
    return getattr(cfg, "vision_config", cfg)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name, device, allowed=("auto", "float32", "bfloat16")):
    """A script's `dtype` setting as a torch dtype: one of `allowed`, where "auto" is bfloat16 on CUDA and float32
    elsewhere. Anything else is an error that lists the choices."""
    if name not in allowed:
        raise ValueError(f"dtype={name!r}: use {', '.join(allowed[:-1])} or {allowed[-1]}")
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def cast_weights(module, dtype):
    """Cast the parameters (and saved buffers) to `dtype`, in place. Buffers a model computes from its config stay as
    built: rotary frequencies in bf16 would put the angle of position 1000 off by up to ~2 radians (module.to(dtype)
    casts those too)."""
    for p in module.parameters():
        p.data = p.data.to(dtype)
    for m in module.modules():
        for name, b in m._buffers.items():
            if b is not None and b.is_floating_point() and name not in m._non_persistent_buffers_set:
                m._buffers[name] = b.to(dtype)
    return module


def enable_checkpointing(llm):
    """Gradient checkpointing per decoder layer, non-reentrant: a reentrant first pass runs without a graph, and
    the VAT maps computed from it would have no gradient."""
    if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name is deprecated
        llm.activation_checkpointing_enable({"use_reentrant": False})
    else:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def tower_tokens(tower):
    """(features per image, whether the first one is a CLS token) of a vision tower: CLIP emits its patches plus a
    CLS token in front, SigLIP its patches only."""
    vc = tower.config
    patches = (vc.image_size // vc.patch_size) ** 2
    emb = next((m for n, m in tower.named_modules() if n.split(".")[-1] == "embeddings"), None)
    n = getattr(emb, "num_positions", patches)
    return n, n == patches + 1


def prepare_tokenizer(tok):
    """Llama-style tokenizers have no pad token: pad with eos (padding is masked everywhere, so any id will do)."""
    if tok is not None and tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def same_tokenizer(a, b):
    """True when two tokenizers give every text the same ids: same vocabulary, special tokens and merges."""
    if a is b:
        return True
    probe = "A chat: USER: <image>\nWhat colour is the 3rd cube? ASSISTANT: Red, 42 cm. \u00e9\u4e2d"
    return (a.get_vocab() == b.get_vocab() and a.bos_token == b.bos_token and a.eos_token == b.eos_token
            and a(probe).input_ids == b(probe).input_ids)


def build_connector(kind, d_in, d_out):
    m = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if m is None:
        raise ValueError(f"unknown connector '{kind}': use mlp{{depth}}x_gelu, e.g. mlp2x_gelu")
    layers = [nn.Linear(d_in, d_out)]
    for _ in range(int(m.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(d_out, d_out)]
    return nn.Sequential(*layers)


class VLM(nn.Module):
    def __init__(self, config: VLMConfig, vision_tower=None, llm=None):
        super().__init__()
        self.config = config
        if vision_tower is None:
            vision_tower = AutoModel.from_config(_vision_config(_hf_config(config.vision)))
        if llm is None:
            llm = AutoModelForCausalLM.from_config(_hf_config(config.llm), attn_implementation=ad.ATTN_IMPLEMENTATION)
        llm.set_attn_implementation(ad.ATTN_IMPLEMENTATION)
        self.vision_tower, self.llm = vision_tower, llm
        self.vision_tower.requires_grad_(False)  # always frozen (LLaVA / the paper)
        n_feat, has_cls = tower_tokens(vision_tower)
        if not config.vision_feature_select_strategy:
            config.vision_feature_select_strategy = "default" if has_cls else "full"
        if config.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy={config.vision_feature_select_strategy!r}: use 'default' "
                             "(drop the first feature: CLIP's CLS token) or 'full' (keep all)")
        self._num_image_tokens = n_feat - (config.vision_feature_select_strategy == "default")
        d_vis = vision_tower.config.hidden_size
        d_llm = llm.config.hidden_size
        if config.taf:
            if config.teacher_hidden_size <= 0:
                raise ValueError("taf=True needs teacher_hidden_size (the teacher connector's output width)")
            self.connector = build_connector(config.connector, d_vis, config.teacher_hidden_size)
            self.post_connector = nn.Linear(config.teacher_hidden_size, d_llm)
        else:
            self.connector = build_connector(config.connector, d_vis, d_llm)
            self.post_connector = None
        self.tokenizer = None        # attached by from_pretrained / the scripts; saved alongside
        self.image_processor = None

    # -- images --------------------------------------------------------------------------------
    @property
    def num_image_tokens(self):
        """Visual tokens per image: the tower's features, less the first under the "default" strategy."""
        return self._num_image_tokens

    @property
    def image_adapter(self):
        """The trainable image-to-LM module: post_connector under TAF (the connector is the teacher's, frozen),
        else the connector."""
        return self.post_connector if self.config.taf else self.connector

    @property
    def image_token_id(self):
        return self.config.image_token_id

    def vision_features(self, pixel_values):
        """Vision-tower features (n_img, N_v, d_vis). The tower is frozen (no graph) except where a
        run trains it on purpose: the shapes teacher learns its random tower from scratch."""
        p = next(self.vision_tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and p.requires_grad):
            dtype = p.dtype
            out = self.vision_tower(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
            z = out.hidden_states[self.config.vision_feature_layer]
        if self.config.vision_feature_select_strategy == "default":
            z = z[:, 1:]
        if z.shape[1] != self.num_image_tokens:  # the splice would shift every later image token
            raise ValueError(f"the vision tower gave {z.shape[1]} features per image, the text holds "
                             f"{self.num_image_tokens} image tokens; check the image processor's size "
                             f"({tuple(pixel_values.shape[-2:])} given, the tower expects "
                             f"{self.vision_tower.config.image_size})")
        return z

    def project(self, z):
        """Vision features -> LLM-space visual tokens (connector, then post_connector under TAF)."""
        h = self.connector(z)
        return self.post_connector(h) if self.post_connector is not None else h

    def image_embeds(self, pixel_values):
        """Images -> the visual tokens spliced into the text: the tower's features, projected (None: no images)."""
        return self.project(self.vision_features(pixel_values)) if pixel_values is not None else None

    # -- text + images -------------------------------------------------------------------------
    def image_positions(self, input_ids):
        """(is_image (B, T) bool, has_image (B,) bool), checking each sample holds 0 or N_v image tokens."""
        is_img = input_ids == self.image_token_id
        counts = is_img.sum(1)
        bad = ((counts != 0) & (counts != self.num_image_tokens)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"samples {bad} hold {counts[bad].tolist()} image tokens; each image must be "
                             f"expanded to exactly {self.num_image_tokens} (model.num_image_tokens) "
                             "consecutive image-token ids, or be absent")
        return is_img, counts > 0

    def image_columns(self, is_img):
        """(B, N_v) sorted positions of each sample's image tokens (any N_v positions for a text-only
        sample, which callers mask out): the rows / columns attention capture reads."""
        return is_img.int().argsort(dim=1, descending=True, stable=True)[:, :self.num_image_tokens].sort(1).values

    def embed(self, input_ids, image_embeds=None):
        """Token embeddings with the visual tokens written at the image positions."""
        is_img, has_img = self.image_positions(input_ids)
        n_img = int(has_img.sum())
        n_given = 0 if image_embeds is None else image_embeds.shape[0]
        if n_img != n_given:
            raise ValueError(f"the batch has {n_img} samples with image tokens but {n_given} images; "
                             "pixel_values must hold one image per sample that has image tokens, in order")
        emb = self.llm.get_input_embeddings()(input_ids)
        if n_img:
            emb = emb.masked_scatter(is_img[..., None], image_embeds.to(emb.dtype))
        return emb

    def hidden_states(self, input_ids, attention_mask, image_embeds=None):
        """Last hidden states (B, T, d) of the LM; logits are left to the caller (they are big)."""
        emb = self.embed(input_ids, image_embeds)
        # use_cache=False: otherwise transformers builds a DynamicCache that copies every layer's K and V
        return self.llm.base_model(inputs_embeds=emb, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def logits(self, h):
        return self.llm.get_output_embeddings()(h)

    def forward(self, input_ids, attention_mask, pixel_values=None, labels=None):
        logits = self.logits(self.hidden_states(input_ids, attention_mask, self.image_embeds(pixel_values)))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return {"loss": loss, "logits": logits}

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, pixel_values=None, max_new_tokens=16, temperature=0.0):
        """Greedy decoding with the LM's KV cache (temperature > 0: sampling from softmax(logits / temperature), with
        torch's global RNG). Takes right-padded prompts; returns (B, <=max_new) ids."""
        B, T = input_ids.shape
        # Left-align the prompts so every row's next token goes at the same column.
        lengths = attention_mask.sum(1)
        shift = T - lengths
        idx = (torch.arange(T, device=input_ids.device)[None] - shift[:, None]) % T
        input_ids, attention_mask = input_ids.gather(1, idx), attention_mask.gather(1, idx)
        emb = self.embed(input_ids, self.image_embeds(pixel_values))
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        # transformers >= 5.2x calls the KV cache `cache`; earlier 5.x `past_key_values`.
        cache = {"cache" if "cache" in inspect.signature(self.llm.forward).parameters else "past_key_values": DynamicCache()}
        out = self.llm(inputs_embeds=emb, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=True, logits_to_keep=1, **cache)
        eos = self.tokenizer.eos_token_id if self.tokenizer is not None else self.llm.config.eos_token_id
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        new = []
        for _ in range(max_new_tokens):
            logits = out.logits[:, -1]
            logits[:, self.image_token_id] = float("-inf")  # a generated image token would have no image
            if temperature > 0:
                nxt = torch.multinomial(F.softmax(logits.float() / temperature, -1), 1)[:, 0]
            else:
                nxt = logits.argmax(-1)
            if eos is not None:
                nxt = nxt.masked_fill(done, eos)
                done |= nxt == eos
            new.append(nxt)
            if done.all():
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], 1)
            position_ids = position_ids[:, -1:] + 1
            out = self.llm(input_ids=nxt[:, None], attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=True, **cache)
        return torch.stack(new, 1)

    # -- save / load ---------------------------------------------------------------------------
    def save_pretrained(self, path, state_dict=None, max_shard_bytes=None):
        """config.json, the weights (model.safetensors; shards above max_shard_bytes), tokenizer, image processor.
        `state_dict`: the weights to write instead of this module's own, under its names (gathered from FSDP
        shards); LoRA adapters are merged into their base weights either way (see plain_state_dict)."""
        os.makedirs(path, exist_ok=True)
        cfg = copy.deepcopy(self.config)
        # Store the backbone configs inline, so a checkpoint rebuilds without the original ids.
        cfg.vision = _vision_config(self.vision_tower.config).to_dict()
        cfg.llm = self.llm.config.to_dict()
        cfg.llm.pop("_attn_implementation_autoset", None)
        # transformers builds a model from a config in the config's dtype: say the dtype the weights are saved in
        # (a bf16 Qwen config would otherwise turn float32 weights back into bf16 on load)
        weights = plain_state_dict(self, state_dict)
        for d, prefix in ((cfg.vision, "vision_tower."), (cfg.llm, "llm.")):
            d["dtype"] = str(next(v for k, v in weights.items() if k.startswith(prefix)).dtype).removeprefix("torch.")
        cfg.save(path)
        write_weights(unique_state_dict(self, weights), path, max_shard_bytes or SHARD_BYTES)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)
        if self.image_processor is not None:
            self.image_processor.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, path, dtype=None):
        """A VLM from a checkpoint directory: ours (a stage's out_dir) or a Hugging Face LLaVA one (imported by an
        explicit key mapping, see `llava_config` / `llava_key_to_ours`), weights in one file or sharded. Weights load
        in float32 (trainable masters) unless `dtype` says otherwise; the model is built without random init. A
        stage's out_dir whose last save was interrupted between its two renames loads from out_dir.old."""
        path = find_checkpoint(path) or path
        kind = checkpoint_kind(path)
        config = llava_config(path) if kind == "llava" else VLMConfig.load(path)
        with params_on_meta():
            model = cls(config)
        tensors = read_weights(path)
        nested = any(k.startswith("vision_model.") for k in model.vision_tower.state_dict())
        if kind == "llava":
            tensors = llava_to_ours(tensors, model, path)
        tensors = {match_tower_nesting(k, nested): t for k, t in tensors.items()}
        load_weights(model, tensors, path, dtype or torch.float32)
        if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
            model.tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(path))
        # transformers 5 processors keep the image processor's settings inside processor_config.json
        if any(os.path.isfile(os.path.join(path, f)) for f in ("preprocessor_config.json", "processor_config.json")):
            model.image_processor = AutoImageProcessor.from_pretrained(path)
        if kind == "llava":
            check_llava_tokenizer(model, path)
        return model

    @staticmethod
    def load_vision_tower(path, dtype=None):
        """The vision tower of a checkpoint (id or path): a vision model, the vision part of a full CLIP / SigLIP
        (e.g. SiglipVisionModel), or the tower inside a Hugging Face LLaVA directory or one of our checkpoints (its
        vision_tower weights, strictly; float32 unless `dtype` says otherwise)."""
        kind = vlm_kind(path)
        if kind is None:
            vcfg = _vision_config(AutoConfig.from_pretrained(path))
            return MODEL_MAPPING[type(vcfg)].from_pretrained(path, dtype=dtype)
        config = llava_config(path) if kind == "llava" else VLMConfig.load(path)
        with params_on_meta():
            tower = AutoModel.from_config(_vision_config(_hf_config(config.vision)))
        rename = llava_key_to_ours if kind == "llava" else (lambda k: k)
        nested = any(k.startswith("vision_model.") for k in tower.state_dict())
        # the tower's tensors only: a 7B LLaVA's LM is never read for its tower
        tensors = read_weights(path, keep=lambda k: (rename(k) or "").startswith("vision_tower."))
        tensors = {match_tower_nesting(rename(k), nested).removeprefix("vision_tower."): t for k, t in tensors.items()}
        return load_weights(tower, tensors, f"{path} (its vision tower)", dtype or torch.float32).eval()

    @classmethod
    def from_backbones(cls, vision, llm, connector="mlp2x_gelu", image_token="<image>", dtype=None, seed=None, **kw):
        """A VLM from pretrained HF backbones (ids or paths); adds the image token to the tokenizer. A whole VLM's
        directory as `vision` (LLaVA or ours) gives its tower with the feature layer and selection it was used with
        (a selection in `kw` wins). `seed`: torch's seed for the new weights, set right after the reads."""
        kw = {**tower_settings(vision), **{k: v for k, v in kw.items() if v != ""}}
        tower = cls.load_vision_tower(vision, dtype=dtype)
        lm = AutoModelForCausalLM.from_pretrained(llm, dtype=dtype, attn_implementation=ad.ATTN_IMPLEMENTATION)
        if seed is not None:  # after the reads: the image token's embedding row and the connector are new
            torch.manual_seed(seed)
        tok = prepare_tokenizer(AutoTokenizer.from_pretrained(llm))
        if image_token not in tok.get_vocab():
            tok.add_special_tokens({"additional_special_tokens": [image_token]})
        if len(tok) > lm.get_input_embeddings().num_embeddings:
            lm.resize_token_embeddings(len(tok))
        config = VLMConfig(vision=vision, llm=llm, connector=connector, image_token=image_token,
                           image_token_id=tok.convert_tokens_to_ids(image_token), **kw)
        model = cls(config, vision_tower=tower, llm=lm)
        model.tokenizer = tok
        model.image_processor = AutoImageProcessor.from_pretrained(vision)
        return cast_weights(model, dtype) if dtype is not None else model


def load_vlm(init_from, teacher=None, vision_model="", llm_model="", llm=None, vision=None, tokenizer="",
             image_processor="", data_dir=".", connector="mlp2x_gelu", vision_feature_select_strategy="", seed=None):
    """
    The one way a model starts, from whatever `init_from` points at:
      a directory   a checkpoint: ours (any stage's out_dir) or a Hugging Face LLaVA one (VLM.from_pretrained)
      "backbones"   a pretrained vision tower (vision_model) and causal LM (llm_model), HF ids or paths, and a new
                    connector (VLM.from_backbones); vision_model may also be a LLaVA directory or one of our
                    checkpoints, whose tower (weights, feature layer, selection, image processor) is taken
      "scratch"     a new LM from the `llm` config dict. With a teacher (a VLM or its directory) it shares the
                    teacher's tower (its feature layer and selection too), tokenizer and image processor, as KD, VAT
                    and TAF need; else it sits on
                    vision_model's pretrained tower or a new one from the `vision` dict, with the tokenizer and
                    image processor given (default: data_dir's tokenizer/ and image_processor/, as shapes.py writes)
    `seed`: torch's seed for the new weights, set right before they are drawn, so that a new model's start depends on
    its seed alone, not on what was read before it (reading a checkpoint moves the random stream).
    """
    if init_from == "backbones":
        if not (vision_model and llm_model):
            raise ValueError("init_from=backbones needs vision_model and llm_model (HF ids or local paths)")
        return VLM.from_backbones(vision_model, llm_model, connector=connector, seed=seed,
                                  vision_feature_select_strategy=vision_feature_select_strategy)
    if init_from != "scratch":
        if not init_from or find_checkpoint(init_from) is None:
            raise FileNotFoundError(f"init_from={init_from!r}: no checkpoint there; run the previous stage first (it "
                                    "writes its out_dir), or use init_from=backbones or scratch")
        return VLM.from_pretrained(init_from)
    if not llm:
        raise ValueError("init_from=scratch needs an `llm` config dict (see config/shapes_*.py)")
    select, layer = vision_feature_select_strategy, VLMConfig.vision_feature_layer
    if isinstance(teacher, str):  # not distilling (a baseline), but the same tower and tokenizer
        teacher = VLM.from_pretrained(teacher)
    if teacher is not None:  # the teacher's tower, tokenizer and image processor: KD and VAT need them equal
        tower, tok, proc = copy.deepcopy(teacher.vision_tower), teacher.tokenizer, teacher.image_processor
        vision, select = teacher.config.vision, teacher.config.vision_feature_select_strategy
        layer = teacher.config.vision_feature_layer
    else:
        tok = prepare_tokenizer(AutoTokenizer.from_pretrained(tokenizer or os.path.join(data_dir, "tokenizer")))
        if vision_model:  # a pretrained tower (e.g. shapes.py's) under a new LM
            tower = VLM.load_vision_tower(vision_model)
            vision = tower.config.to_dict()
            proc = AutoImageProcessor.from_pretrained(image_processor or vision_model)
            settings = tower_settings(vision_model)  # a LLaVA's tower is read as that LLaVA reads it
            layer = settings.get("vision_feature_layer", layer)
            select = select or settings.get("vision_feature_select_strategy", "")
        elif vision:
            tower = None
            proc = AutoImageProcessor.from_pretrained(image_processor or os.path.join(data_dir, "image_processor"))
        else:
            raise ValueError("init_from=scratch without a teacher needs a `vision` config dict or a `vision_model` path")
    llm = dict(llm, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    config = VLMConfig(vision=vision, llm=llm, connector=connector, vision_feature_select_strategy=select,
                       vision_feature_layer=layer, image_token_id=tok.convert_tokens_to_ids("<image>"))
    if seed is not None:
        torch.manual_seed(seed)
    model = VLM(config, vision_tower=tower)
    model.tokenizer, model.image_processor = tok, proc
    return model


# -----------------------------------------------------------------------------
# teacher / student


def set_trainable(student, stage, train_llm=None, train_vision=False):
    """
    Freeze everything, then unfreeze the stage's trainable set (README, "What each stage does"): the image
    adapter (post_connector under TAF, else the student's own connector) always; the LLM in DFT
    and SFT (or wherever `train_llm` says), or only its LoRA adapters when it has them. A TAF
    connector never trains; the vision tower only with train_vision (a model trained from scratch,
    e.g. the shapes teacher; never when distilling). Returns the trainable parameters.
    """
    if stage not in ("dpt", "dft", "sft"):
        raise ValueError(f"unknown stage '{stage}': use dpt, dft or sft")
    student.requires_grad_(False)
    student.image_adapter.requires_grad_(True)
    if train_llm if train_llm is not None else stage != "dpt":
        lora = [p for n, p in student.llm.named_parameters() if is_lora(n)]
        for p in lora or student.llm.parameters():
            p.requires_grad_(True)
    if train_vision:
        student.vision_tower.requires_grad_(True)
    return [p for p in student.parameters() if p.requires_grad]


# -----------------------------------------------------------------------------
# LoRA (optional: peft), as the reference recipe trains DFT and SFT


def add_lora(student, rank, alpha=0.0, dropout=0.0, targets="all-linear"):
    """Rank-`rank` LoRA adapters (peft) on the student LM's linears: by default every Linear of the decoder
    layers (not the LM head). B starts at zero, so the model's outputs do not change. alpha 0: 2 * rank (the
    reference's r 128 / alpha 256). The attention modules stay where they were, so VAT capture works unchanged."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise ImportError(f"lora_rank={rank} needs peft, an optional dependency: pip install peft") from e
    targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    cfg = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=dropout, target_modules=targets)
    inject_adapter_in_model(cfg, student.llm)
    return student


def is_lora(name):
    return ".lora_" in name


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


def same_weights(a, b):
    """Same parameter names, shapes and values; a bf16 copy of float32 weights counts as the same (compared in
    the narrower dtype), so the answer does not change when the frozen teacher is cast to bf16."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())

    def equal(x, y):
        dt = x.dtype if x.element_size() <= y.element_size() else y.dtype
        return x is y or (x.shape == y.shape and torch.equal(x.to(dt), y.to(dt)))
    return pa.keys() == pb.keys() and all(equal(pa[k], pb[k]) for k in pa)


class TeacherStudent(nn.Module):
    """
    Student + frozen teacher; forward(batch) -> {lm, kd, vat, total}. With teacher=None (SFT) it
    is the plain LM loss. The teacher is deliberately *not* a registered submodule: DDP, the
    optimizer, state_dict() and checkpoints see only the student.
    """

    def __init__(self, teacher, student, student_layers=None, teacher_layers=None, matching="group",
                 vat_queries="all", vat_pool="flat", vat_loss="cosine", vat_layer_reduce="sum", kd_weight=1.0,
                 vat_weight=1.0, kd_temperature=1.0):
        super().__init__()
        self.student = student
        object.__setattr__(self, "teacher", teacher)
        self.kd_weight, self.vat_weight, self.kd_temperature = kd_weight, vat_weight, kd_temperature
        self.matching, self.vat_queries = matching, vat_queries
        # The outlier filter belongs to the reference (column) form; the paper's flat form has none.
        self.vat_kwargs = dict(pool=vat_pool, loss=vat_loss, filter_outliers=vat_pool == "column",
                               layer_reduce=vat_layer_reduce)
        if matching not in ("group", "simple", "adaptive"):
            raise ValueError(f"unknown matching '{matching}': use group, simple or adaptive")
        if vat_queries not in ("image", "all", "text"):
            raise ValueError(f"unknown vat_queries '{vat_queries}': use image, all or text")
        if teacher is None:
            return
        teacher.eval().requires_grad_(False)
        if teacher.image_token_id != student.image_token_id or teacher.num_image_tokens != student.num_image_tokens:
            raise ValueError("teacher and student must share the tokenizer's image token and the number of "
                             f"visual tokens (teacher {teacher.image_token_id}/{teacher.num_image_tokens}, "
                             f"student {student.image_token_id}/{student.num_image_tokens})")
        # KD compares the two next-token distributions id by id: that needs one tokenizer. Embedding matrices may
        # be padded to different sizes; KD then reads only the tokenizer's real vocabulary.
        if teacher.tokenizer is not None and student.tokenizer is not None:
            if not same_tokenizer(teacher.tokenizer, student.tokenizer):
                raise ValueError(f"the teacher's tokenizer ({teacher.tokenizer.name_or_path or 'teacher'}) and the "
                                 f"student's ({student.tokenizer.name_or_path or 'student'}) differ (vocabulary, "
                                 "special tokens or merges): logit KD would compare unrelated tokens. Use a teacher "
                                 "and a student LM of one family, sharing the tokenizer")
            self.vocab_size = len(student.tokenizer)
        else:
            self.vocab_size = min(m.llm.get_output_embeddings().out_features for m in (teacher, student))
        self.student_layers = ad.resolve_layers(student_layers, student.llm.config.num_hidden_layers)
        self.teacher_layers = ad.resolve_layers(teacher_layers, teacher.llm.config.num_hidden_layers)
        if matching == "simple":
            self.windows = [[t] for t in ad.simple_matching(self.student_layers, self.teacher_layers)]
        else:
            self.windows = ad.group_matching(self.student_layers, self.teacher_layers)
        # Checked once, before any cast to bf16: a shared frozen tower lets one vision forward serve both models.
        self.shared_vision = (same_weights(teacher.vision_tower, student.vision_tower)
                              and teacher.config.vision_feature_layer == student.config.vision_feature_layer
                              and teacher.num_image_tokens == student.num_image_tokens)
        self._same_connector = None
        if student.config.taf:
            self._check_taf()

    def to(self, *args, **kwargs):
        if self.teacher is not None:
            self.teacher.to(*args, **kwargs)
        return super().to(*args, **kwargs)

    def apply_taf(self):
        """TAF: the student reuses the teacher's trained connector, frozen, plus a new trainable
        post_connector Linear(d_teacher -> d_student)."""
        s, t = self.student, self.teacher
        d_t, d_s = t.llm.config.hidden_size, s.llm.config.hidden_size
        p = next(s.llm.parameters())
        s.connector = copy.deepcopy(t.connector).requires_grad_(False).to(device=p.device, dtype=p.dtype)
        s.post_connector = nn.Linear(d_t, d_s).to(device=p.device, dtype=p.dtype)
        s.config.taf, s.config.teacher_hidden_size, s.config.connector = True, d_t, t.config.connector
        self._check_taf()
        return self

    def _check_taf(self):
        """TAF feeds the student's tower features into the teacher's connector: refuse any other tower. Then
        compare the two frozen connectors once (not every step: on GPU that is a host sync per step), before
        the teacher is cast to bf16."""
        if not self.shared_vision:
            s, t = self.student, self.teacher
            what = []
            if not same_weights(s.vision_tower, t.vision_tower):
                what.append("the student's tower has other weights than the teacher's")
            if s.config.vision_feature_layer != t.config.vision_feature_layer:
                what.append(f"the student reads feature layer {s.config.vision_feature_layer}, the teacher "
                            f"{t.config.vision_feature_layer}")
            if s.config.vision_feature_select_strategy != t.config.vision_feature_select_strategy:
                what.append(f"the student selects features {s.config.vision_feature_select_strategy!r}, the teacher "
                            f"{t.config.vision_feature_select_strategy!r}")
            raise ValueError("TAF needs the teacher's vision tower: " + "; ".join(what or ["the towers differ"]) +
                             "; the teacher's connector would read features it was never trained on. Build the "
                             "student on the teacher's tower (init_from=scratch with the teacher takes its tower, "
                             "feature layer and selection; with init_from=backbones pass the teacher's vision_model, "
                             "or the teacher's own directory, and its vision_feature_select_strategy), or run without "
                             "TAF (taf=False)")
        self._same_connector = same_weights(self.student.connector, self.teacher.connector)

    def _reuses_teacher_connector(self):
        # Under TAF with a shared tower, the student's frozen connector equals the teacher's, so the
        # teacher's connector output is the student's pre-post_connector input: compute it once.
        return bool(self.student.config.taf and self.shared_vision and self._same_connector)

    def forward(self, batch, kd=True, vat=True):
        s, t = self.student, self.teacher
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        pixel_values = batch.get("pixel_values")
        # The teacher runs on every micro-batch when a configured loss needs it, images or not: under FSDP its
        # sharded layers gather from every rank at once. On a text-only micro-batch VAT masks every sample (a zero).
        kd, vat = kd and t is not None, vat and t is not None
        is_img, has_img = s.image_positions(ids)

        # 1. visual tokens: the frozen tower (and teacher connector under TAF) run once for both
        img_s = img_t = None
        if pixel_values is not None:
            z = s.vision_features(pixel_values)
            if kd or vat:
                with torch.no_grad():
                    img_t = t.project(z if self.shared_vision else t.vision_features(pixel_values))
            if img_t is not None and self._reuses_teacher_connector():
                img_s = s.post_connector(img_t.to(s.post_connector.weight.dtype))
            else:
                img_s = s.project(z)

        # 2. which attention rows / columns VAT needs: each sample's own image positions
        if vat:
            B, T = ids.shape
            cols = s.image_columns(is_img)
            rows, row_mask = cols, None
            if self.vat_queries != "image":
                rows = torch.arange(T, device=ids.device).expand(B, T)
                row_mask = mask.bool() & (~is_img if self.vat_queries == "text" else True)

        # 3. the two forwards (teacher without a graph), capturing only the matched layers
        pred = labels[:, 1:] != -100  # positions that predict a supervised token
        targets = labels[:, 1:][pred]
        maps_t = maps_s = None
        if kd or vat:
            with torch.no_grad():
                layers_t = sorted({l for w in self.windows for l in w}) if vat else []
                with ad.capture_attention(t.llm, layers_t, rows, cols) if vat else nullcontext() as maps_t:
                    h_t = t.hidden_states(ids, mask, img_t)
                logits_t = t.logits(h_t[:, :-1][pred]) if kd else None
        with ad.capture_attention(s.llm, self.student_layers, rows, cols) if vat else nullcontext() as maps_s:
            h_s = s.hidden_states(ids, mask, img_s)
        logits_s = s.logits(h_s[:, :-1][pred])

        # 4. losses
        zero = h_s.sum() * 0.0
        lm = F.cross_entropy(logits_s.float(), targets) if targets.numel() else zero
        kd_l = ad.kd_loss(logits_s, logits_t, self.kd_temperature, self.vocab_size) if kd else zero
        vat_l = zero
        if vat:
            A_s = torch.stack([maps_s[l] for l in self.student_layers])
            if self.matching == "adaptive":
                chosen = ad.adaptive_matching(A_s, maps_t, self.windows, sample_mask=has_img)
                A_t = torch.stack([maps_t[l] for l in chosen])
            else:
                A_t = ad.window_average(maps_t, self.windows)
            if row_mask is not None:  # rows that are padding (or not text) count for nothing
                A_s, A_t = A_s * row_mask[None, :, :, None], A_t * row_mask[None, :, :, None]
            vat_l = ad.vat_loss(A_s, A_t, sample_mask=has_img, **self.vat_kwargs)
        total = lm + self.kd_weight * kd_l + self.vat_weight * vat_l
        if img_s is None:  # text only: under DDP every trainable parameter must join the backward, the adapter too
            total = total + sum(p.sum() for p in s.image_adapter.parameters() if p.requires_grad) * 0.0
        return {"lm": lm, "kd": kd_l, "vat": vat_l, "total": total}


# -----------------------------------------------------------------------------
# checkpoint directories: ours or a Hugging Face LLaVA one; weights in one safetensors file or sharded

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"  # {"weight_map": {tensor name: shard file}}, as on the hub
SHARD_BYTES = 5 * 2**30  # the hub's usual shard size: a 7B model in float32 becomes 6 files
ACCEPTED = ("a CompoDistill checkpoint (a stage's out_dir: config.json with 'vision' and 'llm', model.safetensors) or "
            "a Hugging Face LLaVA directory (LlavaForConditionalGeneration: config.json with model_type 'llava', "
            "model.safetensors or model.safetensors.index.json with its shards, tokenizer and image processor)")


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


def vlm_kind(path):
    """"ours" or "llava" when `path` is a directory whose config.json describes a whole VLM (then checkpoint_kind
    checks it), else None: a hub id, a vision model's or an LM's directory."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        return None
    cfg = _read_json(cfg_path)
    if ("vision" in cfg and "llm" in cfg) or cfg.get("model_type") == "llava":
        return checkpoint_kind(path)
    return None


def tower_settings(path):
    """{vision_feature_layer, vision_feature_select_strategy} a whole VLM's directory reads its tower with (empty for
    anything else): a tower taken from a LLaVA is read as that LLaVA reads it."""
    kind = vlm_kind(path)
    if kind is None:
        return {}
    c = llava_config(path) if kind == "llava" else VLMConfig.load(path)
    return dict(vision_feature_layer=c.vision_feature_layer,
                vision_feature_select_strategy=c.vision_feature_select_strategy)


def checkpoint_kind(path):
    """"ours" or "llava" for a directory VLM.from_pretrained can load; anything else is an error that says what was
    found there and what is accepted."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such directory; expected {ACCEPTED}")
    found = ", ".join(sorted(os.listdir(path))[:12]) or "nothing"
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json (found: {found}); expected {ACCEPTED}")
    cfg = _read_json(cfg_path)
    if "vision" in cfg and "llm" in cfg:
        kind = "ours"
    elif cfg.get("model_type") == "llava":
        kind = "llava"
    else:
        raise ValueError(f"{cfg_path} describes model_type {cfg.get('model_type')!r} "
                         f"(architectures {cfg.get('architectures')}), which is neither kind of checkpoint this "
                         f"project loads: expected {ACCEPTED}. A separate vision tower and causal LM enter with "
                         "init_from=backbones (vision_model=..., llm_model=...)")
    if not has_weights(path):
        raise FileNotFoundError(f"{path}: a {'LLaVA' if kind == 'llava' else 'CompoDistill'} config.json but no "
                                f"weights (found: {found}); expected {WEIGHTS_NAME}, or {WEIGHTS_INDEX_NAME} and the "
                                "shards it lists")
    return kind


def _read_safetensors(file, keep=None):
    """name -> tensor of one safetensors file (only the names `keep` accepts, when given). A damaged file (cut short
    by an interrupted copy, an error page saved in its place) is an error that names it."""
    try:
        with safe_open(file, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if keep is None or keep(k)}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: cannot read the weights ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                         "the file is damaged or not safetensors: copy or download the checkpoint again, or rerun the "
                         "stage that wrote it") from e


def _read_json(file):
    with open(file, encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e}); the file is damaged: copy or download the checkpoint again, "
                         "or rerun the stage that wrote it") from e


def read_weights(path, keep=None):
    """name -> tensor from model.safetensors, or from every shard that model.safetensors.index.json lists; with
    `keep` (name -> bool), only the tensors it accepts are read."""
    if os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
        return _read_safetensors(os.path.join(path, WEIGHTS_NAME), keep)
    index = os.path.join(path, WEIGHTS_INDEX_NAME)
    weight_map = _read_json(index)
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


def write_weights(tensors, path, max_shard_bytes=SHARD_BYTES):
    """Write name -> tensor as model.safetensors, or, past max_shard_bytes, as model-0000i-of-0000n.safetensors plus
    model.safetensors.index.json (the layout of hub checkpoints). Earlier weight files in `path` are removed first,
    so a directory never mixes two models."""
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


@contextmanager
def params_on_meta():
    """Build modules with their parameters on the meta device: no memory and no random init for weights that a
    checkpoint is about to replace (a 7B LM would otherwise be initialised once for nothing). Buffers stay real: some
    are computed at construction and never saved (rotary frequencies, position ids)."""
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


def llava_config(path):
    """Our VLMConfig for a LLaVA directory: its vision and text configs, the projector as mlp2x_gelu, its image token,
    vision_feature_layer and vision_feature_select_strategy (and, for a student exported by export_hf.py, the layer
    pairs it was distilled on)."""
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
    return VLMConfig(vision=c.vision_config.to_dict(), llm=text, connector="mlp2x_gelu",
                     image_token_id=c.image_token_index, vision_feature_layer=c.vision_feature_layer,
                     vision_feature_select_strategy=c.vision_feature_select_strategy, extra=extra)


def check_llava_tokenizer(model, path):
    """Our data pipeline writes each image as data.IMAGE_TOKEN ("<image>"): the LLaVA tokenizer must have it, with the
    id its config gives the image token."""
    tok = model.tokenizer
    if tok is None or model.image_processor is None:
        raise FileNotFoundError(f"{path}: a LLaVA checkpoint without its tokenizer or image processor (no "
                                "tokenizer_config.json / preprocessor_config.json or processor_config.json); copy "
                                "the processor files too")
    got = tok.convert_tokens_to_ids(model.config.image_token)
    if got != model.image_token_id:
        raise ValueError(f"{path}: the tokenizer's {model.config.image_token} is id {got}, config.json's "
                         f"image_token_index is {model.image_token_id}; the image token must be "
                         f"{model.config.image_token!r} with that id")
