"""The docs a new user follows: every Python block of docs/contract.md runs, in order, in one
namespace, and pdoc renders the contract's API pages."""

from __future__ import annotations

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUIDE = os.path.join(ROOT, "docs", "contract.md")


def python_blocks(path: str) -> list[str]:
    with open(path) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_contract_guide_runs(capsys):
    blocks = python_blocks(GUIDE)
    assert len(blocks) >= 5, "docs/contract.md lost its code blocks"
    namespace: dict = {"__name__": "contract_guide"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"docs/contract.md block {i + 1}", "exec"), namespace)
        except Exception as err:  # noqa: BLE001 - report which block failed
            pytest.fail(f"docs/contract.md block {i + 1} failed: {type(err).__name__}: {err}\n{block}")
    out = capsys.readouterr().out
    from streamzoo.testing import ALL_CHECKS

    # the broken layer's error names the failing check; the EMA report lists every check
    assert re.search(r"^\[(" + "|".join(ALL_CHECKS) + r")\] ", out, flags=re.M), out
    assert str(sorted(ALL_CHECKS)) in out, out


def test_pdoc_renders_the_contract_api(tmp_path):
    pdoc = pytest.importorskip("pdoc")
    pdoc.pdoc("streamzoo", "streamzoo.core", "streamzoo.testing", output_directory=tmp_path)
    page = (tmp_path / "streamzoo" / "testing.html").read_text()
    assert "assert_stream_contract" in page and "StreamContractError" in page
    assert (tmp_path / "streamzoo" / "core.html").exists()
