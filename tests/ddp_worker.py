"""Run under `accelerate launch`: a few LaViT training steps on every rank, then each rank writes a checksum of its
weights (tests/test_trainer.py compares them)."""

from __future__ import annotations

import hashlib
import json
import sys

import torch

from data_lavit import load_lavit_dataset
from modeling_lavit import LavitForConditionalGeneration
from processing_lavit import LavitProcessor
from trainer_lavit import LavitSFTConfig, LavitSFTTrainer


def main(lavit_dir: str, dataset_dir: str, output_dir: str) -> None:
    model = LavitForConditionalGeneration.from_pretrained(lavit_dir)
    processor = LavitProcessor.from_pretrained(lavit_dir)
    args = LavitSFTConfig(output_dir, use_cpu=True, max_steps=3, per_device_train_batch_size=2, gate_warmup_steps=2,
                          learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", seed=0,
                          dataloader_num_workers=0)
    trainer = LavitSFTTrainer(model=model, args=args, train_dataset=load_lavit_dataset(dataset_dir, "kept"),
                              processing_class=processor)
    trainer.train()
    rank = trainer.accelerator.process_index
    digest = hashlib.sha256()
    for name, tensor in sorted(trainer.accelerator.unwrap_model(trainer.model).state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    with open(f"{output_dir}/rank{rank}.json", "w") as f:
        json.dump({"rank": rank, "world": trainer.accelerator.num_processes, "sha256": digest.hexdigest(),
                   "losses": losses}, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
