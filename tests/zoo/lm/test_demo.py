"""`streamzoo demo lm`: StreamingLLM decoding with the checked-in model under a small sinks +
window ring (so a short run already evicts), its table and checks; bad arguments exit with 2
and name the argument."""

from __future__ import annotations

import re

import pytest

from streamzoo.zoo.lm import demo


def test_demo_small_ring(capsys):
    argv = ["--tokens", "40", "--sinks", "2", "--window", "20", "--prompt", "Return a new list",
            "--temperature", "0.8", "--top-k", "8", "--seed", "3", "--chunk", "8"]
    assert demo.main(argv) == 0
    out = capsys.readouterr().out
    assert "Return a new list" in out
    for row in ("tokens generated", "tokens/s (after compile)", "compile of the decode loop",
                "carry bytes at start", "carry bytes at end"):
        assert row in out, row
    assert re.search(r"tokens generated\s+40 in 2 generate calls", out)
    start = re.search(r"carry bytes at start\s+([\d,]+)", out).group(1)
    end = re.search(r"carry bytes at end\s+([\d,]+)", out).group(1)
    assert start == end and int(start.replace(",", "")) > 0
    # 1 start token + 17 prompt bytes + 40 new tokens, of which 2 + 20 stay in the ring.
    assert re.search(r"tokens committed to the stream\s+58\n", out)
    assert re.search(r"tokens evicted from the ring\s+36\n", out)
    assert "OK: greedy decoding of the first 32 tokens == argmax of the offline forward" in out
    assert "OK: next-token logits after 40 tokens == offline" in out


@pytest.mark.parametrize("argv, message", [
    (["--tokens", "0"], "argument --tokens: expected an integer >= 1, got 0"),
    (["--window", "ten"], "argument --window: expected an integer, got 'ten'"),
    (["--temperature", "-1"], "argument --temperature: expected a finite number >= 0, got -1"),
    (["--top-k", "-2"], "argument --top-k: expected an integer >= 0, got -2"),
])
def test_demo_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
