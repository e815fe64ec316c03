"""The chat template: messages rendered as a play script, the assistant's turn left open."""

from __future__ import annotations

from app.openai.protocol import ChatCompletionRequest

ROLE_NAMES = {"system": "SYSTEM", "developer": "SYSTEM", "user": "USER", "assistant": "ASSISTANT"}
_CUT = "\x00\x01content\x01\x00"


def render_chat(template: str, body: ChatCompletionRequest) -> tuple[str, str]:
    """(prompt, turn end): every message as a turn of `template`, then the assistant's turn left open.

    A message's speaker is its `name`, else ROLE_NAMES[role]; the open turn's speaker is the last assistant
    message's name, else ASSISTANT. Text parts of a message are joined with a newline (as vLLM does).
    """
    turns, speaker = [], ROLE_NAMES["assistant"]
    for i, m in enumerate(body.messages):
        content = m.text(i)  # refuses what is not served
        name = m.name or ROLE_NAMES[m.role]
        if m.role == "assistant" and m.name:
            speaker = m.name
        turns.append(template.format(name=name, content=content))
    opened, end = template.format(name=speaker, content=_CUT).split(_CUT)
    return "".join(turns) + opened, end
