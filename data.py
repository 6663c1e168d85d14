"""
Data for every stage: LLaVA-format JSON -> tokenized, label-masked samples -> padded batches.

A sample is {"id", "image" (optional, relative to image_folder), "conversations": [{"from": "human"|"gpt",
"value": str}, ...]} (LLaVA-Pretrain 558K and mix665K both look like this). It becomes

    [<bos>]{system} USER: <image>\n{question} ASSISTANT: {answer}<eos> USER: {question} ASSISTANT: {answer}<eos> ...

with "<image>" expanded to num_image_tokens image-token ids, and labels = IGNORE_INDEX (-100) everywhere except on
the assistant answers and their <eos>. A batch (collate()) is {input_ids, attention_mask, labels, pixel_values,
image_mask, dropped, truncated}; model.py reads the first four and finds each sample's image positions from the
image-token ids itself.
"""
import json
import os
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import torch
from torch.utils.data import Dataset

from common import why

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<pad>", "<unk>", "<eos>", IMAGE_TOKEN]  # ids 0..3 in word-level tokenizers
IGNORE_INDEX = -100  # the label value HF losses (and ours) skip


# -----------------------------------------------------------------------------
# chat template

@dataclass
class ChatTemplate:
    system: str = "A chat between a user and an assistant that answers questions about an image."
    user: str = " USER: "
    assistant: str = " ASSISTANT:"
    # The answer is encoded as " " + answer, not with the space at the end of `assistant`: a BPE tokenizer then
    # sees the word-initial space it will produce when generating after a prompt that ends with `assistant`.
    answer_prefix: str = " "

CHAT = ChatTemplate()


@lru_cache(maxsize=None)
def bos_prefix(tokenizer):
    """[bos id] when the tokenizer itself puts BOS in front of what it encodes (Llama family), else [] (Qwen and
    GPT-2 style tokenizers, which define no BOS or do not add it). Every sequence starts with it exactly once."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return ()
    ids = tokenizer("a", add_special_tokens=True).input_ids
    return (bos,) if ids and ids[0] == bos else ()


def decode_answer(tokenizer, ids):
    """Generated token ids (a list or a 1-d tensor) -> the answer: the text up to the first eos, special tokens
    dropped."""
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    if tokenizer.eos_token_id in ids:
        ids = ids[:ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def tokenize_conversation(conversations, tokenizer, num_image_tokens, has_image, template=CHAT, sample_id=None):
    """Return (input_ids, labels) as lists of ints. Raises ValueError (naming sample_id) on a malformed sample.

    Every piece is encoded on its own so each token's origin, hence its label, is known exactly (encoding the whole
    string and searching for answer spans afterwards breaks at BPE merges across piece boundaries).
    If the conversation ends with a human turn, the result ends with template.assistant: that is the prompt that
    evaluate.py generates from (no supervised token).
    """
    where = f"sample {sample_id!r}"
    if not isinstance(conversations, list) or not conversations:
        raise ValueError(f"{where}: 'conversations' must be a non-empty list of {{'from', 'value'}} turns")
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id is None or image_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token: add it with "
                         f"tokenizer.add_tokens(['{IMAGE_TOKEN}'], special_tokens=True) (and resize the LLM's embeddings)")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token: set tokenizer.eos_token")

    texts = []
    for i, turn in enumerate(conversations):
        role = ("human", "gpt")[i % 2]
        if not isinstance(turn, dict) or turn.get("from") != role or not isinstance(turn.get("value"), str):
            raise ValueError(f"{where}: turn {i} must be {{'from': '{role}', 'value': str}} "
                             f"(turns alternate human/gpt, starting with human), got {turn!r}")
        texts.append(turn["value"])
    n_image = sum(t.count(IMAGE_TOKEN) for t in texts)
    if any(IMAGE_TOKEN in t for t in texts[1::2]):
        raise ValueError(f"{where}: {IMAGE_TOKEN} appears in an assistant answer")
    if n_image > 1:
        raise ValueError(f"{where}: {n_image} {IMAGE_TOKEN} placeholders; only one image per sample is supported")
    if n_image == 1 and not has_image:
        raise ValueError(f"{where}: the text has {IMAGE_TOKEN} but the sample has no 'image'")
    if has_image and n_image == 0:
        texts[0] = IMAGE_TOKEN + "\n" + texts[0]  # LLaVA's convention: the image goes before the first question

    def encode(text):
        return tokenizer(text, add_special_tokens=False).input_ids if text else []

    input_ids, labels = [], []

    def add(ids, supervised):
        input_ids.extend(ids)
        labels.extend(ids if supervised else [IGNORE_INDEX] * len(ids))

    add(list(bos_prefix(tokenizer)), False)
    add(encode(template.system), False)
    for i, text in enumerate(texts):
        if i % 2 == 0:
            add(encode(template.user), False)
            before, image, after = text.partition(IMAGE_TOKEN)
            add(encode(before), False)
            if image:
                add([image_id] * num_image_tokens, False)
            add(encode(after), False)
        else:
            add(encode(template.assistant), False)
            add(encode(template.answer_prefix + text) + [tokenizer.eos_token_id], True)
    if len(texts) % 2 == 1:
        add(encode(template.assistant), False)
    return input_ids, labels


# -----------------------------------------------------------------------------
# tokenizers and image processors (tiny offline ones for the embedded default and the tests)

def word_tokenizer(words, template=CHAT):
    """A word-level tokenizer over `words` (any strings; they are split and lower-cased like the text will be).

    Ids: <pad>=0, <unk>=1, <eos>=2, <image>=3, then the distinct words in sorted order, so the same words always give
    the same ids whatever order they were collected in. The words of `template` are added too (pass template=None to
    skip), otherwise every prompt would be full of <unk>.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.Lowercase()
    # WhitespaceSplit then Punctuation: "square?" -> "square", "?" and "don't" -> "don", "'", "t".
    pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    texts = list(words)
    if template is not None:
        texts += [template.system, template.user, template.assistant, template.answer_prefix]
    pieces = {p for t in texts for p, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(t))}
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for p in sorted(pieces - set(SPECIAL_TOKENS)):
        vocab[p] = len(vocab)

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.add_special_tokens(SPECIAL_TOKENS)  # matched before normalisation/splitting, so "<image>" stays one token
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
                                   extra_special_tokens=[IMAGE_TOKEN])


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


def image_processor(image_size):
    """SigLIP preprocessing (resize to a square, scale to [-1, 1]) without torchvision or a hub download."""
    from transformers import SiglipImageProcessorPil
    return SiglipImageProcessorPil(size={"height": image_size, "width": image_size})


def load_image(path):
    """The image at `path` as an 8-bit RGB PIL image, decoded now (so a damaged file fails here, not later). 16-bit
    images (PNG mode "I;16", as scans and microscopy often come) keep their high byte: convert("RGB") would clip
    every value above 255, turning mid-grey into white. Mode "I" (32-bit integers) does not say how deep its values
    are: all within 0..255, they are 8-bit values and stay as they are; above, they are read as 16-bit. An image over
    PIL's pixel limit (about 179 M pixels) raises OSError, as any unreadable image does."""
    import numpy as np
    from PIL import Image
    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
                a = np.asarray(im).astype(np.int64).clip(0, 65535)
                if im.mode != "I" or a.max(initial=0) > 255:
                    a = a >> 8
                return Image.fromarray(a.astype(np.uint8), "L").convert("RGB")
            return im.convert("RGB")
    except Image.DecompressionBombError as e:  # not an OSError: it would crash where an unreadable image is dropped
        raise OSError(f"{path}: {e} Downscale the image (or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it)") from e


# -----------------------------------------------------------------------------
# dataset

def json_lines(text, path):
    """The objects of a JSON-lines text (blank lines skipped); a bad line is an error naming the file and line.
    Lines end at '\n' only (a '\r' before it is dropped): str.splitlines() would also split at U+2028, U+2029 and
    U+0085, which JSON allows unescaped inside strings."""
    records = []
    for n, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: not valid JSON ({e}); fix the file, or download or regenerate "
                                 "it") from e
    return records


def load_records(path):
    """Read a LLaVA .json (a list of samples) or .jsonl (one sample per line) file, with errors that say what to do."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path} not found: check the data path setting, or generate the embedded "
                                f"data first (python shapes.py)")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e}); LLaVA files are UTF-8 JSON: re-encode it, e.g. "
                         f"iconv -f latin1 -t utf-8 {path} > fixed.json") from e
    if path.endswith(".jsonl"):
        return json_lines(text, path)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); fix or regenerate the file "
                         f"(a file with one sample per line must be named *.jsonl)") from e
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of samples (LLaVA format), got a {type(records).__name__}")
    return records


class Dropped(NamedTuple):
    """What LLaVADataset returns for a sample it cannot use; collate() moves it into batch["dropped"]."""
    key: tuple      # (data file, index in it): a sample is counted once, however often it is fetched
    reason: str     # bad_sample | missing_image | unreadable_image | image_truncated | no_supervised_tokens
    message: str    # names the file, the sample and what is wrong


class LLaVADataset(Dataset):
    """LLaVA-format samples, tokenized lazily in __getitem__ (so a 665K-sample file opens in seconds).

    A bad sample is never zero-filled: __getitem__ returns a Dropped record, which collate() sets aside in
    batch["dropped"], so the training loop learns of it even from a DataLoader worker. A sample whose text is cut at
    max_length is kept and marked (batch["truncated"]). `self.dropped` counts this process's drops by reason, one
    per sample.
    """

    def __init__(self, json_path, image_folder, tokenizer, image_processor, num_image_tokens, max_length,
                 template=CHAT, annotate=None):
        self.path = json_path
        self.records = load_records(json_path)
        if not self.records:
            raise ValueError(f"{json_path}: no samples (an empty list); point the data setting at a LLaVA file")
        # LLaVA's image paths are relative to an image folder; by default, the folder holding the JSON file
        self.image_folder = image_folder if image_folder is not None else os.path.dirname(os.path.abspath(json_path))
        self.tokenizer, self.image_processor, self.template = tokenizer, image_processor, template
        self.num_image_tokens, self.max_length = num_image_tokens, max_length
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        # annotate(record, input_ids, labels) -> {name: (T, ...) tensor}: per-position targets that travel with the
        # sample (privileged.SceneTargets, for the shapes teacher); collate pads them into batch["privileged"]
        self.annotate = annotate
        self.drops = {}  # key -> reason

    def __len__(self):
        return len(self.records)

    @property
    def dropped(self):
        return Counter(self.drops.values())

    def __getitem__(self, i):
        rec = self.records[i]
        sid = rec.get("id", i) if isinstance(rec, dict) else i
        key = (self.path, i)

        def drop(reason, message):
            self.drops[key] = reason
            return Dropped(key, reason, f"{self.path}, sample {sid!r}: {message}")

        try:
            if not isinstance(rec, dict):
                raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
            image = rec.get("image")
            if image is not None and not isinstance(image, str):
                raise ValueError("'image' must be one path string (multi-image is not supported)")
            conv = rec.get("conversations")
            input_ids, labels = tokenize_conversation(conv, self.tokenizer, self.num_image_tokens,
                                                      image is not None, self.template, sid)
            if not any(isinstance(t, dict) and t.get("from") == "gpt" for t in conv):
                raise ValueError("no gpt turn: the conversation has no answer to learn from")
        except ValueError as e:
            return drop("bad_sample", str(e).removeprefix(f"sample {sid!r}: "))

        # Cutting through the image would leave the model with a partial image whose tokens no longer match
        # pixel_values, so such a sample goes; cutting text after the image is harmless (and counted).
        truncated = len(input_ids) > self.max_length
        if truncated:
            if image is not None:
                last_image_pos = len(input_ids) - 1 - input_ids[::-1].index(self.image_token_id)
                if last_image_pos >= self.max_length:
                    return drop("image_truncated", f"its image tokens end at position {last_image_pos + 1} > "
                                f"max_length={self.max_length}; raise max_length")
            input_ids, labels = input_ids[:self.max_length], labels[:self.max_length]
        if all(l == IGNORE_INDEX for l in labels):
            return drop("no_supervised_tokens", f"no answer token left within max_length={self.max_length} (the "
                        f"prompt alone is {len(input_ids)}+ tokens); raise max_length")

        pixel_values = None
        if image is not None:
            path = os.path.join(self.image_folder, image)
            try:
                img = load_image(path)
            except (OSError, ValueError) as e:  # missing, unreadable or not an image
                if not os.path.isfile(path):
                    return drop("missing_image", f"image {path} not found; check image_folder")
                what = "is empty (0 bytes)" if os.path.getsize(path) == 0 else \
                    f"exists but cannot be read as an image ({why(e)})"
                return drop("unreadable_image", f"image {path} {what}; replace the file, or remove the sample")
            pixel_values = self.image_processor(images=img, return_tensors="pt").pixel_values[0]

        sample = dict(input_ids=torch.tensor(input_ids, dtype=torch.long),
                      labels=torch.tensor(labels, dtype=torch.long),
                      pixel_values=pixel_values, key=key, truncated=truncated)
        if self.annotate is not None:
            try:
                sample["privileged"] = self.annotate(rec, input_ids, labels)
            except ValueError as e:
                raise ValueError(f"{self.path}, sample {sid!r}: {e}") from e
        return sample


def check_dataset(dataset, n=64):
    """Read up to `n` samples spread evenly over `dataset` (one LLaVADataset) before training starts. Raises
    ValueError when most of them cannot be used, naming the file, the reasons and the first messages (a wrong
    image_folder drops every image sample). Returns (one usable sample or None, [Dropped])."""
    m = min(n, len(dataset))
    idx = sorted({round(k * (len(dataset) - 1) / max(1, m - 1)) for k in range(m)})
    good, drops = None, []
    for i in idx:
        s = dataset[i]
        if isinstance(s, Dropped):
            drops.append(s)
        elif good is None:
            good = s
    if len(drops) * 2 > len(idx):
        raise ValueError(too_many_dropped(dataset.path, len(drops), len(idx), drops))
    return good, drops


def too_many_dropped(where, n_dropped, n_read, drops, reasons=None):
    """The message of a stop for too many unusable samples: `drops` are the first ones (Dropped records); `reasons`
    the count of every drop by reason (default: counted from `drops`)."""
    reasons = reasons if reasons is not None else Counter(d.reason for d in drops)
    first = "\n  ".join(d.message for d in drops[:3])
    return (f"{where}: {n_dropped} of {n_read} samples read cannot be used ({dict(reasons)}); training on what is "
            f"left would be training on (almost) nothing. First ones:\n  {first}")


# -----------------------------------------------------------------------------
# batching

def collate(samples, pad_id):
    """Right-pad a list of samples into the contract's batch dict; Dropped samples are set aside in
    batch["dropped"], and the keys of samples cut at max_length listed in batch["truncated"].

    If every sample was dropped, the batch holds only those two lists (no "input_ids"). Use it as
    DataLoader(..., collate_fn=functools.partial(collate, pad_id=tokenizer.pad_token_id)).
    """
    dropped = [s for s in samples if isinstance(s, Dropped)]
    samples = [s for s in samples if not isinstance(s, Dropped)]
    extra = dict(dropped=dropped, truncated=[s["key"] for s in samples if s.get("truncated")])
    if not samples:
        return extra
    B, T = len(samples), max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[b, :n], attention_mask[b, :n], labels[b, :n] = s["input_ids"], 1, s["labels"]
    # Only samples with an image contribute a row, so a text-only sample costs no vision-tower compute. The rows
    # are in batch order; image_mask says which samples have one (for callers; the model reads the image tokens).
    image_mask = torch.tensor([s["pixel_values"] is not None for s in samples], dtype=torch.bool)
    images = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
    pixel_values = torch.stack(images) if images else None
    if "privileged" in samples[0]:  # per-position targets: padded with "no target" (zeros, IGNORE_INDEX)
        extra["privileged"] = {}
        for name, first in samples[0]["privileged"].items():
            fill = IGNORE_INDEX if first.dtype == torch.long else 0
            t = torch.full((B, T, *first.shape[1:]), fill, dtype=first.dtype)
            for b, s in enumerate(samples):
                t[b, :len(s["input_ids"])] = s["privileged"][name]
            extra["privileged"][name] = t
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                pixel_values=pixel_values, image_mask=image_mask, **extra)
