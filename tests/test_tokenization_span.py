"""The response span with a GPT-2-style byte-level BPE tokenizer and a Llama-3-style chat template, and the GRM
authors' doubled-BOS tokenization (`double_bos`).

The tokenizer is trained here with the `tokenizers` library (no download) on text full of "\\n\\n", so "ĊĊ" is one
merged token: the rendered prompt alone ends in it, but once the response follows the pre-tokenizer splits it into
two "Ċ" tokens. A span found by comparing token prefixes starts at the split and counts two template newlines as
response; a span found from character offsets starts at the response.
"""

from __future__ import annotations

import pytest

from pipeline.tokenization import collate, encode_conversation

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
SPECIAL = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|pad|>"]


@pytest.fixture(scope="module")
def byte_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [f"Hello world.\n\nList {i} fruits please.\n\nApple pear plum kiwi.\n\n" for i in range(200)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = tok.token_to_id("<|begin_of_text|>")
    # like Llama-3's tokenizer: BOS added when special tokens are asked for
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|pad|>")
    fast.chat_template = LLAMA3_TEMPLATE
    assert len(tok.encode("\n\n", add_special_tokens=False).ids) == 1  # "ĊĊ" is one merged token
    return fast


PROMPTS = ["List 3 fruits please.", [{"role": "user", "content": "Hello world."},
                                     {"role": "assistant", "content": "Hello."},
                                     {"role": "user", "content": "List 2 fruits please."}]]
RESPONSES = ["Apple pear plum.", "kiwi"]


def _ids(tok, messages, **kw):
    out = tok.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("i", range(len(PROMPTS)))
def test_span_starts_at_the_response_with_byte_level_bpe(byte_bpe, i):
    tok, prompt, response = byte_bpe, PROMPTS[i], RESPONSES[i]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    conv = messages + [{"role": "assistant", "content": response}]
    head = _ids(tok, messages, add_generation_prompt=True)
    full = _ids(tok, conv)
    assert full[: len(head)] != head  # the case token-prefix comparison gets wrong

    enc = encode_conversation(tok, prompt, response, 1024)
    assert enc.input_ids == full  # same ids as apply_chat_template(tokenize=True): one BOS, not two
    assert enc.input_ids.count(tok.bos_token_id) == 1 and enc.input_ids[0] == tok.bos_token_id
    head_text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tok.decode(enc.input_ids[: enc.response_start]) == head_text  # both newlines stay in the prompt
    assert tok.decode(enc.input_ids[enc.response_start:]) == response + "<|eot_id|>"
    mask = collate([enc], tok.pad_token_id)["response_mask"][0]
    assert int(mask.sum()) == len(enc.input_ids) - enc.response_start


@pytest.mark.parametrize("i", range(len(PROMPTS)))
def test_double_bos_adds_exactly_one_bos_and_keeps_the_span(byte_bpe, i):
    tok = byte_bpe
    one = encode_conversation(tok, PROMPTS[i], RESPONSES[i], 1024)
    two = encode_conversation(tok, PROMPTS[i], RESPONSES[i], 1024, double_bos=True)
    assert two.input_ids == [tok.bos_token_id] + one.input_ids
    assert two.input_ids[:2] == [tok.bos_token_id] * 2 and two.input_ids.count(tok.bos_token_id) == 2
    assert two.response_start == one.response_start + 1
    assert two.input_ids[two.response_start:] == one.input_ids[one.response_start:]
    assert not two.truncated
    # the extra token counts against max_length
    n = len(one.input_ids)
    assert not encode_conversation(tok, PROMPTS[i], RESPONSES[i], n).truncated
    assert encode_conversation(tok, PROMPTS[i], RESPONSES[i], n, double_bos=True).truncated


def test_world_tokenizer_span_unchanged():
    """The tiny world's word-level tokenizer: the span is the tokens after the generation prompt, as before."""
    from pipeline.world import build_tokenizer

    tok = build_tokenizer()
    head = _ids(tok, [{"role": "user", "content": "list 3 fruits"}], add_generation_prompt=True)
    enc = encode_conversation(tok, "list 3 fruits", "apple pear", 1024)
    assert enc.input_ids[: len(head)] == head and enc.response_start == len(head)


def test_double_bos_passes_from_config_to_the_scorer(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from pipeline.config import GoldConfig, ProxyConfig, ScorerStageConfig
    from pipeline.scoring import build_scorer
    from pipeline.world import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=1, num_attention_heads=2, num_labels=1,
                                               pad_token_id=tok.pad_token_id)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    for double in (False, True):
        gold = build_scorer(ScorerStageConfig(name="gold", gold=GoldConfig(type="hf", model_id=str(tmp_path),
                                                                           double_bos=double)), {})
        proxy = build_scorer(ScorerStageConfig(name="r", proxy=ProxyConfig(name="r", type="checkpoint",
                                                                           path=str(tmp_path), double_bos=double)), {})
        assert gold.double_bos is double and proxy.double_bos is double
    with pytest.raises(ValueError, match="double_bos is only for type 'checkpoint'"):
        ProxyConfig(name="b", type="bt", double_bos=True)
    with pytest.raises(ValueError, match="gold.double_bos is only for a reward model"):
        GoldConfig(double_bos=True)


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_pads_and_masks_each_row(side):
    from pipeline.tokenization import Encoded, collate

    batch = collate([Encoded([5, 6, 7], 1, False), Encoded([8, 9, 10, 11, 12], 3, False), Encoded([4], 0, False)],
                    pad_id=0, padding_side=side)
    rows = {"right": ([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12], [4, 0, 0, 0, 0]],
                      [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]],
                      [[0, 1, 1, 0, 0], [0, 0, 0, 1, 1], [1, 0, 0, 0, 0]]),
            "left": ([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12], [0, 0, 0, 0, 4]],
                     [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]],
                     [[0, 0, 0, 1, 1], [0, 0, 0, 1, 1], [0, 0, 0, 0, 1]])}[side]
    assert batch["input_ids"].tolist() == rows[0]
    assert batch["attention_mask"].tolist() == rows[1]
    assert batch["response_mask"].tolist() == rows[2]


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_rows_to_a_given_width(side):
    from pipeline.tokenization import pad_rows

    ids, mask = pad_rows([[3, 4], [], [5, 6, 7]], pad_id=9, padding_side=side, width=4)
    expected = {"right": [[3, 4, 9, 9], [9, 9, 9, 9], [5, 6, 7, 9]], "left": [[9, 9, 3, 4], [9, 9, 9, 9], [9, 5, 6, 7]]}
    assert ids.tolist() == expected[side]
    assert mask.tolist() == [[int(t != 9) for t in row] for row in expected[side]]
    assert pad_rows([], pad_id=0)[0].shape == (0, 0)
    with pytest.raises(ValueError, match="width 2 is shorter than the longest row \\(3 tokens\\)"):
        pad_rows([[3, 4], [5, 6, 7]], pad_id=9, padding_side=side, width=2)
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right', got 'Left'"):
        pad_rows([[3]], pad_id=9, padding_side="Left")


HEADER_TEMPLATE = (  # Llama-3's turn markers without the newlines: the content sits between special tokens
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>"
    "{{ message['content'] TRIM }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>{% endif %}")


@pytest.mark.parametrize("trim", [True, False])
def test_batched_encoder_alone_gives_the_full_templates_ids(byte_bpe, monkeypatch, trim):
    """With no pair checked against the full template, the batched encoder (each prompt object's template rendered
    once, each distinct response tokenized once) gives every pair the ids of its conversation rendered through the
    template, also for responses with whitespace at their edges: a template that trims them (`| trim`) has them
    tokenized stripped, one that keeps them has those pairs go through the full template."""
    import copy

    from pipeline.tokenization import ConversationEncoder

    tok = copy.deepcopy(byte_bpe)
    tok.chat_template = HEADER_TEMPLATE.replace(" TRIM", " | trim" if trim else "")
    monkeypatch.setattr(ConversationEncoder, "CHECKED_PER_CALL", 0)
    shared = [{"role": "user", "content": "List 3 fruits please."}]
    prompts = [shared, shared, "Hello world.", shared, [{"role": "user", "content": "Hello world."}]] * 3
    responses = ["Apple pear.", " kiwi", "Apple pear.", "plum\n\n", "\nHello world. ", "Apple pear.", "kiwi",
                 "  pear plum", "kiwi", "Apple", "Apple pear.", " kiwi ", "plum", "pear\n", "kiwi"]
    encoder = ConversationEncoder(tok, 64)
    assert encoder.suffix is not None and encoder.strip is trim
    assert encoder.encode(prompts, responses) == [encode_conversation(tok, p, r, 64)
                                                  for p, r in zip(prompts, responses)]
    assert encoder.suffix is not None  # no fallback: the batched path made these ids


@pytest.mark.parametrize("rewrites", [False, True])
def test_a_share_of_the_pairs_is_encoded_as_the_whole_call_encodes_it(byte_bpe, rewrites):
    """`encode(..., items)` (a data-parallel rank's share) gives those pairs' ids as the whole call would: the
    composition is checked on the call's first pairs, not the share's, so a template that rewrites content (here
    "Apple" -> "Pear"; its probes do not show it) sends a share without the call's first pairs to the full template
    too, where a share's own first pairs would have passed the check and composed its later pairs wrongly."""
    import copy

    from pipeline.tokenization import ConversationEncoder

    tok = copy.deepcopy(byte_bpe)
    content = "message['content'] | replace('Apple', 'Pear')" if rewrites else "message['content']"
    tok.chat_template = HEADER_TEMPLATE.replace("message['content'] TRIM", content)
    prompts = ["List 3 fruits please.", "Hello world."] * 10
    responses = ["Apple pear."] + ["kiwi plum", " pear", "plum kiwi"] * 5 + ["kiwi", "Apple", "pear", "Apple kiwi"]
    share = list(range(1, 20, 2))
    assert not any("Apple" in responses[i] for i in share[:ConversationEncoder.CHECKED_PER_CALL])
    assert any("Apple" in responses[i] for i in share)
    encoder = ConversationEncoder(tok, 64)
    assert encoder.suffix is not None
    assert encoder.encode(prompts, responses, share) == [encode_conversation(tok, prompts[i], responses[i], 64)
                                                         for i in share]
    assert (encoder.suffix is None) is rewrites  # the call's first pair showed the rewrite
    assert encoder.encode(prompts, responses, []) == []


def test_pair_dataset_encodes_both_sides_as_the_full_template_does(monkeypatch):
    """Proxy training's pairs through the batched encoder alone (no pair checked against the full template): each
    side gets the ids of its conversation rendered through the template, a pair with a truncated side is dropped, and
    each pair keeps its margin."""
    import pandas as pd

    from pipeline.preference_pairs import PairDataset
    from pipeline.tokenization import ConversationEncoder
    from tests.test_generation import gemma_like_tokenizer

    monkeypatch.setattr(ConversationEncoder, "CHECKED_PER_CALL", 0)
    tok = gemma_like_tokenizer()
    prompt = [{"role": "user", "content": "hello"}]
    frame = pd.DataFrame({"prompt": [prompt, prompt, [{"role": "user", "content": "world"}]] * 4,
                          "chosen": ["hello world", "hello", "world " * 40, " world "] * 3,
                          "rejected": ["world", "hello", "hello"] * 4,
                          "gold_chosen": [1.0, 0.5, 2.0] * 4, "gold_rejected": [0.25, 0.5, 0.0] * 4})
    data = PairDataset(frame, tok, max_length=16, margin_scale=2.0)
    kept = [r for r in frame.itertuples() if not r.chosen.startswith("world world")]
    assert data.dropped == 3 and len(data) == len(kept) == 9  # the chosen side of 3 pairs exceeds 16 tokens
    for (c, j, margin), row in zip(data, kept):
        assert c == encode_conversation(tok, row.prompt, row.chosen, 16)
        assert j == encode_conversation(tok, row.prompt, row.rejected, 16)
        assert margin == 2.0 * abs(row.gold_chosen - row.gold_rejected)


def test_sample_chats_share_one_message_list_per_prompt():
    """Samples of one prompt get one parsed message list (the encoder renders its template once), equal to parsing
    each row's stored prompt."""
    import numpy as np
    import pandas as pd

    from pipeline.records import messages, sample_chats

    stored = {"a": np.array([{"role": "user", "content": "one"}], dtype=object),
              "b": np.array([{"role": "user", "content": "two"}], dtype=object)}
    samples = pd.DataFrame({"prompt_id": ["a", "b", "a", "b", "a"]})
    samples["prompt"] = [stored[p] for p in samples.prompt_id]
    chats = sample_chats(samples)
    assert chats == [messages(p) for p in samples.prompt]
    assert chats[0] is chats[2] is chats[4] and chats[1] is chats[3] and chats[0] is not chats[1]


def test_plain_token_ids_are_the_tokenizer_calls_whatever_state_its_backend_is_in(byte_bpe, monkeypatch):
    """The batched encoder's response ids come from the Rust backend directly only when it is in the state
    `tokenizer(texts, add_special_tokens=False)` sets; truncation, padding or special-token splitting left on the
    backend by another caller send the texts through the call, which resets them."""
    import copy

    from pipeline.tokenization import plain_token_ids

    texts = ["", " ", "Apple pear plum kiwi. " * 8, "<|eot_id|> kiwi", "a\n\nb", "  lead", "trail  ", "ünï ✓"]
    tok = copy.deepcopy(byte_bpe)
    expected = tok(texts, add_special_tokens=False)["input_ids"]
    assert max(map(len, expected)) > 8 and [len(ids) for ids in expected].count(1) >= 1
    with monkeypatch.context() as m:  # the backend's own ids: transformers' encoding path is not taken
        m.setattr(type(tok), "_encode_plus", lambda *a, **k: pytest.fail("went through the tokenizer call"))
        assert plain_token_ids(tok, texts) == expected
    for leave_state in (lambda b: b.enable_truncation(max_length=4), lambda b: b.enable_padding(length=40),
                        lambda b: setattr(b, "encode_special_tokens", True)):
        tok = copy.deepcopy(byte_bpe)
        leave_state(tok.backend_tokenizer)
        assert plain_token_ids(tok, texts) == expected
