"""One way to turn (prompt, response) into model inputs: the tokenizer's own chat template, tokenized once.

Used by every reward model (scoring and training) so that the reward is always read at the same position and the
response-token mask used by GRM's text-generation loss is the same span that a policy generated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch

Message = dict  # {"role": ..., "content": ...}
Prompt = Union[str, Sequence[Message]]


def as_messages(prompt: Prompt) -> list[Message]:
    """A prompt is either a single user turn (str) or the list of turns before the response."""
    from pipeline.records import messages, user_prompt

    return user_prompt(prompt) if isinstance(prompt, str) else messages(prompt)


def _template_ids(tokenizer, messages: list[Message], add_generation_prompt: bool) -> list[int]:
    # tokenize=True keeps the template's own special tokens and adds none (no doubled BOS).
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def prompt_ids(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of the prompt followed by the template's generation prompt (what a policy continues)."""
    if tokenizer.chat_template is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template")
    return _template_ids(tokenizer, as_messages(prompt), add_generation_prompt=True)


@dataclass
class Encoded:
    input_ids: list[int]
    response_start: int  # index of the first response token
    truncated: bool


def encode_conversation(tokenizer, prompt: Prompt, response: str, max_length: int, *,
                        double_bos: bool = False) -> Encoded:
    """Token ids of prompt + response through the chat template; `response_start` marks the response span.

    The conversation is rendered to text once and tokenized once without added special tokens (the template writes
    its own, so the ids equal `apply_chat_template(tokenize=True)`). The response span is located from character
    offsets: the response starts where the rendered prompt + generation prompt ends, and `response_start` is the first
    token whose character span reaches past that point. This is exact for every tokenizer, including byte-level BPE
    ones whose last prompt token (a merged "\n\n") splits once the response follows.

    `double_bos`: tokenize the rendered text *with* special tokens, as the GRM authors did when training and
    benchmarking their released checkpoints (their template already starts with BOS, so the tokenizer adds a second
    one at position 0). Only for scoring such checkpoints; models trained here use one BOS.

    Over-long sequences are kept from the left and flagged, so callers can filter them rather than silently score a
    truncated response.
    """
    if tokenizer.chat_template is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template")
    messages = as_messages(prompt)
    if not getattr(tokenizer, "is_fast", False):  # no offsets: compare token prefixes (exact unless merges differ)
        return _encode_by_token_prefix(tokenizer, messages, response, max_length, double_bos)
    full_text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                              add_generation_prompt=False, tokenize=False)
    head_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if full_text.startswith(head_text):
        char_start = len(head_text)
    else:  # the template renders the prompt differently once a response follows: from where the texts diverge
        char_start = _common_prefix(list(head_text), list(full_text))
        _warn_once(tokenizer, f"chat template of {getattr(tokenizer, 'name_or_path', '')!r}: the rendered prompt is "
                              f"not a prefix of prompt + response; the response span starts where they diverge")
    enc = tokenizer(full_text, add_special_tokens=double_bos, return_offsets_mapping=True)
    full, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    start = next((i for i, (_, end) in enumerate(offsets) if end > char_start and not _is_added_special(
        tokenizer, full[i], offsets[i], double_bos)), len(full))
    truncated = len(full) > max_length
    return Encoded(full[:max_length], min(start, max_length), truncated)


def _is_added_special(tokenizer, token_id: int, offset, double_bos: bool) -> bool:
    """A special token the tokenizer itself added (BOS/EOS with `double_bos`): it has an empty character span."""
    return double_bos and offset[0] == offset[1] and token_id in set(tokenizer.all_special_ids)


def _encode_by_token_prefix(tokenizer, messages: list[Message], response: str, max_length: int,
                            double_bos: bool) -> Encoded:
    """For tokenizers without character offsets: the response starts after the prompt's own tokens."""
    head = _template_ids(tokenizer, messages, add_generation_prompt=True)
    full = _template_ids(tokenizer, messages + [{"role": "assistant", "content": response}],
                         add_generation_prompt=False)
    if full[: len(head)] == head:
        start = len(head)
    else:
        start = _common_prefix(head, full)
        _warn_once(tokenizer, f"chat template of {getattr(tokenizer, 'name_or_path', '')!r}: the prompt's tokens "
                              f"are not a prefix of prompt + response; the response span starts at their common prefix")
    if double_bos:
        text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                             add_generation_prompt=False, tokenize=False)
        with_special = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        lead = next((k for k in range(len(with_special) - len(full) + 1)
                     if with_special[k:k + len(full)] == full), 0)  # tokens the tokenizer added in front
        full, start = with_special, start + lead
    truncated = len(full) > max_length
    return Encoded(full[:max_length], min(start, max_length), truncated)


_warned: set[int] = set()


def _warn_once(tokenizer, message: str) -> None:
    import logging

    if id(tokenizer) not in _warned:
        _warned.add(id(tokenizer))
        logging.getLogger("overopt").warning(message)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, padding_side: str = "right",
             width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) int64 arrays of token-id rows padded to `width` (default the longest row) on `padding_side`."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    longest = int(lengths.max(initial=0))
    if width is not None and width < longest:
        raise ValueError(f"width {width} is shorter than the longest row ({longest} tokens)")
    width = longest if width is None else width
    offsets = width - lengths if padding_side == "left" else np.zeros_like(lengths)
    # one flat copy of every id instead of a tensor per row: per-row copies were a third of scoring time
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    row_of = np.repeat(np.arange(len(rows)), lengths)
    col_of = np.repeat(offsets, lengths) + (np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths))
    ids[row_of, col_of] = np.fromiter((t for r in rows for t in r), dtype=np.int64, count=int(lengths.sum()))
    positions = np.arange(width)[None, :]
    mask = (positions >= offsets[:, None]) & (positions < (offsets + lengths)[:, None])
    return ids, mask.astype(np.int64)


def collate(encoded: list[Encoded], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a batch; returns input_ids, attention_mask and response_mask (1 on response tokens only)."""
    ids, attn = pad_rows([e.input_ids for e in encoded], pad_id, padding_side)
    lengths = np.array([len(e.input_ids) for e in encoded], dtype=np.int64)
    first = ids.shape[1] - lengths if padding_side == "left" else np.zeros_like(lengths)  # each row's first token
    starts = first + np.array([e.response_start for e in encoded], dtype=np.int64)
    resp = attn.astype(bool) & (np.arange(ids.shape[1])[None, :] >= starts[:, None])
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(attn),
            "response_mask": torch.from_numpy(resp.astype(np.int64))}


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, whatever the padding side."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask).argmax(dim=1)


def end_of_turn_ids(tokenizer) -> set[int]:
    """Special tokens the chat template puts after an assistant message (`<end_of_turn>`, `<|eot_id|>`, `<|im_end|>`,
    EOS...): a policy's turn ends at any of them, whatever its generation config lists."""
    head = prompt_ids(tokenizer, "x")
    full = _template_ids(tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                         add_generation_prompt=False)
    ignore = {tokenizer.unk_token_id, tokenizer.pad_token_id}
    return {t for t in full[len(head):] if t in set(tokenizer.all_special_ids) - ignore}


def pad_token_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has neither a pad nor an eos token")


def _assistant_suffix(tokenizer) -> list[int] | None:
    """The tokens the chat template puts after an assistant message's content (`</s>`, `<end_of_turn>\\n`, ...), or
    None when the template does not render as prompt tokens + content tokens + a fixed suffix."""
    suffixes = []
    for probe in ("a", "b c"):
        head = prompt_ids(tokenizer, "x")
        full = _template_ids(tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": probe}],
                             add_generation_prompt=False)
        content = tokenizer(probe, add_special_tokens=False)["input_ids"]
        if full[:len(head)] != head or full[len(head):len(head) + len(content)] != content:
            return None
        suffixes.append(full[len(head) + len(content):])
    return suffixes[0] if suffixes[0] == suffixes[1] else None


def _ignores_edge_whitespace(tokenizer, suffix: list[int]) -> bool:
    """Do an assistant message's leading and trailing whitespace leave its tokens unchanged: the template trims the
    content (Gemma's and Llama 3's `| trim`) or the tokenizer drops whitespace? Then a response is tokenized stripped;
    else whitespace at its edges can merge with the template's tokens and only the full template is exact."""
    head = prompt_ids(tokenizer, "x")
    full = _template_ids(tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": " \na b \n"}],
                         add_generation_prompt=False)
    return full == head + tokenizer("a b", add_special_tokens=False)["input_ids"] + suffix


def plain_token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """`tokenizer(texts, add_special_tokens=False)["input_ids"]`, taken straight from a fast tokenizer's Rust backend
    when the backend is already in the state that call would set (no truncation, no padding, special tokens split as
    the tokenizer says): transformers' per-text conversion of the result is most of the call's time (0.45-0.50 s
    through the call, 0.07-0.10 s from the backend, for the demo's 20,424 distinct best-of-n responses). Any other
    tokenizer or state takes the call."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (backend is not None and backend.truncation is None and backend.padding is None
            and backend.encode_special_tokens == getattr(tokenizer, "split_special_tokens", False)):
        return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


class ConversationEncoder:
    """`encode_conversation` for many pairs at once, fast: each distinct prompt's template is rendered once, the
    responses are tokenized in one batched call, and the template's closing tokens are appended.

    Whether the template keeps a response's edge whitespace is probed once: if it trims it (or the tokenizer drops
    it), responses are tokenized stripped; if it keeps it, a response with whitespace at an edge goes through the
    full template (its tokens could merge with the template's). The composition is also checked against
    `encode_conversation` on the first pairs of every call; a template for which it does not hold (it rewrites
    content otherwise) falls back to the exact path. With `encode_ids` a caller that already holds token ids (a policy
    sharing this tokenizer) skips text entirely.
    """

    CHECKED_PER_CALL = 8

    def __init__(self, tokenizer, max_length: int, double_bos: bool = False):
        self.tokenizer, self.max_length, self.double_bos = tokenizer, max_length, double_bos
        # the released-checkpoint tokenization (a second BOS) is reproduced only by the exact path
        self.suffix = None if double_bos else _assistant_suffix(tokenizer)
        self.strip = self.suffix is not None and _ignores_edge_whitespace(tokenizer, self.suffix)
        self._heads: dict[str, list[int]] = {}

    def _head(self, prompt: Prompt) -> list[int]:
        messages = as_messages(prompt)
        key = repr([(m["role"], m["content"]) for m in messages])
        if key not in self._heads:
            self._heads[key] = _template_ids(self.tokenizer, messages, add_generation_prompt=True)
        return self._heads[key]

    def _heads_of(self, prompts: list[Prompt]) -> list[list[int]]:
        """`_head` of each prompt. Callers pass one object for every sample of a prompt: the ids are looked up by
        identity within the call (`prompts`, a list, holds every object, so no id is reused), by content once per
        object."""
        by_identity: dict[int, list[int]] = {}
        heads = []
        for p in prompts:
            head = by_identity.get(id(p))
            if head is None:
                head = by_identity[id(p)] = self._head(p)
            heads.append(head)
        return heads

    def _content_ids(self, responses: Sequence[str]) -> list[list[int]]:
        """Token ids of each response without special tokens; each distinct text tokenized once."""
        distinct = list(dict.fromkeys(responses))
        ids = dict(zip(distinct, plain_token_ids(self.tokenizer, distinct))) if distinct else {}
        return [ids[r] for r in responses]

    def _compose(self, head: list[int], content: list[int]) -> Encoded:
        full = head + list(content) + self.suffix
        return Encoded(full[:self.max_length], min(len(head), self.max_length), len(full) > self.max_length)

    def encode(self, prompts: Sequence[Prompt], responses: Sequence[str],
               items: Sequence[int] | None = None) -> list[Encoded]:
        """Same result as `[encode_conversation(tok, p, r, max_length) for p, r in zip(prompts, responses)]`, or of
        those pairs only whose indices are in `items` (a data-parallel rank's share). The composition is checked on
        the call's first pairs whatever `items` holds, so every share takes the path the whole call would."""
        prompts, responses = list(prompts), list(responses)  # a list holds each prompt object for `_heads_of`
        items = range(len(prompts)) if items is None else list(items)
        checked = range(min(self.CHECKED_PER_CALL, len(prompts)))
        exact = [encode_conversation(self.tokenizer, prompts[i], responses[i], self.max_length,
                                     double_bos=self.double_bos) for i in checked]
        if self.suffix is None:
            return [exact[i] if i < len(exact) else
                    encode_conversation(self.tokenizer, prompts[i], responses[i], self.max_length,
                                        double_bos=self.double_bos) for i in items]
        wanted = [*checked, *items]  # the checked pairs are composed too, whether or not they are among `items`
        chosen = [responses[i] for i in wanted]
        contents = self._content_ids([r.strip() for r in chosen] if self.strip else chosen)
        fast = [self._compose(h, c) for h, c in zip(self._heads_of([prompts[i] for i in wanted]), contents)]
        if not self.strip:  # whitespace at an edge may merge with the template's tokens: the full template
            for k, i in enumerate(wanted):
                if responses[i] != responses[i].strip():
                    fast[k] = encode_conversation(self.tokenizer, prompts[i], responses[i], self.max_length)
        if any(e != f for e, f in zip(exact, fast)):
            _warn_once(self.tokenizer, "chat template does not compose as prompt + response tokens + suffix; "
                                       "encoding every pair through the full template (slower)")
            self.suffix = None
            return self.encode(prompts, responses, items)
        return fast[len(exact):]

    def encode_ids(self, prompt_token_ids: Sequence[Sequence[int]],
                   response_token_ids: Sequence[Sequence[int]]) -> list[Encoded]:
        """Prompt ids (template with generation prompt, as `prompt_ids` gives) + response ids (without the token that
        ended the turn) + the template's closing tokens: what the text path gives for the decoded response."""
        if self.suffix is None:
            raise ValueError(f"the chat template of {getattr(self.tokenizer, 'name_or_path', '')!r} does not close an "
                             f"assistant turn with fixed tokens; score from text instead")
        return [self._compose(list(p), list(r)) for p, r in zip(prompt_token_ids, response_token_ids)]


def same_tokenizer(a, b) -> bool:
    """Do two tokenizers give the same ids for every text and chat (vocabulary, special tokens, template)?"""
    if a is b:
        return True
    return (type(a) is type(b) and a.get_vocab() == b.get_vocab() and a.chat_template == b.chat_template
            and a.all_special_tokens == b.all_special_tokens and a.bos_token == b.bos_token
            and a.eos_token == b.eos_token and getattr(a, "backend_tokenizer", None) is not None
            and a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str())
