#!/usr/bin/env python
"""Train a LaViT student on LaViT-15K with the paper's recipe, a baseline or an ablation (examples/configs/).

Tested with (CPU, a tiny converted student and a tiny LaViT-15K folder, see tests/test_trainer.py):

    python examples/train_lavit.py --config examples/configs/tiny_cpu.yaml \
        --model_name_or_path lavit-tiny --dataset_name lavit15k-tiny --output_dir runs/tiny

The paper's run (Qwen2.5-VL-3B student converted with K = 4 and the 32B teacher's width; 8 GPUs):

    accelerate launch --config_file examples/accelerate/ddp.yaml examples/train_lavit.py \
        --config examples/configs/lavit_3b.yaml

Every field of LavitSFTConfig (and TrainingArguments) is a flag: `--help` lists them. An --output_dir holding
another run is refused: `--resume_from_checkpoint true` continues it (its latest checkpoint, with the same
settings), `--overwrite_output_dir true` starts afresh there. `--use_peft` trains LoRA
adapters on the language model (the latent-token rows and the concept head trained in full).
"""

from __future__ import annotations

import logging

from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import ModelConfig, ScriptArguments, TrlParser

from cli_lavit import check_output_dir, checkpoint_model_type
from data_lavit import load_lavit_dataset
from trainer_lavit import LavitSFTConfig, LavitSFTTrainer, lavit_lora_config


def main(argv=None) -> None:
    parser = TrlParser((ScriptArguments, LavitSFTConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if model_args.model_name_or_path is None:
        raise SystemExit("--model_name_or_path: a LaViT student (examples/convert_qwen2_5_vl.py makes one).")
    if script_args.dataset_name is None:
        raise SystemExit("--dataset_name: a LaViT-15K folder or hub id (examples/build_lavit_dataset.py builds one).")
    try:  # the student's own folder would be overwritten (and overwrite_output_dir would delete it)
        check_output_dir(training_args.output_dir, model_args.model_name_or_path, "--output_dir")
    except ValueError as err:
        raise SystemExit(str(err)) from err
    try:  # before anything is loaded: a stock checkpoint would fail deep in its video processor otherwise
        model_type = checkpoint_model_type(model_args.model_name_or_path)
    except ValueError as err:
        raise SystemExit(f"--model_name_or_path: {err}") from err
    if model_type != "lavit":
        raise SystemExit(
            f"--model_name_or_path {model_args.model_name_or_path} is a '{model_type}' checkpoint, not a LaViT student: "
            "convert it first with examples/convert_qwen2_5_vl.py --base <it> --output-dir <student> (Naive SFT trains "
            "the converted student too, with --distill false)."
        )
    dtype = model_args.dtype if model_args.dtype not in (None, "auto") else "auto"
    model = AutoModelForImageTextToText.from_pretrained(
        model_args.model_name_or_path, trust_remote_code=True, dtype=dtype,
        revision=model_args.model_revision,
    )
    processor = AutoProcessor.from_pretrained(model_args.model_name_or_path, trust_remote_code=True)
    dataset = load_lavit_dataset(script_args.dataset_name, script_args.dataset_config or "kept")
    peft_config = None
    if model_args.use_peft:
        peft_config = lavit_lora_config(model, r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
                                        lora_dropout=model_args.lora_dropout)
    trainer = LavitSFTTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=processor,
                              peft_config=peft_config)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        processor.save_pretrained(training_args.output_dir)


if __name__ == "__main__":
    main()
