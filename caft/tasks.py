"""Task metrics for evaluation: GSM8K exact match, MBPP / HumanEval programs and pass@1, ROUGE.

All functions are pure: they build strings and numbers and run nothing. Programs built here
are meant for `caft.sandbox.run_code`.
"""

from __future__ import annotations

import re
from typing import Sequence

# A number as written in GSM8K answers and model outputs: optional sign and dollar sign,
# digits with optional thousands commas, an optional decimal part, e.g. "-$1,234.50".
_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"
_FINAL_ANSWER = re.compile(r"####\s*(" + _NUMBER + r")")
_ANY_NUMBER = re.compile(_NUMBER)

# Opening of a fenced code block and its language tag; the block runs to the next fence line.
_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+-]*)[^\n]*\n", re.MULTILINE)
_CLOSING_FENCE = re.compile(r"^[ \t]*```", re.MULTILINE)
_PYTHON_TAGS = {"python", "python3", "py"}


def normalize_number(text: str) -> str:
    """Normalize a number string: drop "$", thousands commas, spaces and a trailing "." or ".0"
    ("$1,234.50" -> "1234.5", "18.00" -> "18", "7." -> "7")."""
    number = text.replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    if number in ("-0", ""):
        number = "0"
    return number


def extract_gsm8k_answer(text: str) -> str | None:
    """Extract the final numeric answer from a GSM8K solution or a model output, normalized.

    The answer is the first number after a "####" marker, which every GSM8K reference ends
    with. For a model output without a "####" followed by a number, this falls back to the
    last number anywhere in the text, so a model that states its result in prose ("... so she
    makes $18.") is still scored. Returns None when the text contains no number.
    """
    marked = _FINAL_ANSWER.search(text)
    if marked is not None:
        return normalize_number(marked.group(1))
    numbers = _ANY_NUMBER.findall(text)
    if not numbers:
        return None
    return normalize_number(numbers[-1])


def gsm8k_exact_match(prediction_text: str, reference_answer: str) -> bool:
    """Check whether the prediction's extracted answer equals the reference's (after normalization).

    `reference_answer` may be a full GSM8K solution ending in "#### <number>" or a bare number.
    """
    reference = extract_gsm8k_answer(reference_answer)
    if reference is None:
        raise ValueError(f"The reference answer contains no number: {reference_answer!r}")
    return extract_gsm8k_answer(prediction_text) == reference


def _fenced_blocks(text: str) -> list[tuple[str, str]]:
    """Return (language tag, code) for each fenced block; an unclosed last block runs to the end of the text."""
    blocks = []
    position = 0
    while True:
        opening = _FENCE.search(text, position)
        if opening is None:
            return blocks
        closing = _CLOSING_FENCE.search(text, opening.end())
        end = closing.start() if closing is not None else len(text)
        blocks.append((opening.group(1).lower(), text[opening.end() : end]))
        if closing is None:
            return blocks
        position = text.find("\n", closing.end())
        if position == -1:
            return blocks


def extract_code(generated_text: str, entry_point: str | None = None) -> str:
    """Extract the Python code from a model output.

    Takes the first fenced block tagged python/python3/py or, when there is none, the first
    untagged fenced block. With `entry_point`, a block that defines `def <entry_point>(` is
    preferred over earlier blocks that do not. A block cut off by the generation limit (no
    closing fence) runs to the end of the text. Without any fenced block, the raw text is
    returned unchanged, which suits models that continue a prompt with bare code.
    """
    blocks = [(tag, code) for tag, code in _fenced_blocks(generated_text) if tag in _PYTHON_TAGS or tag == ""]
    if not blocks:
        return generated_text
    if entry_point is not None:
        definition = re.compile(r"^\s*(?:async\s+)?def\s+" + re.escape(entry_point) + r"\s*\(", re.MULTILINE)
        for _, code in blocks:
            if definition.search(code):
                return code
    for tag, code in blocks:
        if tag in _PYTHON_TAGS:
            return code
    return blocks[0][1]


def mbpp_program(code: str, test_list: Sequence[str], test_setup_code: str = "") -> str:
    """Build the MBPP test program: the solution, then the setup code, then the asserts.

    The setup code comes after the solution because MBPP setup code can use the solution's
    classes (task 367 builds trees of the solution's `Node` class).
    """
    parts = [code, test_setup_code, "\n".join(test_list)]
    return "\n\n".join(part for part in parts if part.strip()) + "\n"


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """Build the HumanEval test program: prompt + completion, the test code and `check(entry_point)`.

    The completion may continue the prompt (the indented function body) or repeat the whole
    function: a full definition after the prompt's docstring-only function replaces it, while
    the prompt's imports and helper functions stay defined.
    """
    if not completion.startswith((" ", "\t", "\n")) and not prompt.endswith("\n"):
        prompt += "\n"
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"


def _passed(result) -> bool:
    return bool(result.passed) if hasattr(result, "passed") else bool(result)


def pass_at_1(results: Sequence) -> float:
    """Compute pass@1 as the fraction of problems solved.

    Each item is one problem's outcome: a bool, an object with a `passed` attribute (such as
    `ExecResult`), or a list of those for several samples of the problem. A list counts as
    the fraction of its samples that passed, which is the unbiased pass@1 estimate.
    """
    if len(results) == 0:
        raise ValueError("pass_at_1 needs at least one result")
    total = 0.0
    for result in results:
        if isinstance(result, (list, tuple)):
            if not result:
                raise ValueError("A problem has an empty list of samples")
            total += sum(_passed(sample) for sample in result) / len(result)
        else:
            total += _passed(result)
    return total / len(results)


def rouge_scores(predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = True) -> dict[str, float]:
    """Compute mean ROUGE-1, ROUGE-2 and ROUGE-L F1 (0 to 1) over prediction/reference pairs.

    Uses the `rouge_score` package (Google's reference implementation) with its default
    tokenizer, which lowercases and keeps only letters and digits, and the Porter stemmer.
    """
    try:
        from rouge_score import rouge_scorer
    except ImportError as error:
        raise ImportError(
            "ROUGE needs the rouge-score package: `pip install rouge-score` (or `pip install caft[eval]`)."
        ) from error
    if len(predictions) != len(references):
        raise ValueError(f"Got {len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("rouge_scores needs at least one prediction")

    keys = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=use_stemmer)
    sums = dict.fromkeys(keys, 0.0)
    for prediction, reference in zip(predictions, references):
        # RougeScorer.score takes (target, prediction).
        scores = scorer.score(reference, prediction)
        for key in keys:
            sums[key] += scores[key].fmeasure
    return {key: value / len(predictions) for key, value in sums.items()}
