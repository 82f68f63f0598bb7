"""Scoring with a Hugging Face sequence-classification reward model through `load_reward_scorer` / `ModelScorer`.

A tiny random `LlamaForSequenceClassification` on the tiny world's tokenizer, saved as safetensors. Every score is
checked against an independent reference: the model run on one sequence alone (no padding), its score head applied to
the final hidden state at the sequence's last token.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.models import seq_cls_rewards
from pipeline.scoring import ModelScorer, load_reward_scorer
from pipeline.tokenization import encode_conversation
from pipeline.world import build_tokenizer

PROMPTS = [
    "list 3 fruits",
    [{"role": "user", "content": "name 2 colors"}, {"role": "assistant", "content": "red blue"},
     {"role": "user", "content": "please give 4 animals"}],
    "write 1 tools",
    "list 5 vegetables",
    "name 2 sports",
]
RESPONSES = ["apple pear plum", "cat dog horse cow", "hammer", "carrot potato onion garlic pepper lettuce", ""]


def _config(tok, **overrides):
    from transformers import LlamaConfig

    kw = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, num_labels=1, pad_token_id=tok.pad_token_id,
              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    kw.update(overrides)
    return LlamaConfig(**kw)


def _save_seq_cls(path, seed=0, **overrides):
    from transformers import LlamaForSequenceClassification

    tok = build_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(_config(tok, **overrides)).eval()
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)  # rewards of order 1, so a wrong position shows
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return model, tok


def _reference(model, tok, prompts=PROMPTS, responses=RESPONSES) -> np.ndarray:
    """Each sequence alone, no padding; the score head at its last token."""
    out = []
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            ids = torch.tensor([encode_conversation(tok, p, r, 1024).input_ids])
            hidden = model.model(input_ids=ids).last_hidden_state
            out.append(float(model.score(hidden[:, -1])[0, 0]))
    return np.array(out)


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("seq_cls_rm")
    model, tok = _save_seq_cls(path)
    return path, model, tok


def test_scores_match_unpadded_reference_any_padding_and_batch_size(rm_dir):
    path, model, tok = rm_dir
    ref = _reference(model, tok)
    assert np.ptp(ref) > 1e-2  # the rewards differ, so a mix-up would show

    scorer = load_reward_scorer(path, batch_size=8)
    assert isinstance(scorer, ModelScorer)
    assert not scorer.module.training
    right = scorer.score(PROMPTS, RESPONSES)
    np.testing.assert_allclose(right, ref, atol=1e-5, rtol=0)

    loaded = scorer.module
    left = ModelScorer(seq_cls_rewards(loaded), loaded, scorer.tokenizer, batch_size=8, padding_side="left")
    np.testing.assert_allclose(left.score(PROMPTS, RESPONSES), ref, atol=1e-5, rtol=0)

    one = load_reward_scorer(path, batch_size=1)
    np.testing.assert_allclose(one.score(PROMPTS, RESPONSES), right, atol=1e-5, rtol=0)

    # order of the inputs does not matter either (batches are length-sorted inside)
    perm = [3, 0, 4, 2, 1]
    np.testing.assert_allclose(scorer.score([PROMPTS[i] for i in perm], [RESPONSES[i] for i in perm]), right[perm],
                               atol=1e-5, rtol=0)


def test_single_bos_and_reward_position(rm_dir):
    path, _, _ = rm_dir
    scorer = load_reward_scorer(path)
    tok = scorer.tokenizer
    for p, r in zip(PROMPTS, RESPONSES):
        ids = encode_conversation(tok, p, r, 1024).input_ids
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert ids[-1] == tok.eos_token_id  # the template ends the assistant turn with EOS: the reward reads there


def test_over_length_pairs_get_nan_not_a_truncated_score(rm_dir):
    path, model, tok = rm_dir
    scorer = load_reward_scorer(path, max_length=12)
    lengths = [len(encode_conversation(tok, p, r, 1024).input_ids) for p, r in zip(PROMPTS, RESPONSES)]
    scores = scorer.score(PROMPTS, RESPONSES)
    too_long = np.array(lengths) > 12
    assert too_long.any() and (~too_long).any()
    assert np.isnan(scores[too_long]).all()
    np.testing.assert_allclose(scores[~too_long], _reference(model, tok)[~too_long], atol=1e-5, rtol=0)


def test_config_pad_id_differs_from_tokenizer_pad(tmp_path):
    """pad == eos in the config (common for chat models), while the tokenizer pads with <pad>: the model's own
    pooling would read before the final EOS; the scorer must still read at the last real token."""
    tok = build_tokenizer()
    model, tok = _save_seq_cls(tmp_path, seed=1, pad_token_id=tok.eos_token_id)
    scorer = load_reward_scorer(tmp_path, batch_size=8)
    assert scorer.module.config.pad_token_id == tok.eos_token_id != scorer.pad_id
    ref = _reference(model, tok)
    np.testing.assert_allclose(scorer.score(PROMPTS, RESPONSES), ref, atol=1e-5, rtol=0)
    left = ModelScorer(seq_cls_rewards(scorer.module), scorer.module, scorer.tokenizer, padding_side="left")
    np.testing.assert_allclose(left.score(PROMPTS, RESPONSES), ref, atol=1e-5, rtol=0)
    # the test has teeth: the library's pooling on the same unpadded sequences reads elsewhere
    with torch.no_grad():
        pooled = [float(model(torch.tensor([encode_conversation(tok, p, r, 1024).input_ids])).logits[0, 0])
                  for p, r in zip(PROMPTS, RESPONSES)]
    assert not np.allclose(pooled, ref, atol=1e-5)


def test_left_padding_with_absolute_position_embeddings():
    """GPT-2 learns absolute positions: a left-padded row is only scored right when positions count real tokens."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=128, num_labels=1,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).eval()
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)
    ref = []
    with torch.no_grad():
        for p, r in zip(PROMPTS, RESPONSES):
            ids = torch.tensor([encode_conversation(tok, p, r, 1024).input_ids])
            ref.append(float(model.score(model.transformer(input_ids=ids).last_hidden_state[:, -1])[0, 0]))
    for side in ("right", "left"):
        scorer = ModelScorer(seq_cls_rewards(model), model, tok, batch_size=8, padding_side=side)
        np.testing.assert_allclose(scorer.score(PROMPTS, RESPONSES), ref, atol=1e-5, rtol=0, err_msg=side)


def test_bad_path_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_reward_scorer(tmp_path / "no_such_model")


def test_causal_lm_checkpoint_is_refused(tmp_path):
    from transformers import LlamaForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(_config(tok)).save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="score head"):
        load_reward_scorer(tmp_path)


def _thread_ranks(world: int) -> list:
    """`pipeline.distributed.Ranks` for `world` ranks that are threads of this process: `gather` goes through a shared
    board and a barrier, as `all_gather_object` gives every rank every rank's object."""
    import threading
    from dataclasses import dataclass

    from pipeline.distributed import Ranks

    board, barrier = [None] * world, threading.Barrier(world, timeout=60)

    @dataclass(frozen=True)
    class ThreadRanks(Ranks):
        def gather(self, obj) -> list:
            barrier.wait()
            board[self.rank] = obj
            barrier.wait()
            out = list(board)
            barrier.wait()  # every rank has read the board before the next gather writes it
            return out

    return [ThreadRanks(rank, world) for rank in range(world)]


def _score_as_ranks(path, prompts, responses, world: int, **scorer_kw):
    """Each rank's (scores or exception, pairs its encoder was asked to encode) for `world` thread ranks."""
    import threading

    from pipeline.scoring import data_parallel

    results, asked = [None] * world, [[] for _ in range(world)]
    # loaded here, one after the other: transformers' loading patches torch's init functions for its duration, and
    # two loads in threads at once can leave the patch in place for the rest of the test session
    scorers = [data_parallel(load_reward_scorer(path, **scorer_kw), ranks) for ranks in _thread_ranks(world)]
    for scorer, pairs in zip(scorers, asked):
        encode = scorer.encoder.encode
        scorer.encoder.encode = lambda p, r, items=None, encode=encode, pairs=pairs: \
            pairs.extend(range(len(p)) if items is None else items) or encode(p, r, items)

    def rank_main(rank: int) -> None:
        try:
            results[rank] = scorers[rank].score(prompts, responses), asked[rank]
        except Exception as e:  # noqa: BLE001 - the test compares what each rank raised
            results[rank] = e, asked[rank]

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_ranks_encode_a_share_each_and_score_as_one_process(rm_dir):
    """Two ranks of a data-parallel stage: neither tokenizes every pair (each encodes its share, learns every length
    from the other, then encodes its own batches' other pairs), both get every score one process computes, bit for
    bit, and an error is raised on both ranks (none waits for the other in a collective): a strict scorer's
    over-length error, and a pair that cannot be encoded in the other rank's share."""
    from pipeline.scoring import SequenceTooLongError

    path, model, tok = rm_dir
    prompts = [PROMPTS[i % 5] for i in range(24)]
    responses = [" ".join(RESPONSES[i % 5].split()[:1 + i % 4]) for i in range(24)]
    alone = load_reward_scorer(path, batch_size=3).score(prompts, responses)
    for (scores, asked) in _score_as_ranks(path, prompts, responses, world=2, batch_size=3):
        np.testing.assert_array_equal(scores, alone)
        assert len(set(asked)) < len(prompts) and len(asked) == len(set(asked))  # no pair twice, not every pair

    lengths = [len(encode_conversation(tok, p, r, 1024).input_ids) for p, r in zip(prompts, responses)]
    limit = sorted(lengths)[-3]  # a few pairs too long
    for (error, _) in _score_as_ranks(path, prompts, responses, world=2, batch_size=3, max_length=limit,
                                      strict_length=True):
        assert isinstance(error, SequenceTooLongError) and "of 24 sequences exceed max_length" in str(error)
    loose_alone = load_reward_scorer(path, batch_size=3, max_length=limit).score(prompts, responses)
    assert np.array_equal(np.isnan(loose_alone), np.array(lengths) > limit)
    for (scores, _) in _score_as_ranks(path, prompts, responses, world=2, batch_size=3, max_length=limit):
        np.testing.assert_array_equal(scores, loose_alone)

    broken = responses[:9] + [None] + responses[10:]  # pair 9: rank 1's share, past the pairs every call checks
    with pytest.raises(AttributeError) as alone_error:
        load_reward_scorer(path, batch_size=3).score(prompts, broken)
    for (error, _) in _score_as_ranks(path, prompts, broken, world=2, batch_size=3):
        assert type(error) is AttributeError and str(error) == str(alone_error.value)
