from pathlib import Path

import pytest

from pipeline.config import ConfigError, dump_config, load_config

TINY = Path(__file__).parents[1] / "configs" / "tiny.yaml"


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_tiny_config_loads_and_round_trips(tmp_path):
    cfg = load_config(TINY)
    assert cfg.study == "tiny"
    assert [p.name for p in cfg.proxies][:2] == ["bt", "grm_sft"]
    again = load_config(write(tmp_path, dump_config(cfg)))
    assert again == cfg


def test_unknown_key_names_it_and_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "gold_label:\n  noise_rat: 0.1\n"))
    assert "gold_label.noise_rat" in str(e.value) and "noise_rate" in str(e.value)


def test_unknown_key_inside_a_proxy(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "proxies:\n  - {name: a, type: grm, alpah: 0.1}\n"))
    assert "proxies.0.alpah" in str(e.value) and "alpha" in str(e.value)


def test_wrong_type_and_range_name_the_key(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "gold_label:\n  noise_rate: 0.9\n"))
    assert "gold_label.noise_rate" in str(e.value) and "0.5" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "bon:\n  n_samples: many\n"))
    assert "bon.n_samples" in str(e.value) and "integer" in str(e.value)


def test_overrides(tmp_path):
    cfg = load_config(TINY, ["gold_label.noise_rate=0.25", "proxies.bt.seed=3", "bon.sampling.temperature=0.7"])
    assert cfg.gold_label.noise_rate == 0.25
    assert next(p for p in cfg.proxies if p.name == "bt").seed == 3
    assert cfg.bon.sampling.temperature == 0.7
    with pytest.raises(ConfigError, match="proxies.nope.seed"):
        load_config(TINY, ["proxies.nope.seed=1"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(TINY, ["gold_label"])
    with pytest.raises(ConfigError, match="did you mean 'noise_rate'"):
        load_config(TINY, ["gold_label.noise_rat=0.1"])


def test_cross_field_checks(tmp_path):
    with pytest.raises(ConfigError, match="duplicate names"):
        load_config(write(tmp_path, "proxies:\n  - {name: a, type: bt}\n  - {name: a, type: grm}\n"))
    with pytest.raises(ConfigError, match="no 'path'"):
        load_config(write(tmp_path, "proxies:\n  - {name: a, type: checkpoint}\n"))
    with pytest.raises(ConfigError, match="n_values"):
        load_config(write(tmp_path, "bon:\n  n_samples: 8\n  n_values: [1, 16]\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_proxy_training_overrides_and_ensemble_members():
    cfg = load_config(TINY, ["proxies.bt.training={lr: 0.5}"])
    bt = next(p for p in cfg.proxies if p.name == "bt")
    assert bt.resolved_training(cfg.proxy_training).lr == 0.5
    assert bt.resolved_training(cfg.proxy_training).epochs == cfg.proxy_training.epochs
    from pipeline.config import ProxyConfig

    ens = ProxyConfig(name="ens", type="ensemble", members=3, seed=10)
    members = ens.member_specs()
    assert [m.name for m in members] == ["ens-m0", "ens-m1", "ens-m2"]
    assert [m.seed for m in members] == [10, 11, 12] and all(m.type == "bt" for m in members)


def test_bon_curve_needs_two_n_above_one(tmp_path):
    with pytest.raises(ConfigError, match="at least two n > 1"):
        load_config(write(tmp_path, "bon:\n  n_samples: 8\n  n_values: [1, 4]\n"))
    with pytest.raises(ConfigError, match="at least two n > 1"):
        load_config(write(tmp_path, "bon:\n  n_samples: 3\n"))
    one_proxy = "proxies:\n  - {name: bt, type: bt}\n"
    assert load_config(write(tmp_path, one_proxy + "bon:\n  n_samples: 4\n")).bon.curve_ns() == [1, 2, 4]


@pytest.mark.parametrize("text", ["proxies: []\n", "study: x\n"])
def test_a_study_needs_at_least_one_proxy(tmp_path, text):
    with pytest.raises(ConfigError, match="a study needs at least one proxy") as err:
        load_config(write(tmp_path, text))
    assert "Value error" not in str(err.value)


def test_proxy_type_lists_and_canonical_come_from_the_proxy_type_table():
    import typing

    from pipeline import proxy_types
    from pipeline.config import ProxyConfig, ProxyType, TrainedType

    assert set(typing.get_args(ProxyType)) == set(proxy_types.PROXY_TYPES)
    assert set(typing.get_args(TrainedType)) == {n for n, s in proxy_types.PROXY_TYPES.items() if s.trained}
    for name, spec in proxy_types.PROXY_TYPES.items():
        extra = {"path": "x"} if name == "checkpoint" else {}
        canon = ProxyConfig(name="p", type=name, **extra).canonical()
        kept = set(ProxyConfig.model_fields) - (proxy_types.COMMON_FIELDS | spec.fields)
        if name == "ensemble":
            kept -= proxy_types.PROXY_TYPES["bt"].fields
        assert all(getattr(canon, f) == ProxyConfig.model_fields[f].default for f in kept), name


def test_missing_relative_model_dir_is_named(tmp_path, monkeypatch):
    from pipeline.scoring import load_reward_scorer

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpts").mkdir()
    with pytest.raises(FileNotFoundError, match="ckpts/rm"):
        load_reward_scorer("ckpts/rm")


def test_bad_override_value_and_colliding_member_names(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(TINY, ["proxy_training.lora={r:"])
    with pytest.raises(ConfigError, match="e-m0"):
        load_config(write(tmp_path, "proxies:\n  - {name: e, type: ensemble, members: 2}\n"
                                    "  - {name: e-m0, type: bt}\n"))


def test_home_relative_paths_are_expanded_once(tmp_path):
    import os

    cfg = load_config(write(tmp_path, "proxies:\n  - {name: r, type: checkpoint, path: ~/models/rm}\n"))
    assert cfg.proxies[0].path == os.path.expanduser("~/models/rm")


def test_canonical_proxies_drop_fields_their_type_does_not_use():
    from pipeline.config import ProxyConfig

    bt = ProxyConfig(name="a", type="bt", alpha=0.5, epsilon=0.2)
    assert bt.canonical() == ProxyConfig(name="a", type="bt")
    ens = ProxyConfig(name="e", type="ensemble", combine="mean", uwo_lambda=3.0, alpha=0.7)
    assert ens.canonical() == ProxyConfig(name="e", type="ensemble", combine="mean")
    grm_ens = ProxyConfig(name="e", type="ensemble", member_type="grm", alpha=0.7, combine="uwo", uwo_lambda=3.0)
    assert grm_ens.canonical().alpha == 0.7 and grm_ens.canonical().uwo_lambda == 3.0


@pytest.mark.parametrize("typo, hint", [("proxy_training.lr_rate", "lr"), ("gold_label.noise", "noise_rate"),
                                        ("gold_label.noise_rat", "noise_rate")])
def test_unknown_key_hint_prefers_a_key_with_something_added_or_cut(typo, hint):
    with pytest.raises(ConfigError, match=f"unknown key '{typo}' \\(did you mean '{hint}'\\?\\)"):
        load_config(TINY, [f"{typo}=1"])
