"""The prompt for one question about one image, built the way the model's family expects.

``prompt_format(processor, model)`` decides once, when the demo starts, and checks its choice: a
sample prompt must hold the processor's image token exactly once and the question, and the processor
must turn it into the model's image tokens. In order it tries

1. a ``--prompt-template`` the user gave (``{image}`` and ``{question}``);
2. the processor's chat template with list content (``[{"type": "image"}, {"type": "text", ...}]``),
   what the LLaVA-1.5/NeXT and Qwen2-VL checkpoints on the Hugging Face hub expect;
3. the chat template with plain string content holding the image token, for templates that print the
   content as it is (the embedded scenes model's: ``USER: <image>\\n{question} ASSISTANT:``, the prompt
   ``vtoken eval`` trains and scores it with);
4. the family's documented plain format (its integration's ``plain_prompt``).

Where none works, ``PromptError`` says what each attempt gave and how to pass a template.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: a question used only to check a prompt format when the demo starts
SAMPLE_QUESTION = "what color is the cube?"


class PromptError(ValueError):
    """No prompt format that places the image where the processor expects it."""


@dataclass
class PromptFormat:
    """How the demo writes a prompt; call it with a question."""

    source: str  # a few words on where the format came from, shown on start-up and in the details
    render: Callable[[str], str] = field(repr=False)
    image_token: str = "<image>"

    def __call__(self, question: str) -> str:
        return self.render(question)


def image_token_of(processor: Any) -> str:
    return getattr(processor, "image_token", None) or getattr(getattr(processor, "tokenizer", None),
                                                              "image_token", None) or "<image>"


def image_token_id_of(model: Any) -> int | None:
    config = getattr(model, "config", None)
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _chat(processor: Any, content: Any) -> str:
    conversation = [{"role": "user", "content": content}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)


def _family(model: Any) -> Any:
    """The model's integration (it knows the family's prompt formats), or None for an unsupported model."""
    from vtoken.integrations.base import Integration

    try:
        return Integration.for_model(model)
    except ValueError:
        return None


def candidates(processor: Any, family: Any, template: str | None) -> list[PromptFormat]:
    """The formats to try, in order (see the module's docstring)."""
    image = image_token_of(processor)
    if template is not None:
        return [PromptFormat("--prompt-template", lambda q: template.format(image=image, question=q), image)]
    found = []
    if getattr(processor, "chat_template", None):
        found.append(PromptFormat(
            "the processor's chat template (list content)",
            lambda q: _chat(processor, [{"type": "image"}, {"type": "text", "text": q}]), image))
        content = family.chat_content if family is not None else "{image}\n{question}"
        found.append(PromptFormat(
            "the processor's chat template (string content)",
            lambda q: _chat(processor, content.format(image=image, question=q)), image))
    plain = family.plain_prompt() if family is not None else None
    if plain is not None:
        name, text = plain
        found.append(PromptFormat(name, lambda q: text.format(image=image, question=q), image))
    return found


def check(fmt: PromptFormat, processor: Any, image_token_id: int | None) -> str:
    """The sample prompt if ``fmt`` is usable; raises PromptError saying what is wrong otherwise."""
    from PIL import Image

    try:
        text = fmt(SAMPLE_QUESTION)
    except Exception as error:  # a template that cannot render this conversation
        raise PromptError(f"{fmt.source}: cannot render ({type(error).__name__}: {error})") from error
    if not isinstance(text, str):
        raise PromptError(f"{fmt.source}: gave {type(text).__name__}, not text")
    count = text.count(fmt.image_token)
    if count != 1:
        raise PromptError(f"{fmt.source}: the prompt holds the image token {fmt.image_token!r} {count} times, "
                          f"not once: {text!r}")
    if SAMPLE_QUESTION not in text:
        raise PromptError(f"{fmt.source}: the question does not appear in the prompt: {text!r}")
    try:
        ids = processor(images=Image.new("RGB", (64, 64), (128, 128, 128)), text=text,
                        return_tensors="pt")["input_ids"]
    except Exception as error:
        raise PromptError(f"{fmt.source}: the processor refuses the prompt {text!r}: {error}") from error
    if image_token_id is not None and not int((ids == image_token_id).sum()):
        raise PromptError(f"{fmt.source}: the processor's input holds no image token (id {image_token_id}) "
                          f"for the prompt {text!r}")
    return text


def prompt_format(processor: Any, model: Any, template: str | None = None) -> PromptFormat:
    """The first usable format for this model and processor (checked; see the module's docstring)."""
    model_type = str(getattr(getattr(model, "config", None), "model_type", "") or "")
    family = _family(model)
    if template is not None and ("{question}" not in template or "{image}" not in template):
        raise PromptError(f"the prompt template must hold {{image}} and {{question}}; got {template!r}")
    tried = []
    for fmt in candidates(processor, family, template):
        try:
            check(fmt, processor, image_token_id_of(model))
        except PromptError as error:
            tried.append(str(error))
            continue
        return fmt
    if template is None and not getattr(processor, "chat_template", None):
        tried.append("the processor has no chat template")
    if template is None and (family is None or family.plain_prompt() is None):
        tried.append(f"vtoken knows no plain prompt format for model type {model_type!r}")
    raise PromptError(
        "cannot build a prompt that places the image for this model:\n  - " + "\n  - ".join(tried)
        + "\nPass one with {image} where the image goes and {question}, e.g. "
        "--prompt-template 'USER: {image}\\n{question} ASSISTANT:' (or prompt_template=... in Python)."
    )
