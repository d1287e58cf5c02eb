"""The benchmark on CPU: roofline byte counts by hand, the two baselines against ReferenceModel, and the
runner end to end (JSON / Markdown / PNG) on a tiny random model.

The baselines are only honest if they compute what the reference computes: in fp32 both differ from it
only in summation order (~1e-7 relative, measured), so 1e-4 catches any real mistake (a wrong head
grouping, RoPE table or mask shows up at 1e-2 or more)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from monokernel.baselines.hf import HFDecoder
from monokernel.baselines.torch_compile import TorchCompileDecoder
from monokernel.bench import cli, report, roofline
from monokernel.bench.bandwidth import copy_bandwidth_TBps
from monokernel.bench.engines import EngineUnavailable, build_engine
from monokernel.bench.runner import BenchConfig, _agreement, run_benchmark
from monokernel.bench.timing import time_steps
from monokernel.errors import InputError
from monokernel.models.presets import preset
from monokernel.models.spec import ModelSpec
from monokernel.models.weights import random_weights
from monokernel.reference.model import ReferenceModel
from monokernel.runtime.kv_cache import KVCache

from conftest import CPU_SPECS, FP32_TOL, TINY, rel_max


def _fill(decoder, cache: KVCache) -> None:
    """A baseline's own cache gets the reference cache's positions, through the Decoder protocol."""
    n = min(cache.max_seq, decoder.max_seq)
    for layer in range(cache.k.shape[0]):
        decoder.write_kv(layer, cache.k[layer, :, :, :n], cache.v[layer, :, :, :n])


def _prefilled(spec: ModelSpec, batch: int, lengths: list[int], max_seq: int, seed: int = 0):
    """Weights, reference model and a reference cache prefilled with prompts of the given lengths."""
    w = random_weights(spec, torch.float32, "cpu", seed)
    ref = ReferenceModel(w)
    cache = KVCache(spec, batch, max_seq, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(seed + 1)
    prompts = torch.randint(0, spec.vocab_size, (batch, max(lengths)), generator=gen)
    ref.forward(prompts, torch.zeros(batch, dtype=torch.long), cache)   # right-padded: junk past each length
    return w, ref, cache, prompts, gen


# ---- roofline -------------------------------------------------------------------------------------
def test_roofline_bytes_by_hand():
    s = preset("llama-3.1-8b")   # H 4096, I 14336, 32 layers, 32 q heads, 8 kv heads, D 128, V 128256, untied
    per_layer = (4096 + 2 * 1024) * 4096 + 4096 * 4096 + 3 * 4096 * 14336 + 2 * 4096   # qkv, o, gate/up/down, norms
    weights = 32 * per_layer + 128256 * 4096 + 4096                                      # + LM head + final norm
    assert per_layer == 218_112_000 and weights == 7_504_924_672
    kv_per_position = 2 * 32 * 8 * 128 * 2                                              # K and V, bf16, one sequence
    b = roofline.step_bytes(s, batch=4, context=8192, dtype=torch.bfloat16)
    assert b.weights == 2 * weights == 15_009_849_344
    assert b.kv_read == 8192 * 4 * kv_per_position == 4_294_967_296
    assert b.kv_written == 4 * kv_per_position == 524_288
    assert roofline.bytes_per_step(s, 4, 8192, torch.bfloat16) == 15_009_849_344 + 4_294_967_296 + 524_288
    assert roofline.bytes_per_step(s, 4, 8192, torch.float32) == 2 * b.total            # dtype-aware
    # tied embeddings (llama-3.2-1b: H 2048, I 8192, 16 layers, q 2048, kv 512): the LM head is the embedding
    per_layer = (2048 + 2 * 512) * 2048 + 2048 * 2048 + 3 * 2048 * 8192 + 2 * 2048
    assert roofline.step_bytes(preset("llama-3.2-1b"), 1, 0, torch.bfloat16).weights == \
        2 * (16 * per_layer + 128256 * 2048 + 2048) == 2_471_628_800
    # DESIGN.md's rooflines at 3.01 TB/s: 0.82 ms (1B) and 4.98 ms (8B)
    assert roofline.roofline_ms(2_471_628_800, 3.01) == pytest.approx(0.82, abs=0.005)
    assert roofline.roofline_ms(15_009_849_344, 3.01) == pytest.approx(4.98, abs=0.01)
    # 3 TB/s moves 1.5 GB in 0.5 ms; measured 1 ms is half of the roofline
    assert roofline.roofline_ms(1_500_000_000, 3.0) == pytest.approx(0.5)
    assert roofline.roofline_fraction(1_500_000_000, 3.0, 1.0) == pytest.approx(0.5)


def test_timing_and_bandwidth_on_cpu():
    calls = []
    t = time_steps(calls.append, steps=7, warmup=3, device="cpu")
    assert calls == list(range(10)) and t.steps == 7 and t.clock == "perf-counter"
    assert 0 <= t.min_ms <= t.median_ms <= t.max_ms
    assert copy_bandwidth_TBps("cpu", nbytes=1 << 20, reps=3) > 0


# ---- baselines against the reference ------------------------------------------------------------
@pytest.mark.parametrize("attention", ["math", "sdpa"])
@pytest.mark.parametrize("case", list(CPU_SPECS))
def test_torch_compile_baseline(case, attention):
    """The torch-compile baseline matches the reference."""
    spec, B, S = CPU_SPECS[case], 3, 48
    w, ref, cache, prompts, gen = _prefilled(spec, B, [12], S)
    dec = TorchCompileDecoder(w, B, S, compile=False, attention=attention)
    assert dec.model.w_gu.data_ptr() == w.w_gu.data_ptr() and dec.model.embed.data_ptr() == w.embed.data_ptr()
    _fill(dec, cache)
    positions = torch.tensor([12, 3, 7])     # a position per sequence
    for t in range(6):
        tokens = torch.randint(0, spec.vocab_size, (B,), generator=gen)
        greedy, logits = dec.step(tokens, positions + t)
        expect = ref.forward(tokens[:, None], positions + t, cache)[:, 0]
        err = rel_max(logits, expect)
        assert err <= FP32_TOL, f"{case}/{attention}: step {t} differs by {err:.2e}"
        assert torch.equal(greedy, expect.argmax(-1))
    # its own prefill gives the reference's prefill logits
    fresh = TorchCompileDecoder(w, B, S, compile=False, attention=attention)
    last = fresh.prefill(prompts, chunk=5)
    ref_cache = KVCache(spec, B, S, torch.float32, "cpu")
    expect = ref.forward(prompts, torch.zeros(B, dtype=torch.long), ref_cache)[:, -1]
    assert rel_max(last, expect) <= FP32_TOL
    assert torch.allclose(fresh.caches[1].k[:, :, :12], ref_cache.k[1, :, :, :12], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", list(CPU_SPECS))
def test_hf_baseline(case):
    """The HF baseline matches the reference."""
    spec, B, S = CPU_SPECS[case], 2, 48
    w, ref, cache, _, gen = _prefilled(spec, B, [10], S, seed=3)
    dec = HFDecoder(w, B, S, compile=False)
    layer0 = dec.model.model.layers[0]
    assert layer0.mlp.up_proj.weight.data_ptr() == w.w_gu[0, 1].data_ptr()      # views, no copies
    _fill(dec, cache)
    for t in range(5):
        tokens = torch.randint(0, spec.vocab_size, (B,), generator=gen)
        pos = torch.full((B,), 10 + t)
        greedy, logits = dec.step(tokens, pos)
        expect = ref.forward(tokens[:, None], pos, cache)[:, 0]
        assert rel_max(logits, expect) <= FP32_TOL, f"{case}: step {t} differs by {rel_max(logits, expect):.2e}"
        assert torch.equal(greedy, expect.argmax(-1))
    # jumping back to an earlier position rewinds transformers' write position too
    tokens = torch.randint(0, spec.vocab_size, (B,), generator=gen)
    _, logits = dec.step(tokens, torch.full((B,), 11))
    assert rel_max(logits, ref.forward(tokens[:, None], torch.full((B,), 11), cache)[:, 0]) <= FP32_TOL
    with pytest.raises(InputError, match="one position"):
        dec.step(tokens, torch.tensor([11, 12]))


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor on CPU needs a C++ compiler")
def test_torch_compile_once():
    """The torch-compile baseline compiles once. The compiled decode step is one graph for every position (positions
    are tensors), still exact."""
    from torch._dynamo.utils import counters

    saved = torch._inductor.config.save_config()     # the decoder sets gpt-fast's options process-wide
    torch._dynamo.reset()
    counters.clear()
    try:
        w, ref, cache, _, gen = _prefilled(TINY, 2, [9], 40)
        dec = TorchCompileDecoder(w, 2, 40, compile=True)
        assert dec.inductor_settings["coordinate_descent_tuning"] is True
        _fill(dec, cache)
        for t in range(4):
            tokens = torch.randint(0, TINY.vocab_size, (2,), generator=gen)
            pos = torch.tensor([9 + t, 2 * t])
            _, logits = dec.step(tokens, pos)
            assert rel_max(logits, ref.forward(tokens[:, None], pos, cache)[:, 0]) <= FP32_TOL
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()
        torch._inductor.config.load_config(saved)


# ---- the runner ---------------------------------------------------------------------------------------
def _check_result(result: dict) -> None:
    for k in report.TOP_FIELDS:
        assert k in result
    assert isinstance(result["copy_bandwidth_TBps"], float) and result["copy_bandwidth_TBps"] > 0
    for r in result["rows"]:
        for k in report.ROW_FIELDS:
            assert k in r, k
        assert r["engine"] in ("monokernel", "torch-compile", "hf")
        assert isinstance(r["batch"], int) and isinstance(r["context"], int) and isinstance(r["bytes_per_step"], int)
        assert r["ms_per_step"] > 0 and r["tokens_per_s"] == pytest.approx(r["batch"] * 1e3 / r["ms_per_step"])
        expect = r["bytes_per_step"] / (r["copy_bandwidth_TBps"] * 1e12) * 1e3 / r["ms_per_step"]
        assert r["roofline_fraction"] == pytest.approx(expect)


def test_runner_end_to_end_on_cpu(tmp_path):
    cfg = BenchConfig(models=[TINY], engines=["monokernel", "torch-compile", "hf"], batches=[1, 2],
                      contexts=[8, 40, 300], dtype=torch.float32, steps=3, warmup=1, agreement_steps=4,
                      device="cpu", compile=False, bandwidth_bytes=1 << 20, progress=False, command="pytest")
    result = run_benchmark(cfg)
    _check_result(result)
    rows = result["rows"]
    assert {(r["engine"], r["batch"], r["context"]) for r in rows} == {
        (e, b, c) for e in ("torch-compile", "hf") for b in (1, 2) for c in (8, 40)}
    for r in rows:
        a = r["agreement"]
        assert a["steps"] == 4 and a["tokens"] == 4 * r["batch"] and a["argmax_inconsistent"] == 0
        if r["engine"] == "torch-compile":
            assert a["reference"] and r["speedup_vs_torch_compile"] == 1.0
        else:     # fp32: the baselines agree on every greedy token
            assert a["mismatches"] == 0 and a["max_rel_logit_diff"] < FP32_TOL
            assert r["speedup_vs_torch_compile"] > 0
        # the timed steps' caches hold context + agreement + warm-up + 1 positions on average (steps = 3)
        assert r["kv_positions_read"] == r["context"] + 4 + 1 + 1
        assert r["bytes_per_step"] == roofline.bytes_per_step(TINY, r["batch"], r["context"] + 6, torch.float32)
    skipped = result["skipped"]
    assert {(s["engine"], s["batch"], s["context"]) for s in skipped} == {
        ("monokernel", b, c) for b in (1, 2) for c in (8, 40, 300)} | {
        (e, b, 300) for e in ("torch-compile", "hf") for b in (1, 2)}
    for s in skipped:
        assert ("CUDA" if s["engine"] == "monokernel" else "exceed the model's 256 positions") in s["reason"]

    paths = report.output_paths(tmp_path, result, append=False)
    written = report.write_reports(result, paths)
    assert set(written) == {"json", "md", "png"}
    loaded = json.loads(written["json"].read_text())
    _check_result(loaded)
    assert loaded["rows"] == json.loads(json.dumps(rows))
    md = written["md"].read_text()
    assert md.count("\n| tiny |") == len(rows) + len(skipped) and "Skipped" in md
    assert written["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image
    assert matplotlib.image.imread(written["png"]).shape[0] > 100


def test_runner_skips_a_failing_engine(monkeypatch):
    import monokernel.bench.runner as runner

    real = runner.build_engine

    def flaky(name, *a, **k):
        if name == "hf":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(name, *a, **k)

    monkeypatch.setattr(runner, "build_engine", flaky)
    cfg = BenchConfig(models=[TINY, "preset:no-such-model"], engines=["hf", "torch-compile"], batches=[1],
                      contexts=[8], dtype=torch.float32, steps=2, warmup=0, agreement_steps=2, device="cpu",
                      compile=False, bandwidth_bytes=1 << 20, progress=False)
    result = run_benchmark(cfg)
    assert [r["engine"] for r in result["rows"]] == ["torch-compile"]
    reasons = {(s["model"], s["engine"]): s["reason"] for s in result["skipped"]}
    assert reasons[("tiny", "hf")].startswith("out of memory")
    assert "unknown preset" in reasons[("preset:no-such-model", "hf")]


def test_runner_skips_what_cannot_fit(monkeypatch):
    """A model whose weights cannot fit is skipped before it is loaded, a row whose KV cache cannot fit is skipped
    before it is allocated, each with the numbers (the CPU's OOM killer would leave no message at all)."""
    import monokernel.bench.runner as runner
    from monokernel.models.presets import PRESETS

    monkeypatch.setattr(runner, "load_model", lambda *a, **k: pytest.fail("a model too big was loaded"))
    free = 24 * 10**9
    monkeypatch.setattr("monokernel.runtime.memory.available_bytes", lambda device: free)
    monkeypatch.setattr(runner, "available_bytes", lambda device: free)
    small = TINY.with_(name="small", max_position_embeddings=1 << 20)
    # 4.3 GB of KV cache per sequence at context 2**16 (and twice that in the reference's expanded fp32 copies):
    # batch 1 fits in 24 GB, batch 4 does not
    wide = small.with_(name="wide", num_layers=2, num_heads=2, num_kv_heads=2, head_dim=4096)
    cfg = BenchConfig(models=["preset:llama-3.1-70b", wide], engines=["torch-compile"], batches=[1, 4],
                      contexts=[1 << 16], dtype=torch.bfloat16, steps=1, warmup=0, agreement_steps=0, device="cpu",
                      compile=False, bandwidth_bytes=1 << 20, progress=False)
    def built(*a, **k):
        raise RuntimeError("built")

    monkeypatch.setattr(runner, "build_engine", built)
    monkeypatch.setattr(runner, "random_weights", lambda spec, *a: None)   # the weights are never read here
    result = run_benchmark(cfg)
    reasons = {(s["model"], s["batch"]): s["reason"] for s in result["skipped"]}
    big = reasons[("preset:llama-3.1-70b", 1)]
    assert big == reasons[("preset:llama-3.1-70b", 4)] and PRESETS["llama-3.1-70b"].num_params() > 7e10
    assert big.startswith("preset:llama-3.1-70b needs ") and "weights 141." in big and "24.0 GB free" in big
    assert reasons[("wide", 4)].startswith("needs ") and "KV cache 17.2 GB for 4 x 65600 positions" in reasons[("wide", 4)]
    assert "24.0 GB free" in reasons[("wide", 4)]
    assert "built" in reasons[("wide", 1)]    # fits, so it got as far as building the engine


def test_agreement_counts_mismatches():
    ref_logits = torch.tensor([[[0.0, 2.0, 1.0]], [[3.0, 0.0, 2.9]]])          # (steps 2, B 1, V 3)
    ref = {"label": "ref", "greedy": ref_logits.argmax(-1), "logits": ref_logits}
    other = torch.tensor([[[0.0, 2.0, 1.0]], [[2.9, 0.0, 3.0]]])               # flips the near tie at step 1
    a = _agreement(ref, other.argmax(-1), other)
    assert a["mismatches"] == 1 and a["first_mismatch_step"] == 1
    assert a["max_mismatch_logit_gap"] == pytest.approx(0.1)
    assert a["max_rel_logit_diff"] == pytest.approx(0.1 / 3.0)


def test_merge_replaces_rows():
    """report.merge replaces the rows of the same configuration."""
    row = lambda e, ms: {"engine": e, "variant": "v", "model": "m", "dtype": "bf16", "batch": 1, "context": 8,
                         "ms_per_step": ms}
    old = {"command": "a", "rows": [row("hf", 5.0), row("monokernel", 1.0)], "skipped": [], "notices": ["x"]}
    new = {"command": "b", "rows": [row("hf", 4.0)], "skipped": [], "notices": ["x", "y"]}
    m = report.merge(old, new)
    assert sorted((r["engine"], r["ms_per_step"]) for r in m["rows"]) == [("hf", 4.0), ("monokernel", 1.0)]
    assert m["command"] == "a ; b" and m["notices"] == ["x", "y"]
    assert report.gpu_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3" and report.gpu_slug("cpu (x86_64)") == "cpu"


def test_cli_writes_and_appends(tmp_path, tiny_preset, capsys):
    base = ["--model", "preset:tiny", "--engines", "torch-compile,hf", "--batch", "1", "--context", "8",
            "--dtype", "fp32", "--steps", "2", "--warmup", "0", "--agreement-steps", "2", "--device", "cpu",
            "--no-compile", "--no-progress", "--out", str(tmp_path)]
    assert cli.main(base) == 0
    first = sorted(p.name for p in tmp_path.iterdir())
    assert len(first) == 3 and first[0].endswith("-cpu.json")
    assert cli.main(base + ["--context", "16", "--append"]) == 0          # merged into the same file
    result = json.loads((tmp_path / first[0]).read_text())
    _check_result(result)
    assert sorted({r["context"] for r in result["rows"]}) == [8, 16]
    assert cli.main(base) == 0                                             # a new run does not overwrite
    assert len(list(tmp_path.glob("*.json"))) == 2
    assert "| tiny | fp32 | 1 | 8 | torch-compile |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["--engines", "nope"])


def test_weights_axis(tmp_path, tiny_preset, capsys):
    """--weights fp32,int8,int4-g64: each format a row group, with bytes per step counting codes, scales and zero
    points exactly. Quantised rows run on the reference engine (weights packed) and on gpt-fast's quantised
    torch.compile paths where the shapes allow; a row that cannot run says why."""
    from monokernel.models.weights import random_weights

    argv = ["--model", "preset:tiny", "--engines", "torch-compile,reference", "--weights", "fp32,int8,int4-g64",
            "--batch", "1", "--context", "8", "--dtype", "fp32", "--steps", "2", "--warmup", "0",
            "--agreement-steps", "2", "--device", "cpu", "--no-compile", "--no-progress", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    result = json.loads(next(tmp_path.glob("*.json")).read_text())
    rows = {(r["engine"], r["weights"]): r for r in result["rows"]}
    assert set(rows) == {("torch-compile", "fp32"), ("reference", "fp32"), ("reference", "int8"),
                         ("torch-compile", "int8"), ("reference", "int4-g64")}
    assert "int8 weight-only (gpt-fast int8)" in rows[("torch-compile", "int8")]["variant"]
    assert rows[("reference", "int8")]["agreement"]["mismatches"] == 0       # against the quantised baseline
    for fmt in ("int8", "int4-g64"):
        w = random_weights(TINY, torch.float32, "cpu", 0, fmt)
        assert rows[("reference", fmt)]["bytes_per_step"] == roofline.bytes_per_step(
            TINY, 1, 8 + 2, torch.float32, weight_bytes=w.bytes_per_step())
        assert w.bytes_per_step() == TINY.weight_bytes_per_step(fmt, "fp32", "fp32")
    assert rows[("reference", "fp32")]["bytes_per_step"] == rows[("torch-compile", "fp32")]["bytes_per_step"]
    assert rows[("reference", "fp32")]["agreement"]["mismatches"] == 0
    skipped = {(r["engine"], r["weights"]): r["reason"] for r in result["skipped"]}
    # TINY's K of 88 does not fit tinygemm's int4 packing: the row says so
    assert "K=88 is not a multiple of the group 64 and of 32" in skipped[("torch-compile", "int4-g64")]
    assert "| tiny | int4-g64 | 1 | 8 | reference |" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["llama-int8", "qwen2-int4-g32", "qwen3-int4-g64-zp", "mistral-int4-g32-bf16"])
def test_quantised_torch_compile_baseline(case):
    """gpt-fast's int8 / tinygemm int4 paths (eager here; compiled in the GPU test) over the same quantised values
    give the reference engine's logits on packed weights to fp32 summation order."""
    from monokernel.reference.model import ReferenceModel
    from monokernel.runtime.decoders import ReferenceDecoder
    from monokernel.runtime.kv_cache import KVCache

    from conftest import FP32_TOL, TINY_SPECS, rel_max

    arch, fmt = case.split("-", 1)
    spec = TINY_SPECS[arch]
    w = random_weights(spec, torch.float32, "cpu", 0, fmt)
    tc = TorchCompileDecoder(w, 3, 32, compile=False)
    ref = ReferenceDecoder(ReferenceModel(w), KVCache(spec, 3, 32, torch.float32, "cpu"))
    assert fmt in tc.variant
    tok, pos = torch.tensor([3, 7, 11]), torch.tensor([0, 5, 9])
    for _ in range(3):
        (g1, l1), (g2, l2) = tc.step(tok, pos), ref.step(tok, pos)
        assert rel_max(l1, l2) < FP32_TOL and torch.equal(g1, g2)
        tok, pos = g2, pos + 1


def test_verify_tokens_axis(tmp_path, capsys):
    """--verify-tokens 1,4: the megakernel's verify rows (T = 4 a sequence) beside the decode rows; the other
    engines have none, and without CUDA the megakernel's rows of both kinds are skipped, each named."""
    cfg = BenchConfig(models=[TINY], engines=["monokernel", "torch-compile"], batches=[1], contexts=[8],
                      tokens_per_seq=[1, 4], dtype=torch.float32, steps=2, warmup=0, agreement_steps=2, device="cpu",
                      compile=False, bandwidth_bytes=1 << 20, progress=False)
    result = run_benchmark(cfg)
    assert [(r["engine"], r["tokens_per_seq"]) for r in result["rows"]] == [("torch-compile", 1)]
    assert sorted(s["variant"] for s in result["skipped"]) == ["megakernel", "megakernel, verify T=4"]
    with pytest.raises(EngineUnavailable, match="no verify step of 4 tokens"):
        build_engine("torch-compile", random_weights(TINY, torch.float32, "cpu", 0), 1, 16, tokens_per_seq=4)
    assert cli.main(["--verify-tokens", "1,9", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "--verify-tokens 1,9: each T must be in 1..8" in capsys.readouterr().err


def test_temperatures_axis(capsys):
    """--temperatures 0,0.8: the megakernel's sampled rows beside the greedy ones (skipped here without CUDA, each
    named); the other engines have none; a negative or non-finite temperature is refused by argparse."""
    cfg = BenchConfig(models=[TINY], engines=["monokernel", "torch-compile"], batches=[1], contexts=[8],
                      temperatures=[0.0, 0.8], dtype=torch.float32, steps=2, warmup=0, agreement_steps=2,
                      device="cpu", compile=False, bandwidth_bytes=1 << 20, progress=False)
    result = run_benchmark(cfg)
    assert [r["engine"] for r in result["rows"]] == ["torch-compile"]
    assert sorted(s["variant"] for s in result["skipped"]) == ["megakernel", "megakernel, sampled at temperature 0.8"]
    for bad in ("-1", "nan", "inf", "x"):
        with pytest.raises(SystemExit):
            cli.main(["--temperatures", bad])
        assert "--temperatures" in capsys.readouterr().err


def test_top_k_of_the_sampled_rows(capsys, tmp_path):
    """--top-k K names the sampled rows' variant; without a sampled row, or with K < 1, it is refused."""
    cfg = BenchConfig(models=[TINY], engines=["monokernel"], batches=[1], contexts=[8], temperatures=[0.0, 0.8],
                      top_k=50, dtype=torch.float32, steps=2, warmup=0, agreement_steps=2, device="cpu",
                      compile=False, bandwidth_bytes=1 << 20, progress=False)
    result = run_benchmark(cfg)
    assert sorted(s["variant"] for s in result["skipped"]) == ["megakernel",
                                                                "megakernel, sampled at temperature 0.8, top-k 50"]
    for flags in (["--top-k", "50"], ["--temperatures", "0,0.8", "--top-k", "0"]):
        assert cli.main([*flags, "--device", "cpu", "--out", str(tmp_path)]) == 2
        assert "top-k restricts sampled rows, so it needs K >= 1" in capsys.readouterr().err
