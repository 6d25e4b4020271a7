"""The chat format: one renderer from a conversation to token ids and a loss mask, used by SFT
data, preference pairs, evaluation prompts and serving alike.

    from nanofm.chat import render, render_prompt, parse
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"}]
    ids, mask = render(tokenizer, messages)     # mask[i] = 1 where token i is trained on
    prompt = render_prompt(tokenizer, messages[:2])   # ... <|assistant|>: the model writes the reply
    ids, mask = render_completion(tokenizer, messages[:2], "4")   # mask on this reply alone (preferences, RL)
    parse(tokenizer, ids)                       # -> the messages back

The format ("nanofm-chat-v1", recorded as meta.json's chat_format):

    <|bos|> <|system|> text <|end|> <|user|> text <|end|> <|assistant|> text <|end|> ...

Design decisions:
- Each role has its own special token, and every turn ends with <|end|>. The loss mask covers the
  assistant's content and its <|end|> only: the model learns to answer and to stop, not to
  predict what users say or which role comes next (the role tags are given to it).
- The generation prompt ends with <|assistant|>, so generation starts with the reply's first
  token; the engine stops at <|end|> (one of the tokenizer's end tokens).
- Content is encoded with the tokenizer's plain `encode`, which treats "<|user|>" written in a
  message as ordinary text: no message can inject a control token (tested).
- Roles: an optional system turn first, then user and assistant turns; two turns of the same
  role in a row are allowed (a user who sends two messages), an unknown role is an error.
- `parse` is the inverse of `render` on its own output; it stops at a turn without <|end|> (a
  reply being generated) and returns what is complete plus that partial turn.
- Images: a message's content may be a list of parts, {"type": "text", "text": ...} and
  {"type": "image", "image": grey pixels [H, W]} (serving turns OpenAI's image_url parts into
  these). An image is written as `image_tokens` copies of <|image|> (the model's count: one per
  image token, model.vision.cfg.n_tokens), whose embeddings the model replaces with the image
  encoder's outputs (nanofm/vision.py); images_of(messages) gives the images in the same order.
  The tokenizer gains <|image|> at its next free id (Tokenizer.with_special_tokens), so every
  text id stays what it was. parse gives an image back as {"type": "image"} (the pixels are not
  in the ids).
"""

from __future__ import annotations

from nanofm.common import NanofmError

CHAT_FORMAT = "nanofm-chat-v1"
ROLES = ("system", "user", "assistant")
END = "<|end|>"
IMAGE = "<|image|>"


class ChatError(NanofmError, ValueError):
    pass


def role_ids(tokenizer) -> dict[str, int]:
    try:
        return {role: tokenizer.special_tokens[f"<|{role}|>"] for role in ROLES}
    except KeyError:
        raise ChatError(f"tokenizer {tokenizer.name} has no chat role tokens (<|system|>, <|user|>, <|assistant|>); "
                        f"nanofm's BPE and gpt2 have them") from None


def end_id(tokenizer) -> int:
    if END not in tokenizer.special_tokens:
        raise ChatError(f"tokenizer {tokenizer.name} has no {END} token")
    return tokenizer.special_tokens[END]


def check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatError("a conversation is a non-empty list of {'role': ..., 'content': ...} messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), (str, list)):
            raise ChatError(f"message {i} must be {{'role': ..., 'content': <text>}}, got {message!r:.80}")
        if isinstance(message["content"], list):
            for j, part in enumerate(message["content"]):
                kind = part.get("type") if isinstance(part, dict) else None
                if not (kind == "text" and isinstance(part.get("text"), str)) and not (kind == "image" and "image" in part):
                    raise ChatError(f"message {i} part {j} must be {{'type': 'text', 'text': ...}} or "
                                    f"{{'type': 'image', 'image': <pixels>}}, got {part!r:.80}")
        if message.get("role") not in ROLES:
            raise ChatError(f"message {i} has role {message.get('role')!r}; roles are {', '.join(ROLES)}")
        if message["role"] == "system" and i > 0:
            raise ChatError(f"message {i}: a system message may only come first")


def parts(content) -> list[dict]:
    """A message's content as a list of parts (a string is one text part)."""
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def text_of(content) -> str:
    """The text of a message's content, its images left out (what text-only checks read)."""
    return content if isinstance(content, str) else " ".join(p["text"] for p in content if p["type"] == "text")


def images_of(messages) -> list:
    """The images of a conversation, in the order render writes them."""
    return [p["image"] for m in messages for p in parts(m["content"]) if p["type"] == "image"]


def image_id(tokenizer) -> int:
    if IMAGE not in tokenizer.special_tokens:
        raise ChatError(f"tokenizer {tokenizer.name} has no {IMAGE} token: this model reads no images "
                        f"(a vision-language model's tokenizer has it: train_vision.py --task=chat)")
    return tokenizer.special_tokens[IMAGE]


def encode_content(tokenizer, content, image_tokens: int = 0) -> list[int]:
    """Ids of a message's content: text encoded as plain text, each image as image_tokens <|image|> ids."""
    if isinstance(content, str):
        return tokenizer.encode(content)
    ids = []
    for part in content:
        if part["type"] == "text":
            ids += tokenizer.encode(part["text"])
        elif image_tokens < 1:
            raise ChatError("the conversation holds an image, but this model reads no images")
        else:
            ids += [image_id(tokenizer)] * image_tokens
    return ids


def as_prompt(prompt) -> list[dict]:
    """A prompt as chat messages that end with a user turn (a string is one user turn), for
    preference pairs and RL prompts alike; ChatError if it is empty, malformed, has an empty
    message or does not end with the user."""
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise ChatError("the prompt is empty (give a string or a list of chat messages)")
    check_messages(prompt)
    if any(not text_of(m["content"]).strip() and not images_of([m]) for m in prompt):
        raise ChatError("the prompt has an empty message")
    if prompt[-1]["role"] != "user":
        raise ChatError("the prompt must end with a user turn (the replies answer it)")
    return prompt


def render(tokenizer, messages, add_generation_prompt: bool = False, image_tokens: int = 0) -> tuple[list[int], list[int]]:
    """(ids, mask) of a conversation; mask is 1 on the assistant's content and its <|end|>.
    image_tokens: <|image|> ids per image (the model's; 0 = images are an error)."""
    check_messages(messages)
    roles, end = role_ids(tokenizer), end_id(tokenizer)
    ids, mask = [tokenizer.bos_id], [0]
    for message in messages:
        content = encode_content(tokenizer, message["content"], image_tokens)  # text cannot inject control tokens
        trained = int(message["role"] == "assistant")
        ids += [roles[message["role"]]] + content + [end]
        mask += [0] + [trained] * (len(content) + 1)
    if add_generation_prompt:
        ids.append(roles["assistant"])
        mask.append(0)
    return ids, mask


def render_prompt(tokenizer, messages, image_tokens: int = 0) -> list[int]:
    """The ids a model continues to write the assistant's next reply."""
    if messages and messages[-1].get("role") == "assistant":
        raise ChatError("the conversation already ends with an assistant message; a prompt ends with the user's turn")
    return render(tokenizer, messages, add_generation_prompt=True, image_tokens=image_tokens)[0]


def render_completion(tokenizer, prompt, reply: str) -> tuple[list[int], list[int]]:
    """(ids, mask) of a prompt and one assistant reply, the mask on that reply and its <|end|> only
    (not on earlier assistant turns of the prompt): what preference pairs, reward models and
    policy log-probabilities score. The ids are render(prompt + [the reply])'s."""
    ids = render_prompt(tokenizer, prompt)
    reply_ids = tokenizer.encode(reply) + [end_id(tokenizer)]
    return ids + reply_ids, [0] * len(ids) + [1] * len(reply_ids)


def parse(tokenizer, ids: list[int]) -> list[dict]:
    """The messages of rendered ids (bos and anything before the first role token are skipped).
    A last turn without <|end|> is returned as it stands (a reply still being written)."""
    by_id = {i: role for role, i in role_ids(tokenizer).items()}
    end, image = end_id(tokenizer), tokenizer.special_tokens.get(IMAGE)
    messages, role, content = [], None, []

    def turn(role, content):  # text, or parts when the turn holds images (one part per run of <|image|>)
        if image not in content:
            return {"role": role, "content": tokenizer.decode(content)}
        out, text = [], []
        for k, token in enumerate(content):
            if token != image:
                text.append(token)
            elif k == 0 or content[k - 1] != image:
                if text:
                    out.append({"type": "text", "text": tokenizer.decode(text)})
                out.append({"type": "image"})
                text = []
        if text:
            out.append({"type": "text", "text": tokenizer.decode(text)})
        return {"role": role, "content": out}

    for token in ids:
        if token in by_id:
            if role is not None:  # a turn that never ended: keep it as it stands
                messages.append(turn(role, content))
            role, content = by_id[token], []
        elif token == end and role is not None:
            messages.append(turn(role, content))
            role, content = None, []
        elif role is not None:
            content.append(token)
    if role is not None:
        messages.append(turn(role, content))
    return messages
