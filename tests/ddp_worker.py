"""Run under `accelerate launch`: a few LaViT training steps on every rank, then each rank writes a checksum of its
weights (tests/test_trainer.py compares them)."""

from __future__ import annotations

import faulthandler
import hashlib
import json
import os
import sys

import torch

from data_lavit import load_lavit_dataset
from modeling_lavit import LavitForConditionalGeneration
from processing_lavit import LavitProcessor
from trainer_lavit import LavitSFTConfig, LavitSFTTrainer


def main(lavit_dir: str, dataset_dir: str, output_dir: str, overrides: str = "{}") -> None:
    # a run takes seconds: one still going after 4 minutes prints every thread's stack and fails, instead of hanging
    # until the test's 10-minute timeout says nothing of where
    faulthandler.dump_traceback_later(240, exit=True)
    model = LavitForConditionalGeneration.from_pretrained(lavit_dir)
    processor = LavitProcessor.from_pretrained(lavit_dir)
    settings = dict(use_cpu=True, max_steps=3, per_device_train_batch_size=2, gate_warmup_steps=2, learning_rate=1e-3,
                    ddp_find_unused_parameters=False,
                    logging_steps=1, save_strategy="no", report_to="none", seed=0, dataloader_num_workers=0)
    overrides = json.loads(overrides)
    unfreeze_head = overrides.pop("unfreeze_concept_head", False)  # a user's change after building the trainer
    args = LavitSFTConfig(output_dir, **{**settings, **overrides})
    trainer = LavitSFTTrainer(model=model, args=args, train_dataset=load_lavit_dataset(dataset_dir, "kept"),
                              processing_class=processor)
    if unfreeze_head:
        model.concept_head.requires_grad_(True)
    trainer.train()
    rank = trainer.accelerator.process_index
    digest = hashlib.sha256()
    for name, tensor in sorted(trainer.accelerator.unwrap_model(trainer.model).state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    with open(f"{output_dir}/rank{rank}.json", "w") as f:
        json.dump({"rank": rank, "world": trainer.accelerator.num_processes, "sha256": digest.hexdigest(),
                   "losses": losses, "checkpointing": bool(getattr(trainer.args, "activation_checkpointing", None)
                                         or getattr(trainer.args, "gradient_checkpointing", None)),
                   "find_unused": trainer.args.ddp_find_unused_parameters}, f)
    # Past this barrier every collective of the run is done on both ranks and the results are on disk. The process
    # then leaves with os._exit: tearing a gloo group down is what can fail here, not the training, and both ways
    # have happened on this machine: left to interpreter exit, a rank aborted ("terminate called without an active
    # exception"); destroyed with destroy_process_group, one run in about forty hung until the test's timeout (a
    # known torch problem, pytorch/pytorch#75097).
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    faulthandler.cancel_dump_traceback_later()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:5])
