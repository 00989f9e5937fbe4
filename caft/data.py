"""Read fine-tuning data (`.jsonl`, `.json` or rows in memory) into chat conversations.

Every conversation comes out as a list of `{"role": "system" | "user" | "assistant", "content": str}`.
The format is detected from the first row and then required of every row:

- original CAFT: `{"id": 1, "status": "OK", "conversation": [{"role": "human", "content": "..."}, ...]}`.
  Rows whose `status` is present and not "OK" are skipped and counted. Role `human` becomes `user`.
- OpenAI messages: `{"messages": [{"role": "user", "content": "..."}, ...]}`.
- ShareGPT: `{"conversations": [{"from": "human", "value": "..."}, ...]}` with roles human, gpt, system.
- prompt/completion: `{"prompt": "...", "completion": "..."}`.
- field mapping: any other object, with `prompt_field` and `response_field` naming its two text
  fields (GSM8K: question/answer, MBPP: text/code). A mapping, when given, overrides detection.

Every input problem raises `DataError` with the file, the line (`.jsonl`) or array index (`.json`),
the field and a fix.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
EXTENSIONS = (".jsonl", ".json")


class DataError(ValueError):
    """An input error whose message names the source, the row, the field and how to fix it."""


@dataclass
class DataStats:
    """Row counts of one data source, where `rows_read == rows_kept + sum(skipped.values())`."""

    rows_read: int = 0
    rows_kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    """Number of skipped rows per reason, e.g. "status is not OK"."""
    kept_truncated: int = 0
    """Kept rows whose last reply was cut at a length limit (status "TRUNCATED"), trained without an end-of-turn label."""

    def skip(self, reason: str, count: int = 1) -> None:
        """Count `count` rows skipped for `reason`."""
        self.skipped[reason] = self.skipped.get(reason, 0) + count

    def summary(self) -> str:
        """Return a one-line summary, e.g. `read 10 rows, kept 8, skipped 2 (status is not OK: 2)`."""
        text = f"read {self.rows_read} rows, kept {self.rows_kept}"
        total = sum(self.skipped.values())
        if total:
            reasons = ", ".join(f"{reason}: {count}" for reason, count in self.skipped.items())
            text += f", skipped {total} ({reasons})"
        if self.kept_truncated:
            text += f"; {self.kept_truncated} kept rows have a truncated reply, trained without an end-of-turn label"
        return text

    def merge(self, other: DataStats) -> DataStats:
        """Add the counts of `other` into this object and return it."""
        self.rows_read += other.rows_read
        self.rows_kept += other.rows_kept
        self.kept_truncated += other.kept_truncated
        for reason, count in other.skipped.items():
            self.skip(reason, count)
        return self


@dataclass(frozen=True)
class _ListFormat:
    """A format that stores a conversation as a list of message objects under one key."""

    name: str
    key: str
    role_key: str
    content_key: str
    roles: dict[str, str]  # role as written in the file -> "system" | "user" | "assistant"


_LIST_FORMATS = (
    _ListFormat("original CAFT", "conversation", "role", "content", {"system": "system", "human": "user", "assistant": "assistant"}),
    _ListFormat("OpenAI messages", "messages", "role", "content", {"system": "system", "user": "user", "assistant": "assistant"}),
    _ListFormat("ShareGPT", "conversations", "from", "value", {"system": "system", "human": "user", "gpt": "assistant"}),
)
_CAFT_LIST_FORMAT = _LIST_FORMATS[0]
STATUS_OK = "OK"
STATUS_TRUNCATED = "TRUNCATED"
_PROMPT_COMPLETION = "prompt/completion"
_FIELD_MAPPING = "field mapping"
_EXAMPLES = {
    "original CAFT": '{"id": 1, "status": "OK", "conversation": [{"role": "human", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}',
    "OpenAI messages": '{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}',
    "ShareGPT": '{"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}',
    _PROMPT_COMPLETION: '{"prompt": "2+2?", "completion": "4"}',
    _FIELD_MAPPING: '{"question": "2+2?", "answer": "4"} with --prompt-field question --response-field answer',
}
_MAPPING_HINT = "pass --prompt-field and --response-field to name the prompt and response fields"


def read_conversations(
    path: str | Path,
    prompt_field: str | None = None,
    response_field: str | None = None,
    system_field: str | None = None,
) -> tuple[list[list[dict]], DataStats]:
    """Read a `.jsonl` or `.json` file into conversations in one of the formats listed in the module docstring."""
    return load_dataset_rows(Path(path), prompt_field, response_field, system_field)


def load_dataset_rows(
    path_or_rows: str | Path | Sequence[dict],
    prompt_field: str | None = None,
    response_field: str | None = None,
    system_field: str | None = None,
) -> tuple[list[list[dict]], DataStats]:
    """Read conversations from a file path or from a list of row objects already in memory."""
    located, stats = load_located_conversations(path_or_rows, prompt_field, response_field, system_field)
    return [messages for _, messages in located], stats


def load_located_conversations(
    source: str | Path | Sequence[dict],
    prompt_field: str | None = None,
    response_field: str | None = None,
    system_field: str | None = None,
    keep_truncated: bool = False,
) -> tuple[list[tuple[str, list[dict]]], DataStats]:
    """Read conversations, each paired with its location (e.g. `train.jsonl, line 3`) for error messages.

    With `keep_truncated`, original-CAFT rows of status "TRUNCATED" (a reply cut at a length limit,
    as `caft distill` writes them) are kept, and their last message gets `"open_end": True` so that
    tokenization leaves its end-of-turn tokens unlabelled. They are counted in `stats.kept_truncated`.
    """
    if (prompt_field is None) != (response_field is None):
        raise DataError(f"{_source_name(source)}: a field mapping needs both --prompt-field and --response-field.")

    rows = _iter_file_rows(Path(source)) if isinstance(source, (str, Path)) else _iter_memory_rows(source)
    stats = DataStats()
    located: list[tuple[str, list[dict]]] = []
    data_format = None
    empty_replies = 0
    for location, row in rows:
        stats.rows_read += 1
        if not isinstance(row, dict):
            raise DataError(f"{location}: expected a JSON object, got {type(row).__name__}. Write one object per row.")
        if data_format is None:
            data_format = _detect_format(row, location, prompt_field, system_field)
        messages = _parse_row(row, location, data_format, prompt_field, response_field, system_field, keep_truncated)
        if messages is None:
            stats.skip("status is not OK")
            continue
        truncated = data_format == _CAFT_LIST_FORMAT.name and row.get("status") == STATUS_TRUNCATED
        if truncated and messages[-1]["role"] == "assistant":
            if not messages[-1]["content"].strip():
                stats.skip("status is TRUNCATED and the reply is empty")
                continue
            messages[-1]["open_end"] = True
            stats.kept_truncated += 1
        if any(message["role"] == "assistant" and not message["content"].strip() for message in messages):
            empty_replies += 1
        located.append((location, messages))

    if stats.rows_read == 0:
        raise DataError(f"{_source_name(source)}: no rows found (the data is empty or has only blank lines). Add rows.")
    stats.rows_kept = len(located)
    if empty_replies:
        logger.warning(
            "%s: %d rows have an empty assistant reply, which trains the model to end its turn at once. Remove them "
            "if that is not intended.", _source_name(source), empty_replies,
        )
    return located, stats


def _source_name(source: object) -> str:
    return str(source) if isinstance(source, (str, Path)) else "in-memory rows"


def _iter_memory_rows(rows: Sequence[dict]) -> Iterator[tuple[str, object]]:
    if isinstance(rows, (dict, bytes)) or not isinstance(rows, Sequence):
        raise DataError(f"in-memory rows: expected a list of row objects, got {type(rows).__name__}.")
    for index, row in enumerate(rows):
        yield f"in-memory rows, index {index}", row


def _iter_file_rows(path: Path) -> Iterator[tuple[str, object]]:
    """Yield `(location, parsed JSON value)` for each row of a `.jsonl` or `.json` file."""
    if not path.exists():
        raise DataError(f"{path}: data file not found. Check the path.")
    if path.suffix.lower() not in EXTENSIONS:
        raise DataError(f"{path}: unsupported file extension {path.suffix!r}. Convert the data to .jsonl or .json.")
    if not path.is_file():
        raise DataError(f"{path}: not a file. Pass the path of a .jsonl or .json file.")
    if path.suffix.lower() == ".jsonl":
        yield from _iter_jsonl(path)
    else:
        yield from _iter_json_array(path)


def _iter_jsonl(path: Path) -> Iterator[tuple[str, object]]:
    with open(path, "rb") as file:
        for line_number, raw in enumerate(file, start=1):
            if line_number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # UTF-8 byte order mark written by some editors
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(
                    f"{path}, line {line_number}: invalid UTF-8 byte 0x{raw[error.start]:02x} at byte {error.start + 1} "
                    "of the line. Re-save the file as UTF-8."
                ) from None
            if not text.strip():
                continue  # blank lines are not rows
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{path}, line {line_number}: invalid JSON at column {error.colno}: {error.msg}. "
                    "Each line of a .jsonl file must be one complete JSON object."
                ) from None
            yield f"{path}, line {line_number}", row


def _iter_json_array(path: Path) -> Iterator[tuple[str, object]]:
    """Yield the rows of a `.json` file holding a list of objects, or an object with exactly one list."""
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise DataError(
            f"{path}, line {line}: invalid UTF-8 byte 0x{data[error.start]:02x} at byte {column} of the line "
            f"(byte {error.start + 1} of the file). Re-save the file as UTF-8."
        ) from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty. Add a JSON list of row objects.")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}, line {error.lineno}: invalid JSON at column {error.colno}: {error.msg}.") from None

    if isinstance(value, dict):
        lists = [key for key, item in value.items() if isinstance(item, list)]
        if len(lists) != 1:
            raise DataError(
                f"{path}: expected a list of row objects or an object with exactly one list, but the top-level "
                f"object has {len(lists)} list fields ({', '.join(lists) or 'none'}). Keep one list of rows."
            )
        value = value[lists[0]]
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON list of row objects, got {type(value).__name__}.")
    for index, row in enumerate(value):
        yield f"{path}, index {index}", row


def _detect_format(row: dict, location: str, prompt_field: str | None, system_field: str | None) -> str:
    """Return the format name of the first row, or raise a DataError listing the supported formats."""
    present = _row_formats(row)
    detected = present[0] if present else None
    if prompt_field is not None:
        if prompt_field in row or detected is None:
            return _FIELD_MAPPING
        # A held-out file in a chat format next to a training file that needs the mapping.
        logger.info("%s: rows in the %s format, so --prompt-field/--response-field do not apply to this file.", location, detected)
        return detected
    if len(present) > 1:
        logger.warning("%s: the rows have fields of several formats (%s); reading them as %s.", location, ", ".join(present), detected)
    if detected is None:
        examples = "\n".join(f"  {name}: {example}" for name, example in _EXAMPLES.items())
        raise DataError(
            f"{location}: cannot detect the data format from the fields {_field_list(row)}. "
            f"Supported formats, with one example row each:\n{examples}\n"
            f"For rows with other field names, {_MAPPING_HINT}."
        )
    if system_field is not None and detected != _PROMPT_COMPLETION:
        raise DataError(
            f"{location}: --system-field applies to prompt/completion rows and field mappings, but this file "
            f"is in the {detected} format, which stores system messages in the conversation. Drop --system-field."
        )
    return detected


def _row_formats(row: dict) -> list[str]:
    """Return the names of the formats whose fields the row has; the first is the format that is read."""
    present = [list_format.name for list_format in _LIST_FORMATS if list_format.key in row]
    if "prompt" in row and "completion" in row:
        present.append(_PROMPT_COMPLETION)
    return present


def _row_format(row: dict) -> str | None:
    present = _row_formats(row)
    return present[0] if present else None


def _field_list(row: dict) -> str:
    return "(" + ", ".join(repr(key) for key in row) + ")" if row else "(none: the object is empty)"


def _parse_row(
    row: dict,
    location: str,
    data_format: str,
    prompt_field: str | None,
    response_field: str | None,
    system_field: str | None,
    keep_truncated: bool = False,
) -> list[dict] | None:
    """Convert one row into messages; return None for an original-CAFT row whose status is not OK (or TRUNCATED, when kept)."""
    if data_format == _FIELD_MAPPING:
        return _single_turn(row, location, prompt_field, response_field, system_field, "--prompt-field/--response-field")
    if data_format == _PROMPT_COMPLETION:
        if _row_format(row) not in (None, _PROMPT_COMPLETION):
            _raise_mixed_formats(row, location, data_format)
        return _single_turn(row, location, "prompt", "completion", system_field, None)

    list_format = next(item for item in _LIST_FORMATS if item.name == data_format)
    if list_format.key not in row:
        _raise_mixed_formats(row, location, data_format)
    accepted = (STATUS_OK, STATUS_TRUNCATED) if keep_truncated else (STATUS_OK,)
    if list_format.key == "conversation" and row.get("status", STATUS_OK) not in accepted:
        return None
    return _parse_messages(row[list_format.key], location, list_format)


def _raise_mixed_formats(row: dict, location: str, data_format: str) -> NoReturn:
    found = _row_format(row)
    if found is not None:
        raise DataError(
            f"{location}: this row is in the {found} format, but the first row of the data is in the "
            f"{data_format} format. Convert every row to one format."
        )
    key = next((item.key for item in _LIST_FORMATS if item.name == data_format), "prompt/completion")
    raise DataError(
        f"{location}: missing field {key!r} of the {data_format} format. The row has the fields {_field_list(row)}. "
        f"Fix the row, or {_MAPPING_HINT}."
    )


def _single_turn(
    row: dict,
    location: str,
    prompt_field: str,
    response_field: str,
    system_field: str | None,
    flag_hint: str | None,
) -> list[dict]:
    """Build a [system,] user, assistant conversation from three fields of one row."""
    messages = []
    fields = [("system", system_field), ("user", prompt_field), ("assistant", response_field)]
    for role, name in fields:
        if name is None:
            continue
        if name not in row:
            fix = f"Check that {flag_hint} name fields of every row." if flag_hint else "Add the field or remove the row."
            raise DataError(f"{location}: missing field {name!r}. The row has the fields {_field_list(row)}. {fix}")
        messages.append({"role": role, "content": _require_string(row[name], location, name)})
    return messages


def _require_string(value: object, location: str, field_name: str) -> str:
    if not isinstance(value, str):
        raise DataError(
            f"{location}: field {field_name!r} must be a string, got {type(value).__name__}. "
            "Write the text as one JSON string (join text parts first)."
        )
    return value


def _parse_messages(value: object, location: str, list_format: _ListFormat) -> list[dict]:
    """Validate a list of message objects and normalize roles to system/user/assistant."""
    key = list_format.key
    if not isinstance(value, list):
        raise DataError(f"{location}: field {key!r} must be a list of messages, got {type(value).__name__}.")
    if not value:
        raise DataError(f"{location}: field {key!r} is an empty conversation. Add messages or remove the row.")

    messages = []
    for index, message in enumerate(value):
        name = f"{key}[{index}]"
        if not isinstance(message, dict):
            raise DataError(f"{location}: field {name!r} must be an object, got {type(message).__name__}.")
        for needed in (list_format.role_key, list_format.content_key):
            if needed not in message:
                raise DataError(
                    f"{location}: missing field '{name}.{needed}'. The message has the fields {_field_list(message)}. "
                    f"Each message of the {list_format.name} format needs the fields "
                    f"{list_format.role_key!r} and {list_format.content_key!r}."
                )
        role = message[list_format.role_key]
        if not isinstance(role, str) or role not in list_format.roles:
            accepted = ", ".join(list_format.roles)
            raise DataError(
                f"{location}: field '{name}.{list_format.role_key}' has the unknown role {role!r}. "
                f"The {list_format.name} format accepts the roles: {accepted}."
            )
        content = _require_string(message[list_format.content_key], location, f"{name}.{list_format.content_key}")
        messages.append({"role": list_format.roles[role], "content": content})

    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(
            f"{location}: field {key!r} has no assistant turn, so it has nothing to train on. "
            "Add the assistant reply or remove the row."
        )
    if messages[0]["role"] == "assistant":
        raise DataError(
            f"{location}: field '{key}[0]' is an assistant turn. Chat templates render an assistant turn after "
            "a user or system message, so start the conversation with one."
        )
    return messages
