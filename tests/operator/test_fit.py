"""The fit estimate against figures computed by hand from the published config.json of
Llama-3-8B, Qwen3-32B and SmolLM2-135M (the arithmetic is spelled out beside each figure), on a
GPU and in a CPU replica's memory."""

from typing import Any

import pytest
from kvpilot.operator.api import InferenceService
from kvpilot.operator.api.model import KNOWN_ARCHITECTURES
from kvpilot.operator.fit import GiB, estimate, kv_bytes_per_token, weight_bytes


def test_parameter_counts_match_the_published_ones():
    # One byte per parameter in float "dtype" of width 1 is the parameter count.
    assert weight_bytes(KNOWN_ARCHITECTURES["Llama-3-8B"], "none", 1) == 8_030_261_248
    assert weight_bytes(KNOWN_ARCHITECTURES["Qwen3-32B"], "none", 1) == 32_762_123_264


# Llama-3-8B: hidden 4096, 32 layers, 32 heads, 8 KV heads, head_dim 128, intermediate 14336,
# vocab 128256, untied. Per layer the linears hold 2*4096*4096 + 2*1024*4096 + 3*14336*4096
# = 218,103,808 weights in 43,008 output rows (6,815,744 groups of 32); the head 525,336,576
# weights in 128,256 rows (16,416,768 groups); embeddings 525,336,576; norms 32*8192 + 4096.
# Qwen3-32B: hidden 5120, 64 layers, 64 heads, 8 KV heads, head_dim 128, intermediate 25600,
# vocab 151936, untied, q/k norms: per layer 487,587,840 linear weights in 71,680 rows
# (15,237,120 groups); head 777,912,320 weights in 151,936 rows (24,309,760 groups);
# embeddings 777,912,320; norms 64*(10240 + 256) + 5120 = 676,864.
@pytest.mark.parametrize(
    ("model", "quantization", "expected"),
    [
        ("Llama-3-8B", "none", 8_030_261_248 * 2),  # 14.96 GiB
        # 32*(218,103,808 + 4*43,008) + (525,336,576 + 4*128,256) + 2*525,336,576 + 2*266,240
        ("Llama-3-8B", "int8", 8_561_882_112),  # 7.97 GiB
        # 32*(218,103,808/2 + 4*6,815,744) + (525,336,576/2 + 4*16,416,768) + float parts as above
        ("Llama-3-8B", "int4", 5_741_617_152),  # 5.35 GiB
        ("Qwen3-32B", "none", 32_762_123_264 * 2),  # 61.02 GiB
        # 64*(487,587,840 + 4*71,680) + (777,912,320 + 4*151,936) + 2*777,912,320 + 2*676,864
        ("Qwen3-32B", "int8", 33_559_670_272),  # 31.25 GiB
        # 64*(487,587,840/2 + 4*15,237,120) + (777,912,320/2 + 4*24,309,760) + float parts
        ("Qwen3-32B", "int4", 21_546_887_168),  # 20.07 GiB
    ],
)
def test_weight_bytes_by_quantization(model, quantization, expected):
    assert weight_bytes(KNOWN_ARCHITECTURES[model], quantization, dtype_bytes=2) == expected
    if quantization == "int8":  # w8a8 and fp8 store the same bytes
        for same in ("w8a8", "fp8"):
            assert weight_bytes(KNOWN_ARCHITECTURES[model], same, dtype_bytes=2) == expected


@pytest.mark.parametrize(
    ("model", "kv_cache_dtype", "expected"),
    [
        ("Llama-3-8B", "auto", 32 * 2 * 8 * 128 * 2),  # 131,072: 128 KiB a token in fp16
        ("Llama-3-8B", "int8", 32 * 2 * 8 * (128 + 4)),  # 67,584 with the float32 scales
        ("Llama-3-8B", "fp8", 32 * 2 * 8 * 128),
        ("Qwen3-32B", "auto", 64 * 2 * 8 * 128 * 2),  # 262,144
        ("Qwen3-32B", "int8", 64 * 2 * 8 * (128 + 4)),  # 135,168
    ],
)
def test_kv_bytes_per_token(model, kv_cache_dtype, expected):
    assert kv_bytes_per_token(KNOWN_ARCHITECTURES[model], kv_cache_dtype, dtype_bytes=2) == expected


def isvc(model: str, gpu_memory: str | None = "80Gi", **engine: Any) -> InferenceService:
    gpu = {"count": 1, **({"memory": gpu_memory} if gpu_memory else {})}
    spec = {
        "model": {"name": "m", "uri": "hf://org/m", "architecture": {"known": model}},
        "engine": engine,
        "resources": {"gpu": gpu},
    }
    return InferenceService.from_body({"metadata": {"name": "m"}, "spec": spec})


@pytest.mark.parametrize(
    ("model", "gpu", "engine", "fits", "message"),
    [
        # 14.96 GiB + 64 * 8192 * 128 KiB = 64 GiB > 72 GiB (0.9 of 80): fits, 57 full sequences at once.
        (
            "Llama-3-8B", "80Gi", {"maxModelLen": 8192},
            True,
            "fits: weights 15.0 GiB + 57.0 GiB KV cache of 72.0 GiB (0.9 of 80.0 GiB), holding 57 of 64 "
            "sequences at 8192 tokens (KV cache for 64 x 8192 tokens: 64.0 GiB; the rest wait)",
        ),
        # int8 KV: 64 * 8192 * 67,584 = 33 GiB; 14.96 + 33 <= 72.
        (
            "Llama-3-8B", "80Gi", {"maxModelLen": 8192, "kvCacheDtype": "int8"},
            True,
            "fits: weights 15.0 GiB + KV cache 33.0 GiB for 64 x 8192 tokens <= 72.0 GiB (0.9 of 80.0 GiB)",
        ),
        # 61.02 GiB of weights > 0.9 * 48 = 43.2 GiB.
        (
            "Qwen3-32B", "48Gi", {"maxModelLen": 8192},
            False,
            "does not fit: weights 61.0 GiB + KV cache 2.0 GiB for one 8192-token sequence > "
            "43.2 GiB (0.9 of 48.0 GiB)",
        ),
        # int4: 20.07 GiB + 64 * 8192 * 135,168 (66 GiB) > 43.2: fits, 23.13 GiB hold 22 sequences.
        (
            "Qwen3-32B", "48Gi", {"maxModelLen": 8192, "quantization": "int4", "kvCacheDtype": "int8"},
            True,
            "fits: weights 20.1 GiB + 23.1 GiB KV cache of 43.2 GiB (0.9 of 48.0 GiB), holding 22 of 64 "
            "sequences at 8192 tokens (KV cache for 64 x 8192 tokens: 66.0 GiB; the rest wait)",
        ),
        # The model's own 40960 tokens: one fp16 sequence takes 10 GiB; 61.02 + 10 <= 72 on 80 GiB.
        ("Qwen3-32B", "80Gi", {}, True, None),
        # ... but not with a 0.8 share (64 GiB).
        ("Qwen3-32B", "80Gi", {"gpuMemoryUtilization": 0.8}, False, None),
        # kvCacheMemory is what the server takes: 61.02 + 16 > 72.
        (
            "Qwen3-32B", "80Gi", {"maxModelLen": 8192, "kvCacheMemory": "16Gi"},
            False,
            "does not fit: weights 61.0 GiB + KV cache 16.0 GiB (kvCacheMemory) > 72.0 GiB (0.9 of 80.0 GiB)",
        ),
        # ... and a cache smaller than one sequence serves nothing: 16384 * 131,072 B = 2 GiB > 1 GiB.
        (
            "Llama-3-8B", "80Gi", {"maxModelLen": 16384, "kvCacheMemory": "1Gi"},
            False,
            "does not fit: KV cache 1.0 GiB (kvCacheMemory) holds no 16384-token sequence",
        ),
        # float32 weights double: 29.9 GiB.
        ("Llama-3-8B", "24Gi", {"maxModelLen": 4096, "dtype": "float32"}, False, None),
    ],
)  # fmt: skip
def test_fit_table(model, gpu, engine, fits, message):
    fit = estimate(isvc(model, gpu, **engine))
    assert fit.fits is fits
    if message is not None:
        assert fit.message() == message


def cpu_isvc(memory: str | None, model: str = "SmolLM2-135M", **engine: Any) -> InferenceService:
    spec = {
        "model": {"name": "m", "uri": "hf://org/m", "architecture": {"known": model}},
        "engine": engine,
        "resources": {"memory": memory} if memory else {},
    }
    return InferenceService.from_body({"metadata": {"name": "m"}, "spec": spec})


# SmolLM2-135M: hidden 576, 30 layers, 9 heads, 3 KV heads, head_dim 64, intermediate 1536, vocab
# 49152, tied. Per layer 2*576*576 + 2*192*576 + 3*1536*576 = 3,538,944 linear weights, 1,152 norm
# weights; embeddings 28,311,552; final norm 576: 134,515,008 parameters, 538,060,032 B in float32
# (the CPU default) = 0.50 GiB. float32 KV: 30 * 2 * 3 * 64 * 4 = 46,080 B per token, 2048 tokens
# 0.088 GiB. The budget: 0.9 of resources.memory less 0.5 GiB for the server.
@pytest.mark.parametrize(
    ("memory", "engine", "fits", "message"),
    [
        # 0.9 * 4 - 0.5 = 3.1 GiB; the KV cache is the server's 1 GiB default: 11 sequences of 2048.
        (
            "4Gi", {"maxModelLen": 2048, "maxNumSeqs": 16},
            True,
            "fits: weights 0.5 GiB + 1.0 GiB KV cache of 3.1 GiB (0.9 of 4.0 GiB memory - 0.5 GiB for the "
            "server), holding 11 of 16 sequences at 2048 tokens (KV cache for 16 x 2048 tokens: 1.4 GiB; "
            "the rest wait)",
        ),
        # 8 sequences need 0.69 GiB, within the default.
        (
            "4Gi", {"maxModelLen": 2048, "maxNumSeqs": 8},
            True,
            "fits: weights 0.5 GiB + KV cache 0.7 GiB for 8 x 2048 tokens <= 3.1 GiB (0.9 of 4.0 GiB memory "
            "- 0.5 GiB for the server)",
        ),
        # 0.9 * 1 - 0.5 = 0.4 GiB < 0.5 GiB of float32 weights (measured: the server's working set after
        # loading them is 1.0 GiB, above 0.9 of a 1 GiB limit).
        (
            "1Gi", {"maxModelLen": 2048},
            False,
            "does not fit: weights 0.5 GiB + KV cache 0.1 GiB for one 2048-token sequence > 0.4 GiB (0.9 of "
            "1.0 GiB memory - 0.5 GiB for the server)",
        ),
        # int4 linears: 106,168,320 / 2 + 3,317,760 groups * 4 B; embeddings and norms in float32:
        # 179,741,952 B; with a 64 MiB cache 0.23 GiB of 0.4 (the operator's end-to-end tests' pods).
        ("1Gi", {"maxModelLen": 1024, "quantization": "int4", "kvCacheMemory": "64Mi"}, True, None),
        (
            "4Gi", {"kvCacheMemory": "4Gi"},
            False,
            "does not fit: weights 0.5 GiB + KV cache 4.0 GiB (kvCacheMemory) > 3.1 GiB (0.9 of 4.0 GiB "
            "memory - 0.5 GiB for the server)",
        ),
        # Llama-3-8B in float32: one 8192-token sequence is 2 GiB, more than the 1 GiB default.
        (
            "64Gi", {"maxModelLen": 8192},
            False,
            "does not fit: the CPU default KV cache 1.0 GiB (set spec.engine.kvCacheMemory) holds no "
            "8192-token sequence",
        ),
        ("64Gi", {"maxModelLen": 8192, "kvCacheMemory": "8Gi"}, True, None),
    ],
)  # fmt: skip
def test_cpu_fit_table(memory, engine, fits, message):
    model = "Llama-3-8B" if memory == "64Gi" else "SmolLM2-135M"
    fit = estimate(cpu_isvc(memory, model, **engine))
    assert (fit.fits, fit.memory_field) == (fits, "spec.resources.memory")
    if message is not None:
        assert fit.message() == message


def test_int4_smollm2_weights_by_hand():
    assert weight_bytes(KNOWN_ARCHITECTURES["SmolLM2-135M"], "none", 4) == 538_060_032
    int4 = 106_168_320 // 2 + 3_317_760 * 4 + (134_515_008 - 106_168_320) * 4
    assert weight_bytes(KNOWN_ARCHITECTURES["SmolLM2-135M"], "int4", 4) == int4 == 179_741_952


def test_without_gpu_memory_or_architecture_the_fit_is_unknown():
    fit = estimate(isvc("Llama-3-8B", gpu_memory=None, maxModelLen=8192))
    assert fit.fits is None
    assert fit.message() == (
        "weights 15.0 GiB + KV cache 64.0 GiB for 64 x 8192 tokens; set resources.gpu.memory to check the fit"
    )
    body = {"metadata": {"name": "m"}, "spec": {"model": {"name": "m", "uri": "hf://org/m"}}}
    assert estimate(InferenceService.from_body(body)) is None
    body["spec"]["model"]["architecture"] = {"known": "Llama-3-8B"}  # a CPU replica: float32, no GPU
    cpu = estimate(InferenceService.from_body(body))
    assert (cpu.weight_bytes, cpu.fits) == (8_030_261_248 * 4, None)
    assert cpu.message().endswith("; set resources.memory to check the fit")


def test_explicit_config_sizes_equal_the_known_architecture():
    sizes = {
        "hiddenSize": 4096, "numHiddenLayers": 32, "numAttentionHeads": 32, "numKeyValueHeads": 8,
        "intermediateSize": 14336, "vocabSize": 128256, "maxPositionEmbeddings": 8192,
    }  # fmt: skip
    body = {
        "metadata": {"name": "m"},
        "spec": {"model": {"name": "m", "uri": "hf://o/m", "architecture": sizes}},
    }
    explicit = InferenceService.from_body(body).spec.model.architecture.shape()
    assert explicit == KNOWN_ARCHITECTURES["Llama-3-8B"]
    assert estimate(isvc("Llama-3-8B")).batch_kv_bytes == 64 * 8192 * 131_072 == 64 * GiB


@pytest.mark.parametrize(
    "architecture",
    [{"known": "Llama-3-8B", "hiddenSize": 4096}, {"hiddenSize": 4096}, {}],
)
def test_architecture_is_either_known_or_complete(architecture):
    body = {
        "metadata": {"name": "m"},
        "spec": {"model": {"name": "m", "uri": "hf://o/m", "architecture": architecture}},
    }
    with pytest.raises(ValueError, match="set either known or all of"):
        InferenceService.from_body(body)


def test_status_carries_the_estimate():
    from kvpilot.operator.status import compute_status

    service = isvc("Llama-3-8B", maxModelLen=8192, kvCacheDtype="int8")
    status = compute_status(service, None, {}, "2026-12-01T12:00:00Z", fit=estimate(service))
    assert status["fit"] == estimate(service).message()
    assert status["fit"].startswith("fits: weights 15.0 GiB + KV cache 33.0 GiB")
