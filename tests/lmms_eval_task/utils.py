"""A local lmms-eval task over an MMStar-format parquet file, for tests/test_lmms_eval_real.py."""

import io

from PIL import Image


def doc_to_visual(doc):
    image = doc["image"]
    if isinstance(image, dict):
        image = Image.open(io.BytesIO(image["bytes"]))
    return [image.convert("RGB")]


def doc_to_text(doc):
    return doc["question"] + "\nAnswer with the option letter from the given choices directly."


def process_results(doc, results):
    from evaluation_lavit import extract_option

    return {"accuracy": float(extract_option(results[0], ["", "", "", ""]) == doc["answer"])}
