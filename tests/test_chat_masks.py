"""Label masks of caft.chat.tokenize_conversation with SmolLM2's tokenizer and several real chat templates."""

from __future__ import annotations

import copy

import pytest

from caft.chat import IGNORE_INDEX, ChatTemplateError, build_dataset, tokenize_conversation
from caft.collator import make_collator

SINGLE = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "2+2 equals 4."},
]
MULTI = [
    *SINGLE,
    {"role": "user", "content": "Write it in Python."},
    {"role": "assistant", "content": "```python\nprint(2 + 2)\n```"},
]
SYSTEM = [{"role": "system", "content": "You answer in one sentence."}, *MULTI]
CONVERSATIONS = {"single": SINGLE, "multi": MULTI, "system": SYSTEM}

# Chat templates of the tokenizer_config.json of each model named below, for string contents.
LLAMA3_TEMPLATE = (
    r"{% set loop_messages = messages %}{% for message in loop_messages %}"
    r"{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    r"{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)  # Meta-Llama-3-8B-Instruct
QWEN2_TEMPLATE = (
    r"{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    r"{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    r"{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)  # Qwen2-72B-Instruct
# Gemma 3 instruct, without its branch for image contents. Gemma has no system role, so a system
# message is merged into the first user turn.
GEMMA_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""
MISTRAL_TEMPLATE = (
    r"{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    r"{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    r"{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    r"{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    r"{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)  # Mixtral-8x7B-Instruct-v0.1

# name -> (template, special tokens the real tokenizer has, bos token, end-of-turn token, whether it adds BOS)
TEMPLATES = {
    "llama3": (LLAMA3_TEMPLATE, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", True),
    "qwen2": (QWEN2_TEMPLATE, [], None, "<|im_end|>", False),
    "gemma": (GEMMA_TEMPLATE, ["<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<end_of_turn>", True),
    "mistral": (MISTRAL_TEMPLATE, ["<s>", "</s>"], "<s>", "</s>", True),
}


def labelled_texts(tokenizer, example: dict) -> list[str]:
    """Decode each run of consecutive labelled tokens."""
    runs: list[list[int]] = [[]]
    for token, label in zip(example["input_ids"], example["labels"]):
        if label == IGNORE_INDEX:
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append(token)
    return [tokenizer.decode(run) for run in runs if run]


def replies(messages: list[dict]) -> list[str]:
    return [message["content"] for message in messages if message["role"] == "assistant"]


def labels_copy_inputs(example: dict) -> bool:
    return all(label in (IGNORE_INDEX, token) for token, label in zip(example["input_ids"], example["labels"]))


# --- SmolLM2 (ChatML with a default system prompt) ------------------------------------------------


@pytest.mark.parametrize("case", CONVERSATIONS)
def test_smollm2_labels_replies_and_im_end(smol_tokenizer, case):
    messages = CONVERSATIONS[case]
    example = tokenize_conversation(smol_tokenizer, messages, 1024)

    assert labelled_texts(smol_tokenizer, example) == [reply + "<|im_end|>" for reply in replies(messages)]
    assert labels_copy_inputs(example)


@pytest.mark.parametrize("case", CONVERSATIONS)
def test_smollm2_newline_after_im_end_unlabelled(smol_tokenizer, case):
    example = tokenize_conversation(smol_tokenizer, CONVERSATIONS[case], 1024)
    im_end, newline = smol_tokenizer.convert_tokens_to_ids(["<|im_end|>", "Ċ"])
    labelled_ends = [i for i, label in enumerate(example["labels"]) if label == im_end]

    assert len(labelled_ends) == len(replies(CONVERSATIONS[case]))
    for position in labelled_ends:
        assert example["input_ids"][position + 1] == newline
        assert example["labels"][position + 1] == IGNORE_INDEX


def test_smollm2_default_system_prompt(smol_tokenizer):
    without_system = smol_tokenizer.decode(tokenize_conversation(smol_tokenizer, MULTI, 1024)["input_ids"])
    with_system = smol_tokenizer.decode(tokenize_conversation(smol_tokenizer, SYSTEM, 1024)["input_ids"])

    assert without_system.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert with_system.startswith("<|im_start|>system\nYou answer in one sentence.<|im_end|>")
    assert "SmolLM" not in with_system


@pytest.mark.parametrize("case", CONVERSATIONS)
def test_smollm2_tokens_match_plain_render(smol_tokenizer, case):
    messages = CONVERSATIONS[case]
    example = tokenize_conversation(smol_tokenizer, messages, 1024)
    rendered = smol_tokenizer.apply_chat_template(messages, tokenize=False)
    bos = smol_tokenizer.bos_token_id

    assert example["input_ids"] == smol_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    # SmolLM2's BOS is <|im_start|>, so it opens every turn, the default system turn included; none is added.
    assert example["input_ids"].count(bos) == rendered.count("<|im_start|>")
    assert example["input_ids"][0] == bos
    assert example["input_ids"][1] != bos


def test_pad_equals_eos_end_of_turn_labelled(smol_tokenizer):
    assert smol_tokenizer.pad_token_id == smol_tokenizer.eos_token_id
    examples = [tokenize_conversation(smol_tokenizer, messages, 1024) for messages in (SINGLE, MULTI)]
    batch = make_collator(smol_tokenizer)(examples)
    im_end = smol_tokenizer.eos_token_id
    short_length = len(examples[0]["input_ids"])

    assert batch["labels"][0].tolist().count(im_end) == 1
    assert batch["labels"][1].tolist().count(im_end) == 2
    assert (batch["input_ids"][0, short_length:] == im_end).all()
    assert (batch["labels"][0, short_length:] == IGNORE_INDEX).all()
    assert (batch["attention_mask"][0, short_length:] == 0).all()
    assert batch["attention_mask"][1].all()


# --- other chat templates on the SmolLM2 vocabulary -----------------------------------------------


def template_tokenizer(tokenizer, name: str):
    """Give a tokenizer copy the template, special tokens and BOS behaviour of the named model family."""
    template, special_tokens, bos_token, _, adds_bos = TEMPLATES[name]
    if special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": special_tokens})
    tokenizer.bos_token = bos_token
    if name == "mistral":
        tokenizer.eos_token = "</s>"
    tokenizer.add_bos_token = adds_bos
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module")
def family_tokenizers(smol_tokenizer):
    """One prepared tokenizer copy per template, shared by the tests that do not change it."""
    return {name: template_tokenizer(copy.deepcopy(smol_tokenizer), name) for name in TEMPLATES}


TEMPLATE_CASES = [(name, case) for name in TEMPLATES for case in CONVERSATIONS if (name, case) != ("mistral", "system")]


@pytest.mark.parametrize(("name", "case"), TEMPLATE_CASES)
def test_template_labels_replies_and_end_of_turn(family_tokenizers, name, case):
    tokenizer = family_tokenizers[name]
    end_of_turn = TEMPLATES[name][3]
    messages = CONVERSATIONS[case]
    example = tokenize_conversation(tokenizer, messages, 1024)

    assert labelled_texts(tokenizer, example) == [reply + end_of_turn for reply in replies(messages)]
    assert labels_copy_inputs(example)
    assert tokenizer.decode(example["input_ids"]) == tokenizer.apply_chat_template(messages, tokenize=False)


@pytest.mark.parametrize("name", ["llama3", "gemma", "mistral"])
def test_template_exactly_one_bos(family_tokenizers, name):
    tokenizer = family_tokenizers[name]
    example = tokenize_conversation(tokenizer, MULTI, 1024)

    assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id  # the tokenizer expects BOS
    assert example["input_ids"].count(tokenizer.bos_token_id) == 1
    assert example["input_ids"][0] == tokenizer.bos_token_id


def test_bos_added_once_when_template_lacks_it(tokenizer_copy):
    tokenizer = template_tokenizer(tokenizer_copy, "qwen2")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<s>"]})
    tokenizer.bos_token = "<s>"
    tokenizer.add_bos_token = True
    example = tokenize_conversation(tokenizer, SINGLE, 1024)

    assert example["input_ids"].count(tokenizer.bos_token_id) == 1
    assert example["input_ids"][0] == tokenizer.bos_token_id
    assert example["labels"][0] == IGNORE_INDEX
    assert labelled_texts(tokenizer, example) == ["2+2 equals 4.<|im_end|>"]


def test_gemma_merges_system_into_first_user_turn(family_tokenizers):
    tokenizer = family_tokenizers["gemma"]
    text = tokenizer.decode(tokenize_conversation(tokenizer, SYSTEM, 1024)["input_ids"])

    assert text.startswith("<bos><start_of_turn>user\nYou answer in one sentence.\n\nWhat is 2+2?<end_of_turn>\n")


# --- template errors ------------------------------------------------------------------------------


def test_template_rewriting_history_raises(smol_tokenizer):
    # Marks only the last message, so earlier text changes as the conversation grows.
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if loop.last %} [last]{% endif %}\n{% endfor %}"

    with pytest.raises(ChatTemplateError, match="chat template passed as chat_template rewrites earlier text.*message 1"):
        tokenize_conversation(smol_tokenizer, SINGLE, 1024, chat_template=template)


def test_missing_chat_template_raises(tokenizer_copy):
    tokenizer_copy.chat_template = None

    with pytest.raises(ChatTemplateError, match="SmolLM2-135M-Instruct has no chat template. Use a chat or instruct model"):
        tokenize_conversation(tokenizer_copy, SINGLE, 1024)


def test_template_exception_names_row(family_tokenizers, write_jsonl):
    tokenizer = family_tokenizers["mistral"]
    path = write_jsonl([{"messages": MULTI}, {"messages": SYSTEM}], name="with_system.jsonl")

    with pytest.raises(ChatTemplateError, match=r"with_system.jsonl, line 2: .*Conversation roles must alternate"):
        build_dataset(path, tokenizer, 1024)


# --- truncation -----------------------------------------------------------------------------------


def test_long_prompt_row_dropped(smol_tokenizer):
    messages = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]

    assert tokenize_conversation(smol_tokenizer, messages, 128) is None


def test_truncated_reply_keeps_surviving_labels(smol_tokenizer):
    reply = " ".join(f"item{i}" for i in range(100))
    messages = [{"role": "user", "content": "List items."}, {"role": "assistant", "content": reply}]
    full = tokenize_conversation(smol_tokenizer, messages, 4096)
    first_label = next(i for i, label in enumerate(full["labels"]) if label != IGNORE_INDEX)

    cut = tokenize_conversation(smol_tokenizer, messages, first_label + 10)

    assert len(cut["input_ids"]) == first_label + 10
    assert cut["input_ids"] == full["input_ids"][: first_label + 10]
    assert cut["labels"][first_label:] == full["input_ids"][first_label : first_label + 10]
    assert smol_tokenizer.eos_token_id not in cut["labels"]
