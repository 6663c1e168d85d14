"""
The per-GPU memory of one DFT step, estimated from parameter counts and a per-token activation formula (no GPU
needed): what run.py holds under each setup (DDP or FSDP, full fine-tuning or LoRA, with or without gradient
checkpointing), and what a rank holds at start-up or resume. These are estimates, not measurements: parameter counts
are exact (the models are built on the meta device from bench.PRESETS' configs), the activations follow
layer_activation_bytes, and a card "fits" when the larger of the step's total and the start-up peak, plus 10 %, is
below its size. bench.py measures what it can on the machine at hand.

    python memory.py --preset=qwen15-1.8b-4b      # the recipe's shapes: the table docs/memory.md shows
"""
import sys

import torch

from bench import PRESETS, VISION
from configurator import cli, configure
from model import VLM, VLMConfig

DEFAULTS = dict(
    preset="qwen15-1.8b-4b",       # a model preset of bench.py (tiny | qwen15-1.8b-4b)
    world=8,                       # GPUs
    seq_len=2048,                  # tokens per sample (the recipe's max_length; the worst case)
    sup_frac=0.25,                 # the fraction of tokens that are supervised (answers)
    lora_rank=128,                 # the reference's LoRA rank
)

GIB = 2 ** 30
SETUPS = ("ddp", "ddp_lora", "fsdp", "fsdp_lora")


def param_counts(p, rank=0):
    """Parameter counts of the preset's models, built on the meta device from their configs (exact, no memory):
    LM parts, tower, connectors, and LoRA adapters of rank `rank` on every Linear of the student's decoder layers."""
    lm = lambda kw: dict(model_type="qwen2", vocab_size=p["vocab"], tie_word_embeddings=False, **kw)  # noqa: E731
    with torch.device("meta"):
        teacher = VLM(VLMConfig(vision=dict(VISION, **p["vision"]), llm=lm(p["teacher"]), image_token_id=0))
        student = VLM(VLMConfig(vision=dict(VISION, **p["vision"]), llm=lm(p["student"]), image_token_id=0, taf=True,
                                teacher_hidden_size=p["teacher"]["hidden_size"]), vision_tower=teacher.vision_tower)
    count = lambda m: sum(x.numel() for x in m.parameters())  # noqa: E731
    c = {}
    for who, m in (("s", student), ("t", teacher)):
        layers = m.llm.base_model.layers
        c[who + "_layers"] = count(layers)
        c[who + "_layer"] = count(layers[0])
        c[who + "_lm_rest"] = count(m.llm) - c[who + "_layers"]  # embeddings, final norm, LM head
        c[who + "_tower"] = count(m.vision_tower)
        c[who + "_connectors"] = count(m.connector) + (count(m.post_connector) if m.post_connector is not None else 0)
    layers = student.llm.base_model.layers  # LoRA: rank x (in + out) per Linear of every decoder layer
    c["lora"] = rank * sum(x.in_features + x.out_features for x in layers[0].modules()
                           if isinstance(x, torch.nn.Linear)) * len(layers)
    c["post_connector"] = count(student.post_connector)
    c["s_cfg"], c["t_cfg"] = student.llm.config, teacher.llm.config
    return c


def layer_activation_bytes(cfg):
    """Bytes one decoder layer (Qwen/Llama style) keeps for backward per token, under bf16 autocast with a float32
    residual stream and SDPA/flash attention (no T x T scores): two RMSNorm inputs (float32, 4d each), their bf16
    outputs that the projections keep (2d each), q, k, v and the attention output (SDPA keeps them), the MLP's gate,
    up, SiLU(gate) and product (2f each)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    hd = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    return 2 * 4 * d + 2 * 2 * d + 2 * (2 * q + 2 * kv) + 4 * 2 * f


def memory_estimate(p, setup, ckpt, world=8, batch=4, seq=2048, sup=0.25, rank=128):
    """Per-GPU GiB of one DFT step (TAF, VAT on), as this code keeps it: the student's trainable weights in float32
    (and cached in bf16 by autocast), its frozen ones in float32 but for LoRA's base LM (bf16), float32 gradients
    and AdamW's two states for what trains, the frozen teacher in bf16, activations. ddp: everything replicated, the whole LM trains. ddp_lora: LoRA adapters of
    `rank` train instead of the LM. fsdp: the student, its gradients and optimizer states sharded over `world`,
    plus what is gathered (the root unit for the step, two decoder layers in flight); the teacher's decoder layers
    sharded too. An estimate: allocator slack, CUDA context (~0.5 GiB) and communication buffers are not counted."""
    if setup not in SETUPS:
        raise ValueError(f"unknown setup '{setup}': use one of {SETUPS}")
    c = param_counts(p, rank)
    s_all = c["s_layers"] + c["s_lm_rest"] + c["s_tower"] + c["s_connectors"]
    s_root = s_all - c["s_layers"]
    lora = setup.endswith("_lora")
    train = c["lora"] + c["post_connector"] if lora else c["s_layers"] + c["s_lm_rest"] + c["post_connector"]
    t_all = c["t_layers"] + c["t_lm_rest"] + c["t_tower"] + c["t_connectors"]
    tokens, n_sup = batch * seq, sup * batch * seq
    V = c["s_cfg"].vocab_size
    if setup.startswith("fsdp"):
        lora_layer = c["lora"] / c["s_cfg"].num_hidden_layers if lora else 0
        # shards, plus the gathered bf16 compute copies: the root unit for the whole step, two layers in flight
        weights = 4 * (s_all + (c["lora"] if lora else 0)) / world + 2 * s_root + 2 * 2 * (c["s_layer"] + lora_layer)
        grads = 4 * train / world + 4 * c["s_layer"]  # sharded, plus one layer's before its reduce-scatter
        optim = 8 * train / world
        teacher = 2 * (c["t_layers"] / world + t_all - c["t_layers"] + c["t_layer"])
    else:  # what trains in float32 (+ autocast's bf16 copy of it); frozen: LoRA's base LM in bf16, the rest float32
        frozen_lm = c["s_layers"] + c["s_lm_rest"] if lora else 0
        weights = 6 * train + 2 * frozen_lm + 4 * (s_all + (c["lora"] if lora else 0) - train - frozen_lm)
        grads, optim = 4 * train, 8 * train
        teacher = 2 * t_all
    per_layer = layer_activation_bytes(c["s_cfg"]) * tokens
    L = c["s_cfg"].num_hidden_layers
    layers = (L * 4 * c["s_cfg"].hidden_size * tokens + per_layer) if ckpt else L * per_layer
    # logits only where an answer token is predicted: student bf16 + float32 log-softmaxes for the LM loss and KD,
    # and the teacher's float32 log-softmax as the KD target
    logits = n_sup * V * (2 + 4 + 4 + 4)
    teacher_act = layer_activation_bytes(c["t_cfg"]) * tokens  # no graph: about one layer's working set at a time
    acts = layers + logits + teacher_act
    out = dict(weights=weights, grads=grads, optimizer=optim, teacher=teacher, activations=acts)
    out = {k: v / GIB for k, v in out.items()}
    out["total"] = sum(out.values())
    return out


def startup_estimate(p, setup, world=8, rank=128):
    """Per-GPU GiB at start-up or resume, before the first step (the larger: a resume also holds AdamW's states), as
    run.py loads: ddp: the student (float32; LoRA's base LM in bf16) and the teacher (cast to bf16 on the CPU before
    it moves), AdamW's states loaded. fsdp: every rank builds the models on the meta device and receives its shards
    from rank 0 tensor by tensor, so its shards (student, teacher's decoder layers, AdamW's states and the zero
    gradients torch's optimizer loading initialises them with), the teacher's unsharded rest, and the largest tensor in
    flight (the student's float32 embedding or LM head). Rank 0 also holds the whole float32 student and bf16 teacher
    in host memory while it sends them; train_state.pt is memory-mapped."""
    if setup not in SETUPS:
        raise ValueError(f"unknown setup '{setup}': use one of {SETUPS}")
    c = param_counts(p, rank)
    s_all = c["s_layers"] + c["s_lm_rest"] + c["s_tower"] + c["s_connectors"]
    lora = setup.endswith("_lora")
    train = c["lora"] + c["post_connector"] if lora else c["s_layers"] + c["s_lm_rest"] + c["post_connector"]
    t_all = c["t_layers"] + c["t_lm_rest"] + c["t_tower"] + c["t_connectors"]
    if setup.startswith("fsdp"):
        largest = 4 * c["s_cfg"].vocab_size * c["s_cfg"].hidden_size
        held = (4 * (s_all + (c["lora"] if lora else 0)) + 12 * train + 2 * c["t_layers"]) / world
        return (held + 2 * (t_all - c["t_layers"]) + largest) / GIB
    frozen_lm = c["s_layers"] + c["s_lm_rest"] if lora else 0
    weights = 4 * (s_all + (c["lora"] if lora else 0) - frozen_lm) + 2 * frozen_lm
    return (weights + 2 * t_all + 8 * train) / GIB


def memory_markdown(p, world=8, batch=4, seq=2048, sup=0.25, rank=128, cards=(24, 48, 80)):
    rows = ["| setup | grad ckpt | student weights | gradients | optimizer | teacher | activations | total | start-up | "
            + " | ".join(f"fits {g} GB" for g in cards) + " |",
            "|---" * (9 + len(cards)) + "|"]
    for setup in SETUPS:
        for ckpt in (False, True):
            e = memory_estimate(p, setup, ckpt, world, batch, seq, sup, rank)
            start = startup_estimate(p, setup, world, rank)
            name = {"ddp": "DDP, full fine-tuning", "ddp_lora": f"DDP + LoRA r{rank}", "fsdp": f"FSDP, {world} GPUs",
                    "fsdp_lora": f"FSDP + LoRA r{rank}, {world} GPUs"}[setup]
            peak = max(e["total"], start)
            fits = ["yes" if peak * GIB * 1.1 < g * 1e9 else "no" for g in cards]  # 10 % for what is not counted
            rows.append(f"| {name} | {'yes' if ckpt else 'no'} | " +
                        " | ".join(f"{e[k]:.1f}" for k in ("weights", "grads", "optimizer", "teacher", "activations", "total"))
                        + f" | {start:.1f} | " + " | ".join(fits) + " |")
    return "\n".join(rows)


def table(preset, world=8, seq_len=2048, sup_frac=0.25, lora_rank=128):
    """The estimate as printed: a line saying what it is, then memory_markdown's table."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset '{preset}': use one of {list(PRESETS)}")
    p = PRESETS[preset]
    return (f"Estimated per-GPU memory (GiB) of one DFT step, {preset}: batch {p['batch']} x {seq_len} tokens per GPU, "
            f"{sup_frac:.0%} of them supervised; estimates, not measurements (memory.memory_estimate says what is "
            "counted).\n\n" + memory_markdown(p, world, p["batch"], seq_len, sup_frac, lora_rank))


def main(argv=None):
    cfg = configure(dict(DEFAULTS), sys.argv[1:] if argv is None else argv, __doc__, [__file__])
    text = table(cfg["preset"], cfg["world"], cfg["seq_len"], cfg["sup_frac"], cfg["lora_rank"])
    print(text)
    return text


if __name__ == "__main__":
    cli(main)
