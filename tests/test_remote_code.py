"""A converted checkpoint loads in a fresh, offline process through the Auto classes and `pipeline` (remote code
copied into the checkpoint), and its stock export loads with plain transformers; logits are identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import QUESTIONS, batch_inputs, conversation
from conversion_lavit import export_to_qwen2_5_vl
from modeling_lavit import LavitForConditionalGeneration


CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, pipeline

    lavit_dir, export_dir, out_dir = sys.argv[1:4]
    questions = json.loads(sys.argv[4])

    def noise_image(width, height, seed):
        rng = np.random.default_rng(seed)
        return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))

    images = [noise_image(84, 56, 1), noise_image(112, 140, 2)]
    messages = [[{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": q}]}]
                for im, q in zip(images, questions)]

    config = AutoConfig.from_pretrained(lavit_dir, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(lavit_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(lavit_dir, trust_remote_code=True)
    processor.tokenizer.padding_side = "right"
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", processor_kwargs={"padding": True})
    with torch.no_grad():
        logits = model(**inputs).logits
        pipe = pipeline("image-text-to-text", model=lavit_dir, trust_remote_code=True)
        pipe_logits = pipe.model(**inputs).logits
    answer = pipe(text=messages[0], generate_kwargs={"max_new_tokens": 6, "do_sample": False})
    answer = answer[0]["generated_text"][-1]["content"]

    stock, info = AutoModelForImageTextToText.from_pretrained(export_dir, output_loading_info=True)
    stock.eval()
    with torch.no_grad():
        stock_logits = stock(**inputs).logits
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    save_file({"logits": logits, "pipe_logits": pipe_logits, "stock_logits": stock_logits,
               "input_ids": inputs["input_ids"]}, out_dir + "/logits.safetensors")
    json.dump({
        "config": type(config).__module__ + "." + type(config).__name__,
        "model": type(model).__module__ + "." + type(model).__name__,
        "processor": type(processor).__module__ + "." + type(processor).__name__,
        "pipe_model": type(pipe.model).__name__,
        "stock": type(stock).__module__ + "." + type(stock).__name__,
        "stock_missing": sorted(info["missing_keys"]), "stock_unexpected": sorted(info["unexpected_keys"]),
        "export_latents": tokenizer.convert_tokens_to_ids(["<v-trace1>", "<v-trace4>"]),
        "export_template": tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                                         tokenize=False),
        "answer": answer,
        "gate": float(model.sensory_gate),
    }, open(out_dir + "/info.json", "w"))
    """
)


def test_fresh_offline_process_loads_everything(lavit_dir, processor, two_images, tmp_path):
    export_dir = export_to_qwen2_5_vl(lavit_dir, tmp_path / "export")
    assert not list(Path(export_dir).glob("*.py"))
    config = json.loads((Path(export_dir) / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl" and "auto_map" not in config
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]

    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "TRANSFORMERS_VERBOSITY": "error"}
    subprocess.run(
        [sys.executable, str(script), lavit_dir, export_dir, str(tmp_path), json.dumps(QUESTIONS)],
        check=True, cwd=tmp_path, env=env, timeout=300,
    )
    info = json.loads((tmp_path / "info.json").read_text())
    child = load_file(tmp_path / "logits.safetensors")

    # The child used the code copied into the checkpoint, not this repository's modules.
    assert info["config"].startswith("transformers_modules.") and info["config"].endswith("LavitConfig")
    assert info["model"].startswith("transformers_modules.") and info["model"].endswith("LavitForConditionalGeneration")
    assert info["processor"].startswith("transformers_modules.") and info["processor"].endswith("LavitProcessor")
    assert info["pipe_model"] == "LavitForConditionalGeneration"
    assert info["gate"] == 1.0
    assert info["stock"] == "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VLForConditionalGeneration"
    assert info["stock_missing"] == [] and info["stock_unexpected"] == []
    assert info["export_latents"] == [processor.latent_token_ids[0], processor.latent_token_ids[-1]]
    assert info["export_template"].endswith("assistant\n<v-trace1><v-trace2><v-trace3><v-trace4>")

    model = LavitForConditionalGeneration.from_pretrained(lavit_dir).eval()
    inputs = batch_inputs(processor, two_images)
    assert torch.equal(inputs["input_ids"], child["input_ids"])
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.equal(child["logits"], logits)
    assert torch.equal(child["pipe_logits"], logits)
    assert (child["stock_logits"] - logits).abs().max().item() == 0.0

    single = processor.apply_chat_template(conversation(two_images[0], QUESTIONS[0]), add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")
    generated = model.generate(**single, max_new_tokens=6, do_sample=False)
    expected = processor.decode(generated[0, single["input_ids"].shape[1]:], skip_special_tokens=True)
    assert info["answer"] == expected


def test_export_without_forced_latents_for_models_trained_without_them(lavit_dir, tmp_path):
    from processing_lavit import LavitBaseProcessor  # the stock processor without torchvision

    forced = LavitBaseProcessor.from_pretrained(export_to_qwen2_5_vl(lavit_dir, tmp_path / "forced"))
    plain = LavitBaseProcessor.from_pretrained(export_to_qwen2_5_vl(lavit_dir, tmp_path / "plain",
                                                                    force_latent_tokens=False))
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    with_latents = forced.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    without = plain.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert with_latents.endswith("assistant\n<v-trace1><v-trace2><v-trace3><v-trace4>")
    assert without.endswith("<|im_start|>assistant\n") and "<v-trace" not in without
    assert with_latents == without + "<v-trace1><v-trace2><v-trace3><v-trace4>"  # nothing else changed
    assert "<v-trace1>" in plain.tokenizer.get_vocab()  # the token rows stay; only the prompt stops forcing them
