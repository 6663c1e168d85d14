"""sample.py: one image + prompt -> the answer, on a shapes checkpoint and on a Hugging Face LLaVA directory."""
import os

import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer

import sample
import shapes
from conftest import llm_cfg, save_llava, vision_cfg
from data import tokenize_conversation
from model import VLM, VLMConfig

PROMPT = "what color is the circle ?"


@pytest.fixture(scope="module")
def shapes_ckpt(tmp_path_factory):
    """A tiny shapes world and a random model on its tokenizer and image processor (24 px, 9 visual tokens)."""
    root = tmp_path_factory.mktemp("sample")
    world = str(root / "shapes")
    shapes.generate(world, n_train=2, n_test=2, image_size=24, progress=False)
    tok = AutoTokenizer.from_pretrained(os.path.join(world, "tokenizer"))
    torch.manual_seed(0)
    llm = dict(llm_cfg(layers=2), vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    m = VLM(VLMConfig(vision=vision_cfg(24, 8), llm=llm, image_token_id=tok.convert_tokens_to_ids("<image>")))
    m.tokenizer, m.image_processor = tok, AutoImageProcessor.from_pretrained(os.path.join(world, "image_processor"))
    m.save_pretrained(str(root / "ckpt"))
    return dict(ckpt=str(root / "ckpt"), image=os.path.join(world, "images", "test_00000.png"), root=root)


def generate_text(model, image, prompt, max_new_tokens):
    """What VLM.generate answers, decoded up to eos (as evaluate.py does), computed here without sample.py."""
    tok = model.tokenizer
    ids, _ = tokenize_conversation([{"from": "human", "value": prompt}], tok, model.num_image_tokens, True)
    ids = torch.tensor([ids])
    pv = model.image_processor(images=Image.open(image).convert("RGB"), return_tensors="pt").pixel_values
    new = model.eval().generate(ids, torch.ones_like(ids), pv, max_new_tokens=max_new_tokens)[0].tolist()
    return tok.decode(new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new,
                      skip_special_tokens=True).strip()


def run(capsys, *args):
    out = sample.main(list(args))
    printed = capsys.readouterr().out
    assert printed == out + "\n"  # the answer, and nothing else, on stdout
    return out


def test_sample_prints_what_generate_answers(shapes_ckpt, capsys):
    d = shapes_ckpt
    out = run(capsys, f"--model={d['ckpt']}", f"--image={d['image']}", f"--prompt={PROMPT}", "--max_new_tokens=6")
    want = generate_text(VLM.from_pretrained(d["ckpt"]), d["image"], PROMPT, 6)
    assert out == want and len(out.split()) >= 2
    # sampling at a tiny temperature is greedy; at temperature 1 the seed decides
    assert run(capsys, f"--model={d['ckpt']}", f"--image={d['image']}", f"--prompt={PROMPT}", "--max_new_tokens=6",
               "--temperature=1e-6") == want
    hot = [run(capsys, f"--model={d['ckpt']}", f"--image={d['image']}", f"--prompt={PROMPT}", "--max_new_tokens=6",
               "--temperature=1.0", f"--seed={s}") for s in (1, 1, 2)]
    assert hot[0] == hot[1] and hot[0] != want


def test_sample_on_a_llava_directory(shapes_ckpt, capsys):
    path = save_llava(shapes_ckpt["root"] / "llava", tower="clip", arch="llama", bos=True)
    image = shapes_ckpt["image"]  # 24 px: the CLIP processor resizes and crops it to 16
    out = run(capsys, f"--model={path}", f"--image={image}", "--prompt=describe the image .", "--max_new_tokens=5")
    assert out and out == generate_text(VLM.from_pretrained(path), image, "describe the image .", 5)


def test_sample_errors_name_the_setting(shapes_ckpt, tmp_path):
    with pytest.raises(ValueError, match="give --image="):
        sample.main([f"--model={shapes_ckpt['ckpt']}"])
    with pytest.raises(FileNotFoundError, match=r"--image=.*nope\.png: cannot read it"):
        sample.main([f"--model={shapes_ckpt['ckpt']}", f"--image={tmp_path / 'nope.png'}"])
    with pytest.raises(ValueError, match=r"^--max_new_tokens=0: the answer needs at least 1 token"):
        sample.main([f"--model={shapes_ckpt['ckpt']}", f"--image={shapes_ckpt['image']}", "--max_new_tokens=0"])
