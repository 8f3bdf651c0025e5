#!/usr/bin/env python
"""Publish a trained LaViT student on the Hub: the checkpoint that loads with trust_remote_code=True, a model card
built from the run, and optionally its stock Qwen2.5-VL export (no remote code) for vLLM and SGLang.

Tested with (offline, a tiny trained student, see tests/test_publishing.py):

    python examples/push_lavit.py --checkpoint runs/lavit-3b --repo-id you/lavit-3b \
        --base-model Qwen/Qwen2.5-VL-3B-Instruct --dataset lavit15k --eval-report eval/report.json --dry-run

Without --dry-run it creates the repository (--private for a private one) and uploads in one commit with
`huggingface_hub`; `--stock-repo you/lavit-3b-stock` (or `--stock-branch stock`) adds the stock export. --dry-run
lists every file and prints the card, touching no network; --stage-dir DIR also lays the upload out in DIR exactly
as the repository will hold it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile

from cli_lavit import output_folder


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="the trained student (examples/train_lavit.py's --output_dir)")
    parser.add_argument("--repo-id", required=True, help="the model repository, owner/name")
    parser.add_argument("--base-model", required=True, help="the Qwen2.5-VL checkpoint the student was converted from")
    parser.add_argument("--dataset", required=True, help="the LaViT-15K folder it was trained on, or its Hub id")
    parser.add_argument("--dataset-id", default=None, help="the dataset's Hub id, for the card (with a local --dataset)")
    parser.add_argument("--teacher", default=None, help="the teacher (default: read from the dataset folder)")
    parser.add_argument("--license", default="other", help="the card's licence (the base model's terms apply)")
    parser.add_argument("--eval-report", default=None, help="examples/evaluate.py's report.json for these weights")
    parser.add_argument("--stock-repo", default=None, help="also publish the stock export to this repository")
    parser.add_argument("--stock-branch", default=None, help="or to this branch of --repo-id")
    parser.add_argument("--add-remote-code", action="store_true",
                        help="copy the installed LaViT remote-code files into the checkpoint where they are missing")
    parser.add_argument("--private", action="store_true", help="create private repositories")
    parser.add_argument("--dry-run", action="store_true", help="list the files and print the card; upload nothing")
    parser.add_argument("--stage-dir", type=output_folder, default=None,
                        help="with --dry-run: write the upload into this (new) folder as the repository will hold it")
    return parser.parse_args(argv)


def prepare(args, workdir: str) -> list[dict]:
    """Every check and file before anything is sent: the uploads as `{"repo", "branch", "card", "plan"}`, a plan being
    `(name, bytes, source path)`; a stock export is written under `workdir`."""
    import torch

    from evaluation_lavit import model_fingerprint
    from modeling_lavit import LavitForConditionalGeneration
    from publishing_lavit import (check_evaluation_report, check_repo_id, installed_remote_code, publish_plan,
                                  read_dataset_facts, read_run_settings, render_model_card)

    check_repo_id(args.repo_id)
    if args.stock_repo:
        check_repo_id(args.stock_repo, "stock repo id")
    if args.stock_repo and args.stock_branch:
        raise ValueError("Give --stock-repo or --stock-branch, not both.")
    # --add-remote-code adds the installed files to the upload; the checkpoint folder itself is not changed
    extra = installed_remote_code(args.checkpoint) if args.add_remote_code and os.path.isdir(args.checkpoint) else {}
    plan = publish_plan(args.checkpoint, extra)  # checks the checkpoint first
    settings = read_run_settings(args.checkpoint)
    dataset = read_dataset_facts(args.dataset)
    if args.dataset_id:
        dataset["id"] = check_repo_id(args.dataset_id, "dataset id")
    report = None
    if args.eval_report:
        with open(args.eval_report, encoding="utf-8") as f:
            report = json.load(f)
        dtype = report.get("dtype", "auto")  # the dtype the report's run loaded the weights in
        model = LavitForConditionalGeneration.from_pretrained(
            args.checkpoint, dtype=getattr(torch, dtype.replace("torch.", "")) if dtype != "auto" else "auto")
        check_evaluation_report(report, model_fingerprint(model), args.eval_report)
        del model
    card = render_model_card(args.checkpoint, args.repo_id, args.base_model, dataset, args.license, args.teacher,
                             report)
    uploads = [{"repo": args.repo_id, "branch": None, "card": card, "plan": plan}]
    if args.stock_repo or args.stock_branch:
        from conversion_lavit import export_to_qwen2_5_vl

        stock_dir = os.path.join(workdir, "stock")
        # a student trained without latent tokens is exported without them in its chat template
        export_to_qwen2_5_vl(args.checkpoint, stock_dir, force_latent_tokens=bool(settings.get("distill", True)))
        repo = args.stock_repo or args.repo_id
        stock_card = render_model_card(args.checkpoint, repo, args.base_model, dataset, args.license, args.teacher,
                                       report, stock=True)
        names = sorted(n for n in os.listdir(stock_dir) if n != "README.md")
        uploads.append({"repo": repo, "branch": args.stock_branch, "card": stock_card,
                        "plan": [(n, os.path.getsize(os.path.join(stock_dir, n)), os.path.join(stock_dir, n))
                                 for n in names if os.path.isfile(os.path.join(stock_dir, n))]})
    return uploads


def upload(entry: dict, private: bool) -> str:
    """One commit to `entry["repo"]` (its branch) with huggingface_hub: the planned files and the card, and the
    deletion of every other file there (an earlier push's, or main's files on a new branch), so that the revision
    holds exactly what loads."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    api = HfApi()
    api.create_repo(entry["repo"], repo_type="model", private=private, exist_ok=True)
    if entry["branch"]:
        api.create_branch(entry["repo"], branch=entry["branch"], exist_ok=True)
    keep = {name for name, _, _ in entry["plan"]} | {"README.md", ".gitattributes"}
    present = api.list_repo_files(entry["repo"], revision=entry["branch"])
    operations = [CommitOperationDelete(path_in_repo=name) for name in present if name not in keep]
    operations += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=source) for name, _, source in entry["plan"]]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=entry["card"].encode("utf-8")))
    commit = api.create_commit(entry["repo"], operations=operations, revision=entry["branch"],
                               commit_message="Upload a LaViT student with examples/push_lavit.py")
    return commit.commit_url


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("push_lavit")
    if args.stage_dir and not args.dry_run:
        raise SystemExit("--stage-dir lays out a dry run; add --dry-run.")
    with tempfile.TemporaryDirectory(prefix="lavit-push-") as workdir:  # the stock export lives through the upload
        try:
            uploads = prepare(args, workdir)
        except ValueError as err:
            raise SystemExit(str(err)) from err
        for entry in uploads:
            where = entry["repo"] + (f" (branch {entry['branch']})" if entry["branch"] else "")
            files = [(name, size) for name, size, _ in entry["plan"]] + [("README.md", len(entry["card"].encode()))]
            if args.dry_run:
                print(f"would upload {len(files)} files to {where}:")
                for name, size in sorted(files):
                    print(f"  {name} ({size} bytes)")
                print(entry["card"])
            else:
                log.info("uploaded %d files to %s: %s", len(files), where, upload(entry, args.private))
        if args.dry_run and args.stage_dir:
            from publishing_lavit import stage_upload

            stage_upload(uploads[0]["plan"], uploads[0]["card"], args.stage_dir)
            log.info("staged the upload of %s in %s", uploads[0]["repo"], args.stage_dir)


if __name__ == "__main__":
    sys.exit(main())
