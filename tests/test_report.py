"""The report's "Made with" environment section."""

from __future__ import annotations

import re

from pipeline.environment import PACKAGES, cpu_model, describe


def test_describe_names_versions_cpu_threads_and_date(tmp_path):
    import torch

    env = describe()
    assert set(env) == {"python", *PACKAGES, "cpu", "logical_cpus", "torch_threads", "date"}
    assert env["torch"].startswith(torch.__version__.split("+")[0])
    assert env["torch_threads"] == torch.get_num_threads() and env["logical_cpus"] >= 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", env["date"])
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Example CPU @ 2.50GHz\n\n"
                    "processor\t: 1\nmodel name\t: Example CPU @ 2.50GHz\n")
    assert cpu_model(info) == "Example CPU @ 2.50GHz"
    info.write_text("processor\t: 0\nHardware\t: some ARM board\n")  # no model name: platform.processor()
    import platform

    assert cpu_model(info) == (platform.processor() or "unknown")
    assert cpu_model(tmp_path / "absent") == (platform.processor() or "unknown")
