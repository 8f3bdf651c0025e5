# Copyright 2026 The LaViT developers. Licensed under the Apache License, Version 2.0.
"""Publishing a trained LaViT student: what a model repository holds, its model card, and the checks before upload.

`publish_plan` picks, from a trained run's folder, exactly the files that load: the config (with `auto_map`), the
safetensors weights, the processor and tokenizer files and the remote-code files the `auto_map`s name (and the
modules they import), never optimizer states, RNG files, checkpoints or the run's own records. `render_model_card`
writes the card from what the run knows: its settings (`lavit_run.json`, written by the trainer), the dataset's
manifest, an evaluation report of these very weights. `stage_upload` lays the upload out in a folder, exactly as the
repository will hold it. The network is `examples/push_lavit.py`'s business (`huggingface_hub`), not this module's.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LOADABLE = (
    "config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "processor_config.json", "preprocessor_config.json",
)
REQUIRED = ("config.json", "tokenizer_config.json")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
RUN_RECORD = "lavit_run.json"  # written by LavitSFTTrainer into its output_dir
CITATION = """@article{wu2026lavit,
  title   = {LaViT: Aligning Latent Visual Thoughts for Multi-modal Reasoning},
  author  = {Wu, Linquan and Jiang, Tianxiang and Dong, Yifei and Yang, Haoyu and Zhang, Fengji and Meng, Shichang and
             Xuan, Ai and Song, Linqi and Keung, Jacky},
  note    = {Official code: https://github.com/Svardfox/LaViT}
}"""


def check_repo_id(repo_id: str, what: str = "repo id") -> str:
    """`repo_id` when it has the Hub's `owner/name` form (letters, digits, `-`, `_`, `.`); a ValueError otherwise."""
    pattern = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}"
    if not re.fullmatch(pattern, repo_id or "") or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise ValueError(
            f"The {what} {repo_id!r} is not of the Hub's form owner/name (e.g. you/lavit-3b: letters, digits, '-', "
            "'_' and '.'); pass it as --repo-id owner/name."
        )
    return repo_id


def _remote_code_files(folder: Path, config: dict[str, Any]) -> list[str]:
    """The Python files the checkpoint's `auto_map`s name, and the sibling modules they import relatively."""
    modules = set()
    maps = [config.get("auto_map") or {}]
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            maps.append(json.loads(path.read_text(encoding="utf-8")).get("auto_map") or {})
    for auto_map in maps:
        for target in auto_map.values():
            for reference in target if isinstance(target, list) else [target]:
                if reference and "--" not in reference:  # "repo--module.Class" points to another repository
                    modules.add(reference.split(".")[0])
    pending, files = sorted(modules), []
    while pending:
        module = pending.pop()
        file = f"{module}.py"
        if file in files:
            continue
        files.append(file)
        path = folder / file
        if path.is_file():
            pending += re.findall(r"^\s*from \.(\w+) import", path.read_text(encoding="utf-8"), re.M)
    return sorted(files)


def check_publishable(folder: str | os.PathLike, extra: dict[str, str] | None = None) -> dict[str, Any]:
    """Checks that `folder` (with the `extra` files, name -> source path, that the upload adds) is a LaViT
    checkpoint others can load with `trust_remote_code=True`, and returns its config. Raises a ValueError naming the
    problem and the fix: not a LaViT checkpoint, a LoRA adapter, no safetensors weights, a missing processor file,
    or remote-code files missing."""
    root = Path(folder)
    extra = extra or {}
    if not (root / "config.json").is_file():
        if (root / "adapter_config.json").is_file():
            raise ValueError(
                f"{folder} holds a LoRA adapter, not a full checkpoint: merge it first (PeftModel.merge_and_unload() "
                "and save_pretrained, with the processor), then publish the merged folder."
            )
        raise ValueError(f"{folder} holds no config.json: it is not a model checkpoint. Pass the folder that "
                         "examples/train_lavit.py wrote (its --output_dir).")
    config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != "lavit":
        raise ValueError(
            f"{folder} is a '{config.get('model_type')}' checkpoint, not a LaViT one; publish a student trained with "
            "examples/train_lavit.py (a stock Qwen2.5-VL export is published with --stock-repo next to its LaViT one)."
        )
    if not (root / "model.safetensors").is_file() and not (root / "model.safetensors.index.json").is_file():
        raise ValueError(f"{folder} has no safetensors weights (model.safetensors or its index); save the model with "
                         "save_pretrained (safetensors is the default) and publish again.")
    missing = [name for name in REQUIRED if not (root / name).is_file()]
    if not any((root / name).is_file() for name in PROCESSOR_FILES):
        missing.append(" or ".join(PROCESSOR_FILES))
    if missing:
        raise ValueError(f"{folder} lacks {missing}: save the processor next to the model "
                         "(processor.save_pretrained(folder), as examples/train_lavit.py does).")
    if not (config.get("auto_map") or {}).get("AutoModelForImageTextToText"):
        raise ValueError(f"{folder}/config.json has no auto_map for AutoModelForImageTextToText, so "
                         "trust_remote_code=True would not find LaViT's class. Load the model with "
                         "AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True) and save it again "
                         "(or save it with conversion_lavit.save_lavit_checkpoint), which writes the auto_map.")
    absent = [file for file in _remote_code_files(root, config) if not (root / file).is_file() and file not in extra]
    if absent:
        raise ValueError(
            f"{folder} lacks the remote-code files {absent} that its auto_map names, so nobody could load it with "
            "trust_remote_code=True; publish with --add-remote-code (copies the installed LaViT's files) or save the "
            "checkpoint with conversion_lavit.save_lavit_checkpoint."
        )
    return config


def installed_remote_code(folder: str | os.PathLike) -> dict[str, str]:
    """The installed LaViT remote-code files (configuration, modeling, processing) that `folder` lacks, as
    name -> source path: what `--add-remote-code` adds to the upload (the checkpoint itself is left as it is)."""
    import configuration_lavit
    import modeling_lavit
    import processing_lavit

    files = {Path(m.__file__).name: m.__file__ for m in (configuration_lavit, modeling_lavit, processing_lavit)}
    return {name: source for name, source in files.items() if not (Path(folder) / name).exists()}


def publish_plan(folder: str | os.PathLike, extra: dict[str, str] | None = None) -> list[tuple[str, int, str]]:
    """The files a repository of the checkpoint holds, as `(name, bytes, source path)`, sorted: `folder`'s files that
    load, and the `extra` ones (name -> source path). The card, made separately, is added as README.md."""
    root, extra = Path(folder), extra or {}
    config = check_publishable(root, extra)
    wanted = set(_remote_code_files(root, config))
    sources = {p.name: str(p) for p in root.iterdir() if p.is_file()}
    sources.update({name: source for name, source in extra.items() if name in wanted})
    chosen = sorted(n for n in sources if n in wanted or any(fnmatch.fnmatch(n, pattern) for pattern in LOADABLE))
    return [(name, os.path.getsize(sources[name]), sources[name]) for name in chosen]


# ----------------------------------------------------------------------------------------------------------------
# The model card
# ----------------------------------------------------------------------------------------------------------------


def read_run_settings(folder: str | os.PathLike) -> dict[str, Any]:
    """The training settings the trainer recorded (`lavit_run.json`); a ValueError naming the fix without them."""
    path = Path(folder) / RUN_RECORD
    if not path.is_file():
        raise ValueError(
            f"{folder} has no {RUN_RECORD}, so it is not a folder LavitSFTTrainer trained into (or its record was "
            "removed); the card needs the run's settings. Publish the --output_dir of examples/train_lavit.py."
        )
    return json.loads(path.read_text(encoding="utf-8"))


def read_dataset_facts(dataset: str | os.PathLike) -> dict[str, Any]:
    """What the card says of the training data: from a local LaViT-15K folder (verified: its manifest, the teacher
    in builder_config.json), or just the Hub id."""
    if not os.path.isdir(dataset):
        return {"id": check_repo_id(str(dataset), "dataset id")}
    from data_lavit import verify_lavit_folder

    manifest = verify_lavit_folder(dataset, "kept")
    builder = Path(dataset) / "builder_config.json"
    teacher = json.loads(builder.read_text(encoding="utf-8")).get("teacher") if builder.is_file() else None
    return {"id": None, "rows": manifest["rows"], "kept": manifest["kept"], "teacher": teacher}


def check_evaluation_report(report: dict[str, Any], weights: str, path: str) -> dict[str, Any]:
    """`report` (evaluate.py's report.json) when it was made with these weights (`model_fingerprint`); a ValueError
    otherwise: an evaluation of another model must not be published as this one's."""
    recorded = report.get("weights")
    if recorded is None:
        raise ValueError(f"{path} records no weights fingerprint (an older evaluate.py wrote it); evaluate this "
                         "checkpoint again with examples/evaluate.py and pass the new report.json.")
    if recorded != weights:
        raise ValueError(
            f"{path} evaluated other weights (fingerprint {recorded}, this checkpoint's is {weights}): it is another "
            "model's report (or the same weights evaluated in another dtype than the report records). Evaluate this "
            "checkpoint with examples/evaluate.py --model <it> and pass that report."
        )
    return report


def _front_matter(fields: dict[str, Any]) -> str:
    lines = ["---"]
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"- {json.dumps(item)}" for item in value]
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines + ["---", ""])


def _evaluation_section(report: dict[str, Any] | None) -> list[str]:
    if report is None:
        return ["## Evaluation", "", "Not evaluated: no evaluation report was given when this card was written. "
                "`examples/evaluate.py` runs MMVP, V* (direct attributes), BLINK and MMStar.", ""]
    columns = report.get("columns", [])
    from evaluation_lavit import PAPER_TABLE1

    rows = {name: values for name, values in report.get("rows", {}).items() if name not in PAPER_TABLE1}
    lines = ["## Evaluation", "", "Accuracy (%) from `examples/evaluate.py` on these weights (greedy decoding; the "
             "latent mode in brackets):", "", "| model | " + " | ".join(columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name, values in rows.items():
        cells = ["—" if values.get(c) is None else f"{values[c]:.2f}" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    evaluated = sorted({c for values in rows.values() for c in columns if values.get(c) is not None})
    missing = [c for c in columns if c not in evaluated]
    lines += ["", f"Evaluated on: {', '.join(evaluated) or 'nothing'}."
              + (f" Not evaluated on: {', '.join(missing)}." if missing else ""), ""]
    return lines


def render_model_card(folder: str | os.PathLike, repo_id: str, base_model: str, dataset: dict[str, Any],
                      license: str = "other", teacher: str | None = None, report: dict[str, Any] | None = None,
                      stock: bool = False) -> str:
    """The model card of a trained student (or, with `stock`, of its stock Qwen2.5-VL export) from the run's
    settings, its config, the dataset's facts and an optional evaluation report checked against the weights."""
    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    settings = read_run_settings(folder)
    teacher = teacher or dataset.get("teacher")
    k = config.get("num_latent_tokens")
    tags = ["lavit", "qwen2_5_vl", "latent-visual-reasoning", "distillation"] + ([] if stock else ["custom_code"])
    fields = {
        "library_name": "transformers", "pipeline_tag": "image-text-to-text", "base_model": base_model,
        "datasets": [dataset["id"]] if dataset.get("id") else None, "license": license, "tags": tags,
    }
    distilled = settings.get("distill", True)
    name = repo_id.split("/")[-1]
    load = "" if stock else ", trust_remote_code=True"
    if distilled:
        summary = (f"A {base_model} student trained with LaViT: it writes K = {k} latent visual tokens before its "
                   "answer, trained to look where its teacher looks (LaViT: Aligning Latent Visual Thoughts for "
                   "Multi-modal Reasoning).")
        template = "the chat template still appends the latent tokens after the generation prompt"
    else:
        summary = (f"A {base_model} student trained with Naive SFT, the LaViT paper's control: the same data and "
                   "student, text-only supervision, no latent tokens and no teacher signals.")
        template = "its chat template appends no latent tokens"
    lines = [_front_matter(fields), f"# {name}", "", summary, ""]
    if stock:
        lines += ["This is the stock Qwen2.5-VL export of the LaViT checkpoint: no remote code and no concept head "
                  f"(it serves training only); {template}, so vLLM and SGLang run it as it was trained.", ""]
    lines += [
        "## Usage",
        "",
        "```python",
        "from PIL import Image",
        "from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline",
        "",
        f'model = AutoModelForImageTextToText.from_pretrained("{repo_id}"{load})',
        f'processor = AutoProcessor.from_pretrained("{repo_id}"{load})',
        'image = Image.open("example.jpg")',
        'messages = [{"role": "user", "content": [{"type": "image", "image": image},',
        '                                         {"type": "text", "text": "What color is the car?"}]}]',
        "inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, "
        'return_dict=True, return_tensors="pt")',
        "output = model.generate(**inputs, max_new_tokens=32)",
        'print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "",
        f'pipe = pipeline("image-text-to-text", model="{repo_id}"{load})',
        'print(pipe(text=messages, max_new_tokens=32, return_full_text=False)[0]["generated_text"])',
        "```",
        "",
        "## Training",
        "",
        f"- teacher: {teacher or 'not recorded'}",
        "- data: LaViT-15K" + (f" ({dataset['id']})" if dataset.get("id") else "")
        + (f", {dataset['kept']} kept of {dataset['rows']} processed samples" if "kept" in dataset else ""),
    ]
    if distilled:
        lines += [
            f"- latent tokens: K = {k}; L_traj reads layers {config.get('latent_attention_layers')}",
            f"- losses: lambda_concept = {settings.get('concept_loss_coef')}, lambda_traj = "
            f"{settings.get('trajectory_loss_coef')} (concept target {settings.get('concept_target')}, trajectory "
            f"top-k {settings.get('trajectory_topk')})",
            f"- sensory gate: {settings.get('gate_schedule')} schedule, T_w = {settings.get('gate_warmup_steps')} "
            f"steps, epsilon = {settings.get('gate_epsilon')}",
        ]
    else:
        lines += ["- losses: next-token prediction only (no latent tokens, no sensory gate)"]
    lines += [
        f"- optimisation: {settings.get('max_steps')} steps, learning rate {settings.get('learning_rate')} "
        f"({settings.get('lr_scheduler_type')}), batch {settings.get('per_device_train_batch_size')} per device, "
        f"seed {settings.get('seed')}; vision tower {'frozen' if settings.get('freeze_vision_tower') else 'trained'}",
        "",
    ]
    lines += _evaluation_section(report)
    lines += [
        "## Limits",
        "",
        "Evaluated only where the table above says; nothing here measures other tasks, languages or safety. The "
        "latent tokens carry the teacher's gaze only as well as the training data covers the images it meets.",
        "",
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
    ]
    return "\n".join(lines)


def stage_upload(plan: list[tuple[str, int, str]], card: str, target: str | os.PathLike) -> None:
    """Writes an upload into `target` exactly as the repository will hold it: the planned files (hard links where
    the file system allows, copies otherwise) and README.md."""
    target = Path(target)
    if target.exists() and any(target.iterdir()):
        raise ValueError(f"{target} is not empty; stage the upload into a new folder.")
    target.mkdir(parents=True, exist_ok=True)
    for name, _, source in plan:
        try:
            os.link(source, target / name)
        except OSError:
            shutil.copyfile(source, target / name)
    (target / "README.md").write_text(card, encoding="utf-8")


__all__ = ["check_repo_id", "check_publishable", "installed_remote_code", "publish_plan", "read_run_settings",
           "read_dataset_facts", "check_evaluation_report", "render_model_card", "stage_upload"]
