"""Shared fixtures: a tiny Qwen2.5-VL checkpoint built in code, its LaViT conversion, and multimodal inputs."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from configuration_lavit import LavitConfig
from conversion_lavit import LAVIT_CONFIG_FIELDS, convert_qwen2_5_vl_to_lavit
from modeling_lavit import LavitForConditionalGeneration
from processing_lavit import LavitProcessor
from testing_lavit import save_tiny_qwen2_5_vl


os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The tests call the example scripts' parse_args and main in-process, and the benchmarks' helpers: the one place
# these folders join the import path.
for _folder in ("examples", "benchmarks"):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), _folder))
torch.set_num_threads(2)

TEACHER_WIDTH = 48


@pytest.fixture(scope="session", autouse=True)
def datasets_cache(tmp_path_factory):
    """The Arrow files load_lavit_dataset writes go to a folder of this session, not the user's datasets cache."""
    import datasets

    before = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = tmp_path_factory.mktemp("datasets_cache")
    yield datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = before


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory) -> str:
    return save_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny_qwen2_5_vl"), seed=0)


@pytest.fixture(scope="session")
def lavit_dir(tiny_base_dir, tmp_path_factory) -> str:
    return convert_qwen2_5_vl_to_lavit(
        tiny_base_dir, tmp_path_factory.mktemp("tiny_lavit"), teacher_hidden_size=TEACHER_WIDTH
    )


@pytest.fixture(scope="session")
def processor(lavit_dir) -> LavitProcessor:
    return LavitProcessor.from_pretrained(lavit_dir)


@pytest.fixture()
def lavit_model(lavit_dir) -> LavitForConditionalGeneration:
    return LavitForConditionalGeneration.from_pretrained(lavit_dir).eval()


def stock_copy(model: LavitForConditionalGeneration, attn_implementation: str = "sdpa"):
    """A stock Qwen2.5-VL model carrying `model`'s weights (the concept head dropped), built independently of the
    conversion code: config from the LaViT config's Qwen fields, weights by a strict state-dict load."""
    fields = {
        k: v
        for k, v in model.config.to_dict().items()
        if k not in LAVIT_CONFIG_FIELDS and k not in ("model_type", "architectures", "auto_map", "transformers_version")
    }
    config = Qwen2_5_VLConfig(**fields)
    config._attn_implementation = attn_implementation
    stock = Qwen2_5_VLForConditionalGeneration(config)
    stock.set_attn_implementation(attn_implementation)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("concept_head.")}
    stock.load_state_dict(state, strict=True)
    return stock.eval()


def conversation(image, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


QUESTIONS = ["what color is the object?", "is there a dog on the left of the red tree in this picture?"]


def batch_inputs(processor, images, questions=QUESTIONS, padding_side="right", add_latent_tokens=True):
    processor.tokenizer.padding_side = padding_side
    messages = [conversation(image, q) for image, q in zip(images, questions)]
    return processor.apply_chat_template(
        messages,
        add_generation_prompt=True,
        add_latent_tokens=add_latent_tokens,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True},
    )


@pytest.fixture(scope="session")
def two_images():
    # 84 x 56 pixels -> a 2 x 3 grid of merged tokens; 112 x 140 -> 5 x 4 (different sizes on purpose)
    return [noise_image(84, 56, seed=1), noise_image(112, 140, seed=2)]
