"""
    python -m pytest -q tests/test_data.py

data.py: the word tokenizer, the chat template's ids and labels, image placeholders, truncation, the collator, the
records' formats and their errors, dropped samples, and one image reader for every image format.
"""
import json

import pytest
import torch
from PIL import Image

from conftest import write_huge_png

from data import (CHAT, IGNORE_INDEX, ChatTemplate, Dropped, LLaVADataset, check_dataset, collate,  # noqa: E402
                  image_processor, load_records, tokenize_conversation, word_tokenizer)

WORDS = ["what color is the square?", "red.", "and the circle?", "blue", "what is it?", "a square"]
N_V = 4  # image tokens per image
S = 16   # image side
NO_SYSTEM = ChatTemplate(system="")


def ids(tok, tokens):
    vocab = tok.get_vocab()
    return [vocab[t] for t in tokens]


def write_png(path, color):
    Image.new("RGB", (20, 12), color).save(path)


def write_json(path, records):
    with open(path, "w") as f:
        json.dump(records, f)
    return str(path)


def make_dataset(tmp_path, records, max_length=512, template=CHAT):
    tok = word_tokenizer(WORDS)
    path = write_json(tmp_path / "data.json", records)
    return LLaVADataset(path, None, tok, image_processor(S), N_V, max_length, template=template)


TWO_TURNS = [{"from": "human", "value": "<image>\nWhat color is the square?"}, {"from": "gpt", "value": "Red."},
             {"from": "human", "value": "And the circle?"}, {"from": "gpt", "value": "Blue"}]
TEXT_ONLY = [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A square"}]


def test_word_tokenizer_ids_are_specials_then_sorted_words():
    tok = word_tokenizer(["b a", "c?"], template=None)
    assert tok.get_vocab() == {"<pad>": 0, "<unk>": 1, "<eos>": 2, "<image>": 3, "?": 4, "a": 5, "b": 6, "c": 7}
    assert (tok.pad_token_id, tok.unk_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids("<image>") == 3
    words = [w for w, _ in sorted(word_tokenizer(WORDS).get_vocab().items(), key=lambda kv: kv[1])][4:]
    assert words == sorted(words) and len(words) == 24  # 13 pieces of WORDS + 10 new ones of the template + ":"
    assert tok("C? <image>\nB zz<eos>", add_special_tokens=False).input_ids == [7, 4, 3, 6, 1, 2]
    # the default template's words are added, so prompts contain no <unk>
    assert 1 not in word_tokenizer(["x"])(CHAT.system + CHAT.user + CHAT.assistant).input_ids


def test_two_turn_conversation_with_image_exact_ids_and_labels():
    tok = word_tokenizer(WORDS)
    input_ids, labels = tokenize_conversation(TWO_TURNS, tok, N_V, has_image=True, sample_id="s0")
    system = ["a", "chat", "between", "a", "user", "and", "an", "assistant", "that", "answers", "questions", "about",
              "an", "image", "."]
    prompt1 = system + ["user", ":"] + ["<image>"] * N_V + ["what", "color", "is", "the", "square", "?",
                                                             "assistant", ":"]
    answer1 = ["red", ".", "<eos>"]
    prompt2 = ["user", ":", "and", "the", "circle", "?", "assistant", ":"]
    answer2 = ["blue", "<eos>"]
    assert input_ids == ids(tok, prompt1 + answer1 + prompt2 + answer2)
    assert labels == ([IGNORE_INDEX] * len(prompt1) + ids(tok, answer1) + [IGNORE_INDEX] * len(prompt2) +
                      ids(tok, answer2))
    assert input_ids.count(3) == N_V and input_ids[17:21] == [3, 3, 3, 3]


def test_image_placeholder_rules():
    tok = word_tokenizer(WORDS)
    # image but no "<image>" in the text: it is prepended to the first question (LLaVA)
    no_tag = [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A square"}]
    input_ids, _ = tokenize_conversation(no_tag, tok, N_V, True, NO_SYSTEM)
    assert input_ids[:8] == ids(tok, ["user", ":"] + ["<image>"] * N_V + ["what", "is"])
    with pytest.raises(ValueError, match="sample 'x7'.*no 'image'"):
        tokenize_conversation(TWO_TURNS, tok, N_V, False, sample_id="x7")
    two_tags = [{"from": "human", "value": "<image> <image> What is it?"}, {"from": "gpt", "value": "A square"}]
    with pytest.raises(ValueError, match="sample 'x8': 2 <image>"):
        tokenize_conversation(two_tags, tok, N_V, True, sample_id="x8")
    with pytest.raises(ValueError, match="turn 1 must be"):
        tokenize_conversation([TEXT_ONLY[0], TEXT_ONLY[0]], tok, N_V, False)
    # a conversation ending with a question is a generation prompt: ends with "assistant :", nothing supervised
    input_ids, labels = tokenize_conversation(TEXT_ONLY[:1], tok, N_V, False, NO_SYSTEM)
    assert input_ids == ids(tok, ["user", ":", "what", "is", "it", "?", "assistant", ":"])
    assert labels == [IGNORE_INDEX] * 8


def test_text_only_sample(tmp_path):
    ds = make_dataset(tmp_path, [{"id": "t", "conversations": TEXT_ONLY}], template=NO_SYSTEM)
    s = ds[0]
    tok = ds.tokenizer
    prompt = ["user", ":", "what", "is", "it", "?", "assistant", ":"]
    answer = ["a", "square", "<eos>"]
    assert s["input_ids"].tolist() == ids(tok, prompt + answer)
    assert s["labels"].tolist() == [IGNORE_INDEX] * 8 + ids(tok, answer)
    assert s["input_ids"].dtype == torch.long and s["pixel_values"] is None
    assert sum(ds.dropped.values()) == 0


def test_truncation_never_cuts_the_image(tmp_path):
    write_png(tmp_path / "a.png", "red")
    rec = [{"id": "i", "image": "a.png", "conversations": TWO_TURNS}]
    # NO_SYSTEM layout: user : (0,1) | <image> x4 (2..5) | what color is the square ? (6..11) | assistant : (12,13)
    # | red . <eos> (14..16) | ...
    ds = make_dataset(tmp_path, rec, max_length=5, template=NO_SYSTEM)
    d = ds[0]
    assert isinstance(d, Dropped) and d.reason == "image_truncated"
    assert d.message.endswith("data.json, sample 'i': its image tokens end at position 6 > max_length=5; "
                              "raise max_length")
    assert ds.dropped == {"image_truncated": 1}

    ds = make_dataset(tmp_path, rec, max_length=6, template=NO_SYSTEM)  # image fits, but no answer token left
    d = ds[0]
    assert d.reason == "no_supervised_tokens" and "no answer token left within max_length=6" in d.message
    assert ds.dropped == {"no_supervised_tokens": 1}

    ds = make_dataset(tmp_path, rec, max_length=15, template=NO_SYSTEM)  # cut after "red": kept, and marked
    s = ds[0]
    assert s["truncated"] and collate([s], 0)["truncated"] == [(ds.path, 0)]
    tok = ds.tokenizer
    assert s["input_ids"].tolist() == ids(tok, ["user", ":"] + ["<image>"] * 4 + ["what", "color", "is", "the",
                                                                               "square", "?", "assistant", ":", "red"])
    assert s["labels"].tolist() == [IGNORE_INDEX] * 14 + ids(tok, ["red"])
    assert s["pixel_values"].shape == (3, S, S) and not ds.dropped


def test_collate(tmp_path):
    write_png(tmp_path / "r.png", (255, 0, 0))
    write_png(tmp_path / "b.png", (0, 0, 255))
    recs = [{"id": "0", "image": "r.png", "conversations": TWO_TURNS},
            {"id": "1", "conversations": TEXT_ONLY},
            {"id": "2", "image": "b.png", "conversations": TEXT_ONLY}]
    ds = make_dataset(tmp_path, recs, template=NO_SYSTEM)
    gone = Dropped(("x.json", 7), "missing_image", "x.json, sample 7: cannot read image")
    samples = [ds[0], gone, ds[1], ds[2]]
    lens = [len(s["input_ids"]) for s in samples if not isinstance(s, Dropped)]
    assert lens == [27, 11, 15]
    batch = collate(samples, pad_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values", "image_mask", "dropped", "truncated"}
    assert batch["dropped"] == [gone] and batch["truncated"] == []
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, 27)
    assert batch["attention_mask"].sum(1).tolist() == [27, 11, 15]
    assert batch["attention_mask"].dtype == torch.long
    assert batch["input_ids"][1, :11].tolist() == ds[1]["input_ids"].tolist()
    assert batch["input_ids"][1, 11:].tolist() == [0] * 16 and batch["labels"][1, 11:].tolist() == [IGNORE_INDEX] * 16
    assert batch["input_ids"][2, 15:].tolist() == [0] * 12 and batch["labels"][2, 15:].tolist() == [IGNORE_INDEX] * 12
    assert batch["labels"][0].tolist() == ds[0]["labels"].tolist()
    assert batch["image_mask"].tolist() == [True, False, True] and batch["image_mask"].dtype == torch.bool
    # one row per image sample, in batch order: red then blue, SigLIP-normalised to [-1, 1]
    assert batch["pixel_values"].shape == (2, 3, S, S)
    assert batch["pixel_values"][:, :, 0, 0].tolist() == [[1.0, -1.0, -1.0], [-1.0, -1.0, 1.0]]
    text_only = collate([ds[1], gone], pad_id=0)
    assert text_only["pixel_values"] is None and text_only["image_mask"].tolist() == [False]
    assert collate([gone, gone], pad_id=0) == {"dropped": [gone, gone], "truncated": []}  # no input_ids


def test_tokenizer_and_image_processor_round_trip(tmp_path):
    from transformers import AutoImageProcessor, AutoTokenizer
    tok = word_tokenizer(WORDS)
    tok.save_pretrained(tmp_path / "tok")
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert tok2.get_vocab() == tok.get_vocab()
    assert (tok2.pad_token_id, tok2.unk_token_id, tok2.eos_token_id, tok2.convert_tokens_to_ids("<image>")) == \
        (0, 1, 2, 3)
    text = "What color is the SQUARE? <image>\nzebra<eos>"
    assert tok2(text, add_special_tokens=False).input_ids == tok(text, add_special_tokens=False).input_ids == \
        ids(tok, ["what", "color", "is", "the", "square", "?", "<image>"]) + [1, 2]

    proc = image_processor(S)
    proc.save_pretrained(tmp_path / "proc")
    proc2 = AutoImageProcessor.from_pretrained(tmp_path / "proc")
    img = Image.new("RGB", (30, 20), (10, 200, 90))
    a = proc(images=img, return_tensors="pt").pixel_values
    b = proc2(images=img, return_tensors="pt").pixel_values
    assert a.shape == (1, 3, S, S) and torch.equal(a, b)
    assert torch.allclose(a[0, :, 0, 0], torch.tensor([10, 200, 90]) / 127.5 - 1)


def test_missing_or_corrupt_image_is_dropped_and_counted(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    recs = [{"id": "m", "image": "nope.png", "conversations": TEXT_ONLY},
            {"id": "c", "image": "bad.png", "conversations": TEXT_ONLY},
            {"id": "b", "conversations": TWO_TURNS},  # <image> in the text, no image: bad sample
            {"id": "ok", "conversations": TEXT_ONLY}]
    ds = make_dataset(tmp_path, recs)
    assert "nope.png" in ds[0].message and "bad.png" in ds[1].message
    assert ds[2].message.startswith(f"{ds.path}, sample 'b': ") and ds[2].reason == "bad_sample"
    assert not isinstance(ds[3], Dropped)
    for _ in range(3):  # fetched again (a second epoch): still one drop per sample
        ds[0]
    assert ds.dropped == {"missing_image": 1, "unreadable_image": 1, "bad_sample": 1}


def test_load_records_formats_and_errors(tmp_path):
    recs = [{"id": "a", "conversations": TEXT_ONLY}, {"id": "b", "conversations": TEXT_ONLY}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    assert load_records(str(tmp_path / "d.jsonl")) == recs
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_records(str(tmp_path / "missing.json"))
    (tmp_path / "broken.json").write_text('[{"id": 1,')
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        load_records(str(tmp_path / "broken.json"))
    (tmp_path / "broken.jsonl").write_text('{"id": 1}\n{oops\n')
    with pytest.raises(ValueError, match="broken.jsonl, line 2"):
        load_records(str(tmp_path / "broken.jsonl"))


def test_bad_data_messages_name_the_file_and_sample(tmp_path):
    recs = [{"id": "q", "conversations": [{"from": "human", "value": "What is it?"}]},  # no answer at all
            {"id": "ok", "conversations": TEXT_ONLY}]
    ds = make_dataset(tmp_path, recs)
    d = ds[0]
    assert d.reason == "bad_sample" and d.message == f"{ds.path}, sample 'q': no gpt turn: the conversation has no " \
                                                     "answer to learn from"
    (tmp_path / "latin1.json").write_bytes('[{"id": "caf\xe9"}]'.encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.json: not UTF-8 text"):
        load_records(str(tmp_path / "latin1.json"))
    with pytest.raises(ValueError, match="data.json: no samples"):
        make_dataset(tmp_path, [])


def test_check_dataset_stops_when_most_samples_are_unusable(tmp_path):
    write_png(tmp_path / "a.png", "red")
    recs = [{"id": str(i), "image": "a.png" if i == 0 else f"img/{i}.png", "conversations": TEXT_ONLY}
            for i in range(10)]  # a wrong image folder: 9 of 10 images missing
    ds = make_dataset(tmp_path, recs)
    with pytest.raises(ValueError) as e:
        check_dataset(ds, n=5)
    msg = str(e.value)
    assert msg.startswith(f"{ds.path}: 4 of 5 samples read cannot be used ({{'missing_image': 4}})")
    assert "img/2.png" in msg  # the first paths are shown (samples 0, 2, 4, 7, 9 are read)
    good, drops = check_dataset(make_dataset(tmp_path, recs[:1] + [{"id": "t", "conversations": TEXT_ONLY}]))
    assert good["key"] == (str(tmp_path / "data.json"), 0) and drops == []


def _bpe(bos):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    t = Tokenizer(models.BPE())
    t.pre_tokenizer, t.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    t.train_from_iterator(WORDS * 3, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>", "<s>", "<image>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:  # Llama style: the tokenizer itself puts <s> in front of everything it encodes
        t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", bos_token="<s>")


@pytest.mark.parametrize("bos", [True, False])
def test_sequences_start_with_bos_exactly_once_when_the_tokenizer_adds_it(bos):
    tok = _bpe(bos)
    ids, labels = tokenize_conversation(TWO_TURNS, tok, N_V, has_image=True)
    no_bos, _ = tokenize_conversation(TWO_TURNS, _bpe(False), N_V, has_image=True)
    if bos:
        assert ids[0] == 1 and ids.count(1) == 1 and labels[0] == IGNORE_INDEX and ids[1:] == no_bos
    else:
        assert 1 not in ids and ids == no_bos
    # the prompt evaluate.py generates from goes through the same function: the same start
    prompt, _ = tokenize_conversation(TWO_TURNS[:1], tok, N_V, has_image=True)
    assert prompt == ids[:len(prompt)]


def test_16_bit_images_are_scaled_to_8_bits_everywhere_images_are_read(tmp_path, monkeypatch):
    """One image reader (data.load_image) for training, evaluate.py and sample.py: a 16-bit PNG ("I;16") is scaled to
    8 bits (its high byte), where convert("RGB") clips mid-grey to white; 8-bit images come out as convert("RGB")
    gives them."""
    import numpy as np
    import evaluate
    import sample
    from data import load_image
    Image.fromarray(np.array([[0, 256, 32768, 65535]] * 4, dtype=np.uint16)).save(tmp_path / "ramp16.png")
    Image.fromarray(np.full((12, 20), 32768, dtype=np.uint16)).save(tmp_path / "grey16.png")
    Image.new("L", (20, 12), 128).save(tmp_path / "grey8.png")
    assert Image.open(tmp_path / "ramp16.png").mode == "I;16"
    ramp = load_image(tmp_path / "ramp16.png")
    assert ramp.mode == "RGB" and np.asarray(ramp)[0].tolist() == [[v] * 3 for v in (0, 1, 128, 255)]
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (12, 20, 4), dtype=np.uint8))
    rgb = rgba.convert("RGB")
    for name, im in [("rgb", rgb), ("rgba", rgba), ("l", rgb.convert("L")), ("p", rgb.convert("P"))]:
        im.save(tmp_path / f"{name}.png")
        assert np.array_equal(np.asarray(load_image(tmp_path / f"{name}.png")),
                              np.asarray(Image.open(tmp_path / f"{name}.png").convert("RGB"))), name

    # training: the 16-bit grey sample gives the 8-bit grey one's pixels
    recs = [{"id": f, "image": f"{f}.png", "conversations": TEXT_ONLY} for f in ("grey16", "grey8")]
    ds = make_dataset(tmp_path, recs)
    assert torch.equal(ds[0]["pixel_values"], ds[1]["pixel_values"])
    # evaluate.py
    model = torch.nn.Linear(1, 1)  # the Runner reads images with the model's image processor alone
    model.tokenizer, model.image_processor = word_tokenizer(WORDS), image_processor(S)
    r = evaluate.Runner(model, str(tmp_path), progress=False)
    assert torch.equal(r.pixels("grey16.png"), ds[1]["pixel_values"])
    # sample.py
    seen = []
    monkeypatch.setattr(sample, "answer", lambda model, image, *a: seen.append(np.asarray(image)) or "")
    monkeypatch.setattr(sample.VLM, "from_pretrained", lambda *a, **k: torch.nn.Linear(1, 1))
    sample.main(["--model=any", f"--image={tmp_path / 'grey16.png'}"])
    assert seen[0].shape == (12, 20, 3) and (seen[0] == 128).all()


def test_json_lines_keeps_line_separators_inside_json_strings(tmp_path):
    """JSON allows U+2028, U+2029 and U+0085 unescaped inside strings (str.splitlines() splits at them): a record is
    one '\\n'-terminated line, a trailing '\\r' (a Windows file) dropped."""
    from data import json_lines
    recs = [{"id": "a", "conversations": [{"from": "human", "value": "x\u2028y\u2029z\u0085w\x1c\x1d\x1e\x0b\x0c"},
                                          {"from": "gpt", "value": "v"}]},
            {"id": "b", "conversations": TEXT_ONLY}]
    text = "\r\n".join(json.dumps(r, ensure_ascii=False) for r in recs) + "\r\n\n"
    (tmp_path / "d.jsonl").write_bytes(text.encode("utf-8"))
    assert load_records(str(tmp_path / "d.jsonl")) == recs
    with pytest.raises(ValueError, match="e.jsonl, line 3: not valid JSON"):  # line numbers count '\n' only
        json_lines(json.dumps(recs[0], ensure_ascii=False) + "\n\n{oops\n", "e.jsonl")


def test_32_bit_integer_images_are_read_by_their_value_range(tmp_path):
    """Mode "I" (32-bit integers, as TIFF and some PNG readers give) says nothing about the values' depth: holding
    8-bit values (max <= 255) it is read as 8-bit, not shifted down to black; above 255 as 16-bit (the high byte)."""
    import numpy as np
    from data import load_image
    Image.fromarray(np.array([[0, 100, 200, 255]] * 3, dtype=np.int32)).save(tmp_path / "i8.tif")
    Image.fromarray(np.array([[0, 256, 32768, 65535]] * 3, dtype=np.int32)).save(tmp_path / "i16.tif")
    Image.fromarray(np.array([[-5, 0, 70000, 1000]] * 3, dtype=np.int32)).save(tmp_path / "out_of_range.tif")
    assert Image.open(tmp_path / "i8.tif").mode == "I"
    for name, row in [("i8", (0, 100, 200, 255)), ("i16", (0, 1, 128, 255)), ("out_of_range", (0, 0, 255, 3))]:
        im = load_image(tmp_path / f"{name}.tif")
        assert im.mode == "RGB" and np.asarray(im).tolist() == [[[v] * 3 for v in row]] * 3, name


def test_an_image_over_pils_pixel_limit_is_an_unreadable_image_everywhere(tmp_path, monkeypatch):
    """PIL's DecompressionBombError is no OSError: it crashed training at the same sample on every resume, and
    sample.py, with a traceback naming neither. It is now read as any unreadable image: dropped and counted in
    training, one line in sample.py naming the file."""
    import sample
    from data import load_image
    write_huge_png(tmp_path / "huge.png")
    with pytest.raises(OSError, match=r"huge.png.*200000000 pixels.*limit"):
        load_image(tmp_path / "huge.png")
    write_png(tmp_path / "ok.png", "red")
    recs = [{"id": "h", "image": "huge.png", "conversations": TEXT_ONLY},
            {"id": "ok", "image": "ok.png", "conversations": TEXT_ONLY}]
    ds = make_dataset(tmp_path, recs)
    d = ds[0]
    assert isinstance(d, Dropped) and d.reason == "unreadable_image" and "huge.png" in d.message
    assert not isinstance(ds[1], Dropped) and ds.dropped == {"unreadable_image": 1}
    monkeypatch.setattr(sample.VLM, "from_pretrained", lambda *a, **k: torch.nn.Linear(1, 1))
    with pytest.raises(FileNotFoundError) as e:
        sample.main(["--model=any", f"--image={tmp_path / 'huge.png'}"])
    msg = str(e.value)
    assert msg.startswith(f"--image={tmp_path / 'huge.png'}: ") and "200000000 pixels" in msg
    assert len(msg.splitlines()) == 1


def test_an_image_file_that_is_not_an_image_is_not_called_missing(tmp_path):
    """A zero-byte file, or text named .jpg, exists: the drop says it is not an image (not "check image_folder")."""
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "page.jpg").write_text("<html>404 Not Found</html>")
    recs = [{"id": i, "image": f, "conversations": TEXT_ONLY}
            for i, f in enumerate(["empty.jpg", "page.jpg", "nope.jpg"])]
    ds = make_dataset(tmp_path, recs)
    empty, page, nope = ds[0], ds[1], ds[2]
    assert (empty.reason, page.reason, nope.reason) == ("unreadable_image", "unreadable_image", "missing_image")
    assert empty.message.startswith(f"{ds.path}, sample 0: image {tmp_path / 'empty.jpg'} is empty (0 bytes)")
    assert page.message.startswith(f"{ds.path}, sample 1: image {tmp_path / 'page.jpg'} exists but cannot be read "
                                   "as an image")
    assert "image_folder" not in empty.message + page.message
    assert nope.message == f"{ds.path}, sample 2: image {tmp_path / 'nope.jpg'} not found; check image_folder"
    assert ds.dropped == {"unreadable_image": 2, "missing_image": 1}
