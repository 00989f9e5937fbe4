"""`caft distill`: write the base model's own answers to a set of prompts, the training data of its heads.

    caft distill -model smollm2 --prompts prompts.jsonl --out distilled.jsonl --max-new-tokens 256 --batch-size 32

Auxiliary heads are trained on text the base model itself would write (self-distillation), so that
head k learns the model's own token t+1+k. The prompts come in any format `caft.data` reads,
with or without answers: each conversation is cut after its last user turn and the model's reply,
generated with its chat template, takes the place of whatever followed. Earlier turns are kept
as they are. Rows in the field-mapping format need only `--prompt-field`.

Output: one JSON object per line in the original CAFT format,
`{"id": ..., "status": "OK" | "TRUNCATED", "conversation": [{"role": "system" | "human" | "assistant", "content": ...}],
"generated_tokens": n}`. The id is the row's `id` field, else its `task_id` field, else its line
number (index for `.json`). `status` is "TRUNCATED" when the reply reached --max-new-tokens
without an end-of-turn token. `caft train-heads` skips such rows and counts them, because
training would otherwise put an end-of-turn label after a cut reply.

Resume: rerunning the same command skips the ids already in the output. Each finished batch is
appended with flush and fsync, so an interrupted run loses at most the batch in flight. A torn
last line (a crash during a write) is cut off on restart. The generation settings are stored in
`<out>.settings.json`, and a rerun with other settings is rejected, so that one file never mixes two settings.

Sampling draws each prompt's tokens from its own generator, seeded from --seed and the prompt id.
A reply therefore does not depend on which prompts share its batch or on where a run was resumed,
up to floating-point differences between batch compositions.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import STATUS_OK, STATUS_TRUNCATED

logger = logging.getLogger(__name__)

_OUTPUT_ROLES = {"system": "system", "user": "human", "assistant": "assistant"}
# Settings that change the generated replies. A resumed run must use the same ones.
_SETTING_KEYS = ("model", "prompts", "prompt_field", "max_new_tokens", "greedy", "temperature", "top_p", "seed", "dtype")
# Values of settings added after the first release, for settings files written without them.
_SETTING_DEFAULTS = {"dtype": "float32"}


@dataclass
class Prompt:
    """One prompt: its id, the messages up to the last user turn, and its location in the input file."""

    id: object
    messages: list[dict]
    location: str


# Reading prompts -------------------------------------------------------------------------------


def read_prompts(path: str | Path, prompt_field: str | None = None) -> list[Prompt]:
    """Read prompts from a file in any `caft.data` format and cut each conversation after its last user turn.

    Conversations without an assistant turn are accepted (they are prompts). Raises DataError
    naming the file and line for invalid rows and for duplicate ids.
    """
    from .data import DataError, _iter_file_rows, load_located_conversations

    path = Path(path)
    located_rows = list(_iter_file_rows(path))
    locations = [location for location, _ in located_rows]
    prepared = [_with_placeholder_reply(row) for _, row in located_rows]
    # caft.data requires a response field in a field mapping. The prompt field is passed in its place
    # because the reply is replaced anyway.
    response_field = prompt_field
    try:
        conversations, _stats = load_located_conversations(prepared, prompt_field, response_field)
    except DataError as error:
        raise DataError(_file_locations(str(error), locations)) from None

    skipped = len(located_rows) - len(conversations)
    if skipped:
        logger.warning("%s: skipped %d rows whose status is not OK", path, skipped)
    prompts: list[Prompt] = []
    seen: dict[str, str] = {}
    for memory_location, messages in conversations:
        index = int(memory_location.rsplit(" ", 1)[1])
        location, row = located_rows[index]
        last_user = max((i for i, message in enumerate(messages) if message["role"] == "user"), default=None)
        if last_user is None:
            raise DataError(f"{location}: the conversation has no user turn, so there is no prompt to reply to. Add a user message.")
        prompt_id = _row_id(row, location)
        key = id_key(prompt_id)
        if key in seen:
            raise DataError(f"{location}: duplicate id {prompt_id!r}, first seen at {seen[key]}. Give every row its own id.")
        seen[key] = location
        prompts.append(Prompt(prompt_id, messages[: last_user + 1], location))
    return prompts


def _with_placeholder_reply(row: object) -> object:
    """Append an empty assistant turn to a chat-format row without one, so that `caft.data` accepts it as a prompt."""
    if not isinstance(row, dict):
        return row
    formats = (("conversation", "role", "content", "assistant"), ("messages", "role", "content", "assistant"),
               ("conversations", "from", "value", "gpt"))
    for key, role_key, content_key, assistant in formats:
        messages = row.get(key)
        if not isinstance(messages, list):
            continue
        if messages and all(isinstance(m, dict) and m.get(role_key) != assistant for m in messages):
            return {**row, key: [*messages, {role_key: assistant, content_key: ""}]}
        return row
    return row


def _file_locations(message: str, locations: list[str]) -> str:
    """Replace `in-memory rows, index i` in a caft.data message with the file location of row i."""
    return re.sub(r"in-memory rows, index (\d+)", lambda match: locations[int(match.group(1))], message)


def _row_id(row: dict, location: str) -> object:
    for name in ("id", "task_id"):
        if name in row:
            value = row[name]
            if not isinstance(value, (str, int)) or isinstance(value, bool):
                raise ValueError(f"{location}: field {name!r} must be a string or an integer, got {type(value).__name__}.")
            return value
    return int(location.rsplit(" ", 1)[1])


def id_key(prompt_id: object) -> str:
    """Return the JSON text of an id, the key that compares ids read back from the output (1 and "1" stay distinct)."""
    return json.dumps(prompt_id)


# Output file ---------------------------------------------------------------------------------------


def repair_and_read_ids(out_path: Path) -> set[str]:
    """Return the id keys already in `out_path`, first cutting off a torn last line.

    Only the last line can be torn, because rows are appended in order. A complete line that
    is not a JSON object with an id is not a crash artefact, so it raises DataError instead.
    """
    from .data import DataError

    if not out_path.exists():
        return set()
    data = out_path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        logger.warning(
            "%s: the last line is incomplete (%d bytes, a crash during a write); removing it, its prompt is answered again",
            out_path, len(data) - end,
        )
        with open(out_path, "r+b") as file:
            file.truncate(end)
            file.flush()
            os.fsync(file.fileno())
    ids: set[str] = set()
    for line_number, line in enumerate(data[:end].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{out_path}, line {line_number}: invalid JSON ({error.msg}). Fix or delete the line, or pass a new --out."
            ) from None
        if not isinstance(row, dict) or "id" not in row:
            raise DataError(f"{out_path}, line {line_number}: expected an object with an 'id' field. Pass a new --out.")
        ids.add(id_key(row["id"]))
    return ids


def check_settings(out_path: Path, settings: dict) -> None:
    """Store the generation settings beside the output, or check them against those of the earlier run."""
    settings_path = out_path.with_name(out_path.name + ".settings.json")
    if settings_path.is_file():
        stored = json.loads(settings_path.read_text(encoding="utf-8"))
        stored, settings = {**_SETTING_DEFAULTS, **stored}, {**_SETTING_DEFAULTS, **settings}
        changed = [f"{key}: {stored.get(key)!r} -> {settings.get(key)!r}" for key in _SETTING_KEYS if stored.get(key) != settings.get(key)]
        if changed:
            raise ValueError(
                f"{out_path} was written with other settings ({'; '.join(changed)}). Rerun with the same flags "
                f"to resume it, or pass a new --out."
            )
        return
    if out_path.exists() and out_path.stat().st_size > 0:
        raise ValueError(f"{out_path} exists but {settings_path.name} is missing, so it cannot be resumed safely. Pass a new --out.")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    settings_path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def append_rows(out_path: Path, rows: list[dict]) -> None:
    """Append rows as JSON lines in one write, then flush and fsync so that a crash keeps them."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    with open(out_path, "ab") as file:
        file.write(text.encode("utf-8"))
        file.flush()
        os.fsync(file.fileno())


def output_row(prompt: Prompt, reply: str, status: str, generated_tokens: int) -> dict:
    conversation = [{"role": _OUTPUT_ROLES[m["role"]], "content": m["content"]} for m in prompt.messages]
    conversation.append({"role": "assistant", "content": reply})
    return {"id": prompt.id, "status": status, "conversation": conversation, "generated_tokens": generated_tokens}


# Generation ------------------------------------------------------------------------------------


@dataclass
class Sampling:
    """Decoding settings: greedy, or temperature and top-p sampling seeded per prompt."""

    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


def prompt_generator(seed: int, prompt_id: object, device) -> torch.Generator:
    """A generator seeded from the run seed and the prompt id, independent of batching and resumes."""
    generator = torch.Generator(device=device)
    generator.manual_seed(zlib.crc32(f"{seed}:{id_key(prompt_id)}".encode("utf-8")))
    return generator


def next_tokens(logits: torch.Tensor, sampling: Sampling, generators: list[torch.Generator]) -> torch.Tensor:
    """Pick one token per row from (B, V) logits: the argmax, or a sample after temperature and top-p."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)  # (B, V)
    if sampling.top_p < 1.0:
        sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is below top_p.
        keep = (sorted_probs.cumsum(dim=-1) - sorted_probs) < sampling.top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(-1, sorted_ids, sorted_probs)
    rows = [torch.multinomial(probs[i], 1, generator=generators[i]) for i in range(probs.shape[0])]
    return torch.cat(rows)


def _render_prompt(tokenizer, prompt: Prompt) -> str:
    """Render a prompt with the chat template and the generation prompt. The text already contains any BOS token."""
    return tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)


def generate_replies(
    model, tokenizer, prompts: list[Prompt], max_new_tokens: int, sampling: Sampling, stop_ids: list[int], on_step=None
):
    """Generate one reply per prompt with a KV cache; return per prompt (token ids, whether it stopped).

    The batch is left-padded and position ids count only real tokens, as `model.generate` does.
    Rows that emit a stop token leave the batch (their KV cache rows are dropped), so the
    remaining rows run faster. The stop token is not part of the returned ids. `on_step(n)`, when
    given, is called after each decoding step with the number of tokens that step added.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    encoded = [tokenizer(_render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(ids) for ids in encoded)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in encoded], device=device)  # (B, T)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    generators = [prompt_generator(sampling.seed, p.id, device) for p in prompts]
    stop = torch.tensor(stop_ids, device=device)

    generated: list[list[int]] = [[] for _ in prompts]
    stopped = [False] * len(prompts)
    active = list(range(len(prompts)))  # prompt index of each batch row
    cache = DynamicCache(config=model.config)
    step_ids, step_positions = input_ids, position_ids
    for _ in range(max_new_tokens):
        logits = model(
            input_ids=step_ids, attention_mask=attention_mask, position_ids=step_positions, cache=cache, use_cache=True
        ).logits[:, -1]  # (B, V)
        tokens = next_tokens(logits, sampling, [generators[i] for i in active])  # (B,)
        finished = torch.isin(tokens, stop)
        if on_step is not None:
            on_step(int((~finished).sum()))
        for row, index in enumerate(active):
            if finished[row]:
                stopped[index] = True
            else:
                generated[index].append(int(tokens[row]))
        if finished.all():
            break
        if finished.any():
            keep = (~finished).nonzero(as_tuple=True)[0]
            cache.batch_select_indices(keep)
            active = [active[row] for row in keep.tolist()]
            tokens, attention_mask, step_positions = tokens[keep], attention_mask[keep], step_positions[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], 1))], dim=1)
        step_positions = step_positions[:, -1:] + 1  # (B, 1)
        step_ids = tokens[:, None]
    return [(ids, done) for ids, done in zip(generated, stopped)]


def distill(
    model,
    tokenizer,
    prompts: list[Prompt],
    out_path: str | Path,
    *,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    sampling: Sampling | None = None,
    settings: dict | None = None,
    show_progress: bool = True,
) -> dict:
    """Answer every prompt whose id is not yet in `out_path` and append the rows batch by batch.

    Returns counts: `prompts`, `already_done`, `written`, `truncated`, `generated_tokens`, `seconds`.
    """
    from tqdm.auto import tqdm

    from .evaluate import _stop_token_ids

    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"--max-new-tokens and --batch-size must be at least 1, got {max_new_tokens} and {batch_size}.")
    if tokenizer.chat_template is None:
        raise ValueError(f"The tokenizer {tokenizer.name_or_path!r} has no chat template; distillation needs a chat model.")
    sampling = sampling or Sampling()
    out_path = Path(out_path)
    check_settings(out_path, settings or {})
    done = repair_and_read_ids(out_path)
    pending = [p for p in prompts if id_key(p.id) not in done]
    # Longest prompts first, so that each batch contains prompts of similar length and little padding.
    lengths = [len(tokenizer(_render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"]) for p in pending]
    order = sorted(range(len(pending)), key=lambda i: -lengths[i])
    pending = [pending[i] for i in order]
    stop_ids = _stop_token_ids(model, tokenizer)
    counts = {"prompts": len(prompts), "already_done": len(prompts) - len(pending), "written": 0, "truncated": 0,
              "generated_tokens": 0, "seconds": 0.0}
    if counts["already_done"]:
        logger.info("Resuming %s: %d of the %d prompts are done, generating the other %d", out_path, counts["already_done"], len(prompts), len(pending))

    start = time.perf_counter()
    step_tokens = 0  # tokens generated so far, counted step by step for the rate shown in the progress bar

    def show_rate(new_tokens: int) -> None:
        nonlocal step_tokens
        step_tokens += new_tokens
        rate = step_tokens / max(time.perf_counter() - start, 1e-9)
        bar.set_postfix(tok_s=f"{rate:.1f}", truncated=counts["truncated"])

    model.eval()
    with torch.inference_mode(), tqdm(total=len(pending), desc="distill", unit="prompt", disable=not show_progress) as bar:
        for first in range(0, len(pending), batch_size):
            batch = pending[first : first + batch_size]
            results = generate_replies(model, tokenizer, batch, max_new_tokens, sampling, stop_ids, on_step=show_rate)
            rows = []
            for prompt, (ids, stopped) in zip(batch, results):
                status = STATUS_OK if stopped else STATUS_TRUNCATED
                reply = tokenizer.decode(ids, skip_special_tokens=True)
                rows.append(output_row(prompt, reply, status, len(ids)))
                counts["truncated"] += not stopped
                counts["generated_tokens"] += len(ids)
            append_rows(out_path, rows)
            counts["written"] += len(rows)
            bar.update(len(batch))
    counts["seconds"] = round(time.perf_counter() - start, 1)
    return counts


# Command line -----------------------------------------------------------------------------------


def register(subparsers) -> None:
    parser = subparsers.add_parser("distill", help="Write the base model's own answers to prompts (training data for heads).")
    parser.add_argument("--model", "-model", default="smollm2", help="Base model: hub id, folder, or 'smollm2' (default: %(default)s).")
    parser.add_argument("--prompts", required=True, help="Prompts in any format caft reads (.jsonl or .json); answers present are replaced.")
    parser.add_argument("--prompt-field", default=None, help="JSON field holding the prompt, for rows in no chat format (e.g. question).")
    parser.add_argument("--out", required=True, help="Output .jsonl (original CAFT format); an existing one is resumed.")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="Maximum reply length in tokens (default: %(default)s).")
    parser.add_argument("--batch-size", type=int, default=16, help="Prompts generated together (default: %(default)s).")
    decoding = parser.add_mutually_exclusive_group()
    decoding.add_argument("--greedy", action="store_true", help="Greedy decoding (the default unless --temperature is given).")
    decoding.add_argument("--temperature", type=float, default=None, help="Sample with this temperature instead of greedy decoding.")
    parser.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling mass, with --temperature (default: %(default)s).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the per-prompt sampling generators (default: %(default)s).")
    parser.add_argument("--limit", type=int, default=None, help="Use only the first N prompts of the file (counting those already done).")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="Model weight dtype (default: %(default)s).")
    parser.set_defaults(handler=_command_distill)


def _command_distill(args: argparse.Namespace) -> int:
    from .assets import resolve_model_name
    from .loading import load_model, load_tokenizer

    if args.temperature is not None and args.temperature <= 0:
        raise ValueError(f"--temperature must be positive, got {args.temperature}; use --greedy for greedy decoding.")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}.")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}.")
    greedy = args.temperature is None
    if greedy and args.top_p != 1.0:
        raise ValueError("--top-p applies to sampling; pass --temperature too, or drop --top-p.")
    sampling = Sampling(greedy=greedy, temperature=args.temperature or 1.0, top_p=args.top_p, seed=args.seed)

    prompts = read_prompts(args.prompts, args.prompt_field)
    if args.limit is not None:
        prompts = prompts[: args.limit]
    settings = {
        "model": args.model, "prompts": str(Path(args.prompts).resolve()), "prompt_field": args.prompt_field,
        "max_new_tokens": args.max_new_tokens, "greedy": greedy, "temperature": None if greedy else args.temperature,
        "top_p": None if greedy else args.top_p, "seed": args.seed, "dtype": args.dtype,
    }
    tokenizer = load_tokenizer(args.model)
    model = load_model(resolve_model_name(args.model), dtype=args.dtype)
    counts = distill(model, tokenizer, prompts, args.out, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                     sampling=sampling, settings=settings)
    rate = counts["generated_tokens"] / counts["seconds"] if counts["seconds"] else 0.0
    print(
        f"caft distill: {counts['written']} rows written ({counts['truncated']} TRUNCATED at {args.max_new_tokens} tokens), "
        f"{counts['already_done']} already done, {counts['generated_tokens']} tokens in {counts['seconds']:.0f} s "
        f"({rate:.1f} tokens/s) -> {args.out}"
    )
    return 0
