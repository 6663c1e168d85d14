"""Tiny random models built from configs: no downloads, a few hundred kB each."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import VLM, VLMConfig  # noqa: E402

# Tiny models gain nothing from a second intra-op thread, and on a busy 2-core machine OpenMP's
# spinning threads made tests 15-40x slower (measured by the evaluate tests: 3.7 s vs 57-155 s).
torch.set_num_threads(1)

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
