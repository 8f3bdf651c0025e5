"""Real checkpoints from the Hub (marked slow: deselected by `make test`; run with `pytest -m slow` on a machine with
network access or a filled Hugging Face cache, and about 16 GB of memory)."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

STUDENT = os.environ.get("LAVIT_REAL_STUDENT", "Qwen/Qwen2.5-VL-3B-Instruct")


@pytest.mark.slow
def test_convert_real_student_keeps_its_logits(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from conversion_lavit import convert_qwen2_5_vl_to_lavit

    path = convert_qwen2_5_vl_to_lavit(STUDENT, tmp_path / "lavit", dtype=torch.float32)
    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    stock = Qwen2_5_VLForConditionalGeneration.from_pretrained(STUDENT, dtype=torch.float32).eval()
    image = Image.new("RGB", (448, 336), (120, 160, 200))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe it."}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, add_latent_tokens=False,
                                           tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        ours, ref = model(**inputs).logits, stock(**inputs).logits
    # Every existing token keeps its logit; only the latent tokens' rows (mean-initialised) are new.
    keep = torch.ones(ref.shape[-1], dtype=torch.bool)
    keep[model.config.latent_token_ids] = False
    assert ours.shape == ref.shape
    assert (ours[..., keep] - ref[..., keep]).abs().max().item() <= 1e-4
    forced = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        out = model(**forced, output_latent_attention=True)
    assert out.concept_embeds.shape == (1, 5120)
    assert torch.allclose(out.latent_image_attention.sum(-1), torch.ones(1, 4), atol=1e-4)
