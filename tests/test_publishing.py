"""Publishing a trained student (issue 16): exactly the files that load, a card built from the run, its usage snippet
run against the upload as it would land on the Hub, the stock export beside it, and bad input refused before
anything is sent. Offline: --dry-run and --stage-dir never touch the network."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import TEACHER_WIDTH, noise_image
from lavit15k_fixture import write_lavit15k_folder

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "processor_config.json", "configuration_lavit.py", "modeling_lavit.py",
            "processing_lavit.py", "README.md"}


@pytest.fixture(scope="module")
def trained(lavit_dir, tmp_path_factory):
    """A student trained for 2 steps the way examples/train_lavit.py does it (remote code, checkpoints on), saved
    with its processor; and the dataset folder it was trained on."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from data_lavit import load_lavit_dataset
    from trainer_lavit import LavitSFTConfig, LavitSFTTrainer

    folder = tmp_path_factory.mktemp("publish")
    dataset = write_lavit15k_folder(folder / "lavit15k", 4, TEACHER_WIDTH)
    model = AutoModelForImageTextToText.from_pretrained(lavit_dir, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(lavit_dir, trust_remote_code=True)
    out = folder / "run"
    args = LavitSFTConfig(str(out), use_cpu=True, max_steps=2, per_device_train_batch_size=2, gate_warmup_steps=1,
                          save_steps=1, report_to="none", seed=0, dataloader_num_workers=0, disable_tqdm=True)
    trainer = LavitSFTTrainer(model=model, args=args, train_dataset=load_lavit_dataset(dataset, "kept"),
                              processing_class=processor)
    trainer.train()
    trainer.save_model(str(out))
    processor.save_pretrained(str(out))
    return out, dataset


def push(argv, capsys=None):
    import push_lavit  # examples/ is on the path (conftest.py)

    push_lavit.main(argv)
    return capsys.readouterr().out if capsys is not None else None


def base_args(trained, *extra):
    out, dataset = trained
    return ["--checkpoint", str(out), "--repo-id", "you/lavit-tiny", "--base-model", "Qwen/Qwen2.5-VL-3B-Instruct",
            "--dataset", dataset, "--dataset-id", "you/lavit-15k", "--license", "apache-2.0", *extra]


def listed(output: str, repo: str) -> set[str]:
    block = output.split(f"files to {repo}:\n", 1)[1]
    return {m.group(1) for m in re.finditer(r"^  (\S+) \(\d+ bytes\)$", block.split("\n---\n")[0], re.M)}


def front_matter(card: str) -> dict:
    return yaml.safe_load(re.match(r"---\n(.*?)\n---\n", card, re.S).group(1))


def test_a_dry_run_lists_exactly_what_loads_and_a_card_from_the_run(trained, tmp_path, capsys):
    out, _ = trained
    assert (out / "checkpoint-2" / "optimizer.pt").exists() and (out / "lavit_run.json").exists()  # left behind
    stage = tmp_path / "stage"
    text = push(base_args(trained, "--dry-run", "--stage-dir", str(stage)), capsys)
    assert listed(text, "you/lavit-tiny") == EXPECTED
    assert {p.name for p in stage.iterdir()} == EXPECTED
    card = (stage / "README.md").read_text()
    header = front_matter(card)
    assert header["library_name"] == "transformers" and header["pipeline_tag"] == "image-text-to-text"
    assert header["base_model"] == "Qwen/Qwen2.5-VL-3B-Instruct" and header["datasets"] == ["you/lavit-15k"]
    assert header["license"] == "apache-2.0" and {"lavit", "custom_code"} <= set(header["tags"])
    settings = json.loads((out / "lavit_run.json").read_text())
    assert f"{settings['max_steps']} steps, learning rate {settings['learning_rate']}" in card
    assert "K = 4 latent visual tokens" in card and "4 kept of 4 processed samples" in card
    assert "lambda_concept = 0.3, lambda_traj = 0.3" in card and "cosine schedule, T_w = 1 steps" in card
    assert "Not evaluated: no evaluation report" in card and "@article{wu2026lavit" in card


def test_the_cards_usage_snippet_loads_the_upload_offline_and_generates(trained, tmp_path, capsys):
    stage = tmp_path / "stage"
    push(base_args(trained, "--dry-run", "--stage-dir", str(stage)), capsys)
    card = (stage / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1).replace("you/lavit-tiny", str(stage))
    work = tmp_path / "user"
    work.mkdir()
    noise_image(84, 56, seed=3).save(work / "example.jpg")
    # the card's code as a user runs it, then what the test checks: new tokens came from both routes
    (work / "snippet.py").write_text(snippet + "\nassert output.shape[1] > inputs['input_ids'].shape[1]\n"
                                     "assert isinstance(pipe(text=messages, max_new_tokens=4)[0]['generated_text'], "
                                     "(str, list))\nprint('GENERATED', output.shape[1] - inputs['input_ids'].shape[1])\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    # a fresh process in another folder: only the staged files and the installed transformers
    result = subprocess.run([sys.executable, "snippet.py"], cwd=work, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^GENERATED [1-9]", result.stdout, re.M), result.stdout[-2000:]


def test_the_stock_export_is_listed_beside_it_without_remote_code(trained, capsys):
    text = push(base_args(trained, "--dry-run", "--stock-repo", "you/lavit-tiny-stock"), capsys)
    stock = listed(text, "you/lavit-tiny-stock")
    assert "model.safetensors" in stock and "config.json" in stock and "README.md" in stock
    assert not any(name.endswith(".py") for name in stock)
    stock_card = text.split("files to you/lavit-tiny-stock:\n", 1)[1]
    assert "custom_code" not in front_matter(stock_card[stock_card.index("---\n"):])["tags"]


def test_an_evaluation_report_is_published_only_with_the_weights_it_evaluated(trained, lavit_dir, tmp_path, capsys):
    from evaluation_lavit import model_fingerprint, render_report
    from modeling_lavit import LavitForConditionalGeneration

    out, _ = trained
    _, table = render_report({"lavit-tiny [forced]": {"mmvp": {"accuracy": 40.0}}})
    table["weights"] = model_fingerprint(LavitForConditionalGeneration.from_pretrained(lavit_dir))  # the untrained
    report = tmp_path / "report.json"
    report.write_text(json.dumps(table))
    with pytest.raises(SystemExit, match=r"report.json evaluated other weights .* it is another model's report"):
        push(base_args(trained, "--dry-run", "--eval-report", str(report)))
    table["weights"] = model_fingerprint(LavitForConditionalGeneration.from_pretrained(out, dtype="auto"))
    report.write_text(json.dumps(table))
    text = push(base_args(trained, "--dry-run", "--eval-report", str(report)), capsys)
    assert "| lavit-tiny [forced] | 40.00 |" in text and "Evaluated on: MMVP. Not evaluated on:" in text


def test_bad_input_is_refused_before_anything_is_sent(trained, tiny_base_dir, tmp_path):
    out, _ = trained
    with pytest.raises(SystemExit, match=r"is a 'qwen2_5_vl' checkpoint, not a LaViT one"):
        push(base_args(trained, "--dry-run")[:1] + [tiny_base_dir] + base_args(trained, "--dry-run")[2:])
    for bad in ("lavit-tiny", "you/lavit tiny", "a/b/c", "you/..x"):
        with pytest.raises(SystemExit, match=r"is not of the Hub's form owner/name"):
            push(["--checkpoint", str(out), "--repo-id", bad, *base_args(trained, "--dry-run")[4:]])
    no_code = tmp_path / "no_code"
    shutil.copytree(out, no_code, ignore=shutil.ignore_patterns("checkpoint-*", "modeling_lavit.py"))
    args = ["--checkpoint", str(no_code), *base_args(trained, "--dry-run")[2:]]
    with pytest.raises(SystemExit, match=r"lacks the remote-code files \['modeling_lavit.py'\] .* --add-remote-code"):
        push(args)
    stage = tmp_path / "stage"
    push(args + ["--add-remote-code", "--stage-dir", str(stage)])  # the fix named works: the upload gets the file
    assert (stage / "modeling_lavit.py").read_bytes() == (ROOT / "modeling_lavit.py").read_bytes()
    assert not (no_code / "modeling_lavit.py").exists()  # and the user's checkpoint is left as it was
    untrained = tmp_path / "untrained"
    shutil.copytree(out, untrained, ignore=shutil.ignore_patterns("checkpoint-*", "lavit_run.json"))
    with pytest.raises(SystemExit, match=r"has no lavit_run.json, so it is not a folder LavitSFTTrainer trained"):
        push(["--checkpoint", str(untrained), *base_args(trained, "--dry-run")[2:]])


def test_a_naive_sft_student_is_described_and_exported_as_one(trained, tmp_path, capsys):
    out, _ = trained
    naive = tmp_path / "naive"
    shutil.copytree(out, naive, ignore=shutil.ignore_patterns("checkpoint-*"))
    settings = json.loads((naive / "lavit_run.json").read_text())
    (naive / "lavit_run.json").write_text(json.dumps({**settings, "distill": False}))
    text = push(["--checkpoint", str(naive), *base_args(trained, "--dry-run", "--stock-repo", "you/naive-stock")[2:]],
                capsys)
    assert "trained with Naive SFT, the LaViT paper's control" in text and "writes K = 4 latent" not in text
    assert "its chat template appends no latent tokens" in text and "lambda_concept" not in text


class FakeHub:
    """The Hub's side of the calls examples/push_lavit.py makes, kept in memory (repos of branches of files), so that
    the upload's logic runs as written without a network: what a revision holds after each push. Every call is bound
    to the real `HfApi` method's signature first, so an argument the real method does not take fails here too."""

    def __init__(self):
        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}
        self.created: list[tuple[str, bool]] = []

    def api_class(self):
        import inspect

        from huggingface_hub import CommitOperationDelete, HfApi

        hub = self

        def bound(method: str, args, kwargs) -> dict:
            call = inspect.signature(getattr(HfApi, method)).bind(None, *args, **kwargs)
            call.apply_defaults()
            return call.arguments

        class Api:
            def create_repo(self, *args, **kwargs):
                call = bound("create_repo", args, kwargs)
                repo = call["repo_id"]
                assert call["repo_type"] == "model" and (call["exist_ok"] or repo not in hub.repos)
                hub.created.append((repo, call["private"]))
                hub.repos.setdefault(repo, {"main": {".gitattributes": b"*.safetensors filter=lfs\n"}})

            def create_branch(self, *args, **kwargs):
                call = bound("create_branch", args, kwargs)
                branches = hub.repos[call["repo_id"]]
                branches.setdefault(call["branch"], dict(branches["main"]))  # a branch starts at main

            def list_repo_files(self, *args, **kwargs):
                call = bound("list_repo_files", args, kwargs)
                return sorted(hub.repos[call["repo_id"]][call["revision"] or "main"])

            def create_commit(self, *args, **kwargs):
                call = bound("create_commit", args, kwargs)
                files = hub.repos[call["repo_id"]][call["revision"] or "main"]
                for operation in call["operations"]:
                    if isinstance(operation, CommitOperationDelete):
                        del files[operation.path_in_repo]
                    else:
                        source = operation.path_or_fileobj
                        data = source if isinstance(source, bytes) else Path(source).read_bytes()
                        files[operation.path_in_repo] = data
                return type("Commit", (), {"commit_url": f"https://huggingface.co/{call['repo_id']}/commit/fake"})()

        return Api


def test_a_push_leaves_each_revision_holding_exactly_what_loads(trained, monkeypatch):
    import huggingface_hub

    out, _ = trained
    hub = FakeHub()
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.api_class())
    # an earlier push left a file this one does not make; the new commit deletes it
    hub.repos["you/lavit-tiny"] = {"main": {"README.md": b"old card", "pytorch_model.bin": b"stale weights"}}
    push(base_args(trained, "--private"))
    main = hub.repos["you/lavit-tiny"]["main"]
    assert set(main) == EXPECTED
    for name in EXPECTED - {"README.md"}:  # the checkpoint's own files, remote code included, byte for byte
        assert main[name] == (out / name).read_bytes(), name
    assert front_matter(main["README.md"].decode())["library_name"] == "transformers"
    assert hub.created == [("you/lavit-tiny", True)]
    # the stock export on a branch of the same repo: it starts from main's files and keeps none of the remote code
    push(base_args(trained, "--stock-branch", "stock"))
    stock = hub.repos["you/lavit-tiny"]["stock"]
    assert "model.safetensors" in stock and not any(name.endswith(".py") for name in stock)
    assert json.loads(stock["config.json"])["model_type"] == "qwen2_5_vl"
    assert "custom_code" not in front_matter(stock["README.md"].decode())["tags"]
    assert set(hub.repos["you/lavit-tiny"]["main"]) == EXPECTED  # main as the first push left it
    # a new repo for the stock export: created public, its .gitattributes kept beside the upload
    push(base_args(trained, "--stock-repo", "you/lavit-tiny-stock"))
    fresh = hub.repos["you/lavit-tiny-stock"]["main"]
    assert hub.created[-1] == ("you/lavit-tiny-stock", False)
    assert set(fresh) == set(stock) | {".gitattributes"} and fresh["model.safetensors"] == stock["model.safetensors"]
