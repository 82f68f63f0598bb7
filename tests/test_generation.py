"""Sampling stops at the end of the assistant turn, whatever token the chat template ends it with."""

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pipeline.config import SamplingConfig
from pipeline.generation import finish_response, sample_responses, stop_token_ids
from pipeline.world import build_tokenizer

GEMMA_LIKE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn> {{ 'model' if m['role'] == 'assistant' else 'user' }} "
    "{{ m['content'] }} <end_of_turn> {% endfor %}{% if add_generation_prompt %}<start_of_turn> model {% endif %}")


def gemma_like_tokenizer():
    words = ["<pad>", "<bos>", "<eos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "user", "model", "hello", "world"]
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>", additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
                                   chat_template=GEMMA_LIKE_TEMPLATE)


def test_stop_tokens_include_the_templates_end_of_turn():
    tok = gemma_like_tokenizer()
    end_of_turn, eos = tok.convert_tokens_to_ids("<end_of_turn>"), tok.eos_token_id
    assert stop_token_ids(tok) == sorted({eos, end_of_turn})  # a generation config listing only EOS is not enough
    world = build_tokenizer()
    assert stop_token_ids(world) == [world.eos_token_id]


def test_finish_response_cuts_at_the_first_stop_token():
    tok = gemma_like_tokenizer()
    ids = tok.convert_tokens_to_ids(["hello", "world", "<end_of_turn>", "<start_of_turn>", "user", "hello"])
    rec = finish_response(ids, stop_token_ids(tok), tok)
    assert rec == {"response": "hello world", "n_tokens": 2, "finished": True, "token_ids": ids[:2],
                   "stop_id": ids[2]}
    assert finish_response(ids[:2], stop_token_ids(tok), tok)["finished"] is False
    assert finish_response(ids[:2], stop_token_ids(tok), tok, stopped=True)["finished"] is True


def test_sampling_is_seeded_and_records_are_keyed():
    tok = build_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, pad_token_id=tok.pad_token_id))
    sampling = SamplingConfig(max_new_tokens=5, batch_size=4)
    a = sample_responses(model, tok, ["list 2 fruits", "name 1 animals"], 3, sampling, seed=1)
    b = sample_responses(model, tok, ["list 2 fruits", "name 1 animals"], 3, sampling, seed=1)
    assert a == b
    assert [(r["prompt_index"], r["sample_idx"]) for r in a] == [(i, j) for i in range(2) for j in range(3)]
    assert all(r["n_tokens"] <= 5 and (r["finished"] or r["n_tokens"] == 5) for r in a)
