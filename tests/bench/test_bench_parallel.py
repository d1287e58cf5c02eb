"""`monokernel bench --devices`: one process per row and device, merged into one result (on CPU here)."""
from __future__ import annotations

import json

import pytest

from monokernel.bench import cli
from monokernel.bench.parallel import Job, parse_devices, run_parallel
from monokernel.errors import MonokernelError

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import torch

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


def _args(model, out, *extra):
    return ["--model", str(model), "--engines", "torch-compile,hf", "--batch", "1", "--dtype", "fp32",
            "--steps", "2", "--warmup", "0", "--agreement-steps", "2", "--no-compile", "--no-progress",
            "--out", str(out), *extra]


def test_rows_merge(tmp_path, tiny_checkpoint, capsys):
    """The rows of several processes merge into one result."""
    assert cli.main(_args(tiny_checkpoint, tmp_path, "--context", "8,16", "--devices", "cpu,cpu")) == 0
    (path,) = tmp_path.glob("*.json")
    result = json.loads(path.read_text())
    rows = {(r["engine"], r["context"]): r for r in result["rows"]}
    assert set(rows) == {(e, c) for e in ("torch-compile", "hf") for c in (8, 16)}
    assert all(r["device_index"] == "cpu" and r["ms_per_step"] > 0 for r in rows.values())
    assert rows[("torch-compile", 8)]["speedup_vs_torch_compile"] == 1.0
    assert result["command"].startswith("monokernel bench") and "--devices cpu,cpu" in result["command"]
    assert (tmp_path / path.name.replace(".json", ".md")).exists()
    err = capsys.readouterr().err
    assert "[2/2]" in err and "started on cpu" in err


def test_failing_row(tmp_path, tiny_checkpoint):
    """A failing row is reported and the others kept."""
    # context 200 exceeds the checkpoint's 128 positions: that process reports the row as skipped
    assert cli.main(_args(tiny_checkpoint, tmp_path, "--context", "8,200", "--devices", "cpu,cpu")) == 0
    (path,) = tmp_path.glob("*.json")
    result = json.loads(path.read_text())
    assert {r["context"] for r in result["rows"]} == {8}
    assert {r["context"] for r in result["skipped"]} == {200}


def test_crashing_process(tmp_path):
    """A crashing process is reported."""
    # a flag the child does not know makes it exit 2 before measuring anything
    jobs = [Job("preset:llama-3.2-1b", 1, 8)]
    with pytest.raises(MonokernelError, match="every bench process failed.*exited with 2.*--bogus"):
        run_parallel(jobs, ["cpu"], ["--bogus"], "monokernel bench", lambda r: None, lambda m: None)


def test_missing_model(tmp_path):
    """A missing model gives skipped rows."""
    assert cli.main(_args(tmp_path / "no-such-model", tmp_path / "out", "--context", "8", "--devices", "cpu")) == 0
    (path,) = (tmp_path / "out").glob("*.json")
    skipped = json.loads(path.read_text())["skipped"]
    assert skipped and all("not found" in r["reason"] for r in skipped)


def test_device_lists():
    assert parse_devices("0,cuda:2") == ["cuda:0", "cuda:2"]
    assert parse_devices("all", cuda_count=2) == ["cuda:0", "cuda:1"]
    assert parse_devices("cpu,cpu") == ["cpu", "cpu"]
    with pytest.raises(MonokernelError, match="not cuda:N"):
        parse_devices("gpu1")
    with pytest.raises(MonokernelError, match="no CUDA device"):
        parse_devices("all", cuda_count=0)
    with pytest.raises(MonokernelError, match="no device given"):
        parse_devices(" , ")


def test_device_and_devices(capsys):
    """--device and --devices together are refused."""
    assert cli.main(["--devices", "cpu", "--device", "cpu", "--model", "preset:llama-3.2-1b"]) == 2
    assert "not both" in capsys.readouterr().err
