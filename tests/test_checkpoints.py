import json


def test_tiny_checkpoints_are_complete(tiny_checkpoints):
    for arch, directory in tiny_checkpoints.items():
        names = {p.name for p in directory.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= names, arch
        assert json.loads((directory / "config.json").read_text())["hidden_size"] == 64
