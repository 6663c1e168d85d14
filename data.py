"""
Data for every stage: LLaVA-format JSON -> tokenized, label-masked samples -> padded batches.

A sample is {"id", "image" (optional, relative to image_folder), "conversations": [{"from": "human"|"gpt",
"value": str}, ...]} (LLaVA-Pretrain 558K and mix665K both look like this). It becomes

    {system} USER: <image>\n{question} ASSISTANT: {answer}<eos> USER: {question} ASSISTANT: {answer}<eos> ...

with "<image>" expanded to num_image_tokens image-token ids, and labels = -100 everywhere except on the
assistant answers and their <eos>. The batch format is fixed by the contract with model.py:
{input_ids, attention_mask, labels, pixel_values, image_mask} (see collate()).
"""
import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

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
# tokenizer and image processor (tiny offline ones for the embedded default and the tests)

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


def image_processor(image_size):
    """SigLIP preprocessing (resize to a square, scale to [-1, 1]) without torchvision or a hub download."""
    from transformers import SiglipImageProcessorPil
    return SiglipImageProcessorPil(size={"height": image_size, "width": image_size})


# -----------------------------------------------------------------------------
# dataset

def load_records(path):
    """Read a LLaVA .json (a list of samples) or .jsonl (one sample per line) file, with errors that say what to do."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path} not found: check the data path setting, or generate the embedded "
                                f"data first (python shapes.py)")
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            records = []
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}, line {n}: not valid JSON ({e}); fix or regenerate the file") from e
            return records
        try:
            records = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); fix or regenerate the file "
                             f"(a file with one sample per line must be named *.jsonl)") from e
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of samples (LLaVA format), got a {type(records).__name__}")
    return records


class LLaVADataset(Dataset):
    """LLaVA-format samples, tokenized lazily in __getitem__ (so a 665K-sample file opens in seconds).

    A bad sample is never zero-filled: __getitem__ returns None, collate() drops it, and `self.dropped` counts the
    reason ("bad_sample", "missing_image", "image_truncated", "no_supervised_tokens"). The counts are per process
    (each DataLoader worker has its own copy).
    """
    max_warnings = 10  # per reason; after that drops are only counted, so a bad large dataset does not flood the log

    def __init__(self, json_path, image_folder, tokenizer, image_processor, num_image_tokens, max_length,
                 template=CHAT):
        self.records = load_records(json_path)
        # LLaVA's image paths are relative to an image folder; by default, the folder holding the JSON file
        self.image_folder = image_folder if image_folder is not None else os.path.dirname(os.path.abspath(json_path))
        self.tokenizer, self.image_processor, self.template = tokenizer, image_processor, template
        self.num_image_tokens, self.max_length = num_image_tokens, max_length
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.dropped = Counter()

    def __len__(self):
        return len(self.records)

    def _drop(self, reason, message):
        self.dropped[reason] += 1
        if self.dropped[reason] <= self.max_warnings:
            more = " (further drops for this reason are only counted in dataset.dropped)" \
                if self.dropped[reason] == self.max_warnings else ""
            warnings.warn(f"skipping {message}{more}", stacklevel=3)
        return None

    def __getitem__(self, i):
        rec = self.records[i]
        sid = rec.get("id", i) if isinstance(rec, dict) else i
        try:
            if not isinstance(rec, dict):
                raise ValueError(f"sample {sid!r}: expected a JSON object, got {type(rec).__name__}")
            image = rec.get("image")
            if image is not None and not isinstance(image, str):
                raise ValueError(f"sample {sid!r}: 'image' must be one path string (multi-image is not supported)")
            input_ids, labels = tokenize_conversation(rec.get("conversations"), self.tokenizer, self.num_image_tokens,
                                                      image is not None, self.template, sid)
        except ValueError as e:
            return self._drop("bad_sample", str(e))

        # Cutting through the image would leave the model with a partial image whose tokens no longer match
        # pixel_values, so such a sample goes; cutting text after the image is harmless.
        if len(input_ids) > self.max_length:
            if image is not None:
                last_image_pos = len(input_ids) - 1 - input_ids[::-1].index(self.image_token_id)
                if last_image_pos >= self.max_length:
                    return self._drop("image_truncated", f"sample {sid!r}: its image tokens end at position "
                                      f"{last_image_pos + 1} > max_length={self.max_length}")
            input_ids, labels = input_ids[:self.max_length], labels[:self.max_length]
        if all(l == IGNORE_INDEX for l in labels):
            return self._drop("no_supervised_tokens", f"sample {sid!r}: no answer token left "
                              f"(max_length={self.max_length}, {len(input_ids)} tokens)")

        pixel_values = None
        if image is not None:
            path = os.path.join(self.image_folder, image)
            try:
                from PIL import Image
                with Image.open(path) as im:
                    img = im.convert("RGB")  # forces the decode here, so a corrupt file fails inside the try
            except (OSError, ValueError) as e:  # missing, unreadable or not an image
                return self._drop("missing_image", f"sample {sid!r}: cannot read image {path} ({e})")
            pixel_values = self.image_processor(images=img, return_tensors="pt").pixel_values[0]

        return dict(input_ids=torch.tensor(input_ids, dtype=torch.long),
                    labels=torch.tensor(labels, dtype=torch.long),
                    pixel_values=pixel_values)


# -----------------------------------------------------------------------------
# batching

def collate(samples, pad_id):
    """Right-pad a list of samples into the contract's batch dict; None samples (dropped) are left out.

    Returns None if every sample was dropped (the caller skips that batch). Use it as
    DataLoader(..., collate_fn=functools.partial(collate, pad_id=tokenizer.pad_token_id)).
    """
    samples = [s for s in samples if s is not None]
    if not samples:
        return None
    B, T = len(samples), max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[b, :n], attention_mask[b, :n], labels[b, :n] = s["input_ids"], 1, s["labels"]
    # Only samples with an image contribute a row, so a text-only sample costs no vision-tower compute;
    # image_mask tells model.py which sample each row belongs to.
    image_mask = torch.tensor([s["pixel_values"] is not None for s in samples], dtype=torch.bool)
    images = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
    pixel_values = torch.stack(images) if images else None
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                pixel_values=pixel_values, image_mask=image_mask)
