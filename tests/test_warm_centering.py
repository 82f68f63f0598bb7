"""Reward-model-side mitigations: WARM (weight-averaged reward models, Ramé et al. 2024) and reward centering
(Eisenstein et al. 2023; TRL's `center_rewards_coefficient`).

Unit tests on tiny models built from configs (averaging by hand, refusals, shared initialisation, data order, the
centering term by hand), then one small smoke study with a warm proxy and a centred BT run through the runner."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

import stages.train_proxy as train_proxy
from pipeline import losses, proxy_types
from pipeline.cache import ArtifactCache
from pipeline.config import (
    BaseModelRef,
    ConfigError,
    LoraConfig,
    ProxyConfig,
    RMTrainingConfig,
    TrainProxyStageConfig,
    load_config,
)
from pipeline.reward_model import (
    HEAD_FILE,
    GRMRewardModel,
    RewardHeadConfig,
    average_state_dicts,
    weight_averaged_reward_model,
)
from pipeline.runner import Runner, fingerprint_view
from pipeline.study import build_stages
from pipeline.tokenization import encode_conversation
from pipeline.world import build_tokenizer

SMOKE = Path(__file__).parents[1] / "configs" / "smoke.yaml"
HEAD = RewardHeadConfig(type="mlp", width=8, dropout=0.1)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def build_base(tok, directory: Path, arch: str = "llama", seed: int = 0, hidden_size: int = 16) -> Path:
    from transformers import AutoModelForCausalLM, GemmaConfig, LlamaConfig

    common = dict(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                  pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = LlamaConfig(**common) if arch == "llama" else GemmaConfig(head_dim=8, **common)  # gemma: tied LM head
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def base(tmp_path_factory, tok):
    return build_base(tok, tmp_path_factory.mktemp("base"))


def saved_member(base_dir: Path, out: Path, seed: int, head: RewardHeadConfig = HEAD) -> Path:
    """A reward model on `base_dir` with every weight perturbed by a seeded amount (as training would), saved."""
    torch.manual_seed(seed)
    model = GRMRewardModel.from_base(base_dir, head)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model.save_pretrained(out)


# ----------------------------------------------------------------------------------------------------- averaging


def test_average_of_two_state_dicts_is_the_hand_computed_mean():
    a = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.5], dtype=torch.bfloat16),
         "steps": torch.tensor([7])}
    b = {"w": torch.tensor([[3.0, 6.0], [-3.0, 0.0]]), "b": torch.tensor([1.5], dtype=torch.bfloat16),
         "steps": torch.tensor([7])}
    avg = average_state_dicts([a, b])
    assert torch.equal(avg["w"], torch.tensor([[2.0, 4.0], [0.0, 2.0]]))
    assert avg["b"].dtype == torch.bfloat16 and avg["b"].item() == 1.0  # averaged in float32, kept in bfloat16
    assert torch.equal(avg["steps"], torch.tensor([7]))  # a non-floating tensor is kept, not averaged
    assert torch.equal(a["w"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))  # the inputs are not modified
    c = {"w": torch.zeros(2, 2), "b": torch.tensor([1.0], dtype=torch.bfloat16), "steps": torch.tensor([7])}
    assert torch.allclose(average_state_dicts([a, b, c])["w"], torch.tensor([[4 / 3, 8 / 3], [0.0, 4 / 3]]))


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_averaged_reward_model_holds_the_mean_of_its_members_weights(tok, tmp_path, arch):
    base_dir = build_base(tok, tmp_path / "base", arch)
    members = [saved_member(base_dir, tmp_path / f"m{i}", seed=i) for i in range(2)]
    avg = weight_averaged_reward_model(members)
    states = [GRMRewardModel.from_pretrained(m).state_dict() for m in members]
    out = avg.state_dict()
    assert set(out) == set(states[0])
    for name, value in out.items():  # backbone, LM head (tied for gemma) and reward head alike
        assert torch.allclose(value, (states[0][name] + states[1][name]) / 2, atol=1e-6), name
    # saved and reloaded, it is a reward model like any other (the stage writes it this way)
    avg.save_pretrained(tmp_path / "avg")
    assert torch.equal(load_file(str(tmp_path / "avg" / HEAD_FILE))["v_head.summary.0.weight"],
                       avg.v_head.summary[0].weight)


def test_averaging_refuses_members_that_differ(tok, tmp_path):
    a = {"w": torch.ones(2, 2), "n": torch.tensor([1])}
    with pytest.raises(ValueError, match=r"member 1.*shapes \['w: \(3, 2\) vs \(2, 2\)'\]"):
        average_state_dicts([a, {"w": torch.ones(3, 2), "n": torch.tensor([1])}])
    with pytest.raises(ValueError, match=r"missing \['n'\].*extra \['x'\]"):
        average_state_dicts([a, {"w": torch.ones(2, 2), "x": torch.tensor([1])}])
    with pytest.raises(ValueError, match="non-floating tensor 'n' differs"):
        average_state_dicts([a, {"w": torch.ones(2, 2), "n": torch.tensor([2])}])
    with pytest.raises(ValueError, match="at least 2 members"):
        average_state_dicts([a])
    # saved reward models: another head width, or another backbone width, is refused naming the member
    base_dir = build_base(tok, tmp_path / "base")
    first = saved_member(base_dir, tmp_path / "m0", seed=0)
    wide_head = saved_member(base_dir, tmp_path / "wide_head", seed=1, head=RewardHeadConfig(width=12))
    with pytest.raises(ValueError, match="reward head"):
        weight_averaged_reward_model([first, wide_head])
    wide_base = saved_member(build_base(tok, tmp_path / "wide", hidden_size=24), tmp_path / "wide_m", seed=1)
    with pytest.raises(ValueError, match=f"cannot average the weights of {tmp_path / 'wide_m'}"):
        weight_averaged_reward_model([first, wide_base])


# -------------------------------------------------------------------------------------- shared init, data order


def member_stage(member: ProxyConfig, base_dir: Path, **training) -> TrainProxyStageConfig:
    tr = dict(epochs=1, batch_size=4, max_length=64) | training
    return TrainProxyStageConfig(proxy=member.canonical(), training=RMTrainingConfig(**tr), base=BaseModelRef())


def test_warm_members_share_their_initialisation(base):
    warm = ProxyConfig(name="w", type="warm", members=3, seed=5, head_width=8)
    members = warm.member_specs()
    assert [(m.name, m.type, m.seed, m.init_seed) for m in members] == [
        ("w-m0", "bt", 5, 5), ("w-m1", "bt", 6, 5), ("w-m2", "bt", 7, 5)]
    heads = [train_proxy.init_reward_model(member_stage(m, base), str(base))[0].v_head.state_dict()
             for m in members]
    for other in heads[1:]:
        assert all(torch.equal(heads[0][k], other[k]) for k in heads[0])
    # without the shared init seed, the member's own seed would give another head
    alone = members[1].model_copy(update={"init_seed": None})
    own = train_proxy.init_reward_model(member_stage(alone, base), str(base))[0].v_head.state_dict()
    assert not torch.equal(own["summary.0.weight"], heads[1]["summary.0.weight"])
    # with LoRA, the adapters' random matrices are part of the shared initialisation too
    lora = LoraConfig(r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"])
    adapters = [{k: v for k, v in train_proxy.init_reward_model(member_stage(m, base, lora=lora), str(base))[0]
                 .state_dict().items() if "lora_A" in k} for m in members[:2]]
    assert adapters[0] and all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])


def test_warm_members_see_the_data_in_their_own_orders(base, tok, tmp_path):
    """The Trainer's first epoch over 12 pairs, each tagged by its index (the collator's `margin`)."""
    items = []
    for i in range(12):
        c = encode_conversation(tok, [{"role": "user", "content": f"list {i % 5 + 1} fruits"}], "apple", 64)
        items.append((c, c, float(i)))
    members = ProxyConfig(name="w", type="warm", members=2, head_width=8).member_specs()

    def order(member: ProxyConfig, scratch: Path) -> list[int]:
        cfg = member_stage(member, base)
        model, ref = train_proxy.init_reward_model(cfg, str(base))
        trainer = train_proxy.make_trainer(cfg, model, items, tok, ref, str(scratch))
        return [int(m) for batch in trainer.get_train_dataloader() for m in batch["margin"].tolist()]

    first, second = order(members[0], tmp_path / "s0"), order(members[1], tmp_path / "s1")
    assert sorted(first) == sorted(second) == list(range(12))
    assert first != second
    assert order(members[0], tmp_path / "s2") == first  # a member's order is its seed's, reproducibly


# ----------------------------------------------------------------------------------------------------- centering


def test_centering_term_by_hand_and_as_trl_writes_it():
    r_c, r_r = torch.tensor([1.0, 0.5, -2.0]), torch.tensor([0.0, 1.5, 1.0])
    # sums 1, 2, -1 -> squares 1, 4, 1 -> mean 2; times c = 0.01
    assert losses.reward_centering(r_c, r_r, 0.01).item() == pytest.approx(0.02)
    # TRL's RewardTrainer: loss += center_rewards_coefficient * torch.mean((rewards_chosen + rewards_rejected) ** 2)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, generator=g), torch.randn(16, generator=g)
    assert torch.equal(losses.reward_centering(a, b, 0.3), 0.3 * torch.mean((a + b) ** 2))
    with pytest.raises(ValueError, match="differ in shape"):
        losses.reward_centering(a, b[:3], 0.1)


@pytest.mark.parametrize("kind", ["bt", "label_smoothing", "frozen"])
def test_centering_is_added_to_every_trained_loss_and_described(kind):
    r_c, r_r = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0])
    plain = ProxyConfig(name="p", type=kind)
    centred = plain.model_copy(update={"center_coef": 0.5})
    base_loss = proxy_types.training_loss(plain, r_c, r_r, {}, None)
    # sums 3, 0 -> mean of squares 4.5; times 0.5
    assert proxy_types.training_loss(centred, r_c, r_r, {}, None).item() == pytest.approx(base_loss.item() + 2.25)
    assert proxy_types.describe_proxy(centred).endswith(", centred c=0.5")
    assert "center_coef" in proxy_types.used_fields(centred)
    assert proxy_types.describe_proxy(ProxyConfig(name="p", type="bt", center_coef=0.01)) == "BT, centred c=0.01"


# ------------------------------------------------------------------------------------------------ config, stages


def test_new_fields_leave_existing_fingerprints_alone():
    bt = ProxyConfig(name="bt", type="bt").canonical()
    assert {"center_coef", "init_seed"}.isdisjoint(fingerprint_view(bt))
    base = Runner(build_stages(load_config(SMOKE)), ArtifactCache("unused")).fingerprints()
    centred = Runner(build_stages(load_config(SMOKE, ["proxies.bt.center_coef=0.01"])),
                     ArtifactCache("unused")).fingerprints()
    changed = {k for k in base if base[k] != centred[k]}
    assert "train_proxy[bt]" in changed and not any("grm_sft" in k for k in changed)
    # unused by a checkpoint, so reset: it does not look like a new proxy
    ckpt = ProxyConfig(name="c", type="checkpoint", path="/m", center_coef=0.1)
    assert ckpt.canonical() == ProxyConfig(name="c", type="checkpoint", path="/m").canonical()


def test_warm_config_errors_and_seed_copies(tmp_path):
    warm = ProxyConfig(name="w", type="warm", members=2, seed=3, seeds=3)
    members = [[(m.name, m.seed, m.init_seed) for m in c.member_specs()] for c in warm.seed_copies()]
    assert members == [[("w-m0", 3, 3), ("w-m1", 4, 3)], [("w@seed4-m0", 5, 5), ("w@seed4-m1", 6, 5)],
                       [("w@seed5-m0", 7, 7), ("w@seed5-m1", 8, 7)]]  # no two copies share a member or an init
    cfg = tmp_path / "c.yaml"
    cfg.write_text("proxies:\n  - {name: w, type: warm, init_seed: 1}\n")
    with pytest.raises(ConfigError, match=r"proxies\.w\.init_seed"):
        load_config(cfg)
    cfg.write_text("proxies:\n  - {name: w, type: warm, members: 1}\n")
    with pytest.raises(ConfigError, match=r"proxies\.0\.members: Input should be greater than or equal to 2"):
        load_config(cfg)
    cfg.write_text("proxies:\n  - {name: w, type: warm}\n  - {name: w-m1, type: bt}\n")
    with pytest.raises(ConfigError, match=r"duplicate names \['w-m1'\]"):
        load_config(cfg)


# --------------------------------------------------------------------------------------------------- smoke study


def test_smoke_study_with_a_warm_proxy_and_a_centred_bt(tmp_path):
    tree = yaml.safe_load(SMOKE.read_text())
    tree["proxies"] = [{"name": "warm", "type": "warm", "members": 2, "head_width": 16},
                       {"name": "bt_c", "type": "bt", "center_coef": 0.01, "head_width": 16}]
    tree["ppo"] = None
    tree["knowledge"] = {"enabled": False}
    tree["gold_label"]["n_pairs"] = 100
    tree["run"] = {"cache_root": str(tmp_path / "cache"), "reports_dir": str(tmp_path / "report")}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(tree))
    cfg = load_config(path)
    cache = ArtifactCache(cfg.run.cache_root)
    plan = Runner(build_stages(cfg), cache).run()
    assert {p.status for p in plan} == {"cached"}
    art = {p.node.key: cache.path(p.node.key, p.fingerprint) for p in plan}
    assert {"train_proxy[warm-m0]", "train_proxy[warm-m1]", "warm_average[warm]", "train_proxy[bt_c]"} <= set(art)
    assert "train_proxy[warm]" not in art

    # the warm proxy's model is the mean of its members' trained weights
    members = [GRMRewardModel.from_pretrained(art[f"train_proxy[warm-m{i}]"] / "model").state_dict()
               for i in range(2)]
    averaged = GRMRewardModel.from_pretrained(art["warm_average[warm]"] / "model").state_dict()
    assert not torch.equal(members[0]["v_head.summary.0.weight"], members[1]["v_head.summary.0.weight"])
    assert averaged.keys() == members[0].keys()
    for name, value in averaged.items():
        assert torch.allclose(value, (members[0][name] + members[1][name]) / 2, atol=1e-6), name

    acc = pd.read_csv(tmp_path / "report" / "accuracy.csv")
    assert set(acc.proxy) == {"warm", "bt_c"} and acc.accuracy.between(0, 1).all()
    assert set(pd.read_csv(tmp_path / "report" / "bon_curves.csv").proxy_name) == {"warm", "bt_c"}
    readme = (tmp_path / "report" / "README.md").read_text()
    assert "WARM of 2" in readme and "BT, centred c=0.01" in readme
    metrics = json.loads((art["warm_average[warm]"] / "metrics.json").read_text())
    assert metrics["member_names"] == ["warm-m0", "warm-m1"]
