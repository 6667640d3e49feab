"""Text out of a growing list of token ids: incremental detokenising with stop strings.

Decoding each new token alone breaks text two ways: a multi-byte character split over two tokens decodes to
U+FFFD, and tokenizers that mark word starts (SentencePiece, byte-level BPE) lose the space before a word.
So, as vLLM and transformers' TextStreamer do, the new tokens are decoded together with the tokens before them
and only what that adds is handed out, once it no longer ends in an incomplete character.

Stop strings: text is handed out only up to (longest stop - 1) characters before its end, so a stop string
that arrives over several tokens is never partly sent; at a stop, the text is cut where the stop begins (the
stop itself is not included, as in OpenAI's API) and `stopped` turns True.
"""

from __future__ import annotations

from typing import Iterable

REPLACEMENT = "\ufffd"


class TextStream:
    """The text of one generation, handed out in pieces by `push` (per step) and `finish` (the rest)."""

    def __init__(self, tokenizer: object, stops: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.prefix = 0  # first id of the window decoded for context
        self.read = 0  # ids before this are in `text`
        self.text = ""  # every complete character decoded so far (cut at a stop)
        self.sent = 0  # characters of `text` handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, tokens: Iterable[int]) -> str:
        """Take one step's committed tokens; return the text that may be sent now ("" if none)."""
        if self.stopped:
            return ""
        self.ids.extend(tokens)
        window = self._decode(self.ids[self.prefix:])
        before = self._decode(self.ids[self.prefix:self.read])
        if len(window) > len(before) and not window.endswith(REPLACEMENT):
            self.text += window[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        cut = min((i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
            return self._take(len(self.text))
        return self._take(len(self.text) - self.hold)

    def finish(self) -> str:
        """The text still held back (and any incomplete character at the very end, as the tokenizer decodes it)."""
        if not self.stopped and self.read < len(self.ids):
            window = self._decode(self.ids[self.prefix:])
            self.text += window[len(self._decode(self.ids[self.prefix:self.read])):]
            self.read = len(self.ids)
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:upto], upto
        return piece
