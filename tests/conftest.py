"""Tiny random models built from configs (no downloads, a few hundred kB each), and the builders several test files
share: checkpoints, data layouts, benchmark files."""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: its scripts run from here
sys.path.insert(0, ROOT)

import shapes  # noqa: E402
import shapes_tower  # noqa: E402
from model import VLM, VLMConfig  # noqa: E402

# Tiny models gain nothing from a second intra-op thread, and on a busy 2-core machine OpenMP's
# spinning threads made tests 15-40x slower (measured by the evaluate tests: 3.7 s vs 57-155 s).
torch.set_num_threads(1)

def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs scripts as subprocesses, several processes or the whole pipeline "
                            "(deselect with -m 'not slow' for a quick loop)")


IMAGE_TOKEN_ID = 3
VOCAB = 40


def vision_cfg(image_size=16, patch_size=8):
    return dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, image_size=image_size, patch_size=patch_size, num_channels=3)


def llm_cfg(arch="qwen2", hidden=32, layers=4, heads=4, kv_heads=2):
    cfg = dict(model_type=arch, vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
               max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0, eos_token_id=2,
               bos_token_id=2)
    return cfg


def tiny_vlm(arch="qwen2", seed=0, vision_tower=None, **llm_kw):
    torch.manual_seed(seed)
    cfg = VLMConfig(vision=vision_cfg(), llm=llm_cfg(arch, **llm_kw), image_token_id=IMAGE_TOKEN_ID)
    return VLM(cfg, vision_tower=vision_tower).eval()


@pytest.fixture
def make_vlm():
    return tiny_vlm


def tiny_ids():
    """(input_ids, attention_mask) of three samples for tiny_vlm: two with the image (4 image tokens) at different
    offsets, right padding, and a text-only one."""
    ids = torch.tensor([[5, 6, 3, 3, 3, 3, 7, 8, 9, 10],
                        [5, 3, 3, 3, 3, 7, 8, 9, 0, 0],
                        [5, 6, 7, 8, 9, 10, 11, 0, 0, 0]])
    mask = (torch.arange(10)[None] < torch.tensor([10, 8, 7])[:, None]).long()
    return ids, mask


def tiny_batch():
    """tiny_ids as a training batch: labels on the text after position 6, two 16 px images (seed 1)."""
    from data import IGNORE_INDEX
    ids, mask = tiny_ids()
    labels = ids.masked_fill(ids == IMAGE_TOKEN_ID, IGNORE_INDEX).masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :6] = IGNORE_INDEX
    torch.manual_seed(1)
    return dict(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=torch.randn(2, 3, 16, 16))


def tiny_pair(taf=True):
    """A tiny TeacherStudent: a 6-layer teacher (width 48), a 4-layer student (width 32) on a copy of its tower, VAT
    on student layers 1-2 against teacher layers 2-4; TAF applied unless taf=False."""
    import copy
    import attention_distill as ad
    from model import TeacherStudent
    t = tiny_vlm(layers=6, hidden=48, heads=4, kv_heads=2, seed=0)
    s = tiny_vlm(layers=4, hidden=32, heads=4, kv_heads=2, seed=1, vision_tower=copy.deepcopy(t.vision_tower))
    ts = TeacherStudent(t, s, ad.VATSettings(student_layers=[1, 2], teacher_layers=[2, 3, 4]))
    return ts.apply_taf() if taf else ts


# -----------------------------------------------------------------------------
# Tiny Hugging Face checkpoints on disk, as real ones come: byte-level BPE tokenizers with a chat template and no
# pad token (Qwen / Llama style), LMs saved in bf16, SigLIP and CLIP towers with their image processors.

CORPUS = ["a red circle left of a blue square", "what color is the square ?", "describe the image .",
          "the green triangle is above the star", "yes", "no", "how many objects are there ?",
          "A chat between a user and an assistant that answers questions about an image.", " USER: ", " ASSISTANT:"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def bpe_tokenizer(bos=False, corpus=CORPUS, vocab_size=320):
    """A byte-level BPE tokenizer trained here. eos <|endoftext|>, no pad token; bos=True: <s> in front of every
    encoding, as Llama's tokenizer does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + (["<s>"] if bos else [])
    t = Tokenizer(models.BPE())
    t.pre_tokenizer, t.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    t.train_from_iterator(list(corpus) * 4, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        t.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                         special_tokens=[("<s>", t.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>", bos_token="<s>" if bos else None)
    tok.chat_template = CHATML
    return tok


def save_lm(path, tok, arch="qwen2", hidden=32, layers=2, heads=4, kv_heads=2, pad_rows=0, dtype=torch.bfloat16,
            seed=0):
    """A random causal LM saved with save_pretrained in `dtype` (as Qwen checkpoints are: bf16), its embedding
    padded `pad_rows` past the tokenizer, and the tokenizer beside it."""
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(seed)
    extra = dict(head_dim=hidden // heads) if arch == "qwen3" else {}
    cfg = AutoConfig.for_model(arch, vocab_size=len(tok) + pad_rows, hidden_size=hidden, intermediate_size=2 * hidden,
                               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                               max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
                               bos_token_id=tok.bos_token_id, pad_token_id=None, dtype=dtype, **extra)
    AutoModelForCausalLM.from_config(cfg).to(dtype).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def save_tower(path, kind="siglip", image_size=16, patch_size=8, seed=0):
    """A random SigLIP or CLIP vision tower (CLIP adds a CLS token to its patches) with its image processor."""
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, \
        SiglipVisionModel
    from data import image_processor
    torch.manual_seed(seed)
    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              image_size=image_size, patch_size=patch_size)
    if kind == "clip":
        CLIPVisionModel(CLIPVisionConfig(**kw)).save_pretrained(path)
        CLIPImageProcessorPil(size={"shortest_edge": image_size},
                              crop_size={"height": image_size, "width": image_size}).save_pretrained(path)
    else:
        SiglipVisionModel(SiglipVisionConfig(**kw)).save_pretrained(path)
        image_processor(image_size).save_pretrained(path)
    return str(path)


def write_llava(path, kinds, image_dir="images", seed=0):
    """A LLaVA-format file with one sample per entry of `kinds`: "image" (an image that exists), "text" (no image),
    "missing" (an image path that does not exist). Images are small coloured PNGs under `image_dir`."""
    import json
    import random
    from PIL import Image
    rng = random.Random(seed)
    root = os.path.dirname(str(path))
    os.makedirs(os.path.join(root, image_dir), exist_ok=True)
    recs = []
    for i, kind in enumerate(kinds):
        q, a = rng.choice([("what color is the square ?", "red"), ("how many objects are there ?", "two"),
                           ("describe the image .", "a red circle left of a blue square")])
        rec = {"id": f"s{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
        if kind != "text":
            rec["image"] = f"{image_dir}/{i}.png"
            rec["conversations"][0]["value"] = "<image>\n" + q
            if kind == "image":
                Image.new("RGB", (20, 20), tuple(rng.randrange(256) for _ in range(3))).save(
                    os.path.join(root, rec["image"]))
        recs.append(rec)
    with open(path, "w") as f:
        json.dump(recs, f)
    return str(path)


def save_llava(path, tower="siglip", arch="qwen2", bos=False, hidden=32, layers=2, heads=4, kv_heads=2,
               image_size=16, patch_size=8, strategy=None, feature_layer=-2, tie=False, dtype=torch.bfloat16, seed=0):
    """A random Hugging Face LlavaForConditionalGeneration saved with save_pretrained (in `dtype`, as hub checkpoints
    come), with its LlavaProcessor: the BPE tokenizer plus an <image> token, the tower's image processor. strategy:
    LLaVA's vision_feature_select_strategy (default: "default" for CLIP, whose CLS token it drops; "full" for
    SigLIP); feature_layer: its vision_feature_layer; tie: the LM head shares the input embedding."""
    from transformers import (AutoConfig, CLIPImageProcessorPil, CLIPVisionConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, SiglipVisionConfig)
    from data import image_processor
    tok = bpe_tokenizer(bos=bos)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              image_size=image_size, patch_size=patch_size)
    if tower == "clip":
        vision = CLIPVisionConfig(**kw)
        proc = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                     crop_size={"height": image_size, "width": image_size})
    else:
        vision = SiglipVisionConfig(**kw)
        proc = image_processor(image_size)
    strategy = strategy or ("default" if tower == "clip" else "full")
    extra = dict(head_dim=hidden // heads) if arch == "qwen3" else {}
    text = AutoConfig.for_model(arch, vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                max_position_embeddings=512, tie_word_embeddings=tie, eos_token_id=tok.eos_token_id,
                                bos_token_id=tok.bos_token_id, pad_token_id=None, **extra)
    n_tokens = (image_size // patch_size) ** 2 - (strategy == "default") + (tower == "clip")
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_select_strategy=strategy, vision_feature_layer=feature_layer,
                      image_seq_length=n_tokens)
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(cfg).to(dtype).save_pretrained(path)
    LlavaProcessor(image_processor=proc, tokenizer=tok, patch_size=patch_size, vision_feature_select_strategy=strategy,
                   num_additional_image_tokens=int(tower == "clip")).save_pretrained(path)
    return str(path)


# -----------------------------------------------------------------------------
# running stages

LAYERS = dict(student_layers=[0, 1], teacher_layers=[1, 2, 3])  # of a 2-layer student and a 4-layer teacher


def args(d):
    return [f"--{k}={v}" for k, v in d.items()]


# What the tests' runs start from: the settings every stage shares (run.DEFAULTS) and, for those each stage script
# sets for itself (its shapes recipe), plain values, so that a test states what its run needs
GENERAL = dict(out_dir="out/run", init_from="", data="out/shapes/instruct.json", max_length=512, kd_weight=0.0,
               vat_weight=0.0, batch_size=16, max_steps=1000, lr=2e-4, warmup_frac=0.03, weight_decay=0.0, beta2=0.999,
               eval_interval=200, save_interval=500)


def training_defaults(**kw):
    """run.DEFAULTS + GENERAL, updated by kw: a complete training config for a test."""
    import run as runner
    return {**runner.DEFAULTS, **GENERAL, **kw}


def stage_main(defaults, argv):
    """A stage script's main on training_defaults() (not the script's shapes recipe) updated by `defaults`, which
    names the stage (default sft); then argv."""
    import importlib
    d = training_defaults(**{"stage": "sft", **defaults})
    return importlib.import_module(f"train_{d['stage']}").main(argv, defaults=d)


def stage_train(cfg):
    """The stage script of cfg["stage"] run with the resolved settings `cfg`."""
    import importlib
    return importlib.import_module(f"train_{cfg['stage']}").train(cfg)


STAGE_TRAINS_LLM = dict(dpt=False, dft=True, sft=True)  # what each script passes to Run.build


def build_models(cfg, amp=None):
    """The models of cfg["stage"] as its training starts them (run_models.ready), without running."""
    import importlib
    from run_models import ready
    mod = importlib.import_module(f"train_{cfg['stage']}")
    return ready(lambda resume_dir: mod.models(cfg, resume_dir), cfg, None, None, amp, STAGE_TRAINS_LLM[cfg["stage"]])


STAGES = {"sft": dict(stage="sft"), "dpt": dict(stage="dpt", kd_weight=1.0, taf=True),
          "dft": dict(stage="dft", kd_weight=1.0, vat_weight=1.0)}  # what run(stage) starts from


def run(stage, **kw):
    """One stage in this process, small and fast by default."""
    base = dict(batch_size=2, max_steps=2, log_interval=1, eval_interval=0, save_interval=100, lr=1e-3,
                max_length=96, warmup_frac=0.0)
    return stage_main(STAGES[stage], args({**base, **kw}))


def script_args(stage, **kw):
    """The command line on which train_<stage>.py (torchrun, a subprocess) runs what run(stage, **kw) runs: the
    script's own recipe replaced where it differs from the tests' training_defaults, then kw."""
    import importlib
    mine = training_defaults(**STAGES[stage])
    script = importlib.import_module(f"train_{stage}").DEFAULTS
    return args({**{k: v for k, v in mine.items() if script[k] != v}, **kw})


def weights(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


# -----------------------------------------------------------------------------
# a tiny shapes world and its first two stages (the stage scripts' recipes and the machinery they share)

VISION = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2, image_size=24, patch_size=8)  # 9 visual tokens (24 px world, 3x3 grid)


def llm(hidden, layers):
    return dict(model_type="qwen2", hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)


def run_stage(script_defaults, **kw):
    """A stage script's main (`script_defaults` names the stage) on a shapes world: short steps at max_length 64."""
    base = dict(batch_size=2, max_steps=2, log_interval=1, eval_interval=0, save_interval=100, lr=1e-3,
                max_length=64, warmup_frac=0.0)
    return stage_main(script_defaults, args({**base, **kw}))


# what run_stage(stage) starts from
SFT = dict(stage="sft", kd_weight=0.0, vat_weight=0.0)
DPT = dict(stage="dpt", kd_weight=1.0, vat_weight=0.0, taf=True)
DFT = dict(stage="dft", kd_weight=1.0, vat_weight=1.0)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A tiny world, a 2-step teacher and a 2-step DPT student, shared by the tests of every file (each writes its
    own directories under world["root"])."""
    root = tmp_path_factory.mktemp("stages")
    data = root / "shapes"
    shapes.generate(str(data), n_train=24, n_test=4, image_size=24, progress=False)
    d = dict(pretrain=str(data / "pretrain.json"), instruct=str(data / "instruct.json"),
             teacher=str(root / "teacher"), dpt=str(root / "dpt"), root=root)
    d["tower"] = str(data / "vision_tower")
    shapes_tower.pretrain_tower(str(data), d["tower"], vision=VISION, steps=2, batch_size=4, progress=False)
    run_stage(SFT, init_from="scratch", data=d["pretrain"] + "," + d["instruct"], out_dir=d["teacher"],
              vision_model=d["tower"], llm=llm(48, 4))
    run_stage(DPT, init_from="scratch", teacher=d["teacher"], data=d["pretrain"], out_dir=d["dpt"],
              llm=llm(32, 2), student_layers=[0, 1], teacher_layers=[1, 2, 3])
    return d


def free_port():
    import socket
    with socket.socket() as s:  # a fixed port hangs when two suites run at once
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, argv, nproc=2, timeout=240, env=None):
    """`script` under torchrun with `nproc` CPU processes (gloo); a hang fails at `timeout` instead of blocking."""
    import subprocess
    import sys
    root = ROOT
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           os.path.join(root, script), *argv]
    return subprocess.run(cmd, cwd=root, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})),
                          capture_output=True, text=True, timeout=timeout)


def data_order(n, seed, steps, world):
    """The dataset index each (step, rank) micro-batch of size 1 reads (run_data.BatchSampler over the train split,
    which with eval_interval=0 is the whole file in the fixed permutation of seed 1234)."""
    from run_data import BatchSampler
    split = torch.randperm(n, generator=torch.Generator().manual_seed(1234)).tolist()
    sampler = iter(BatchSampler(n, 1, seed, 0, 1))
    return [[split[next(sampler)[0]] for _ in range(world)] for _ in range(steps)]


def write_layout(path, kinds_by_step, seed=0):
    """A LLaVA file (see write_llava) laid out so that, with batch size 1 and data seed `seed`, the micro-batch of
    step s on rank r reads a sample of kind kinds_by_step[s][r]; one epoch covers the file. Its images go to a folder
    of its own (a "missing" one must not exist)."""
    world = len(kinds_by_step[0])
    n = len(kinds_by_step) * world
    kinds = [None] * n
    for step, row in zip(data_order(n, seed, len(kinds_by_step), world), kinds_by_step):
        for i, kind in zip(step, row):
            kinds[i] = kind
    return write_llava(path, kinds, image_dir=os.path.basename(str(path)) + "_images", seed=1)


@pytest.fixture(scope="session")
def hf(tmp_path_factory):
    """Tiny backbones as real ones come, a teacher (2 SFT steps from backbones; its LM's embedding padded 48 rows
    past the tokenizer, as Qwen's is) and a DPT student with TAF (2 steps), all from bf16 checkpoints."""
    root = tmp_path_factory.mktemp("hf")
    tok = bpe_tokenizer()
    d = dict(root=root, siglip=save_tower(root / "siglip"), clip=save_tower(root / "clip", "clip"),
             teacher_lm=save_lm(root / "qwen2_t", tok, hidden=48, layers=4, pad_rows=48),
             student_lm=save_lm(root / "qwen2_s", tok, hidden=32, layers=2, seed=1),
             data=write_llava(root / "data.json", ["image"] * 6 + ["text"] * 2))
    d["teacher"], d["dpt"] = str(root / "teacher"), str(root / "dpt")
    run("sft", init_from="backbones", vision_model=d["siglip"], llm_model=d["teacher_lm"], data=d["data"],
        out_dir=d["teacher"])
    run("dpt", init_from="backbones", vision_model=d["siglip"], llm_model=d["student_lm"], teacher=d["teacher"],
        data=d["data"], out_dir=d["dpt"], **LAYERS)
    return d


def write_huge_png(path, width=20000, height=10000):
    """A PNG whose header declares width x height pixels (200 M here: past PIL's limit of about 179 M), a few bytes
    on disk: PIL refuses it when it opens it, before reading any pixel."""
    import struct
    import zlib
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data +  # noqa: E731
                                struct.pack(">I", zlib.crc32(kind + data)))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) +
                chunk(b"IEND", b""))


def write_lines(path, rows):
    """A JSON-lines file (its folder made): benchmark files and answer files."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def write_reefknot_layout(root, images):
    """Reefknot as downloaded: numeric Visual Genome ids, images as <id>.jpg in another folder, the three files;
    one item whose image is missing, one without a relation_type (the released Multichoice file has none)."""
    from PIL import Image
    os.makedirs(images, exist_ok=True)
    for i in ("2344270", "4680"):
        Image.new("RGB", (8, 8), (200, 10, 10)).save(os.path.join(images, i + ".jpg"))
    rows = {"YESNO.jsonl": [
                dict(image_id="2344270", query_prompt="Is the cat eating fish in this photo? Please answer yes or no.",
                     label="yes", relation_type="cognition"),
                dict(image_id="2344270", query_prompt="Is the cat under fish in this photo? please answer yes or no.",
                     label="no", relation_type="perception"),
                dict(image_id="999", query_prompt="Is the dog on bed in this photo? Please answer yes or no.",
                     label="yes", relation_type="perception")],  # 999.jpg does not exist: skipped and counted
            "Multichoice.jsonl": [
                dict(image_id="4680", query_prompt="What is the relation with man and horse in this photo? A. riding "
                     "B. eating C. under D. beside, please choose.", label="A", type="Multichoice")],
            "VQA.jsonl": [
                dict(image_id="4680", query_prompt="What is the relation between the man and the horse?",
                     label="riding", relation_type="cognition"),
                dict(image_id="4680", query_prompt="Where is the horse relative to the fence?",
                     label="next to", relation_type="perception")]}
    os.makedirs(root, exist_ok=True)
    for name, items in rows.items():
        with open(os.path.join(root, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in items)


class CannedRunner:
    """Stands in for evaluate.Runner in a benchmark's run(): answers each prompt from a table, and records what it was
    asked."""

    def __init__(self, answers):
        self.answers, self.asked = answers, []

    def generate(self, specs, max_new_tokens, desc):
        self.asked += specs
        return [self.answers[q] for q, _, _ in specs]
