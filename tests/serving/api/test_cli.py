"""`kvpilot serve` flag and env-var validation: one line naming the flag, exit code 2, no traceback."""

import pytest
from kvpilot.serving import cli


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["--max-num-seqs", "0"], {}, "--max-num-seqs"),
        (["--port", "http"], {}, "--port"),
        (["--tensor-parallel-size", "2"], {}, "--tensor-parallel-size"),
        (["--quantization", "int3"], {}, "--quantization"),
        (["--kv-cache-dtype", "fp4"], {}, "--kv-cache-dtype"),
        (["--kv-cache-memory", "lots"], {}, "--kv-cache-memory"),
        (["--model", "/no/such/checkpoint"], {}, "--model"),
        (["--shutdown-timeout", "-1"], {}, "--shutdown-timeout"),
        (["--gpu-memory-utilization", "1.5"], {}, "--gpu-memory-utilization"),
        (["--gpu-memory-utilization", "0"], {}, "--gpu-memory-utilization"),
        (["--dtype", "fp8"], {}, "--dtype"),
        (["--max-request-bytes", "lots"], {}, "--max-request-bytes"),
        ([], {"KVPILOT_MAX_QUEUE_LEN": "-3"}, "KVPILOT_MAX_QUEUE_LEN"),
        ([], {"KVPILOT_BLOCK_SIZE": "sixteen"}, "KVPILOT_BLOCK_SIZE"),
    ],
)
def test_bad_value_is_one_line_naming_the_flag(argv, env, named, monkeypatch, capsys):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err and "Traceback" not in err


def test_flags_override_env_and_reach_the_engine_config(monkeypatch, tiny_llama):
    from kvpilot.serving.api.settings import ServeSettings

    monkeypatch.setenv("KVPILOT_MAX_NUM_SEQS", "5")
    monkeypatch.setenv("KVPILOT_ENABLE_PREFIX_CACHING", "false")
    settings = ServeSettings(model=str(tiny_llama), kv_cache_memory="64MiB", max_num_batched_tokens=128)
    config = settings.engine_config()
    assert (config.max_num_seqs, config.enable_prefix_caching) == (5, False)
    assert (config.kv_cache_memory_bytes, config.max_num_batched_tokens) == (64 << 20, 128)
    assert settings.model_name == str(tiny_llama)


def test_serving_defaults_and_sizes(tiny_llama):
    from kvpilot.serving.api.settings import ServeSettings

    defaults = ServeSettings(model=str(tiny_llama))
    config = defaults.engine_config()
    assert (config.dtype, config.gpu_memory_utilization, config.kv_cache_memory_bytes) == ("auto", 0.9, None)
    assert (defaults.max_request_bytes, defaults.termination_log) == (4 << 20, None)
    assert ServeSettings(model=str(tiny_llama), max_request_bytes="512KiB").max_request_bytes == 512 << 10


def test_default_model_is_the_bundled_smollm2(default_gguf):
    from kvpilot.serving.api.settings import ServeSettings

    settings = ServeSettings()
    assert settings.model_path == str(default_gguf)
    assert settings.model_name == "SmolLM2-135M-Instruct"


def test_subcommands_are_wired(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for command in ("serve", "demo", "bench", "crd", "render", "operator"):
        assert command in out
