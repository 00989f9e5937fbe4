"""Tokenize conversations with the tokenizer's chat template and label the assistant turns.

Labels equal `input_ids` on the tokens of every assistant turn and are -100 elsewhere, so the
loss covers only what the model should generate. Masks come from renders, never from searching
the text: for an assistant turn at index i the template renders `messages[:i]` with the
generation prompt and `messages[:i + 1]` without it, and the text between the two renders is
the turn. Each render must start with the previous one (the template must not rewrite earlier
turns), otherwise `ChatTemplateError` names the template. Each piece between two renders is
tokenized on its own, so the tokens of a shorter render are always a prefix of the tokens of a
longer one, and a reply starts on a token boundary, as it does in generation. Tokenizing the
whole text at once can instead merge the end of a prompt with the start of the reply (a GPT-2
style pre-tokenizer splits "\n\n" differently before a word and at the end of the text).

End-of-turn rule: a turn's labels cover its content and the end-of-turn token (`<|im_end|>` in
ChatML, `<|eot_id|>` in Llama 3, `<end_of_turn>` in Gemma, the eos token in Mistral). Whitespace
that the template writes after that token (ChatML and Gemma write "\\n") gets -100, because
generation stops at the end-of-turn token and never produces it. The end-of-turn token is the
last special token of the turn; a turn without a special token is labelled whole.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path

import jinja2

from caft.data import DataError, DataStats, load_located_conversations

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of positions that the loss skips (the default `ignore_index` of PyTorch's cross-entropy)."""


class ChatTemplateError(DataError):
    """A chat template that is missing, fails to render a conversation, or rewrites earlier turns."""


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int, *, chat_template: str | None = None) -> dict | None:
    """Tokenize one conversation and label its assistant turns by the rules in the module docstring.

    Returns `{"input_ids": list[int], "labels": list[int]}` cut to the first `max_length` tokens,
    or None when no labelled token is left after the cut. `chat_template` (a Jinja string)
    overrides the tokenizer's template.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}.")
    _require_chat_template(tokenizer, chat_template)
    end_of_turn_ids = _special_token_ids(tokenizer)

    input_ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if index == 0:
            raise ValueError("The first message is an assistant turn. A chat template needs a user or system message before it.")
        prompt = _render(tokenizer, messages[:index], chat_template, add_generation_prompt=True)
        turn = _render(tokenizer, messages[: index + 1], chat_template, add_generation_prompt=False)

        prompt_ids = _tokenize_extension(tokenizer, chat_template, rendered, prompt, index)
        turn_ids = _tokenize_extension(tokenizer, chat_template, prompt, turn, index)
        input_ids += prompt_ids + turn_ids
        turn_labels = _label_turn(tokenizer, turn_ids, end_of_turn_ids)
        if message.get("open_end"):
            turn_labels = _unlabel_end_of_turn(turn_labels, end_of_turn_ids)
        labels += [IGNORE_INDEX] * len(prompt_ids) + turn_labels
        rendered = turn

    if _tokenizer_adds_bos(tokenizer) and input_ids[:1] != [tokenizer.bos_token_id]:
        input_ids.insert(0, tokenizer.bos_token_id)
        labels.insert(0, IGNORE_INDEX)

    input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": input_ids, "labels": labels}


def build_dataset(
    source: str | Path | Sequence[dict],
    tokenizer,
    max_length: int,
    size: int | None = None,
    seed: int = 0,
    prompt_field: str | None = None,
    response_field: str | None = None,
    system_field: str | None = None,
    *,
    chat_template: str | None = None,
    keep_truncated: bool = False,
) -> tuple[list[dict], DataStats]:
    """Read `source` (a file path or rows in memory) and tokenize every conversation.

    Without `size` the examples keep the order of the source. With `size`, the conversations are
    shuffled with `random.Random(seed)` and the first `size` that keep a label after truncation
    are returned; the rest count as skipped. With `keep_truncated`, rows of status "TRUNCATED" are
    kept without a label on their last end-of-turn tokens (see `load_located_conversations`).
    Raises DataError when no example is left.
    """
    if size is not None and size < 1:
        raise ValueError(f"size must be at least 1 (or None for all rows), got {size}.")
    _require_chat_template(tokenizer, chat_template)
    located, stats = load_located_conversations(source, prompt_field, response_field, system_field, keep_truncated)
    stats.kept_truncated = 0

    order = list(range(len(located)))
    if size is not None:
        random.Random(seed).shuffle(order)

    examples = []
    truncated_reason = f"no label left after truncation to {max_length} tokens"
    for position, index in enumerate(order):
        if size is not None and len(examples) == size:
            stats.skip(f"not selected (size={size})", len(order) - position)
            break
        location, messages = located[index]
        try:
            example = tokenize_conversation(tokenizer, messages, max_length, chat_template=chat_template)
        except ChatTemplateError as error:
            raise ChatTemplateError(f"{location}: {error}") from None
        if example is None:
            stats.skip(truncated_reason)
            continue
        examples.append(example)
        stats.kept_truncated += bool(messages[-1].get("open_end"))
    stats.rows_kept = len(examples)

    name = str(source) if isinstance(source, (str, Path)) else "in-memory rows"
    problems = {reason: count for reason, count in stats.skipped.items() if not reason.startswith("not selected")}
    if problems:
        logger.warning("Skipped %d of %d rows of %s: %s", sum(problems.values()), stats.rows_read, name, problems)
    if not examples:
        hint = f" Raise the maximum length (-maxlen) above {max_length}." if truncated_reason in stats.skipped else ""
        raise DataError(f"{name}: no usable rows left ({stats.summary()}).{hint}")
    if size is not None and len(examples) < size:
        logger.warning("%s: size=%d requested but only %d rows are usable", name, size, len(examples))
    return examples, stats


def _template_name(tokenizer, chat_template: str | None) -> str:
    if chat_template is not None:
        return "the chat template passed as chat_template"
    return f"the chat template of {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__}"


def _require_chat_template(tokenizer, chat_template: str | None) -> None:
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ChatTemplateError(
            f"The tokenizer of {name} has no chat template. Use a chat or instruct model, "
            "or pass a Jinja chat template (chat_template=..., or set tokenizer.chat_template)."
        )


def _render(tokenizer, messages: list[dict], chat_template: str | None, add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except (jinja2.TemplateError, ValueError, TypeError) as error:
        raise ChatTemplateError(f"{_template_name(tokenizer, chat_template)} failed to render the conversation: {error}") from None


def _tokenize_extension(tokenizer, chat_template: str | None, shorter: str, longer: str, index: int) -> list[int]:
    """Tokenize the text that `longer` adds to `shorter`, after checking that it starts with `shorter`."""
    if not longer.startswith(shorter):
        offset = next((i for i, (a, b) in enumerate(zip(shorter, longer)) if a != b), min(len(shorter), len(longer)))
        raise ChatTemplateError(
            f"{_template_name(tokenizer, chat_template)} rewrites earlier text when the conversation grows to the "
            f"assistant turn at message {index}: the renders differ from character {offset} "
            f"({shorter[offset:offset + 40]!r} became {longer[offset:offset + 40]!r}). Labels are built from "
            "growing renders, so use a template that renders earlier turns unchanged."
        )
    # NOTE: special-token strings inside message contents become special tokens here, as in apply_chat_template.
    return tokenizer(longer[len(shorter):], add_special_tokens=False)["input_ids"]


def _special_token_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(index for index, token in tokenizer.added_tokens_decoder.items() if token.special)
    return ids


def _label_turn(tokenizer, turn_ids: list[int], end_of_turn_ids: set[int]) -> list[int]:
    """Label a turn up to its last special token; whitespace-only tokens after that token get -100."""
    last_special = max((i for i, token in enumerate(turn_ids) if token in end_of_turn_ids), default=None)
    if last_special is None:
        return list(turn_ids)
    trailing = turn_ids[last_special + 1 :]
    if tokenizer.decode(trailing).strip():
        return list(turn_ids)  # text follows the special token, so it is not an end-of-turn marker
    return turn_ids[: last_special + 1] + [IGNORE_INDEX] * len(trailing)


def _unlabel_end_of_turn(labels: list[int], end_of_turn_ids: set[int]) -> list[int]:
    """Set the label of a turn's first special token and of every token after it to -100 (a cut reply has no end)."""
    first_special = next((i for i, token in enumerate(labels) if token in end_of_turn_ids), len(labels))
    return labels[:first_special] + [IGNORE_INDEX] * (len(labels) - first_special)


def _tokenizer_adds_bos(tokenizer) -> bool:
    """Return whether plain tokenizer calls prepend BOS, i.e. the model expects it at position 0."""
    if tokenizer.bos_token_id is None:
        return False
    return tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]
