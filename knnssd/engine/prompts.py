"""Turning prompt text into token ids, with or without the model's chat template."""

from __future__ import annotations

import torch

from knnssd.errors import KnnSsdError


def encode_prompt(tokenizer: object, text: str, chat: bool = False) -> torch.Tensor:
    """Token ids (1, T) for `text`; with `chat`, as one user turn through the chat template,
    ending with the assistant's generation prompt."""
    if not isinstance(text, str) or not text.strip():
        raise KnnSsdError("the prompt is empty", fix="give a prompt with some text, e.g. --prompt 'Hello'")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise KnnSsdError("--chat asked for, but this model's tokenizer has no chat template",
                              fix="drop --chat, or use an instruction-tuned model")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
    else:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    ids = list(ids[0]) if ids and isinstance(ids[0], list) else list(ids)
    if not ids:
        raise KnnSsdError("the prompt encodes to no tokens", fix="give a prompt with some text")
    return torch.tensor([ids], dtype=torch.long)
