"""`kvpilot crd` and `kvpilot render`, with no cluster."""

from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kvpilot.operator.crd import CRD_PATH
from kvpilot.serving.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_crd_command_writes_the_committed_file(tmp_path):
    assert main(["crd", "-o", str(tmp_path / "crd.yaml")]) == 0
    assert (tmp_path / "crd.yaml").read_text() == CRD_PATH.read_text()


def test_render_prints_every_child(capsys):
    assert main(["render", "-f", str(EXAMPLES / "hf-download.yaml")]) == 0
    objects = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [(o["kind"], o["metadata"]["name"]) for o in objects] == [
        ("ServiceAccount", "qwen"),
        ("Deployment", f"qwen-{objects[1]['metadata']['labels']['kvpilot.dev/revision']}"),
        ("Service", "qwen-engine"),
        ("PodDisruptionBudget", "qwen"),  # autoscaling up to 4 replicas
        ("ConfigMap", "qwen-router"),
        ("Deployment", "qwen-router"),
        ("Service", "qwen"),
        ("PodDisruptionBudget", "qwen-router"),
    ]
    deployment = objects[1]
    assert deployment["spec"]["template"]["spec"]["initContainers"][0]["name"] == "model-download"
    assert "ownerReferences" not in deployment["metadata"]  # no uid without a cluster


def test_render_shows_the_router_config_tenants_and_inference_pool(tmp_path, capsys):
    manifest = yaml.safe_load((EXAMPLES / "tenants.yaml").read_text())
    manifest["spec"]["router"]["inferencePool"] = True
    path = tmp_path / "isvc.yaml"
    path.write_text(yaml.safe_dump(manifest))
    assert main(["render", "-f", str(path)]) == 0
    out = capsys.readouterr().out
    assert "router.yaml: |\n" in out  # the config as a readable block, not an escaped string
    objects = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(out)}
    config = yaml.safe_load(objects["ConfigMap", "chat-router"]["data"]["router.yaml"])
    assert [t["keyFile"] for t in config["tenants"]] == [
        "/etc/kvpilot/keys/team-a",
        "/etc/kvpilot/keys/team-b",
    ]
    volumes = objects["Deployment", "chat-router"]["spec"]["template"]["spec"]["volumes"]
    (keys,) = [v for v in volumes if v["name"] == "keys"]
    assert [s["secret"]["name"] for s in keys["projected"]["sources"]] == ["chat-keys", "chat-keys"]
    assert objects["InferencePool", "chat"]["spec"]["targetPorts"] == [{"number": 8000}]


def test_render_rejects_an_invalid_manifest_naming_the_field(tmp_path, capsys):
    manifest = yaml.safe_load((EXAMPLES / "chat.yaml").read_text())
    manifest["spec"]["engine"]["tensorParallelSize"] = 2
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(manifest))
    assert main(["render", "-f", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "spec.engine.tensorParallelSize: tensor parallelism is not supported yet" in captured.err


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_rendered_examples_pass_kubernetes_validate_strict(path, capsys):
    assert main(["render", "-f", str(path)]) == 0
    for obj in yaml.safe_load_all(capsys.readouterr().out):
        kubernetes_validate.validate(obj, "1.29.0", strict=True)


def test_render_shows_the_gpu_fit_and_refuses_a_model_that_does_not_fit(tmp_path, capsys):
    example = EXAMPLES / "gpu-cached.yaml"
    assert main(["render", "-f", str(example)]) == 0
    captured = capsys.readouterr()
    # int4 Qwen3-32B: 20.1 GiB; int8 KV 32 x 16384 x 135,168 B = 66 GiB > the 51.9 GiB left of 72.
    assert captured.err == (
        "InferenceService qwen3: GPU memory fits: weights 20.1 GiB + 51.9 GiB KV cache of 72.0 GiB (0.9 of "
        "80.0 GiB), holding 25 of 32 sequences at 16384 tokens (KV cache for 32 x 16384 tokens: 66.0 GiB; "
        "the rest wait)\n"
    )
    kinds = [o["kind"] for o in yaml.safe_load_all(captured.out)]
    assert kinds[:3] == ["PersistentVolumeClaim", "Job", "Deployment"]  # the cache, then the engine

    manifest = yaml.safe_load(example.read_text())
    manifest["spec"]["engine"]["quantization"] = "none"  # 61 GiB of bf16 weights
    manifest["spec"]["resources"]["gpu"]["memory"] = "48Gi"
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(manifest))
    assert main(["render", "-f", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "error: InferenceService qwen3: spec.resources.gpu.memory: does not fit: weights 61.0 GiB + KV cache "
        "2.1 GiB for one 16384-token sequence > 43.2 GiB (0.9 of 48.0 GiB)\n"
    )


def test_render_shows_the_cpu_memory_fit_and_refuses_a_replica_too_small(tmp_path, capsys):
    example = EXAMPLES / "cpu-smollm2.yaml"
    assert main(["render", "-f", str(example)]) == 0
    assert capsys.readouterr().err == (
        "InferenceService smollm2-cpu: memory fits: weights 0.5 GiB + 1.0 GiB KV cache of 3.1 GiB (0.9 of "
        "4.0 GiB memory - 0.5 GiB for the server), holding 11 of 16 sequences at 2048 tokens (KV cache for "
        "16 x 2048 tokens: 1.4 GiB; the rest wait)\n"
    )
    manifest = yaml.safe_load(example.read_text())
    manifest["spec"]["resources"]["memory"] = "1Gi"
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(manifest))
    assert main(["render", "-f", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "error: InferenceService smollm2-cpu: spec.resources.memory: does not fit: weights 0.5 GiB + KV "
        "cache 0.1 GiB for one 2048-token sequence > 0.4 GiB (0.9 of 1.0 GiB memory - 0.5 GiB for the "
        "server)\n"
    )
