"""A fatal start-up error leaves one line in the termination log, where Kubernetes reads it."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from kvpilot.serving.api.termination import termination_log_path, write_termination_reason


def test_the_default_path_only_when_it_exists_and_is_writable(tmp_path):
    default = tmp_path / "termination-log"
    assert termination_log_path(None, str(default)) is None  # absent
    default.write_text("")
    assert termination_log_path(None, str(default)) == default
    assert termination_log_path("", str(default)) is None  # '' turns it off
    assert termination_log_path(str(tmp_path / "mine"), str(default)) == tmp_path / "mine"
    default.chmod(0o444)
    if os.access(default, os.W_OK):
        pytest.skip("running as root: every file is writable")
    assert termination_log_path(None, str(default)) is None


def test_the_reason_is_one_line_cut_to_what_the_kubelet_reads(tmp_path):
    path = tmp_path / "log"
    write_termination_reason(str(path), "first\nsecond\t third " + "x" * 10_000)
    text = path.read_text()
    assert text.startswith("first second third x") and text.count("\n") == 1 and len(text) <= 4096
    write_termination_reason(str(tmp_path / "no" / "such" / "dir"), "unwritable: logged, not raised")


def serve(args: list[str], termination_log) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "kvpilot.serving.cli", "serve", "--port", "0", *args]
    command += ["--termination-log", str(termination_log)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_a_checkpoint_that_does_not_load_exits_1_with_its_reason(tiny_llama, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(config | {"architectures": ["GPT2LMHeadModel"]}))
    log = tmp_path / "termination-log"
    result = serve(["--model", str(broken)], log)
    assert result.returncode == 1, result.stderr[-2000:]
    line = log.read_text()
    assert line.count("\n") == 1 and line.startswith("kvpilot serve: cannot load the model")
    assert "config.json: field 'architectures': unsupported ['GPT2LMHeadModel']" in line


def test_a_bad_setting_exits_2_with_the_flag_named(tmp_path):
    log = tmp_path / "termination-log"
    result = serve(["--max-num-seqs", "0"], log)
    assert result.returncode == 2
    assert log.read_text() == result.stderr.strip().splitlines()[-1] + "\n"
    assert "--max-num-seqs" in log.read_text()
