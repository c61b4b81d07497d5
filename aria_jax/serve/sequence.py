"""One request's generated tokens on the host: its text as it grows (as ``Aria.chat`` decodes it), and when it ends
(an eos id, ``<|im_end|>`` or a ``stop`` string, ``max_tokens``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from aria_jax.inference.generation import stop_string_checker

END_OF_TURN = "<|im_end|>"  # Aria.chat's stop string: ends every reply


@dataclasses.dataclass
class Generated:
    """A request's tokens so far and the text already handed out."""

    decode: Callable[..., str]  # the tokenizer's decode(tokens, skip_special_tokens=...)
    eos_ids: tuple[int, ...]
    max_tokens: int
    stop: Sequence[str] = ()
    tokens: list[int] = dataclasses.field(default_factory=list)
    shown: str = ""
    finish_reason: str | None = None  # "stop" or "length" once it ended

    def __post_init__(self):
        raw = lambda t: self.decode(t, skip_special_tokens=False)
        self._ends_turn = stop_string_checker(raw, [END_OF_TURN])
        self._user_stop = stop_string_checker(lambda t: self.decode(t, skip_special_tokens=True), self.stop)

    def text(self) -> str:
        """The reply as ``Aria.chat`` returns it, cut before the first ``stop`` string."""
        text = self.decode(self.tokens, skip_special_tokens=True).split(END_OF_TURN)[0]
        cuts = [i for i in (text.find(s) for s in self.stop if s) if i >= 0]
        return text[:min(cuts)] if cuts else text

    def add(self, token: int) -> str:
        """Record one token; returns the new text it shows (held back while it may be the start of a ``stop``
        string or an incomplete UTF-8 character); sets ``finish_reason`` when the reply ends."""
        self.tokens.append(int(token))
        if int(token) in self.eos_ids or self._ends_turn(self.tokens) or (self.stop and self._user_stop(self.tokens)):
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.max_tokens:
            self.finish_reason = "length"
        text = self.text()
        if self.finish_reason is None:
            if text.endswith("\ufffd"):
                return ""
            hold = max((len(s) for s in self.stop if s), default=1) - 1
            text = text[:len(text) - hold] if hold else text
        if len(text) <= len(self.shown) or not text.startswith(self.shown):
            return ""
        piece, self.shown = text[len(self.shown):], text
        return piece

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)
