"""`overopt show` lists everything a study can swap in, each with what it is; the tables stay complete."""

from __future__ import annotations

from pipeline.cli import print_catalog
from pipeline.proxy_types import PROXY_OPTIONS, PROXY_TYPES, used_fields
from pipeline.reward_transforms import DESCRIPTIONS, KINDS


def test_every_proxy_type_and_transform_is_described_and_listed(capsys):
    assert all(spec.summary for spec in PROXY_TYPES.values())
    # every type trained or combined here names its paper (a checkpoint is whatever the user brings)
    assert all(spec.reference for name, spec in PROXY_TYPES.items() if name != "checkpoint")
    assert set(DESCRIPTIONS) == set(KINDS)
    print_catalog()
    out = capsys.readouterr().out
    for name in [*PROXY_TYPES, *PROXY_OPTIONS, *KINDS]:
        assert f"  {name} " in out, name


def test_proxy_options_are_fields_of_every_trained_type():
    from pipeline.config import ProxyConfig

    for name, spec in PROXY_TYPES.items():
        if spec.trained:
            proxy = ProxyConfig(name="p", type=name, **({"path": "x"} if name == "checkpoint" else {}))
            assert set(PROXY_OPTIONS) <= used_fields(proxy), name
