"""The operator's Deployments start servers that `kvpilot serve` accepts, with the spec's settings."""

from pathlib import Path

import pytest
import yaml
from kvpilot.operator.api import InferenceService
from kvpilot.operator.api.validation import duration_seconds
from kvpilot.operator.builders import build_deployment
from kvpilot.serving.api.settings import ServeSettings
from kvpilot.serving.cli import build_parser
from kvpilot.serving.contract import DEFAULT_PORT, HEALTH_PATH, READY_PATH, SERVE_SETTING

EXAMPLES = sorted(Path(__file__).parent.parent.joinpath("examples").glob("*.yaml"))


def server_container(manifest: dict) -> dict:
    deployment = build_deployment(InferenceService.from_body(manifest))
    return deployment["spec"]["template"]["spec"]["containers"][0]


def parse_serve(argv: list[str], model_dir: Path) -> ServeSettings:
    args = vars(build_parser(["serve"]).parse_args(argv))
    given = {k: v for k, v in args.items() if k in SERVE_SETTING}
    return ServeSettings(**{**given, "model": str(model_dir)})  # the pod's volume is not here


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_rendered_server_args_parse_to_the_spec(example, tmp_path):
    manifest = yaml.safe_load(example.read_text())
    engine = InferenceService.from_body(manifest).spec.engine
    if engine.tensor_parallel_size != 1:
        pytest.skip("the bundled server runs one device per replica")
    container = server_container(manifest)
    assert container["command"][-1] == "serve"
    settings = parse_serve(["serve", *container["args"]], tmp_path)
    assert settings.served_model_name == manifest["spec"]["model"]["name"]
    assert settings.port == DEFAULT_PORT == container["ports"][0]["containerPort"]
    assert settings.quantization == engine.quantization
    assert settings.kv_cache_dtype == engine.kv_cache_dtype
    assert settings.max_model_len == engine.max_model_len
    assert settings.enable_prefix_caching == engine.enable_prefix_caching
    assert container["readinessProbe"]["httpGet"]["path"] == READY_PATH
    assert container["livenessProbe"]["httpGet"]["path"] == HEALTH_PATH
    assert container["startupProbe"]["httpGet"]["path"] == READY_PATH
    assert settings.shutdown_timeout == duration_seconds(engine.drain_timeout)


def test_every_engine_setting_is_reachable_from_the_cli_and_the_crd():
    """One declaration per setting (contract.SERVE_SETTINGS): a new EngineConfig field, CRD engine
    field or server setting that is not wired through it fails here."""
    import dataclasses

    from kvpilot.operator.api import EngineSpec
    from kvpilot.serving.contract import NOT_IN_CRD, SERVE_SETTINGS
    from kvpilot.serving.engine.config import EngineConfig

    engine_fields = {field.name for field in dataclasses.fields(EngineConfig)} - {"model"}  # --model's path
    assert engine_fields == {s.engine_field for s in SERVE_SETTINGS if s.engine_field}

    serve = build_parser(["serve"])._subparsers._group_actions[0].choices["serve"]
    flags = {option for action in serve._actions for option in action.option_strings}
    assert {s.flag for s in SERVE_SETTINGS} <= flags
    assert set(ServeSettings.model_fields) == {s.name for s in SERVE_SETTINGS}

    # Not server settings: extraArgs, and loadTimeout (the operator's startup probe).
    crd_fields = set(EngineSpec.model_fields) - {"extra_args", "load_timeout"}
    assert crd_fields == {s.crd_field for s in SERVE_SETTINGS if s.crd_field}
    assert set(NOT_IN_CRD) == {s.name for s in SERVE_SETTINGS if not s.crd_field}
