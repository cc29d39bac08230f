"""The `streamzoo` command line, the core demo and the latency harness behind it."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import tomllib

import jax
import numpy as np
import pytest

from streamzoo.cli import main
from streamzoo.core import Seq, carry_nbytes
from streamzoo.demos import core_stack
from streamzoo.eval.latency import format_table, measure_stream, offline
from streamzoo.layers.pooling import CumulativeMean

ROOT = pathlib.Path(__file__).resolve().parents[1]


# The commands README.md gives, which .ci/run must run verbatim.
README_COMMANDS = {
    "system packages": "apt-get update && apt-get install -y espeak-ng sox python3-doc",
    "setup": 'python3.11 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]" && pip install --no-deps silero-vad==6.2.3',
    "tests": "python -m pytest",
}


def test_readme_and_ci_run_the_same_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for name, command in README_COMMANDS.items():
        assert f"```bash\n{command}\n```" in readme, f"README.md: {name} command {command!r} missing"
        marker = ci.index(f"# README: {name}")
        assert command in ci[marker + 1], f".ci/run: expected {command!r}, got {ci[marker + 1]!r}"
    assert "```bash\nstreamzoo demo\n```" in readme


def test_readme_example_runs():
    readme = (ROOT / "README.md").read_text()
    examples = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert examples, "README.md: expected a python example"
    for code in examples:
        exec(compile(code, "README.md", "exec"), {})


def test_console_script_points_at_main():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["streamzoo"] == "streamzoo.cli:main"


def test_demo_help_in_a_fresh_process():
    done = subprocess.run([sys.executable, "-m", "streamzoo.cli", "demo", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: streamzoo demo" in done.stdout
    assert "core" in done.stdout


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["demo", "core", "--help"]])
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert "usage: streamzoo" in capsys.readouterr().out


def test_bad_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "core", "--chunk-sizes", "0"])
    assert exit_info.value.code == 2
    assert "--chunk-sizes: expected a positive integer, got 0" in capsys.readouterr().err


def test_core_demo_streams_real_speech_like_offline(capsys):
    code = main(["demo", "--quick"])
    out, err = capsys.readouterr()
    assert code == 0, f"streamzoo demo --quick exited with {code}\n{out}\n{err}"
    assert "core (default)" in out  # no family given: the families are listed
    rows = re.findall(r"^\s*(\d+)\s+\d+\s+.*\s(\S+)$", out, flags=re.M)
    assert [int(chunk) for chunk, _ in rows] == [1, 8], out
    for chunk, deviation in rows:
        assert float(deviation) < 1e-4, f"chunk {chunk}: max deviation {deviation}\n{out}"


def test_demo_without_espeak_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no espeak-ng on the PATH
    assert main(["demo", "core", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "espeak-ng is not installed" in err and "apt-get install -y espeak-ng" in err


def test_log_mel_of_real_speech():
    audio = core_stack.synthesize("Seven", voice="en-us")
    assert audio.dtype == np.float32 and audio.ndim == 1 and np.abs(audio).max() <= 1.0
    feats = core_stack.log_mel(audio)
    hop, win = core_stack.SAMPLE_RATE // 100, core_stack.SAMPLE_RATE * 25 // 1000
    assert feats.shape == (1 + (audio.shape[0] - win) // hop, core_stack.NUM_MELS)
    assert np.isfinite(feats).all()
    energy = feats.mean(axis=1)
    assert energy.max() - energy.min() > 5.0  # speech and the silence around it differ
    with pytest.raises(ValueError, match="audio: expected a 1-D signal"):
        core_stack.log_mel(audio[:10])


def test_latency_harness_reports_deviation_carry_and_times(key):
    lengths = np.array([13, 7])
    x = Seq.from_lengths(jax.random.normal(key, (2, 13, 4)), lengths)
    model = CumulativeMean(4)
    report = measure_stream(model, x, 4, frame_ms=10.0, progress=False)
    assert report.num_chunks == 4 and report.chunk_ms.shape == (4,)
    assert report.max_deviation < 1e-5
    assert report.carry_bytes == carry_nbytes(model.init_carry(2))
    assert report.p50_ms <= report.p90_ms
    assert report.real_time_factor == pytest.approx(report.p50_ms / 40.0)
    assert "max |stream-offline|" in format_table([report])

    wrong = offline(model, x)
    wrong = wrong.replace(values=wrong.values + 1.0)
    assert measure_stream(model, x, 4, reference=wrong, progress=False).max_deviation > 0.5
    with pytest.raises(ValueError, match="chunk_size: expected a positive multiple"):
        measure_stream(model, x, 0)
