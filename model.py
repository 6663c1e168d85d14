"""
The model: a LLaVA-style VLM, how one starts (load_vlm), and the teacher/student wrapper that computes CompoDistill's
losses.

VLM: image -> vision tower (frozen, features of `vision_feature_layer`) -> connector
(`mlp{depth}x_gelu`) [-> post_connector under TAF] -> N_v visual tokens written into the text
embeddings where the input has image-token ids -> Hugging Face causal LM.

The data pipeline has already expanded each "<image>" into N_v image-token ids, so every sample's
image positions are known before the model runs; the same positions drive splicing, label masking
and attention capture.

TeacherStudent: a frozen teacher and a trainable student; one forward returns
{lm, kd, vat, total}. Only the logits at supervised positions are ever computed, and the shared
frozen vision tower (plus the teacher connector under TAF) runs once for both models. The attention
losses themselves (which rows and columns, which layers, the VAT and KD formulas) are in attention_distill.py;
reading and writing checkpoint directories is in checkpoint.py.
"""

import copy
import inspect
import json
import os
import re
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer,
                          DynamicCache)
from transformers.models.auto.modeling_auto import MODEL_MAPPING

import attention_distill as ad
from checkpoint import (find_checkpoint, open_checkpoint, params_on_meta, plain_state_dict, unique_state_dict,
                        vlm_checkpoint, write_weights)
from common import cast_weights
from data import IGNORE_INDEX, IMAGE_TOKEN, prepare_tokenizer, same_tokenizer


@dataclass
class VLMConfig:
    vision: dict | str                 # HF vision-model config (dict with model_type) or a model id / path
    llm: dict | str                    # HF causal-LM config (dict with model_type) or a model id / path
    connector: str = "mlp2x_gelu"      # mlp{depth}x_gelu, as in LLaVA
    taf: bool = False                  # student sees images through the teacher connector + post_connector
    teacher_hidden_size: int = 0       # width of the teacher connector (TAF only)
    image_token: str = IMAGE_TOKEN
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


def backbone_config(spec):
    """A transformers config from a dict {model_type, ...} or from an id / path."""
    if isinstance(spec, dict):
        spec = dict(spec)
        return AutoConfig.for_model(spec.pop("model_type"), **spec)
    return AutoConfig.from_pretrained(spec)


def _vision_config(cfg):
    # A full CLIP / SigLIP checkpoint holds text and vision configs; the tower is the vision part.
    return getattr(cfg, "vision_config", cfg)


def tower_tokens(tower):
    """(features per image, whether the first one is a CLS token) of a vision tower: CLIP emits its patches plus a
    CLS token in front, SigLIP its patches only."""
    vc = tower.config
    patches = (vc.image_size // vc.patch_size) ** 2
    emb = next((m for n, m in tower.named_modules() if n.split(".")[-1] == "embeddings"), None)
    n = getattr(emb, "num_positions", patches)
    return n, n == patches + 1


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
            vision_tower = AutoModel.from_config(_vision_config(backbone_config(config.vision)))
        if llm is None:
            llm = AutoModelForCausalLM.from_config(backbone_config(config.llm),
                                                   attn_implementation=ad.ATTN_IMPLEMENTATION)
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
            # the teacher's connector, frozen for good (only post_connector trains): a reloaded TAF student is built
            # as frozen as the one that was saved, so both take the same (no-gradient) kernels
            self.connector = build_connector(config.connector, d_vis, config.teacher_hidden_size).requires_grad_(False)
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
    def trainable_connector(self):
        """The part of the image path that trains: post_connector under TAF (the connector is then the teacher's,
        frozen), else the connector."""
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
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=IGNORE_INDEX)
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
        write_weights(unique_state_dict(self, weights), path, max_shard_bytes)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)
        if self.image_processor is not None:
            self.image_processor.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, path, dtype=None):
        """A VLM from a checkpoint directory: ours (a stage's out_dir) or a Hugging Face LLaVA one (imported by an
        explicit key mapping, checkpoint.LLAVA_KEYS), weights in one file or sharded. Weights load in float32
        (trainable masters) unless `dtype` says otherwise; the model is built without random init. A stage's out_dir
        whose last save was interrupted between its two renames loads from out_dir.old."""
        ckpt = open_checkpoint(path)  # which directory, which kind: asked here once
        with params_on_meta():
            model = cls(VLMConfig(**ckpt.settings()))
        ckpt.load_into(model, dtype or torch.float32)
        path = ckpt.path  # out_dir.old when that is where the checkpoint is
        if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
            model.tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(path))
        # transformers 5 processors keep the image processor's settings inside processor_config.json
        if any(os.path.isfile(os.path.join(path, f)) for f in ("preprocessor_config.json", "processor_config.json")):
            model.image_processor = AutoImageProcessor.from_pretrained(path)
        if ckpt.kind == "llava":
            check_llava_tokenizer(model, path)
        return model

    @staticmethod
    def load_vision_tower(path, dtype=None):
        """The vision tower of a checkpoint (id or path): a vision model, the vision part of a full CLIP / SigLIP
        (e.g. SiglipVisionModel), or the tower inside a Hugging Face LLaVA directory or one of our checkpoints (its
        vision_tower weights, strictly; float32 unless `dtype` says otherwise)."""
        return pretrained_tower(path, dtype=dtype)[0]

    @classmethod
    def from_backbones(cls, vision, llm, connector="mlp2x_gelu", image_token=IMAGE_TOKEN, dtype=None, seed=None,
                       vision_feature_select_strategy=""):
        """A VLM from pretrained HF backbones (ids or paths); adds the image token to the tokenizer. A whole VLM's
        directory as `vision` (LLaVA or ours) gives its tower read as that VLM reads it (pretrained_tower). `seed`:
        torch's seed for the new weights, set right after the reads."""
        tower, layer, select = pretrained_tower(vision, vision_feature_select_strategy, dtype)
        lm = AutoModelForCausalLM.from_pretrained(llm, dtype=dtype, attn_implementation=ad.ATTN_IMPLEMENTATION)
        if seed is not None:  # after the reads: the image token's embedding row and the connector are new
            torch.manual_seed(seed)
        tok = prepare_tokenizer(AutoTokenizer.from_pretrained(llm))
        if image_token not in tok.get_vocab():
            tok.add_special_tokens({"additional_special_tokens": [image_token]})
        if len(tok) > lm.get_input_embeddings().num_embeddings:
            lm.resize_token_embeddings(len(tok))
        config = VLMConfig(vision=vision, llm=llm, connector=connector, image_token=image_token,
                           image_token_id=tok.convert_tokens_to_ids(image_token), vision_feature_layer=layer,
                           vision_feature_select_strategy=select)
        model = cls(config, vision_tower=tower, llm=lm)
        model.tokenizer = tok
        model.image_processor = AutoImageProcessor.from_pretrained(vision)
        return cast_weights(model, dtype) if dtype is not None else model


# -----------------------------------------------------------------------------
# how a model starts


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


def pretrained_tower(path, select="", dtype=None):
    """(tower, vision_feature_layer, vision_feature_select_strategy) for a tower taken from `path`, asked once what
    `path` is. A whole VLM's directory (LLaVA or ours): its vision_tower weights (strictly; float32 unless `dtype`
    says otherwise), read with the layer and selection that VLM reads them with, so the tower is read as it was
    trained to be (a `select` given wins). Anything else (a vision model, a full CLIP / SigLIP, an id): its vision
    model, LLaVA's feature layer and `select` ("" lets the VLM pick the tower's own)."""
    ckpt = vlm_checkpoint(path)
    if ckpt is None:
        vcfg = _vision_config(AutoConfig.from_pretrained(path))
        return MODEL_MAPPING[type(vcfg)].from_pretrained(path, dtype=dtype), VLMConfig.vision_feature_layer, select
    c = VLMConfig(**ckpt.settings())
    with params_on_meta():
        tower = AutoModel.from_config(_vision_config(backbone_config(c.vision)))
    tower = ckpt.load_into(tower, dtype or torch.float32, tower_only=True).eval()
    return tower, c.vision_feature_layer, select or c.vision_feature_select_strategy


def load_vlm(cfg, teacher=None):
    """
    The one way a model starts, from a training config `cfg` (run.DEFAULTS and the stage scripts name and explain
    the settings read here). cfg["init_from"]:
      a directory   a checkpoint: ours (any stage's out_dir) or a Hugging Face LLaVA one (VLM.from_pretrained)
      "backbones"   a pretrained vision tower (vision_model) and causal LM (llm_model), HF ids or paths, and a new
                    connector (VLM.from_backbones); vision_model may also be a LLaVA directory or one of our
                    checkpoints, whose tower (weights, feature layer, selection, image processor) is taken
      "scratch"     a new LM from the `llm` config dict. With a teacher (`teacher`, a VLM, else cfg["teacher"]'s
                    directory) it shares the teacher's tower (its feature layer and selection too), tokenizer and
                    image processor, as KD, VAT and TAF need; else it sits on vision_model's pretrained tower or a new
                    one from the `vision` dict, with the tokenizer and image processor given (default: the data
                    folder's tokenizer/ and image_processor/, as shapes.py writes them)
    Each directory named here (init_from, teacher, vision_model) is asked once what it is, by checkpoint.py's
    open_checkpoint or vlm_checkpoint; the Checkpoint that answers then reads its settings and weights.
    cfg["seed"] seeds torch right before the new weights are drawn, so that a new model's start depends on its seed
    alone, not on what was read before it (reading a checkpoint moves the random stream).
    """
    init_from, select, seed = cfg["init_from"], cfg["vision_feature_select_strategy"], cfg["seed"]
    if init_from == "backbones":
        if not (cfg["vision_model"] and cfg["llm_model"]):
            raise ValueError("init_from=backbones needs vision_model and llm_model (HF ids or local paths)")
        return VLM.from_backbones(cfg["vision_model"], cfg["llm_model"], connector=cfg["connector"], seed=seed,
                                  vision_feature_select_strategy=select)
    if init_from != "scratch":
        if not init_from or find_checkpoint(init_from) is None:
            raise FileNotFoundError(f"init_from={init_from!r}: no checkpoint there; run the previous stage first (it "
                                    "writes its out_dir), or use init_from=backbones or scratch")
        return VLM.from_pretrained(init_from)
    if not cfg["llm"]:
        raise ValueError("init_from=scratch needs an `llm` config dict (see config/shapes_*.py)")
    data_dir = os.path.dirname(os.path.abspath(cfg["data"].split(",")[0]))
    layer, vision = VLMConfig.vision_feature_layer, cfg["vision"]
    if teacher is None and cfg["teacher"]:  # not distilling (a baseline), but the same tower and tokenizer
        teacher = VLM.from_pretrained(cfg["teacher"])
    if teacher is not None:  # the teacher's tower, tokenizer and image processor: KD and VAT need them equal
        tower, tok, proc = copy.deepcopy(teacher.vision_tower), teacher.tokenizer, teacher.image_processor
        vision, select = teacher.config.vision, teacher.config.vision_feature_select_strategy
        layer = teacher.config.vision_feature_layer
    else:
        tok = prepare_tokenizer(AutoTokenizer.from_pretrained(cfg["tokenizer"] or os.path.join(data_dir, "tokenizer")))
        if cfg["vision_model"]:  # a pretrained tower (e.g. shapes.py's) under a new LM
            tower, layer, select = pretrained_tower(cfg["vision_model"], select)
            vision = tower.config.to_dict()
            proc = AutoImageProcessor.from_pretrained(cfg["image_processor"] or cfg["vision_model"])
        elif vision:
            tower = None
            proc = AutoImageProcessor.from_pretrained(cfg["image_processor"]
                                                      or os.path.join(data_dir, "image_processor"))
        else:
            raise ValueError("init_from=scratch without a teacher needs a `vision` config dict or a `vision_model` "
                             "path")
    llm = dict(cfg["llm"], vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    config = VLMConfig(vision=vision, llm=llm, connector=cfg["connector"], vision_feature_select_strategy=select,
                       vision_feature_layer=layer, image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN))
    if seed is not None:
        torch.manual_seed(seed)
    model = VLM(config, vision_tower=tower)
    model.tokenizer, model.image_processor = tok, proc
    return model


# -----------------------------------------------------------------------------
# teacher / student


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
    optimizer, state_dict() and checkpoints see only the student. `vat_settings`: attention_distill.VATSettings
    (which layers, how they are matched, which form of the loss).
    """

    def __init__(self, teacher, student, vat_settings=None, kd_weight=1.0, vat_weight=1.0, kd_temperature=1.0,
                 privileged=None):
        super().__init__()
        self.student = student
        # privileged.Privileged: supervision only a teacher in training gets (never with a teacher of its own)
        self.privileged = privileged
        object.__setattr__(self, "teacher", teacher)
        self.vat_settings = vat_settings or ad.VATSettings()
        self.kd_weight, self.vat_weight, self.kd_temperature = kd_weight, vat_weight, kd_temperature
        self.pairs = None  # the matched layers (attention_distill.LayerPairs); with a teacher only
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
        self.pairs = ad.match_layers(student.llm.config.num_hidden_layers, teacher.llm.config.num_hidden_layers,
                                     self.vat_settings.student_layers, self.vat_settings.teacher_layers,
                                     self.vat_settings.matching)
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

    def forward(self, batch, with_kd=True, with_vat=True):
        """The losses of one micro-batch: {"lm", "kd", "vat", "total"} (0-d tensors); with_kd, with_vat: whether to
        compute L_KD and L_VAT (with a teacher). Shapes: B samples, T tokens (Nv of them visual), V vocabulary, D
        hidden."""
        s, t = self.student, self.teacher
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]  # (B, T) each
        pixel_values = batch.get("pixel_values")  # (B, 3, H, W), or None for a text-only micro-batch
        # The teacher runs on every micro-batch when a configured loss needs it, images or not: under FSDP its
        # sharded layers gather from every rank at once. On a text-only micro-batch VAT masks every sample (a zero).
        with_kd, with_vat = with_kd and t is not None, with_vat and t is not None
        is_img, has_img = s.image_positions(ids)  # (B, T) bool: image-token positions; (B,) bool: has an image

        # 1. visual tokens: the frozen tower (and teacher connector under TAF) run once for both
        img_s = img_t = None
        if pixel_values is not None:
            z = s.vision_features(pixel_values)  # (B, Nv, D_vision)
            if with_kd or with_vat:
                with torch.no_grad():  # (B, Nv, D_teacher)
                    img_t = t.project(z if self.shared_vision else t.vision_features(pixel_values))
            if img_t is not None and self._reuses_teacher_connector():
                img_s = s.post_connector(img_t.to(s.post_connector.weight.dtype))  # (B, Nv, D_student)
            else:
                img_s = s.project(z)  # (B, Nv, D_student)

        # 2. the attention rows / columns VAT reads: each sample's own image positions
        rows = cols = row_mask = None
        if with_vat:
            # (B, Nq) query rows, (B, Nv) image columns, (B, Nq) which rows are real
            rows, cols, row_mask = ad.vat_positions(is_img, mask, self.vat_settings.vat_queries, s.num_image_tokens)

        # 3. the two forwards (teacher without a graph), capturing only the matched layers
        pred = labels[:, 1:] != IGNORE_INDEX  # (B, T-1): positions that predict a supervised token
        targets = labels[:, 1:][pred]  # (P,): the P supervised tokens of the micro-batch
        maps_t = maps_s = None
        if with_kd or with_vat:
            with torch.no_grad():
                # maps_t: {layer: (B, Nq, Nv)}, head-averaged attention of each captured teacher layer
                with ad.capture_attention(t.llm, self.pairs.captured, rows, cols) if with_vat else \
                        nullcontext() as maps_t:
                    h_t = t.hidden_states(ids, mask, img_t)  # (B, T, D_teacher)
                logits_t = t.logits(h_t[:, :-1][pred]) if with_kd else None  # (P, V_teacher)
        with ad.capture_attention(s.llm, self.pairs.student, rows, cols) if with_vat else nullcontext() as maps_s, \
                self.privileged.capture(s.llm) if self.privileged is not None else nullcontext() as seen:
            h_s = s.hidden_states(ids, mask, img_s)  # (B, T, D_student); maps_s as maps_t, the student's layers
        logits_s = s.logits(h_s[:, :-1][pred])  # (P, V_student)

        # 4. losses
        zero = h_s.sum() * 0.0  # () on the graph: a loss that is off still backpropagates (as nothing)
        l_lm = F.cross_entropy(logits_s.float(), targets) if targets.numel() else zero  # ()
        l_kd = ad.kd_loss(logits_s, logits_t, self.kd_temperature, self.vocab_size) if with_kd else zero  # ()
        if with_vat:  # the matched maps, (L, B, Nq, Nv) each: L layer pairs; samples without an image left out
            A_s, A_t = ad.matched_maps(maps_s, maps_t, self.pairs, self.vat_settings, has_img, row_mask)
            l_vat = ad.vat_loss(A_s, A_t, sample_mask=has_img, **self.vat_settings.loss_kwargs())  # ()
        else:
            l_vat = zero
        total = l_lm + self.kd_weight * l_kd + self.vat_weight * l_vat
        if img_s is None:  # text only: under DDP every trainable parameter must join the backward, the connector too
            total = total + sum(p.sum() for p in s.trainable_connector.parameters() if p.requires_grad) * 0.0
        out = {"lm": l_lm, "kd": l_kd, "vat": l_vat, "total": total}
        if self.privileged is not None:  # a teacher in training: where to look, where things are
            p = self.privileged
            out["look"], out["readout"] = p.losses(seen, batch, is_img, s.num_image_tokens)
            out["total"] = total + p.look_weight * out["look"] + p.readout_weight * out["readout"]
        return out
