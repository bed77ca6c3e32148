"""Turning a task example into the exact prompt text a model sees."""

from __future__ import annotations

from typing import Any


def format_prompt(tokenizer: Any, task: Any, example: Any, system_prompt: str | None = None) -> str:
    """The chat template of the tokenizer applied to the task's message, or ``prompt + "\\n"``."""
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + task.chat(example)
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return task.prompt(example) + "\n"
