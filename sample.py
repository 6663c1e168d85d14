"""
One image and a prompt in, the model's answer out (this project's nanoGPT sample.py):

    python sample.py --model=out/shapes/sft --image=out/shapes/images/test_00000.png --prompt="what color is the star ?"

--model: any checkpoint directory (a stage's out_dir) or a Hugging Face LLaVA directory. The prompt is written as in
training (data.tokenize_conversation: the image, then the prompt, then " ASSISTANT:"). Greedy decoding by default,
as evaluate.py does; --temperature > 0 samples instead (--seed). On a GPU when there is one. The model computes in the
dtype its weights are loaded in (--dtype; auto = bfloat16 on CUDA, float32 on the CPU), without autocast, as in
evaluate.py. Prints the answer only.
"""
import sys

import torch

from common import pick_device, resolve_dtype
from data import decode_answer, load_image, tokenize_conversation
from model import VLM

DEFAULTS = dict(
    model="out/shapes/sft",   # checkpoint directory: ours or a Hugging Face LLaVA one
    image="",                 # a .png / .jpg file
    prompt="describe the image .",  # the question, as the user's turn of the chat
    max_new_tokens=64,        # the answer's length limit
    temperature=0.0,          # 0: greedy; > 0: sample from softmax(logits / temperature)
    seed=0,                   # for temperature > 0
    device="auto",            # auto: cuda when available, else cpu
    dtype="auto",             # the model loads and computes in it (no autocast): auto = bfloat16 on cuda, float32
                              # on cpu; or float32 / bfloat16
)


@torch.no_grad()
def answer(model, image, prompt, max_new_tokens=64, temperature=0.0):
    """The model's answer (text, up to its eos) to `prompt` about PIL `image` (RGB; data.load_image reads files so)."""
    tok = model.tokenizer
    ids, _ = tokenize_conversation([{"from": "human", "value": prompt}], tok, model.num_image_tokens, True)
    device = next(model.parameters()).device
    ids = torch.tensor([ids], device=device)
    pixels = model.image_processor(images=image.convert("RGB"), return_tensors="pt").pixel_values.to(device)
    return decode_answer(tok, model.generate(ids, torch.ones_like(ids), pixels, max_new_tokens, temperature)[0])


def main(argv=None):
    from configurator import configure
    cfg = configure(dict(DEFAULTS), sys.argv[1:] if argv is None else argv, __doc__, [__file__])
    if not cfg["image"]:
        raise ValueError("give --image=<png/jpg file> (and --model=<checkpoint dir>, --prompt=...)")
    if cfg["max_new_tokens"] < 1:
        raise ValueError(f"--max_new_tokens={cfg['max_new_tokens']}: the answer needs at least 1 token; give 1 or more")
    device = pick_device(cfg["device"])
    dtype = resolve_dtype(cfg["dtype"], device)
    try:
        image = load_image(cfg["image"])
    except OSError as e:
        raise FileNotFoundError(f"--image={cfg['image']}: cannot read it as an image ({e})") from e
    model = VLM.from_pretrained(cfg["model"], dtype=dtype).to(device).eval()
    torch.manual_seed(cfg["seed"])
    text = answer(model, image, cfg["prompt"], cfg["max_new_tokens"], cfg["temperature"])
    print(text)
    return text


if __name__ == "__main__":
    from configurator import cli
    cli(main)
