"""
Export a checkpoint as a Hugging Face LLaVA directory, which transformers loads with no code from this project:

    python export_hf.py --model=out/shapes/sft --out=out/shapes/sft_hf

    from transformers import AutoProcessor, LlavaForConditionalGeneration
    model = LlavaForConditionalGeneration.from_pretrained("out/shapes/sft_hf")
    processor = AutoProcessor.from_pretrained("out/shapes/sft_hf")

What it writes, in the layout of the llava-hf checkpoints on the hub:
  config.json             model_type "llava": our vision tower's and LM's configs, image_token_index = our image token,
                          image_seq_length = our visual tokens per image, our vision_feature_layer and
                          vision_feature_select_strategy
  model.safetensors       the weights under the hub's tensor names (past 5 GiB: shards + model.safetensors.index.json)
  processor files         tokenizer, image processor, and a chat template that writes our training prompt,
                          {system} USER: <image>\\n{question} ASSISTANT:   (and answers as " {answer}<eos>"; the
                          tokenizer adds BOS in front where training has one)
  generation_config.json  greedy, stopping at the tokenizer's eos, the image token suppressed (as in VLM.generate)
The config also keeps, under "compodistill", the layer pairs the student was distilled on (transformers ignores the
key; importing the directory again gives evaluate.py's alignment task those pairs).

The projector. LLaVA's is Linear(d_vis, d) -> GELU -> Linear(d, d), d the LM's width: our mlp2x_gelu connector as it
is. Under TAF the student sees images through the teacher's connector (width d_t) and a post_connector
Linear(d_t, d), which folds into the second Linear exactly:

    post(W2 g + b2) = (Wp W2) g + (Wp b2 + bp),   g = GELU(W1 z + b1)   (computed in float64)

That leaves d_t GELU units where LLaVA has d. With d_t <= d the missing units are zero-padded (zero rows in W1 and
b1 give GELU(0) = 0, and their columns in the folded W2 are zero): the same function. With d_t > d (a teacher wider
than the student, as the paper's 4B -> 2B pair) no LLaVA projector holds the student, and export refuses, saying
why, instead of writing an approximation of the model that was evaluated.

It refuses an --out that is a checkpoint (the one exported, a folder inside it, or another of ours) before writing
anything: the export would overwrite it.

Checks before it returns: the exported processor, on a probe question and image, must give the exact token ids of our
training prompt (data.tokenize_conversation), image-token count included.
"""
import copy
import os
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import ours_to_llava_key, read_json, unique_state_dict, write_weights
from common import resolve_dtype
from data import CHAT, IMAGE_TOKEN, tokenize_conversation
from model import VLM, tower_tokens

DEFAULTS = dict(
    model="",            # checkpoint directory: any stage's out_dir (or a LLaVA directory, rewritten as ours is)
    out="",              # the Hugging Face directory to write (default: <model>_hf)
    dtype="float32",     # float32 | bfloat16 | float16: the exported weights' dtype
)
PROBE = "what color is the square ?"


def projector(vlm, where="the model"):
    """(W1, b1, W2, b2) of LLaVA's projector for our connector [+ post_connector under TAF], in float64."""
    c = vlm.connector
    if not (len(c) == 3 and isinstance(c[1], nn.GELU) and c[1].approximate == "none"):
        raise ValueError(f"{where}: the connector is {vlm.config.connector}; a LLaVA projector is Linear-GELU-Linear "
                         "(mlp2x_gelu), so only that connector exports")
    W1, b1, W2, b2 = (t.detach().double() for t in (c[0].weight, c[0].bias, c[2].weight, c[2].bias))
    if vlm.post_connector is None:
        return W1, b1, W2, b2
    d, d_t = vlm.llm.config.hidden_size, W1.shape[0]
    if d_t > d:
        raise ValueError(
            f"{where}: this TAF student cannot be written as a Hugging Face LLaVA directory: its image path is the "
            f"teacher's connector ({d_t} GELU units) followed by the post_connector, while LLaVA's projector has as "
            f"many GELU units as the LM is wide ({d}). Folding the post_connector in is exact only for a teacher no "
            f"wider than the student ({d_t} > {d} here), and any {d}-unit projector would be an approximation of the "
            "model you evaluated, so export refuses. What you can do: use this checkpoint as it is (evaluate.py, "
            "sample.py and init_from= load it); or distill a student whose LM is at least as wide as the teacher's, or "
            "one trained without TAF (taf=False), which exports exactly")
    Wp, bp = vlm.post_connector.weight.detach().double(), vlm.post_connector.bias.detach().double()
    W2, b2 = Wp @ W2, Wp @ b2 + bp
    pad = d - d_t
    return F.pad(W1, (0, 0, 0, pad)), F.pad(b1, (0, pad)), F.pad(W2, (0, pad)), b2


def hf_tensors(vlm, dtype, where="the model"):
    """Our weights under the hub's LLaVA names, the projector folded (see projector())."""
    W1, b1, W2, b2 = projector(vlm, where)
    out = {ours_to_llava_key(k): t for k, t in unique_state_dict(vlm).items()
           if not k.startswith(("connector.", "post_connector."))}
    for ours, t in (("connector.0.weight", W1), ("connector.0.bias", b1), ("connector.2.weight", W2),
                    ("connector.2.bias", b2)):
        out[ours_to_llava_key(ours)] = t
    return {k: t.to(dtype) if t.is_floating_point() else t for k, t in out.items()}


def distill_note(vlm):
    """{"compodistill": {"distill": the layer pairs the student was distilled on}} (nothing for a model that was not
    distilled): transformers keeps an unknown config key as it is, and checkpoint.llava_settings reads it back, so
    evaluate.py's alignment on an export measures the pairs training aligned."""
    distill = (vlm.config.extra or {}).get("distill")
    return {"compodistill": {"distill": distill}} if distill else {}


def hf_config(vlm, dtype):
    from transformers import LlavaConfig
    name = str(dtype).removeprefix("torch.")
    vision = dict(vlm.vision_tower.config.to_dict(), dtype=name)
    text = dict(vlm.llm.config.to_dict(), dtype=name)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=vlm.image_token_id,
                      image_seq_length=vlm.num_image_tokens, projector_hidden_act="gelu",
                      vision_feature_layer=vlm.config.vision_feature_layer,
                      vision_feature_select_strategy=vlm.config.vision_feature_select_strategy,
                      multimodal_projector_bias=True, tie_word_embeddings=bool(text.get("tie_word_embeddings")),
                      **distill_note(vlm))
    cfg.architectures = ["LlavaForConditionalGeneration"]
    cfg.dtype = name
    return cfg


def chat_template(template=CHAT):
    """A Jinja chat template that writes our training prompt, {system} USER: <image>\\n{question} ASSISTANT:, and
    answers as " {answer}<eos>" (data.tokenize_conversation). A system message replaces the default system text; an
    image part puts "<image>\\n" before the message's text. BOS is not in the template: the tokenizer adds it where it
    adds one (Llama), when the processor tokenizes the text, as for the llava-hf checkpoints; so the text goes to the
    processor as it is (what lmms-eval's llava_hf model does), or apply_chat_template(..., tokenize=True)."""
    def lit(s):
        return repr(s)  # a Python string literal is a Jinja one
    parts = "m['content'] | selectattr('type', 'equalto', '{}') | {}"
    return ("{% set ns = namespace(system=" + lit(template.system) + ", start=0) %}"
            "{% if messages[0]['role'] == 'system' %}{% set m = messages[0] %}"
            "{% set ns.system = m['content'] if m['content'] is string else " +
            parts.format("text", "map(attribute='text') | join('')") + " %}{% set ns.start = 1 %}{% endif %}"
            "{{ ns.system }}"
            "{% for m in messages[ns.start:] %}"
            "{% if m['content'] is string %}{% set text = m['content'] %}{% set images = 0 %}"
            "{% else %}{% set text = " + parts.format("text", "map(attribute='text') | join('')") + " %}"
            "{% set images = " + parts.format("image", "list | length") + " %}{% endif %}"
            "{% if m['role'] == 'user' %}{{ " + lit(template.user) + " + " + lit(IMAGE_TOKEN + "\n") +
            " * images + text }}"
            "{% else %}{{ " + lit(template.assistant + template.answer_prefix) + " + text + eos_token }}{% endif %}"
            "{% endfor %}"
            "{% if add_generation_prompt %}{{ " + lit(template.assistant) + " }}{% endif %}")


def hf_processor(vlm):
    from transformers import LlavaProcessor
    if vlm.tokenizer is None or vlm.image_processor is None:
        raise ValueError("the model has no tokenizer or image processor (a checkpoint without their files); a LLaVA "
                         "directory needs both")
    tok = copy.deepcopy(vlm.tokenizer)
    tok.chat_template = chat_template()
    _, has_cls = tower_tokens(vlm.vision_tower)
    # LLaVA's processor expands "<image>" to (side / patch)^2 + num_additional_image_tokens tokens, less one under the
    # "default" strategy: CLIP's CLS token is the additional one, so both towers give our num_image_tokens
    return LlavaProcessor(image_processor=vlm.image_processor, tokenizer=tok,
                          patch_size=vlm.vision_tower.config.patch_size,
                          vision_feature_select_strategy=vlm.config.vision_feature_select_strategy,
                          chat_template=tok.chat_template, image_token=vlm.config.image_token,
                          num_additional_image_tokens=int(has_cls))


def hf_generation_config(vlm):
    from transformers import GenerationConfig
    tok = vlm.tokenizer
    return GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, do_sample=False, suppress_tokens=[vlm.image_token_id])


def check_prompt(vlm, out, question=PROBE):
    """The exported processor must turn one user message (an image and `question`) into our training prompt, token
    for token. A different image-token count is an error (the model would fail); different text tokens (a tokenizer
    that encodes the pieces of a prompt differently from the whole) a warning."""
    from PIL import Image
    from transformers import AutoProcessor
    proc = AutoProcessor.from_pretrained(out)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    size = vlm.vision_tower.config.image_size
    got = proc(text=text, images=Image.new("RGB", (size, size)), return_tensors="pt").input_ids[0].tolist()
    want, _ = tokenize_conversation([{"from": "human", "value": question}], vlm.tokenizer, vlm.num_image_tokens, True)
    n_img = got.count(vlm.image_token_id)
    if n_img != vlm.num_image_tokens:
        raise ValueError(f"{out}: the exported processor expands the image into {n_img} tokens, the model reads "
                         f"{vlm.num_image_tokens}; check the image processor's size against the tower's image_size")
    if got != want:
        warnings.warn(f"{out}: the exported chat template's prompt tokenizes differently from training "
                      f"({vlm.tokenizer.convert_ids_to_tokens(got)} vs {vlm.tokenizer.convert_ids_to_tokens(want)}); "
                      "the exported model will see slightly different prompts")
    return got


def check_out(model, out):
    """Refuse an `out` that would overwrite a checkpoint: the one being exported (its weights would become the LLaVA
    ones), a folder inside it (its run's next save replaces the directory) or another of our checkpoints."""
    default = f" (the default is {os.path.normpath(model)}_hf)" if isinstance(model, str) else ""
    real = os.path.realpath(out)
    if isinstance(model, str):
        src = os.path.realpath(model)
        where = "is" if real == src else "lies inside" if real.startswith(src + os.sep) else None
        if where:
            raise ValueError(f"--out={out} {where} the checkpoint being exported (--model={model}): the export would "
                             f"overwrite it; choose another --out{default}")
    if os.path.isfile(os.path.join(out, "train_state.pt")) or _is_ours(out):
        raise ValueError(f"--out={out} holds a CompoDistill checkpoint, which the export would overwrite; choose "
                         f"another --out{default}")


def _is_ours(path):
    try:
        cfg = read_json(os.path.join(path, "config.json"))
    except (OSError, ValueError):  # none there, or not ours to judge
        return False
    return isinstance(cfg, dict) and "vision" in cfg and "llm" in cfg


def export(model, out, dtype=torch.float32, max_shard_bytes=None):
    """Write `model` (a VLM or a checkpoint directory) to `out` as a Hugging Face LLaVA directory; returns `out`.
    `out` may not be a checkpoint (check_out)."""
    check_out(model, out)
    vlm = VLM.from_pretrained(model) if isinstance(model, str) else model
    tensors = hf_tensors(vlm, dtype, model if isinstance(model, str) else "the model")  # a refusal writes nothing
    os.makedirs(out, exist_ok=True)
    hf_config(vlm, dtype).save_pretrained(out)
    write_weights(tensors, out, max_shard_bytes)
    hf_processor(vlm).save_pretrained(out)
    hf_generation_config(vlm).save_pretrained(out)
    check_prompt(vlm, out)
    return out


def main(argv=None):
    from configurator import configure
    cfg = configure(dict(DEFAULTS), sys.argv[1:] if argv is None else argv, __doc__, [__file__])
    if not cfg["model"]:
        raise ValueError("give --model=<checkpoint dir> (and --out=<dir>, default <model>_hf)")
    dtype = resolve_dtype(cfg["dtype"], torch.device("cpu"), allowed=("float32", "bfloat16", "float16"))
    out = cfg["out"] or os.path.normpath(cfg["model"]) + "_hf"
    export(cfg["model"], out, dtype)
    print(f"-> {out} (LlavaForConditionalGeneration.from_pretrained / AutoProcessor.from_pretrained)")
    return out


if __name__ == "__main__":
    from configurator import cli
    cli(main)
