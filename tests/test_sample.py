"""
    python -m pytest -q tests/test_sample.py

sample.py: one image + prompt -> the answer, on a shapes checkpoint and on a Hugging Face LLaVA directory, against
answers computed without sample.py or VLM.generate.
"""
import os

import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer

import sample
import shapes
from conftest import llm_cfg, save_llava, vision_cfg
from data import prepare_tokenizer, tokenize_conversation
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


def prompt_ids(tok, n_image_tokens, prompt):
    """The prompt as training writes it (the image, the user's turn, then the assistant's cue)."""
    return torch.tensor([tokenize_conversation([{"from": "human", "value": prompt}], tok, n_image_tokens, True)[0]])


def answer_text(tok, new):
    """Generated ids -> the text before the first eos."""
    new = new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
    return tok.decode(new, skip_special_tokens=True).strip()


def greedy_by_hand(model, image, prompt, max_new_tokens):
    """The greedy answer from whole forwards of the model, one per new token (no KV cache, no VLM.generate), the
    image token never chosen."""
    tok = model.tokenizer
    ids = prompt_ids(tok, model.num_image_tokens, prompt)
    pv = model.image_processor(images=Image.open(image).convert("RGB"), return_tensors="pt").pixel_values
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model.eval()(ids, torch.ones_like(ids), pv)["logits"][0, -1]
            logits[model.image_token_id] = float("-inf")
            new.append(int(logits.argmax()))
            if new[-1] == tok.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[new[-1]]])], 1)
    return answer_text(tok, new)


def transformers_greedy(path, image, prompt, max_new_tokens):
    """The greedy answer of transformers' own LlavaForConditionalGeneration on the same prompt."""
    from transformers import LlavaForConditionalGeneration
    hf = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(path))
    ids = prompt_ids(tok, hf.config.image_seq_length, prompt)
    pv = AutoImageProcessor.from_pretrained(path)(images=Image.open(image).convert("RGB"),
                                                  return_tensors="pt").pixel_values
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv, do_sample=False,
                          max_new_tokens=max_new_tokens, suppress_tokens=[hf.config.image_token_index])
    return answer_text(tok, out[0, ids.shape[1]:].tolist())


def run(capsys, *args):
    out = sample.main(list(args))
    printed = capsys.readouterr().out
    assert printed == out + "\n"  # the answer, and nothing else, on stdout
    return out


def test_sample_prints_what_generate_answers(shapes_ckpt, capsys):
    d = shapes_ckpt
    out = run(capsys, f"--model={d['ckpt']}", f"--image={d['image']}", f"--prompt={PROMPT}", "--max_new_tokens=6")
    want = greedy_by_hand(VLM.from_pretrained(d["ckpt"]), d["image"], PROMPT, 6)
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
    assert out and out == transformers_greedy(path, image, "describe the image .", 5)


def test_sample_errors_name_the_setting(shapes_ckpt, tmp_path):
    with pytest.raises(ValueError, match="give --image="):
        sample.main([f"--model={shapes_ckpt['ckpt']}"])
    with pytest.raises(FileNotFoundError, match=r"--image=.*nope\.png: cannot read it"):
        sample.main([f"--model={shapes_ckpt['ckpt']}", f"--image={tmp_path / 'nope.png'}"])
    with pytest.raises(ValueError, match=r"^--max_new_tokens=0: the answer needs at least 1 token"):
        sample.main([f"--model={shapes_ckpt['ckpt']}", f"--image={shapes_ckpt['image']}", "--max_new_tokens=0"])
