"""The chat template: messages rendered as a play script, the assistant's turn left open."""

from __future__ import annotations

import json
import string
from collections.abc import Sequence

from app.openai.protocol import ChatMessage

ROLE_NAMES = {"system": "SYSTEM", "developer": "SYSTEM", "user": "USER", "assistant": "ASSISTANT"}


def turn_parts(template: str) -> tuple[str, str, str]:
    """The text before {name}, between {name} and {content}, and after {content} (the turn's end) of `template`
    (SHORTCUT_CHAT_TEMPLATE: the settings checked it has exactly these two fields, in this order), escaped braces
    read as single ones, as `str.format` would write them."""
    parts = [""]
    for literal, field, _, _ in string.Formatter().parse(template):
        parts[-1] += literal  # an escaped brace splits a literal in two
        if field is not None:
            parts.append("")
    pre, mid, post = parts
    return pre, mid, post


def render_chat(template: str, messages: Sequence[ChatMessage], add_generation_prompt: bool = True) -> tuple[str, str]:
    """(prompt, turn end): every message as a turn of `template`, then the assistant's turn left open (unless
    `add_generation_prompt` is false).

    A message's speaker is its `name`, else ROLE_NAMES[role]; the open turn's speaker is the last assistant
    message's name, else ASSISTANT. Text parts of a message are joined with a newline (as vLLM does). The open turn
    is the template's text up to {content}, built from its parts: no text a message can hold changes where it ends.
    """
    pre, mid, end = turn_parts(template)
    turns, speaker = [], ROLE_NAMES["assistant"]
    for i, m in enumerate(messages):
        content = m.text(i)  # refuses what is not served
        name = m.name or ROLE_NAMES[m.role]
        if m.role == "assistant" and m.name:
            speaker = m.name
        turns.append(pre + name + mid + content + end)
    return "".join(turns) + (pre + speaker + mid if add_generation_prompt else ""), end


def jinja_template(template: str) -> str:
    """`template` (SHORTCUT_CHAT_TEMPLATE: text, {name}, text, {content}, text) as a Jinja chat template over
    string contents, for clients that render chats themselves from GET /tokenizer_info (lm-eval's RemoteTokenizer)."""
    pre, mid, post = (json.dumps(x, ensure_ascii=False) for x in turn_parts(template))
    roles = json.dumps(ROLE_NAMES)
    return (
        f"{{%- set roles = {roles} -%}}{{%- set ns = namespace(speaker='ASSISTANT') -%}}"
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'assistant' and m.get('name') -%}{%- set ns.speaker = m['name'] -%}{%- endif -%}"
        f"{{{{ {pre} }}}}{{{{ m.get('name') or roles[m['role']] }}}}"
        f"{{{{ {mid} }}}}{{{{ m['content'] }}}}{{{{ {post} }}}}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{ {pre} }}}}{{{{ ns.speaker }}}}{{{{ {mid} }}}}{{%- endif -%}}"
    )
