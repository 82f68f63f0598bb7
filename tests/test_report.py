"""The report's self-contained HTML page and its "Made with" environment section."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from pipeline.environment import PACKAGES, cpu_model, describe
from pipeline.html_report import markdown_to_html

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9aw"
                       "AAAABJRU5ErkJggg==")  # a 1×1 pixel


def local_references(page: str) -> list[str]:
    """Every src/href value of the page that is not a data URI, a web address or an anchor."""
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    return [r for r in refs if not r.startswith(("data:", "http://", "https://", "#"))]


def check_self_contained(page: str, report_dir: Path, readme: str) -> None:
    """The checks the report stage's HTML must pass: tables, every referenced PNG embedded, no local file named."""
    assert page.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in page
    assert "<table>" in page
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme)
    assert images, "the README references no image"
    for name in images:
        encoded = base64.b64encode((report_dir / name).read_bytes()).decode("ascii")
        assert f'<img src="data:image/png;base64,{encoded}"' in page, name
    assert page.count('<img src="data:image/png;base64,') == len(images)
    assert local_references(page) == []
    assert ".png" not in page and ".csv" not in page


def test_markdown_renders_tables_and_embeds_pngs(tmp_path):
    (tmp_path / "plot.png").write_bytes(PNG)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "other.png").write_bytes(PNG + b"x")
    readme = ("# Study `t`\n\nα ≤ β ± 1 <script>alert(1)</script>\n\n| proxy | gold |\n|---|---|\n| bt | 1.000 |\n\n"
              "![a plot](plot.png)\n\n![another](sub/other.png) see [the table](accuracy.csv), "
              "[the paper](https://arxiv.org/abs/2406.10216) and [below](#made-with)\n")
    page = markdown_to_html(readme, tmp_path, "study t")
    check_self_contained(page, tmp_path, readme)
    assert "<title>study t</title>" in page and "α ≤ β ± 1" in page
    assert "<script>" not in page  # raw HTML in the markdown is escaped
    assert "see the table," in page  # a link to a local file keeps its text, not the link
    assert '<a href="https://arxiv.org/abs/2406.10216">the paper</a>' in page and 'href="#made-with"' in page


def test_markdown_refuses_missing_or_non_png_images(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        markdown_to_html("![x](missing.png)\n", tmp_path, "t")
    (tmp_path / "plot.svg").write_text("<svg/>")
    with pytest.raises(ValueError, match="plot.svg"):
        markdown_to_html("![x](plot.svg)\n", tmp_path, "t")


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
