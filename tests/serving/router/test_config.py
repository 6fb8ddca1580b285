"""The router config: valid files load; each bad one is an error naming its field."""

import hashlib
import subprocess
import sys

import pytest
from kvpilot.serving.router.config import (
    ConfigError,
    load_config,
    parse_config,
    parse_duration,
    tenant_key_hashes,
)

GOOD = """
models:
- name: smollm2
  revisions:
  - name: stable
    weight: 90
    endpoints: [http://10.0.0.5:8000, http://10.0.0.6:8000/]
  - name: canary
    weight: 10
    service: http://smollm2-canary:8000
  balancing: least-request
  activation: {timeout: 5m, maxQueued: 7}
tenants:
- name: team-a
  keySha256: 9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08
  models: [smollm2]
  requestsPerMinute: 600
  tokensPerMinute: 200000
upstreamApiKeyFile: /etc/kvpilot/upstream/key
"""

MINIMAL = "models:\n- name: m\n  revisions:\n  - name: r\n"


def test_the_issue_example_loads_with_its_values():
    config = parse_config(GOOD)
    model = config.model("smollm2")
    assert [r.name for r in model.revisions] == ["stable", "canary"]
    assert model.revisions[0].addresses == ["http://10.0.0.5:8000", "http://10.0.0.6:8000"]
    assert model.revisions[1].addresses == ["http://smollm2-canary:8000"]
    assert (model.balancing, model.activation.timeout, model.activation.max_queued) == (
        "least-request",
        300.0,
        7,
    )
    tenant = config.tenants[0]
    assert tenant.key_sha256 == hashlib.sha256(b"test").hexdigest()
    assert (tenant.models, tenant.requests_per_minute, tenant.tokens_per_minute) == (["smollm2"], 600, 200000)
    assert config.upstream_api_key_file == "/etc/kvpilot/upstream/key"
    assert config.model("other") is None


def test_defaults():
    model = parse_config(MINIMAL).models[0]
    assert (model.balancing, model.activation.timeout, model.activation.max_queued) == ("prefix", 300.0, 1000)
    assert (model.revisions[0].weight, model.revisions[0].addresses) == (100, [])
    assert parse_config(MINIMAL).tenants is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("models: []", "models: List should have at least 1 item"),
        ("- a", "expected a mapping"),
        ("models: [", "not valid YAML"),
        ("models:\n- name: m\n  revisions: []", "models[0].revisions: List should have at least 1 item"),
        (
            MINIMAL + "    weight: -1",
            "models[0].revisions[0].weight: Input should be greater than or equal to 0",
        ),
        (MINIMAL + "    wieght: 3", "models[0].revisions[0].wieght: Extra inputs are not permitted"),
        (
            MINIMAL + "    endpoints: [ftp://x]",
            "models[0].revisions[0].endpoints[0]: expected an http(s)://host",
        ),
        (
            MINIMAL + "    endpoints: ['http://a:1', 'http://a:1']",
            "models[0].revisions[0]: endpoints are listed twice",
        ),
        (
            MINIMAL + "    endpoints: ['http://a:1']\n    service: http://b:2",
            "models[0].revisions[0]: set endpoints or",
        ),
        (MINIMAL + "  - name: r", "models[0].revisions: revision names must be unique: r repeated"),
        (
            MINIMAL + "  balancing: nearest",
            "models[0].balancing: Input should be 'prefix', 'least-request' or",
        ),
        (MINIMAL + "  activation: {timeout: 3x}", "models[0].activation.timeout: expected a duration"),
        (
            MINIMAL + "  activation: {maxQueued: -1}",
            "models[0].activation.maxQueued: Input should be greater",
        ),
        (MINIMAL + MINIMAL.removeprefix("models:\n"), "models: model names must be unique: m repeated"),
        (MINIMAL + "tenants:\n- {name: t}", "tenants[0]: set exactly one of keySha256 and keyFile"),
        (MINIMAL + "tenants:\n- {name: t, keySha256: abc}", "tenants[0].keySha256: expected 64 hexadecimal"),
        (
            MINIMAL + "tenants:\n- {name: t, keyFile: /k, requestsPerMinute: 0}",
            "tenants[0].requestsPerMinute: Input",
        ),
        (
            MINIMAL + "tenants:\n- {name: t, keyFile: /a}\n- {name: t, keyFile: /b}",
            "tenants: tenant names must be",
        ),
    ],
)
def test_a_bad_config_names_the_field(text, expected):
    with pytest.raises(ConfigError) as error:
        parse_config(text, "router.yaml")
    assert str(error.value).startswith(f"router.yaml: {expected}"), str(error.value)


def test_durations():
    assert [parse_duration(v) for v in ("300s", "5m", "1h", "250ms", 2, "1.5")] == [
        300,
        300,
        3600,
        0.25,
        2,
        1.5,
    ]
    for bad in ("0s", "-1", "soon", True):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_key_files_are_hashed_at_load_and_errors_name_the_tenant(tmp_path):
    (tmp_path / "a").write_text("key-a\n")
    (tmp_path / "empty").write_text("\n")
    digest_b = hashlib.sha256(b"key-b").hexdigest()
    config = parse_config(
        MINIMAL + f"tenants:\n- {{name: a, keyFile: {tmp_path / 'a'}}}\n- {{name: b, keySha256: {digest_b}}}"
    )
    assert tenant_key_hashes(config) == {
        hashlib.sha256(b"key-a").hexdigest(): "a",
        hashlib.sha256(b"key-b").hexdigest(): "b",
    }
    for path, expected in (
        (tmp_path / "missing", "tenants[0].keyFile: cannot read"),
        (tmp_path / "empty", "tenants[0].keyFile: "),
    ):
        with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]")):
            tenant_key_hashes(parse_config(MINIMAL + f"tenants:\n- {{name: a, keyFile: {path}}}"))
    same = (
        MINIMAL
        + f"tenants:\n- {{name: a, keyFile: {tmp_path / 'a'}}}\n- {{name: b, keyFile: {tmp_path / 'a'}}}"
    )
    with pytest.raises(ConfigError, match=r"tenants\[1\]: same key as tenant 'a'"):
        tenant_key_hashes(parse_config(same))


def test_load_config_names_a_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "r.yaml").write_text(MINIMAL)
    assert load_config(tmp_path / "r.yaml").models[0].name == "m"


def test_the_config_module_imports_nothing_heavy():
    heavy = "{'torch', 'fastapi', 'httpx', 'starlette'}"
    code = f"import sys, kvpilot.serving.router.config; print(sorted({heavy} & set(sys.modules)))"
    assert (
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        == "[]"
    )
