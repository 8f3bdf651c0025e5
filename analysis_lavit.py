# Copyright 2026 The LaViT developers. Licensed under the Apache License, Version 2.0.
"""The paper's attention analyses (sections 3.1-3.2 and 5.3) for any teacher and student.

* Metrics: S_focus (equation 1, `teacher_lavit.s_focus`), attention entropy (equation 10), salient regions (patches
  above 1.5x the mean), and across samples the mean, standard deviation, range and coefficient of variation (Table 2).
* Trajectories: the attention of any Qwen2.5-VL or LaViT model over an image for chosen query rows (its generated
  answer, each generated token, or the latent tokens), through the same side channel as the teacher extraction.
* Figure 2: accuracy of the samples whose S_focus exceeds each threshold. Figure 3: the perception gap, per response
  token, between teacher and student. Figure 4: entropy histograms. Figure 5: heatmap overlays.
* `attention_analysis`: all of it for several models on one sample set, the one function that
  examples/analyze_attention.py and the quickstart's analysis stage call.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from data_lavit import box_to_token_mask, resize_gaze
from teacher_lavit import forced_attention_pass, generate_answers, s_focus


logger = logging.getLogger(__name__)

CATEGORIES = ("functional", "object", "attribute")


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------


def normalise_map(attention) -> np.ndarray:
    """A non-negative attention map as a distribution (flattened, summing to 1)."""
    values = np.asarray(attention, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("An empty attention map has no distribution.")
    if (values < 0).any():
        raise ValueError("Attention maps are non-negative; got negative values.")
    total = values.sum()
    if total <= 0:
        raise ValueError("An attention map with no mass has no distribution.")
    return values / total


def attention_entropy(attention) -> float:
    """Equation 10: H = -sum_i p_i log p_i (natural log) of the normalised map; 0 for a one-hot map, log N for a
    uniform one."""
    p = normalise_map(attention)
    nonzero = p[p > 0]
    return float(-(nonzero * np.log(nonzero)).sum())


def salient_regions(attention, factor: float = 1.5) -> int:
    """Table 2: the number of patches whose attention exceeds `factor` times the map's mean (0 for a uniform map)."""
    p = normalise_map(attention)
    return int((p > factor * p.mean()).sum())


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, (population) standard deviation, minimum, maximum and coefficient of variation sigma / mu."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("No values to summarise: the sample set is empty.")
    mean, std = float(values.mean()), float(values.std())
    return {"mean": mean, "std": std, "min": float(values.min()), "max": float(values.max()),
            "cv": std / mean if mean else float("nan"), "n": int(values.size)}


def map_kl(p, q, grid_p: tuple[int, int] | None = None, grid_q: tuple[int, int] | None = None,
           resize: bool = False, eps: float = 1e-10) -> float:
    """KL(p || q) of two attention maps, each normalised to a distribution.

    Maps of different grids are compared only with `resize=True` (q is resized bilinearly onto p's grid, both grids
    given); otherwise they raise a `ValueError`, since there is no one rule to align them.
    """
    p, q = np.asarray(p, dtype=np.float64).reshape(-1), np.asarray(q, dtype=np.float64).reshape(-1)
    if p.size != q.size or (grid_p is not None and grid_q is not None and tuple(grid_p) != tuple(grid_q)):
        if not resize or grid_p is None or grid_q is None:
            raise ValueError(
                f"Maps of different grids ({grid_p or p.size} and {grid_q or q.size}) need a resize rule: pass both grids "
                "and resize=True to resize the second onto the first bilinearly."
            )
        q = resize_gaze(q, tuple(grid_q), tuple(grid_p)).numpy().reshape(-1).astype(np.float64).clip(min=0)
    p, q = normalise_map(p), normalise_map(q)
    return float((p * (np.log(p + eps) - np.log(q + eps))).sum())


def focus_curve(focus: Sequence[float], correct: Sequence[bool], thresholds: Sequence[float]) -> list[dict[str, float]]:
    """Figure 2: for each threshold, the accuracy of the samples whose S_focus exceeds it (and how many there are)."""
    focus, correct = np.asarray(focus, dtype=np.float64), np.asarray(correct, dtype=bool)
    if focus.size == 0:
        raise ValueError("No samples to draw accuracy against focus from.")
    curve = []
    for t in thresholds:
        chosen = focus > t
        curve.append({"threshold": float(t), "n": int(chosen.sum()),
                      "accuracy": float(correct[chosen].mean()) if chosen.any() else float("nan")})
    return curve


# ----------------------------------------------------------------------------------------------------------------
# Word categories (Figure 3)
# ----------------------------------------------------------------------------------------------------------------

FUNCTION_WORDS = frozenset(
    """a an the this that these those some any each every no all both either neither of in on at to from by with
    for about into onto over under as than and or but nor so yet if then because while although though whether is
    are was were be been being am do does did done have has had having will would shall should can could may might
    must it its it's they them their theirs he him his she her hers we us our ours you your yours i me my mine who
    whom whose which what where when why how there here not also just only very too quite rather there's that's
    what's yes""".split()
)
ATTRIBUTE_WORDS = frozenset(
    """red orange yellow green blue purple violet pink brown black white gray grey silver gold golden beige tan dark
    light bright pale colorful colourful small large big tiny huge little tall short long wide narrow thick thin
    round square rectangular triangular circular oval flat curved straight striped spotted plain wooden metal metallic
    plastic glass stone paper leather soft hard smooth rough shiny wet dry empty full open closed old new young left
    right above below behind beside between near far top bottom middle center centre front back inside outside next
    upper lower closer farther further nearest farthest first second third last same different many few several
    one two three four five six seven eight nine ten""".split()
)


def load_spacy():
    """spaCy's small English pipeline when spaCy and the model are installed, else None (the lexicon is used)."""
    try:
        import spacy  # optional: used when installed with an English model
    except ImportError:
        return None
    try:
        return spacy.load("en_core_web_sm", disable=["parser", "ner"])
    except OSError:
        return None


def word_category(word: str, nlp=None) -> str:
    """The category of a response word (Figure 3): `functional` (function words, punctuation, numbers), `attribute`
    (adjectives, colours, sizes, shapes, materials, spatial relations) or `object` (the other words: nouns and
    content words).

    With a spaCy pipeline (`nlp`), its part of speech decides: NOUN/PROPN -> object; ADJ, NUM or a spatial word ->
    attribute; the rest -> functional. Without it, the shipped lexicons `FUNCTION_WORDS` and `ATTRIBUTE_WORDS` decide,
    any other alphabetic word counting as an object.
    """
    cleaned = word.strip().lower()
    cleaned = re.sub(r"^[^\w']+|[^\w']+$", "", cleaned)
    if not cleaned or not re.search(r"[a-z]", cleaned):
        return "functional"
    if nlp is not None:
        token = nlp(cleaned)[0]
        if token.pos_ in ("NOUN", "PROPN"):
            return "object"
        if token.pos_ in ("ADJ", "NUM") or cleaned in ATTRIBUTE_WORDS:
            return "attribute"
        return "functional"
    if cleaned in ATTRIBUTE_WORDS:
        return "attribute"
    if cleaned in FUNCTION_WORDS:
        return "functional"
    return "object"


def token_categories(tokenizer, token_ids: Sequence[int], nlp=None) -> list[str]:
    """The category of each token of a response: the category of the word it belongs to (a byte-level BPE token that
    starts with a space, or follows punctuation, starts a new word). Special tokens are functional."""
    special = set(getattr(tokenizer, "all_special_ids", []))
    words: list[list[int]] = []
    pieces = [tokenizer.decode([token]) for token in token_ids]
    for i, (token, piece) in enumerate(zip(token_ids, pieces)):
        starts = not words or piece[:1].isspace() or not piece[:1].isalnum() or token in special or \
            not pieces[i - 1][-1:].isalnum()
        if starts:
            words.append([i])
        else:
            words[-1].append(i)
    categories = [""] * len(token_ids)
    for positions in words:
        ids = [token_ids[i] for i in positions]
        category = "functional" if ids[0] in special else word_category(tokenizer.decode(ids), nlp)
        for i in positions:
            categories[i] = category
    return categories


# ----------------------------------------------------------------------------------------------------------------
# Trajectories
# ----------------------------------------------------------------------------------------------------------------


def _end_id(processor) -> int:
    return processor.tokenizer.convert_tokens_to_ids("<|im_end|>")


def attention_maps(model, processor, images, questions, response_ids, rows: str = "response",
                   per_token: bool = False) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """Each sample's attention over its image tokens (averaged over all text layers and heads) from one teacher-forced
    pass of any Qwen2.5-VL or LaViT model, through the side channel.

    Args:
        rows: `"response"` (the response tokens), `"latents"` (a LaViT model's latent tokens) or `"prompt_and_response"`.
        per_token: keep the rows apart, `(R_i, N_i)` per sample; else average them, `(N_i,)`.
    Returns:
        maps (raw probability mass, not normalised), grids `(rows, cols)`.
    """
    run = forced_attention_pass(model, processor, images, questions, response_ids, rows, reduce_queries=not per_token)
    stacked = run.capture.mean_over_layers().float().cpu().numpy()  # (B, N) or (B, R, N)
    key_counts = run.capture.key_mask.sum(1).tolist()
    row_counts = run.capture.query_mask.sum(1).tolist()
    maps = []
    for b, n in enumerate(key_counts):
        maps.append(stacked[b, : int(row_counts[b]), : int(n)] if per_token else stacked[b, : int(n)])
    return maps, run.grids


def answer_trajectories(model, processor, images, questions, max_new_tokens: int = 32, rows: str = "response",
                        batch_size: int = 4, generated: dict[str, list] | None = None) -> dict[str, list]:
    """Generates each sample's answer greedily, then reads its attention map for `rows` (the answer, or the latents).

    Args:
        generated: an earlier result of this function for the same model, processor and samples: its answers are
            read again with `rows` instead of being generated again (a LaViT student's answer rows, then its latents).
    Returns `{"maps", "grids", "answers", "answer_ids"}`.
    """
    maps, grids, answers, answer_ids = [], [], [], []
    for start in range(0, len(images), batch_size):
        batch = slice(start, start + batch_size)
        batch_images, batch_questions = images[batch], questions[batch]
        if generated is None:
            texts, ids = generate_answers(model, processor, batch_questions, batch_images, max_new_tokens)
            ids = [i if i else [_end_id(processor)] for i in ids]
        else:
            texts, ids = generated["answers"][batch], generated["answer_ids"][batch]
        batch_maps, batch_grids = attention_maps(model, processor, batch_images, batch_questions, ids, rows)
        maps += batch_maps
        grids += batch_grids
        answers += texts
        answer_ids += ids
    return {"maps": maps, "grids": grids, "answers": answers, "answer_ids": answer_ids}


def perception_gap(teacher, teacher_processor, student, student_processor, images, questions, responses,
                   nlp=None, batch_size: int = 4) -> dict[str, Any]:
    """Figure 3: teacher and student read the same prompts and the teacher's response; for every response token,
    the KL divergence between their normalised image-attention maps (the student's resized onto the teacher's grid)
    and the cosine distance between their last hidden states, grouped by word category.

    Hidden states of different widths are compared through a LaViT student's concept head (trained to map into the
    teacher's space); without one, the cosine is not reported. The result says which (`"cosine_through"`).
    """
    if not images:
        raise ValueError("The perception gap needs at least one sample.")
    records = []
    student_head = getattr(student, "concept_head", None)
    teacher_width = teacher.config.text_config.hidden_size
    student_width = student.config.text_config.hidden_size
    if teacher_width == student_width:
        comparison = "direct"
    elif student_head is not None and student.config.teacher_hidden_size == teacher_width:
        comparison = "concept_head"
    else:
        comparison = None
    for start in range(0, len(images), batch_size):
        batch = slice(start, start + batch_size)
        t_ids = [teacher_processor.tokenizer(r).input_ids + [_end_id(teacher_processor)] for r in responses[batch]]
        s_ids = [student_processor.tokenizer(r).input_ids + [_end_id(student_processor)] for r in responses[batch]]
        if t_ids != s_ids:
            raise ValueError("Teacher and student tokenise the responses differently; the per-token gap needs one "
                             "tokenizer (Qwen2.5-VL models share theirs).")
        teacher_run = forced_attention_pass(teacher, teacher_processor, images[batch], questions[batch], t_ids,
                                            "response", reduce_queries=False)
        student_run = forced_attention_pass(student, student_processor, images[batch], questions[batch], s_ids,
                                            "response", reduce_queries=False)
        t_maps = teacher_run.capture.mean_over_layers().float().cpu().numpy()  # (B, R, N_t)
        s_maps = student_run.capture.mean_over_layers().float().cpu().numpy()  # (B, R, N_s)
        for b, ids in enumerate(t_ids):
            categories = token_categories(teacher_processor.tokenizer, ids, nlp)
            t_rows = teacher_run.rows[b].nonzero()[:, 0]
            s_rows = student_run.rows[b].nonzero()[:, 0]
            n_t = int(teacher_run.capture.key_mask[b].sum())
            n_s = int(student_run.capture.key_mask[b].sum())
            with torch.inference_mode():
                t_hidden = teacher_run.hidden[b, t_rows].float()
                s_hidden = student_run.hidden[b, s_rows]
                if comparison == "concept_head":
                    s_hidden = student_head(s_hidden.to(next(student_head.parameters()).dtype))
                s_hidden = s_hidden.float()
                cosine = (1 - torch.nn.functional.cosine_similarity(t_hidden, s_hidden.to(t_hidden.device), dim=-1)
                          ).cpu().numpy() if comparison else [None] * len(ids)
            for i, category in enumerate(categories):
                kl = map_kl(t_maps[b, i, :n_t], s_maps[b, i, :n_s], teacher_run.grids[b], student_run.grids[b],
                            resize=True)
                records.append({"token": teacher_processor.tokenizer.decode([ids[i]]), "category": category, "kl": kl,
                                "cosine_distance": None if cosine[i] is None else float(cosine[i])})
    summary = {}
    for category in CATEGORIES:
        rows = [r for r in records if r["category"] == category]
        summary[category] = {
            "tokens": len(rows),
            "kl": float(np.mean([r["kl"] for r in rows])) if rows else None,
            "cosine_distance": float(np.mean([r["cosine_distance"] for r in rows]))
            if rows and comparison else None,
        }
    return {"per_token": records, "per_category": summary, "cosine_through": comparison}


def attention_statistics(maps: Sequence) -> dict[str, Any]:
    """Table 2 for one model: salient-region counts and entropies of its maps, summarised with `spread`."""
    if len(maps) == 0:
        raise ValueError("No attention maps: the sample set is empty.")
    return {
        "salient_regions": spread([salient_regions(m) for m in maps]),
        "entropy": spread([attention_entropy(m) for m in maps]),
    }


# ----------------------------------------------------------------------------------------------------------------
# Figures (matplotlib, headless)
# ----------------------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_focus_curves(models: dict[str, dict], path) -> None:
    """Figure 2: accuracy of the samples whose S_focus exceeds a threshold, one line per model. `models` maps a name
    to `{"curve": focus_curve(...), "mean_focus_correct", "mean_focus_incorrect"}`; the legend names each model with
    its mean S_focus on right and wrong answers, or says that it has none of one kind (no NaN)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=100)
    for name, figure in models.items():
        xs = [c["threshold"] for c in figure["curve"]]
        ys = [100 * c["accuracy"] if not math.isnan(c["accuracy"]) else np.nan for c in figure["curve"]]
        means = []
        for kind in ("correct", "incorrect"):
            value = figure.get(f"mean_focus_{kind}")
            means.append(f"{kind} {value:.3f}" if value is not None and not math.isnan(value)
                         else f"no {kind} answers")
        ax.plot(xs, ys, marker="o", label=f"{name} (mean S_focus: {', '.join(means)})")
    ax.set_xlabel("S_focus threshold")
    ax.set_ylabel("accuracy of samples above it (%)")
    ax.set_title("Accuracy against focus on the key region (Figure 2)", fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_perception_gaps(gaps: dict[str, dict], path) -> None:
    """Figure 3: per word category, each student's attention KL from the teacher and the cosine distance of its hidden
    states (bars side by side, one colour per student, named in the legend). A category with no tokens in the
    responses is labelled as such instead of drawn as an empty bar."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4), dpi=100)
    categories = list(CATEGORIES)
    width = 0.8 / max(1, len(gaps))
    x = np.arange(len(categories))
    for panel, (key, title) in enumerate((("kl", "KL(teacher || student) of image attention"),
                                          ("cosine_distance", "cosine distance of hidden states"))):
        ax = axes[panel]
        for i, (name, gap) in enumerate(gaps.items()):
            values = [gap["per_category"][c][key] for c in categories]
            comparison = gap.get("cosine_through")
            label = name if key == "kl" else f"{name} ({comparison or 'not comparable'})"
            ax.bar(x + (i - (len(gaps) - 1) / 2) * width, [v if v is not None else 0.0 for v in values], width,
                   label=label)
        for j, category in enumerate(categories):
            if all(gap["per_category"][category]["tokens"] == 0 for gap in gaps.values()):
                ax.text(j, 0, "no tokens of\nthis category\nin the answers", ha="center", va="bottom", fontsize=6)
        ax.set_xticks(x, categories)
        ax.set_title(title, fontsize=8)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_entropy_histograms(entropies: dict[str, Sequence[float]], path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    for name, values in entropies.items():
        ax.hist(values, bins=min(20, max(3, len(values))), alpha=0.5, label=name)
    ax.set_xlabel("attention entropy H (equation 10)")
    ax.set_ylabel("samples")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_heatmaps(images, maps_by_model: dict[str, list], grids_by_model: dict[str, list], path,
                  boxes: Sequence | None = None) -> None:
    """Figure 5: each sample's image with each model's attention laid over it; the key region's box and a triangle
    at its centre where a box is known."""
    plt = _pyplot()
    names = list(maps_by_model)
    fig, axes = plt.subplots(len(images), len(names), figsize=(2.6 * len(names), 2.6 * len(images)), dpi=100,
                             squeeze=False)
    for r, image in enumerate(images):
        width, height = image.size
        for c, name in enumerate(names):
            rows, cols = grids_by_model[name][r]
            heat = normalise_map(maps_by_model[name][r]).reshape(rows, cols)
            heat = np.asarray(Image.fromarray((255 * heat / heat.max()).astype(np.uint8)).resize((width, height),
                                                                                               Image.BILINEAR))
            ax = axes[r][c]
            ax.imshow(image)
            ax.imshow(heat, cmap="jet", alpha=0.45)
            if boxes is not None and boxes[r] is not None:
                x1, y1, x2, y2 = boxes[r]
                ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="white", linewidth=1.5))
                ax.plot([(x1 + x2) / 2], [(y1 + y2) / 2], marker="^", color="white", markersize=8)
            ax.set_axis_off()
            if r == 0:
                ax.set_title(name, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def focus_of(maps, grids, images, boxes) -> list[float]:
    """S_focus of each map against its sample's box (None where a sample has no box)."""
    out = []
    for m, grid, image, box in zip(maps, grids, images, boxes):
        out.append(None if box is None else s_focus(m, box_to_token_mask(box, image.size, grid)))
    return out


# ----------------------------------------------------------------------------------------------------------------
# The whole analysis, as examples/analyze_attention.py and the quickstart's analysis stage run it
# ----------------------------------------------------------------------------------------------------------------

FIGURE_FILES = {"figure2": "figure2_accuracy_vs_focus.png", "figure3": "figure3_perception_gap.png",
                "figure4": "figure4_entropy.png", "figure5": "figure5_heatmaps.png"}


def focus_summary(focus: Sequence, correct: Sequence[bool], thresholds: Sequence[float]) -> dict[str, Any]:
    """One line of Figure 2: `focus_curve` of the samples that have an S_focus (None: no box), the mean S_focus of the
    right and of the wrong answers (None where there is none of a kind) and how many samples it reads."""
    pairs = [(f, bool(c)) for f, c in zip(focus, correct, strict=True) if f is not None]
    right = [f for f, c in pairs if c]
    wrong = [f for f, c in pairs if not c]
    return {"curve": focus_curve([f for f, _ in pairs], [c for _, c in pairs], thresholds),
            "mean_focus_correct": float(np.mean(right)) if right else None,
            "mean_focus_incorrect": float(np.mean(wrong)) if wrong else None,
            "samples": len(pairs)}


def model_attention(model, processor, rows: str, images, questions, boxes, references=None, judge=None,
                    max_new_tokens: int = 32, batch_size: int = 4, generated: dict | None = None) -> dict[str, Any]:
    """One model's attention while it answers (`answer_trajectories` with `rows`, reusing the answers of `generated`
    when given), each sample's S_focus on its box and entropy, and, given the `references` and a
    `judge(answer, reference) -> bool`, whether each answer is right.

    Returns the trajectories (`maps`, `grids`, `answers`, `answer_ids`) with `focus`, `entropies`, `correct` (None without
    references) and `statistics`: Table 2's `attention_statistics`, the mean `s_focus` over the samples with a box
    (None without any), `rows` and, with references, `accuracy` (%) over every sample.
    """
    if references is not None and judge is None:
        raise ValueError("Judging the answers against references needs a judge(answer, reference) -> bool.")
    run = answer_trajectories(model, processor, images, questions, max_new_tokens, rows, batch_size, generated)
    focus = focus_of(run["maps"], run["grids"], images, boxes)
    measured = [f for f in focus if f is not None]
    statistics = {**attention_statistics(run["maps"]), "s_focus": float(np.mean(measured)) if measured else None,
                  "rows": rows}
    correct = None
    if references is not None:
        correct = [bool(judge(answer, reference)) for answer, reference in zip(run["answers"], references, strict=True)]
        statistics["accuracy"] = 100 * float(np.mean(correct))
    return {**run, "focus": focus, "entropies": [attention_entropy(m) for m in run["maps"]], "correct": correct,
            "statistics": statistics}


def attention_analysis(models: dict[str, tuple], images, questions, boxes, output_dir, *, references=None,
                       judge=None, responses=None, focus_lines: dict[str, tuple] | None = None,
                       pooled_lines: dict[str, list[str]] | None = None,
                       gaps: dict[str, tuple[str, str]] | None = None, shown: list[str] | None = None,
                       heatmaps: int = 3, thresholds: Sequence[float] = (0.0, 0.1, 0.2), max_new_tokens: int = 32,
                       batch_size: int = 4, nlp=None, progress: bool = True) -> dict[str, Any]:
    """The paper's attention analyses of several models on one sample set, written as Figures 2-5 into `output_dir`.

    Args:
        models: name -> `(model, processor, rows)`, the query rows its maps read (`answer_trajectories`); one model
            may appear under two names with other rows (a LaViT student's answer and its latent tokens).
        images, questions, boxes: the samples (a box may be None: that sample has no S_focus).
        references, judge: each sample's reference (its answer, or whatever else the judge reads, such as the
            answer and its source) and `judge(answer, reference) -> bool`, to score each model's own answers (its
            accuracy over every sample, and the lines of `pooled_lines` over the samples with a box).
        responses: the teacher-forced responses the perception gap reads (needed with `gaps`).
        focus_lines: Figure 2 label -> `(focus, correct)` measured elsewhere (e.g. the teacher's, from LaViT-15K's
            flags).
        pooled_lines: Figure 2 label -> names of `models` whose own answers are pooled into one line (e.g. a
            method's seeds).
        gaps: Figure 3 label -> `(teacher name, student name)` of `models`.
        shown: the models of Figures 4 and 5 (default: all); heatmaps: how many samples Figure 5 shows (0: none).
        batch_size: samples per generation, per forced pass and per perception-gap pass.
    Returns:
        `{"per_model": name -> statistics (see `model_attention`), "figure2": label -> `focus_summary` (a pooled line
        also names its `runs`), "perception_gap": label -> {"per_category", "cosine_through"}, "figures": the file
        names written}`.
    Every argument is checked before a model runs or a file is written.
    """
    import sys

    from tqdm.auto import tqdm

    focus_lines, pooled_lines, gaps = focus_lines or {}, pooled_lines or {}, gaps or {}
    if not images:
        raise ValueError("No samples to analyse.")
    for what, values in (("questions", questions), ("boxes", boxes), ("references", references),
                         ("responses", responses)):
        if values is not None and len(values) != len(images):
            raise ValueError(f"{len(images)} images but {len(values)} {what}: give one per sample.")
    if references is not None and judge is None:
        raise ValueError("Judging the answers against references needs a judge(answer, reference) -> bool.")
    if pooled_lines and references is None:
        raise ValueError("Figure 2 lines pooled from the models' own answers need the references to judge them.")
    if gaps and responses is None:
        raise ValueError("The perception gap reads teacher-forced responses: pass `responses`.")
    repeated = sorted(set(focus_lines) & set(pooled_lines))
    if repeated:
        raise ValueError(f"Figure 2 labels {repeated} are both a given line and a pooled one; name them apart.")
    named = [name for line in pooled_lines.values() for name in line]
    named += [name for pair in gaps.values() for name in pair] + list(shown or [])
    unknown = sorted(set(named) - set(models))
    if unknown:
        raise ValueError(f"The analysis names models it was not given: {unknown} (given: {sorted(models)}).")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # redrawn every second on a terminal, every 30 s in a log file
    bar = tqdm(total=len(models) + len(gaps), desc="attention analysis", unit="model", disable=not progress,
               mininterval=1.0 if sys.stderr.isatty() else 30.0)
    measured = {}
    answered = {}  # a model listed under two names (other rows) answers once: (model, processor) -> its result
    for name, (model, processor, rows) in models.items():
        earlier = answered.get((id(model), id(processor)))
        measured[name] = model_attention(model, processor, rows, images, questions, boxes, references, judge,
                                         max_new_tokens, batch_size, generated=earlier)
        answered.setdefault((id(model), id(processor)), measured[name])
        bar.update()
    figures = []
    figure2 = {label: focus_summary(focus, correct, thresholds) for label, (focus, correct) in focus_lines.items()}
    for label, names in pooled_lines.items():
        pooled = focus_summary([value for name in names for value in measured[name]["focus"]],
                               [value for name in names for value in measured[name]["correct"]], thresholds)
        figure2[label] = {"curve": pooled.pop("curve"), "runs": list(names), **pooled}
    if figure2:
        plot_focus_curves(figure2, output_dir / FIGURE_FILES["figure2"])
        figures.append(FIGURE_FILES["figure2"])
    perception = {}
    for label, (teacher, student) in gaps.items():
        (teacher_model, teacher_processor, _), (student_model, student_processor, _) = models[teacher], models[student]
        gap = perception_gap(teacher_model, teacher_processor, student_model, student_processor, images, questions,
                             responses, nlp=nlp, batch_size=batch_size)
        perception[label] = {"per_category": gap["per_category"], "cosine_through": gap["cosine_through"]}
        bar.update()
    bar.close()
    if perception:
        plot_perception_gaps(perception, output_dir / FIGURE_FILES["figure3"])
        figures.append(FIGURE_FILES["figure3"])
    shown = list(shown or models)
    plot_entropy_histograms({name: measured[name]["entropies"] for name in shown}, output_dir / FIGURE_FILES["figure4"])
    figures.append(FIGURE_FILES["figure4"])
    count = min(heatmaps, len(images))
    if count > 0:
        plot_heatmaps(images[:count], {name: measured[name]["maps"][:count] for name in shown},
                      {name: measured[name]["grids"][:count] for name in shown}, output_dir / FIGURE_FILES["figure5"],
                      boxes[:count])
        figures.append(FIGURE_FILES["figure5"])
    return {"per_model": {name: result["statistics"] for name, result in measured.items()}, "figure2": figure2,
            "perception_gap": perception, "figures": figures}

__all__ = [
    "normalise_map",
    "attention_entropy",
    "salient_regions",
    "spread",
    "map_kl",
    "focus_curve",
    "word_category",
    "load_spacy",
    "token_categories",
    "attention_maps",
    "answer_trajectories",
    "perception_gap",
    "attention_statistics",
    "plot_focus_curves",
    "plot_perception_gaps",
    "plot_entropy_histograms",
    "plot_heatmaps",
    "focus_of",
    "focus_summary",
    "model_attention",
    "attention_analysis",
    "FIGURE_FILES",
    "FUNCTION_WORDS",
    "ATTRIBUTE_WORDS",
]
