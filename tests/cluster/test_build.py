"""The binary build's bookkeeping with a stand-in `go`: one build per binary, however many callers."""

import os
import subprocess
import sys
from pathlib import Path

from tests.cluster.build import COMMANDS

REPO_ROOT = Path(__file__).resolve().parents[2]
# Answers `go env GOVERSION`; for `go build ... -o OUT PKG` notes the call, waits, writes OUT.
FAKE_GO = """#!/bin/sh
if [ "$1" = env ]; then echo go1.26.8; exit 0; fi
echo "$@" >> "$FAKE_GO_CALLS"
sleep 1
while [ $# -gt 0 ]; do if [ "$1" = -o ]; then out=$2; fi; shift; done
echo binary > "$out"
"""


def test_two_concurrent_callers_build_each_binary_once_and_print_the_time(tmp_path):
    go = tmp_path / "go"
    go.write_text(FAKE_GO)
    go.chmod(0o755)
    calls = tmp_path / "calls"
    env = {
        **os.environ,
        "KVPILOT_GO": str(go),
        "KVPILOT_K8S_CACHE": str(tmp_path / "cache"),
        "FAKE_GO_CALLS": str(calls),
    }
    command = [sys.executable, "-m", "tests.cluster.build"]
    callers = [
        subprocess.Popen(
            command, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [caller.communicate(timeout=60) for caller in callers]
    assert [caller.returncode for caller in callers] == [0, 0], outputs
    built = calls.read_text().splitlines()
    assert [line.split()[-1] for line in built] == [f"k8s.io/kubernetes/cmd/{name}" for name in COMMANDS]
    assert all("-X k8s.io/component-base/version.gitVersion=v1.36.5" in line for line in built)
    bin_dir = tmp_path / "cache" / "v1.36.5" / "bin"
    assert {stdout.strip() for stdout, _ in outputs} == {str(bin_dir)}
    assert sorted(p.name for p in bin_dir.iterdir()) == sorted(COMMANDS)
    assert "built kube-apiserver in" in "".join(stderr for _, stderr in outputs)
    go_mod = (tmp_path / "cache" / "v1.36.5" / "src" / "go.mod").read_text()
    assert "k8s.io/client-go => k8s.io/client-go v0.36.5" in go_mod


def test_a_test_that_cannot_get_its_binaries_fails_and_never_skips(tmp_path):
    go = tmp_path / "go"
    go.write_text(
        '#!/bin/sh\nif [ "$1" = env ]; then echo go1.26.8; exit 0; fi\necho "no network" >&2\nexit 1\n'
    )
    go.chmod(0o755)
    test = tmp_path / "test_needs_a_control_plane.py"
    test.write_text("def test_it(control_plane):\n    pass\n")
    env = {**os.environ, "KVPILOT_GO": str(go), "KVPILOT_K8S_CACHE": str(tmp_path / "cache")}
    # The suite's fixtures and build hook (tests/conftest.py) as a plugin, on a test outside the tree.
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "tests.conftest",
        str(test),
    ]
    child = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert child.returncode == 1, child.stdout + child.stderr
    assert "1 error" in child.stdout and "skipped" not in child.stdout, child.stdout
    assert "go build kube-apiserver failed" in child.stdout
