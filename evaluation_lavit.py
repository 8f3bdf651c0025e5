# Copyright 2026 The LaViT developers. Licensed under the Apache License, Version 2.0.
"""Evaluation on the paper's benchmarks (section 5.1-5.2, Table 1, Table 3) from local files.

Loaders read the published formats of MMVP, V*Bench (direct attributes), BLINK (any subtask) and MMStar into one
`EvalSample` shape; `evaluate` runs greedy, batched, left-padded generation with a progress bar, writes every
prediction to a JSONL file as it comes (a killed run resumes where it stopped) and scores them with a documented,
deterministic option-letter extractor. `render_report` lays the results out as Table 1, with the paper's numbers as
reference rows.

Nothing stale, partial or damaged is trusted. A loader pointed at another folder or a damaged file says which
benchmark layout it expected and what it found there, naming the path (and the line of a broken JSON line). A
predictions file is resumed only by a run of the same model name, benchmark, settings and weights: its header holds
`model_fingerprint(model)`, a hash of the model's config and of up to 4096 evenly spread values of every weight
tensor, so new weights saved at the same path are refused rather than scored with the old predictions (see
`RunConfig`).

Latent modes select how the latent tokens take part at inference: `forced` (the processor appends them, the
default), `none` (no latent tokens: the base model's behaviour), `masked` (present, but no later query may attend
to them: Table 3's "w/o latent tokens"), `zeroed` (their input embeddings are zero) and `shuffled` (each sample's
latent hidden states replaced by another sample's).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import string
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image, UnidentifiedImageError

from cli_lavit import changed_settings
from data_lavit import open_image
from modeling_lavit import LATENT_INTERVENTIONS, model_device
from processing_lavit import user_turn


logger = logging.getLogger(__name__)

LETTERS = string.ascii_uppercase
DEFAULT_INSTRUCTION = "Answer with the option letter from the given choices directly."
PROMPT_TEMPLATE = "{question}\n{options}\n{instruction}"
LATENT_MODES = ("forced", "none", *LATENT_INTERVENTIONS)  # forced latents, none, and the interventions
BLINK_PAPER_TASKS = ("Relative_Depth", "IQ_Test", "Relative_Reflectance", "Spatial_Relation")
BLINK_TASKS = (
    "Art_Style", "Counting", "Forensic_Detection", "Functional_Correspondence", "IQ_Test", "Jigsaw",
    "Multi-view_Reasoning", "Object_Localization", "Relative_Depth", "Relative_Reflectance",
    "Semantic_Correspondence", "Spatial_Relation", "Visual_Correspondence", "Visual_Similarity",
)
TABLE1_COLUMNS = (
    ("mmvp", "MMVP"), ("vstar", "V* Attrib."), ("blink/Relative_Depth", "Rel. Depth"), ("blink/IQ_Test", "IQ-Test"),
    ("blink/Relative_Reflectance", "Rel. Ref."), ("blink/Spatial_Relation", "Spatial"), ("mmstar", "MMStar"),
)
# Table 1 of the paper (accuracy, %), for reference rows next to a user's results.
PAPER_TABLE1 = {
    "Qwen2.5-VL-3B (paper)": (62.33, 81.74, 61.29, 24.0, 29.85, 81.12, 50.2),
    "Naive SFT 3B (paper)": (65.33, 80.87, 70.16, 28.0, 34.33, 81.82, 55.53),
    "LaViT-3B (paper)": (67.33, 82.61, 78.23, 32.0, 45.52, 81.82, 54.07),
    "Qwen2.5-VL-7B (paper)": (66.7, 77.39, 71.77, 26.0, 38.8, 87.4, 58.9),
    "Qwen2.5-VL-32B (paper)": (75.33, 82.61, 75.81, 30.0, 55.97, 85.31, 69.8),
}


@dataclass
class EvalSample:
    """One multiple-choice question.

    Attributes:
        benchmark: `mmvp`, `vstar`, `blink/<Task>` or `mmstar`.
        id: unique within the benchmark.
        question: the question (with its options inline when `options_in_question`).
        options: the option texts, lettered A, B, C, ...
        answer: the correct letter.
        images: callables returning the PIL images (loaded lazily).
        category: MMStar's category, BLINK's subtask, V*'s category.
        pair: MMVP's pair number (questions 2k-1 and 2k), else None.
        options_in_question: the question text already lists the options (MMStar), so the prompt does not repeat them.
    """

    benchmark: str
    id: str
    question: str
    options: list[str]
    answer: str
    images: list[Callable[[], Image.Image]]
    category: str = ""
    pair: int | None = None
    options_in_question: bool = False


class UnreadableImage(ValueError):
    """A sample's image is missing or corrupt (the harness counts and records the skip)."""


def _file_image(path: Path) -> Callable[[], Image.Image]:
    return _image_loader(path, str(path))


def _bytes_image(data: Any, where: str) -> Callable[[], Image.Image]:
    return _image_loader(data, f"in {where}")


def _image_loader(data: Any, where: str) -> Callable[[], Image.Image]:
    """Decodes `data` (`data_lavit.open_image`) when called; a missing or corrupt image is an `UnreadableImage`."""
    def load() -> Image.Image:
        try:
            image = open_image(data)
        except FileNotFoundError as err:
            raise UnreadableImage(f"missing image {err.filename or where}") from err
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise UnreadableImage(f"corrupt image {where}: {err}") from err
        return image.convert("RGB")

    return load


def _check_answer(sample: EvalSample, where: str, option_format: str) -> EvalSample:
    """`sample` when its options were read and its answer is one of their letters; a ValueError naming `where` (file
    and line or row) otherwise."""
    if not sample.options:
        raise ValueError(
            f"{sample.benchmark} {sample.id}: no options could be read from {where} (expected {option_format}); the "
            "file is damaged or of another format."
        )
    valid = LETTERS[: len(sample.options)]
    if sample.answer not in valid:
        raise ValueError(
            f"{sample.benchmark} {sample.id}: the answer {sample.answer!r} is not among the options "
            f"{list(valid)} ({sample.options}) in {where}; the file is damaged or of another format."
        )
    return sample


def _check_unique(samples: list[EvalSample], where: str) -> list[EvalSample]:
    """`samples` when their ids are unique (predictions are keyed on them); a ValueError otherwise."""
    repeated = sorted(i for i, n in Counter(s.id for s in samples).items() if n > 1)
    if repeated:
        raise ValueError(
            f"{where}: the id(s) {repeated[:5]} appear more than once; predictions are keyed on ids, so the file is "
            "damaged or of another format."
        )
    return samples


def _found(path: Path) -> str:
    """What is at `path`, in words, for an error message."""
    if not path.exists():
        return "it does not exist"
    if path.is_file():
        return f"it is a file of {path.stat().st_size} bytes"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    if not names:
        return "it is an empty folder"
    more = f" and {len(names) - 8} more" if len(names) > 8 else ""
    return f"it holds {', '.join(names[:8])}{more}"


def _layout_error(benchmark: str, path: Path, layout: str, fix: str) -> ValueError:
    return ValueError(f"{path} is not {benchmark}'s layout: expected {layout}; {_found(path)}. {fix}")


def _parquet_files(path: Path) -> list[Path]:
    """The parquet files `path` names: the folder's `*.parquet`, the file itself, or none."""
    if path.is_dir():
        return sorted(path.glob("*.parquet"))
    return [path] if path.is_file() and path.suffix == ".parquet" else []


def _read_parquet(path: Path, benchmark: str, columns: tuple[str, ...], layout: str) -> list[dict[str, Any]]:
    """The rows of one parquet file of `benchmark`; a ValueError naming the file when it cannot be read or lacks one of
    `columns`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(
            f"{path} is not a readable parquet file ({err}); it is truncated or damaged: download {benchmark} again."
        ) from err
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(
            f"{path} lacks the column(s) {missing} of {benchmark}'s layout ({layout}); its columns are "
            f"{table.column_names}. Point the loader at {benchmark}'s published file."
        )
    return table.to_pylist()


# ----------------------------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------------------------

_MMVP_OPTION = re.compile(r"\(([a-zA-Z])\)\s*(.*?)(?=\s*\([a-zA-Z]\)\s*|$)")
MMVP_COLUMNS = ("Index", "Question", "Options", "Correct Answer")
MMVP_LAYOUT = (
    "MMVP's folder: Questions.csv (columns Index, Question, Options, Correct Answer) with the images in "
    "'MMVP Images/<Index>.jpg', or *.parquet file(s) with those columns and an image column"
)


def _mmvp_csv_rows(csv_path: Path) -> list[tuple[str, dict[str, Any]]]:
    """`(where, row)` for each row of MMVP's Questions.csv, every column present and filled."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in MMVP_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{csv_path} lacks the column(s) {missing} of MMVP's Questions.csv ({', '.join(MMVP_COLUMNS)}); its "
                f"header is {reader.fieldnames or 'empty'}. Point --mmvp-dir at MMVP's release folder."
            )
        rows = []
        for row in reader:
            where = f"{csv_path} line {reader.line_num}"
            short = [c for c in MMVP_COLUMNS if row.get(c) is None]
            if short:
                raise ValueError(
                    f"{where}: the row ends before its {short} field(s); the file is truncated or damaged: download "
                    "MMVP again."
                )
            rows.append((where, row))
    return rows


def load_mmvp(root: str | os.PathLike) -> list[EvalSample]:
    """MMVP from its release folder: `Questions.csv` (`Index,Question,Options,Correct Answer`, options such as
    `(a) Standing (b) Sitting`, answers such as `(a)`) with `MMVP Images/<Index>.jpg`, or the parquet variant with an
    `image` column (`*.parquet` in `root`, or one parquet file). Questions 2k-1 and 2k form pair k.

    Raises:
        ValueError: `root` holds neither layout, a file is damaged or lacks a column, or a row has no options, an
            answer outside them or a repeated index (each naming the file and line or row).
    """
    root = Path(root)
    fix = "Point --mmvp-dir at MMVP's release folder (or its parquet file)."
    csv_path = root / "Questions.csv"
    if root.is_file() and root.suffix == ".csv":
        csv_path, root = root, root.parent
    if csv_path.is_file():
        image_dir = root / "MMVP Images"
        if not image_dir.is_dir():
            raise _layout_error("MMVP", root, MMVP_LAYOUT, f"The images belong in {image_dir}.")
        rows = _mmvp_csv_rows(csv_path)
        images = {str(r["Index"]): _file_image(image_dir / f"{r['Index']}.jpg") for _, r in rows}
    else:
        parquets = _parquet_files(root)
        if not parquets:
            raise _layout_error("MMVP", root, MMVP_LAYOUT, fix)
        rows = [(f"{p} row {i}", r) for p in parquets
                for i, r in enumerate(_read_parquet(p, "MMVP", (*MMVP_COLUMNS, "image"), MMVP_LAYOUT))]
        images = {str(r["Index"]): _bytes_image(r["image"], f"MMVP {r['Index']}") for _, r in rows}
    samples = []
    for where, row in rows:
        index = str(row["Index"]).strip()
        if not index.isdigit():
            raise ValueError(f"{where}: the Index {index!r} is not a number; the file is damaged or of another format.")
        options = [text.strip() for _, text in _MMVP_OPTION.findall(str(row["Options"]))]
        answer = str(row["Correct Answer"]).strip().strip("()").upper()
        samples.append(_check_answer(EvalSample(
            benchmark="mmvp", id=index, question=str(row["Question"]).strip(), options=options, answer=answer,
            images=[images[index]], pair=(int(index) + 1) // 2,
        ), where, "options such as '(a) Yes (b) No'"))
    return _check_unique(samples, str(csv_path if csv_path.is_file() else root))


_INLINE_OPTION = re.compile(r"^\s*\(([A-Z])\)\s*(.+?)\s*$")


VSTAR_FIELDS = ("image", "text", "question_id", "label")
VSTAR_LAYOUT = (
    "V*Bench's folder: test_questions.jsonl (one JSON object a line with image, text, category, question_id, label) "
    "beside the image folders (direct_attributes/, relative_position/)"
)


def _json_line(line: str, where: str, fix: str) -> Any:
    """One line of a JSONL file, parsed; a ValueError naming `where` (file and line) when it is not JSON."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not valid JSON ({err.msg}, column {err.colno}): {fix}") from err


def load_vstar(root: str | os.PathLike, category: str | None = "direct_attributes") -> list[EvalSample]:
    """V*Bench from `test_questions.jsonl` (`image` path relative to the file, `text` with the options inline as
    `(A) ...` lines, `category`, `question_id`, `label` letter); `category` filters (the paper's 115 direct-attribute
    questions by default; None keeps all).

    Raises:
        ValueError: no `test_questions.jsonl` at `root`, a line that is not JSON or lacks a field, no question of
            `category`, a question without options or with an answer outside them, or a repeated question_id (each
            naming the file and line).
    """
    root = Path(root)
    path = root / "test_questions.jsonl" if root.is_dir() else root
    if not path.is_file():
        raise _layout_error("V*Bench", root, VSTAR_LAYOUT, "Point --vstar-dir at V*Bench's folder.")
    samples = []
    categories: set[str] = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        row = _json_line(line, where, "the file is truncated or damaged: download V*Bench again.")
        missing = [k for k in VSTAR_FIELDS if not isinstance(row, dict) or k not in row]
        if missing:
            found = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(
                f"{where} lacks the field(s) {missing} of V*Bench's questions ({', '.join(VSTAR_FIELDS)}, category); "
                f"it has {found}. The file is damaged or of another format."
            )
        categories.add(str(row.get("category")))
        if category is not None and row.get("category") != category:
            continue
        question_lines, options = [], []
        for text_line in str(row["text"]).splitlines():
            match = _INLINE_OPTION.match(text_line)
            if match:
                options.append(match.group(2))
            elif not options and "answer with the option" not in text_line.lower():
                question_lines.append(text_line)
        samples.append(_check_answer(EvalSample(
            benchmark="vstar", id=str(row["question_id"]), question="\n".join(question_lines).strip(), options=options,
            answer=str(row["label"]).strip().strip("()").upper(), images=[_file_image(path.parent / row["image"])],
            category=str(row.get("category", "")),
        ), where, "'(A) ...' lines in its text"))
    if not samples:
        wanted = f"of category {category!r} " if category is not None else ""
        raise ValueError(
            f"{path} holds no question {wanted}(its categories: {sorted(categories)}); choose one of those, or point "
            "--vstar-dir at V*Bench's folder."
        )
    return _check_unique(samples, str(path))


BLINK_COLUMNS = ("idx", "question", "image_1", "choices", "answer")
BLINK_LAYOUT = (
    "BLINK's folder: <Task>/val-*.parquet for each subtask (columns idx, question, image_1 ... image_4, choices, "
    "answer)"
)


def load_blink(root: str | os.PathLike, tasks: list[str] | tuple[str, ...] = BLINK_PAPER_TASKS) -> list[EvalSample]:
    """BLINK from `<Task>/val-00000-of-00001.parquet` (`idx`, `question`, `sub_task`, `image_1` ... `image_4` as image
    structs or null, `choices`, `answer` such as `(A)`, `prompt`), for the given subtasks (the paper's four by
    default; any of `BLINK_TASKS` by name).

    Raises:
        ValueError: an unknown task, a task folder without `val-*.parquet`, a damaged file or one that lacks a column,
            a question without choices or with an answer outside them, or a repeated idx (each naming the file).
    """
    unknown = [t for t in tasks if t not in BLINK_TASKS]
    if unknown:
        raise ValueError(f"Unknown BLINK task(s) {unknown}; the tasks are: {', '.join(BLINK_TASKS)}.")
    root = Path(root)
    samples = []
    for task in tasks:
        files = sorted((root / task).glob("val-*.parquet"))
        if not files:
            raise _layout_error("BLINK", root, BLINK_LAYOUT, f"Download BLINK's {task} split into {root / task}, or "
                                "point --blink-dir at the folder that holds the task folders.")
        task_samples = []
        for file in files:
            for i, row in enumerate(_read_parquet(file, "BLINK", BLINK_COLUMNS, BLINK_LAYOUT)):
                images = [_bytes_image(row[f"image_{k}"], f"BLINK {task} {row['idx']}") for k in range(1, 5)
                          if row.get(f"image_{k}") is not None]
                task_samples.append(_check_answer(EvalSample(
                    benchmark=f"blink/{task}", id=str(row["idx"]), question=str(row["question"]).strip(),
                    options=[str(c) for c in row["choices"] or []],
                    answer=str(row["answer"]).strip().strip("()").upper(), images=images, category=task,
                ), f"{file} row {i}", "a list of choices"))
        samples += _check_unique(task_samples, str(root / task))
    return samples


_MMSTAR_OPTIONS = re.compile(r"Options:\s*(.*)$", re.S)
_MMSTAR_SPLIT = re.compile(r"(?:^|,\s*)([A-F]):\s*")


MMSTAR_COLUMNS = ("index", "question", "image", "answer")
MMSTAR_LAYOUT = (
    "MMStar's mmstar.parquet (columns index, question with 'Options: A: ..., B: ...', image, answer, category)"
)


def load_mmstar(path: str | os.PathLike) -> list[EvalSample]:
    """MMStar from `mmstar.parquet` (`index`, `question` with the options inline after `Options:` as `A: ..., B:
    ...`, `image`, `answer` letter, `category`, `l2_category`), or every parquet file of a folder.

    Raises:
        ValueError: no parquet file at `path`, a damaged file or one that lacks a column, a question without options
            or with an answer outside them, or a repeated index (each naming the file and row).
    """
    path = Path(path)
    files = _parquet_files(path)
    if not files:
        raise _layout_error("MMStar", path, MMSTAR_LAYOUT, "Point --mmstar-path at MMStar's mmstar.parquet.")
    samples = []
    for where, row in ((f"{f} row {i}", r) for f in files
                       for i, r in enumerate(_read_parquet(f, "MMStar", MMSTAR_COLUMNS, MMSTAR_LAYOUT))):
        question = str(row["question"])
        match = _MMSTAR_OPTIONS.search(question)
        options = []
        if match:
            parts = _MMSTAR_SPLIT.split(match.group(1))
            options = [parts[i + 1].strip().rstrip(",").strip() for i in range(1, len(parts) - 1, 2)]
        samples.append(_check_answer(EvalSample(
            benchmark="mmstar", id=str(row["index"]), question=question.strip(), options=options,
            answer=str(row["answer"]).strip().upper(), images=[_bytes_image(row["image"], f"MMStar {row['index']}")],
            category=str(row.get("category", "")), options_in_question=True,
        ), where, "the options after 'Options:' in the question, as 'A: ..., B: ...'"))
    return _check_unique(samples, str(path))


# ----------------------------------------------------------------------------------------------------------------
# Prompting and scoring
# ----------------------------------------------------------------------------------------------------------------


def build_prompt(sample: EvalSample, template: str = PROMPT_TEMPLATE, instruction: str = DEFAULT_INSTRUCTION) -> str:
    """The paper's prompt: the question, the options (`A. text` lines, unless the question lists them), then
    `instruction`."""
    options = "" if sample.options_in_question else "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(sample.options))
    text = template.format(question=sample.question, options=options, instruction=instruction)
    return re.sub(r"\n{2,}", "\n", text).strip()


_PAREN = re.compile(r"\(([A-Za-z])\)")
_PHRASES = [
    re.compile(r"(?:the\s+)?(?:correct\s+)?answer\s*(?:is|:)\s*(?:option\s*)?\(?([A-Za-z])\b\)?", re.I),
    re.compile(r"\boption\s*\(?([A-Za-z])\b\)?", re.I),
    re.compile(r"\bchoice\s*(?:is\s*)?\(?([A-Za-z])\b\)?", re.I),
]
_LEADING = re.compile(r"^\s*\(?([A-Za-z])\s*(?:[.:)\]]|$)")
_STANDALONE = re.compile(r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])")


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def extract_option(response: str, options: list[str]) -> str | None:
    """The option letter a response picks, or None when it picks none unambiguously. The rules, in order:

    1. a response that is only a letter, with brackets or punctuation (`B`, `b`, `(b)`, `B.`, `C)`), or that opens
       with one followed by `.`, `:` or `)` (`B. Sitting`) and names no other letter in brackets;
    2. a parenthesised letter among the valid options (`... so (A)`), when all such letters agree;
    3. a phrase such as `the answer is C`, `answer: C`, `option C` (the last one wins);
    4. a standalone capital letter among the valid options, when exactly one distinct letter stands so; a capital
       `A` followed by a lower-case word is the article (`A dog is ...`), never an option;
    5. the text of exactly one option appearing in the response (whole words, case-insensitive).

    Letters outside the options' range never count; an empty response gives None.
    """
    valid = set(LETTERS[: len(options)])
    text = (response or "").strip()
    if not text:
        return None
    bracketed = {m.upper() for m in _PAREN.findall(text) if m.upper() in valid}
    leading = _LEADING.match(text)
    if leading and leading.group(1).upper() in valid and bracketed <= {leading.group(1).upper()}:
        rest = text[leading.end():].strip()
        if not rest or leading.group(0).rstrip().endswith((".", ":", ")", "]")):
            return leading.group(1).upper()
    if len(bracketed) == 1:
        return bracketed.pop()
    for phrase in _PHRASES:
        found = [m.upper() for m in phrase.findall(text) if m.upper() in valid]
        if found:
            return found[-1]
    standalone = set()
    for match in _STANDALONE.finditer(text):
        letter = match.group(1)
        if letter not in valid:
            continue
        following = text[match.end():match.end() + 2]
        if letter == "A" and re.match(r"\s[a-z]", following):
            continue  # the article
        standalone.add(letter)
    if len(standalone) == 1:
        return standalone.pop()
    normalised = f" {_normalise(text)} "
    hits = {LETTERS[i] for i, option in enumerate(options) if _normalise(option) and f" {_normalise(option)} " in normalised}
    if len(hits) == 1:
        return hits.pop()
    return None


def score(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy per benchmark (micro, per question, as the paper reports), the unparseable count, MMVP's pair
    accuracy, BLINK per task and MMStar per category. `records` are prediction records (`benchmark`, `id`,
    `prediction`, `answer`, `category`, `pair`)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        groups[record["benchmark"]].append(record)
    out: dict[str, Any] = {}
    for benchmark, rows in sorted(groups.items()):
        correct = sum(r["prediction"] == r["answer"] for r in rows)
        result = {
            "n": len(rows),
            "correct": correct,
            "accuracy": 100.0 * correct / len(rows),
            "unparseable": sum(r["prediction"] is None for r in rows),
        }
        if benchmark == "mmvp":
            pairs: dict[int, list[bool]] = defaultdict(list)
            for r in rows:
                pairs[r["pair"]].append(r["prediction"] == r["answer"])
            complete = [v for v in pairs.values() if len(v) == 2]
            result["pair_accuracy"] = 100.0 * sum(all(v) for v in complete) / len(complete) if complete else None
            result["pairs"] = len(complete)
        if benchmark == "mmstar":
            per: dict[str, list[bool]] = defaultdict(list)
            for r in rows:
                per[r["category"]].append(r["prediction"] == r["answer"])
            result["per_category"] = {c: 100.0 * sum(v) / len(v) for c, v in sorted(per.items())}
        out[benchmark] = result
    blink = {k.split("/", 1)[1]: v["accuracy"] for k, v in out.items() if k.startswith("blink/")}
    if blink:
        out["blink"] = {"per_task": blink}
    return out


# ----------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------


FINGERPRINT_VALUES = 4096


def _plain_config(value: Any) -> Any:
    """A config dict without the fields that name where it came from (`_name_or_path`, `_commit_hash`, ...) or which
    transformers wrote it; everything that shapes the model stays."""
    if isinstance(value, dict):
        return {str(k): _plain_config(v) for k, v in value.items()
                if not str(k).startswith("_") and k != "transformers_version"}
    if isinstance(value, (list, tuple)):
        return [_plain_config(v) for v in value]
    return value


def model_fingerprint(model, values_per_tensor: int = FINGERPRINT_VALUES) -> str:
    """A cheap fingerprint of `model`'s content: 16 hex digits of a SHA-256 over its config (less the fields that name
    its path or the transformers version) and, for every tensor of its state dict in order, the name, shape, dtype and
    the bytes of at most `values_per_tensor` values at evenly spread positions of the flattened tensor (its first and
    last values among them; every value of a smaller tensor).

    Computed from the loaded model (no file is read again), it costs one small gather per tensor, whatever the model's
    size. Any training step, another seed or a reload in another dtype changes it; an edit confined to values
    between the sampled positions (one number changed by hand) would not, which is the price of not hashing every
    weight.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(_plain_config(model.config.to_dict()), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.detach().reshape(-1)
            count = min(flat.numel(), values_per_tensor)  # evenly spread positions, the first and the last among them
            positions = torch.arange(count, dtype=torch.int64) * (flat.numel() - 1) // max(count - 1, 1)
            sample = flat[positions.to(flat.device)].cpu()
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
            digest.update(sample.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class RunConfig:
    """What decides a predictions file's content; a resumed run must match it.

    `weights` is `model_fingerprint(model)`: the predictions file is keyed on the model's content, not only on its
    name or path. When the weights at a path change (a new training run saved there, another dtype), the old file is
    refused with a message that names it, rather than resumed (its predictions would score the old weights) or
    overwritten (they are a result of their own); deleting the file or choosing a new output path evaluates the new
    weights.
    """

    model: str
    benchmark: str
    mode: str = "forced"
    template: str = PROMPT_TEMPLATE
    instruction: str = DEFAULT_INSTRUCTION
    max_new_tokens: int = 16
    weights: str = ""

    def header(self) -> dict[str, Any]:
        return {"_header": asdict(self)}


PREDICTION_FIELDS = ("id", "benchmark", "response", "prediction", "answer")


def read_predictions(path: str | os.PathLike, config: RunConfig) -> dict[str, dict]:
    """The records already in `path` (by id). A last line cut by a killed run is dropped; a file written for another
    model, weights, benchmark or setting, or with a damaged line, is refused with a ValueError naming it (and the
    line) and the fix."""
    path = Path(path)
    if not path.exists():
        return {}
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):  # a run killed in the middle of a write: drop the partial line
        text = text[: text.rfind("\n") + 1]
        path.write_text(text, encoding="utf-8")
    fix = "the predictions file is damaged; delete it to predict its questions again, or use a new output path."
    lines = [(number, _json_line(line, f"{path} line {number}", fix))
             for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines or not isinstance(lines[0][1], dict) or "_header" not in lines[0][1]:
        raise ValueError(f"{path} is not a predictions file of this harness (no header line); choose another path.")
    header = lines[0][1]["_header"]
    expected = asdict(config)
    if header != expected:
        diff = changed_settings(header, expected)
        if "weights" in diff and not header.get("weights"):
            raise ValueError(
                f"{path} was written without a weights fingerprint (by an older version of this harness), so which "
                "weights made its predictions is unknown; it is not resumed. Delete the file to evaluate the current "
                "weights, or use a new output path."
            )
        if "weights" in diff:
            raise ValueError(
                f"{path} holds predictions made by other weights (fingerprint {header['weights']} when "
                f"written, {config.weights} now: the checkpoint {config.model} changed since, or was loaded in "
                "another dtype); its predictions would score the old weights, so it is not resumed. Delete the file "
                "to evaluate the current weights, or use a new output path."
            )
        raise ValueError(
            f"{path} holds predictions of another run (it differs in {diff}: {[header.get(k) for k in diff]}); "
            "refusing to resume into it. Use a new output path."
        )
    records = {}
    for number, record in lines[1:]:
        missing = [k for k in PREDICTION_FIELDS if not isinstance(record, dict) or k not in record]
        if missing:
            raise ValueError(f"{path} line {number} is no prediction record (it lacks {missing}): {fix}")
        records[record["id"]] = record
    return records


@dataclass
class RunResult:
    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    resumed: int = 0


def generate_texts(model, processor, messages: list[list[dict]], images: list[list] | None, mode: str,
                   max_new_tokens: int) -> list[str]:
    """Greedy answers to a batch of chat `messages` (left-padded) with their `images`, a LaViT model run in latent
    `mode` (a stock model: mode "none"). "shuffled" needs two samples to swap; a batch of one keeps its own."""
    from modeling_lavit import find_latent_tokens

    lavit = getattr(model.config, "model_type", None) == "lavit"
    kwargs = {"add_latent_tokens": mode != "none"} if lavit else {}
    prompts = [processor.apply_chat_template(m, add_generation_prompt=True, **kwargs) for m in messages]
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True, padding_side="left")
    inputs = {k: v.to(model_device(model)) for k, v in inputs.items()}
    extra = {}
    if mode in LATENT_INTERVENTIONS and (mode != "shuffled" or len(prompts) > 1):
        extra["latent_intervention"] = mode
    if mode == "masked":
        extra["latent_positions"] = find_latent_tokens(inputs["input_ids"], model.config.latent_token_ids)[0]
    with torch.inference_mode():
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **extra)
    return processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def evaluate(
    model,
    processor,
    samples: list[EvalSample],
    predictions_path: str | os.PathLike,
    mode: str = "forced",
    batch_size: int = 8,
    max_new_tokens: int = 16,
    model_name: str | None = None,
    template: str = PROMPT_TEMPLATE,
    instruction: str = DEFAULT_INSTRUCTION,
    progress: bool = True,
) -> RunResult:
    """Greedy multiple-choice evaluation of `samples` (one benchmark) in a latent `mode`, resumable.

    Every prediction is appended to `predictions_path` (JSONL, a header line first) as soon as its batch is done;
    ids already there are skipped. A sample whose image is missing or corrupt is counted and recorded as skipped.
    The header holds `model_fingerprint(model)`: a file written by other weights (new ones saved at the same path) is
    refused, as is one of another model name, benchmark or setting, or one whose recorded answers differ from the
    samples' (the benchmark files changed); nothing is written before these checks pass (see `RunConfig`).
    """
    from tqdm.auto import tqdm

    if mode not in LATENT_MODES:
        raise ValueError(f"mode must be one of {LATENT_MODES}, got {mode!r}.")
    for name, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive whole number, got {value!r}.")
    if not samples:
        raise ValueError("No samples to evaluate: the loader returned none; check the benchmark path and filters.")
    benchmarks = {s.benchmark.split("/")[0] for s in samples}
    if len(benchmarks) != 1:
        raise ValueError(f"evaluate takes one benchmark at a time, got {sorted(benchmarks)}.")
    lavit = getattr(model.config, "model_type", None) == "lavit"
    if not lavit and mode != "none":
        raise ValueError(f"A stock model has no latent tokens: evaluate it in mode 'none', not {mode!r}.")
    if lavit:
        processor.check_model(model.config)
    if mode == "shuffled" and batch_size < 2:
        raise ValueError("The shuffled mode swaps latent states between the samples of a batch: batch_size >= 2.")
    config = RunConfig(model=model_name or str(getattr(model.config, "_name_or_path", "")), benchmark=benchmarks.pop(),
                       mode=mode, template=template, instruction=instruction, max_new_tokens=max_new_tokens,
                       weights=model_fingerprint(model))
    done = read_predictions(predictions_path, config)
    changed = [s.id for s in samples if s.id in done and (done[s.id]["answer"], done[s.id]["benchmark"])
               != (s.answer, s.benchmark)]
    if changed:
        raise ValueError(
            f"{predictions_path} holds predictions whose recorded answer or benchmark differs from the samples' now "
            f"(ids {changed[:5]}, {len(changed)} in all): the benchmark files changed since it was written. Delete "
            "the file to evaluate the current files, or use a new output path."
        )
    path = Path(predictions_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text(json.dumps(config.header()) + "\n", encoding="utf-8")
    resumed = [done[s.id] for s in samples if s.id in done]
    result = RunResult(records=resumed, resumed=len(resumed))
    todo = [s for s in samples if s.id not in done]
    bar = tqdm(total=len(todo), unit="q", disable=not progress, desc=f"{config.benchmark} [{mode}]")
    for start in range(0, len(todo), batch_size):
        batch = []
        for sample in todo[start : start + batch_size]:
            try:
                batch.append((sample, [load() for load in sample.images]))
            except UnreadableImage as err:
                result.skipped.append({"id": sample.id, "reason": str(err)})
        if mode == "shuffled" and len(batch) == 1 and result.records:
            logger.warning("A shuffled batch of one sample: it keeps its own latent states.")
        if batch:
            messages = [[user_turn(build_prompt(s, template, instruction), len(images))] for s, images in batch]
            texts = generate_texts(model, processor, messages, [images for _, images in batch], mode, max_new_tokens)
            new = []
            for (sample, _), text in zip(batch, texts):
                prediction = extract_option(text, sample.options)
                new.append({
                    "id": sample.id, "benchmark": sample.benchmark, "category": sample.category, "pair": sample.pair,
                    "response": text, "prediction": prediction, "answer": sample.answer,
                    "correct": prediction == sample.answer,
                })
            with open(path, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in new)
            result.records += new
        bar.update(len(todo[start : start + batch_size]))
    bar.close()
    return result


CHECKPOINT_TYPES = ("lavit", "qwen2_5_vl")


def check_checkpoint(model: str, stock: bool) -> str:
    """The `model_type` in `model`'s config.json (a folder or a hub id), read before any weight is loaded; a ValueError
    that names the fix when it does not fit `stock` (a stock Qwen2.5-VL model evaluated as the baseline) or is
    neither kind."""
    from cli_lavit import checkpoint_model_type

    model_type = checkpoint_model_type(model)
    if model_type not in CHECKPOINT_TYPES:
        raise ValueError(
            f"{model} has model_type {model_type!r} in its config.json; evaluation takes a LaViT checkpoint "
            "(model_type 'lavit') or, with --stock, a stock Qwen2.5-VL one (model_type 'qwen2_5_vl')."
        )
    if stock and model_type == "lavit":
        raise ValueError(
            f"{model} is a LaViT checkpoint (model_type 'lavit' in its config.json), not a stock Qwen2.5-VL one: drop "
            "--stock (with --modes none it runs without latent tokens)."
        )
    if not stock and model_type == "qwen2_5_vl":
        raise ValueError(
            f"{model} is a stock Qwen2.5-VL checkpoint (model_type 'qwen2_5_vl' in its config.json): pass --stock to "
            "evaluate it as the baseline, or convert it with examples/convert_qwen2_5_vl.py to evaluate it as LaViT."
        )
    return model_type


def render_report(results: dict[str, dict[str, Any]], include_paper: bool = True) -> tuple[str, dict[str, Any]]:
    """Table 1's layout in markdown, and the same numbers as JSON.

    Args:
        results: `{row name: score(...) output}`, e.g. one row per model and latent mode.
    """
    header = "| model | " + " | ".join(label for _, label in TABLE1_COLUMNS) + " |"
    lines = [header, "|---|" + "---|" * len(TABLE1_COLUMNS)]
    table: dict[str, Any] = {"columns": [label for _, label in TABLE1_COLUMNS], "rows": {}}
    for name, scores in results.items():
        values = [scores.get(key, {}).get("accuracy") for key, _ in TABLE1_COLUMNS]
        table["rows"][name] = dict(zip(table["columns"], values))
        lines.append(f"| {name} | " + " | ".join("—" if v is None else f"{v:.2f}" for v in values) + " |")
    if include_paper:
        for name, values in PAPER_TABLE1.items():
            table["rows"][name] = dict(zip(table["columns"], values))
            lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    extra = []
    for name, scores in results.items():
        details = []
        if scores.get("mmvp", {}).get("pair_accuracy") is not None:
            details.append(f"MMVP pair accuracy {scores['mmvp']['pair_accuracy']:.2f}")
        unparseable = sum(v.get("unparseable", 0) for v in scores.values() if isinstance(v, dict))
        details.append(f"{unparseable} unparseable answers")
        extra.append(f"- {name}: " + "; ".join(details))
    markdown = "\n".join(lines + [""] + extra) + "\n"
    table["details"] = results
    return markdown, table


__all__ = [
    "EvalSample",
    "UnreadableImage",
    "load_mmvp",
    "load_vstar",
    "load_blink",
    "load_mmstar",
    "build_prompt",
    "extract_option",
    "score",
    "RunConfig",
    "model_fingerprint",
    "read_predictions",
    "evaluate",
    "check_checkpoint",
    "render_report",
    "LATENT_MODES",
    "BLINK_TASKS",
    "PAPER_TABLE1",
]
