"""`tandem bench` and `--synthetic`: a tiny geometry stands in for V2-Lite so the test is quick; the real
geometries go through the same code (`tandem bench --synthetic deepseek-v2-lite --layers 8`)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

from local import synthetic
from local.bench import LlamaCppTarget, TandemTarget, active_bytes_per_token, render, run_bench
from local.cli import main
from quant.gguf_file import GGUFModel

TINY = dict(synthetic.GEOMETRIES["deepseek-v2-lite"], vocab_size=4608, hidden_size=256, intermediate_size=512,
            moe_intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
            kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32, n_routed_experts=16,
            num_experts_per_tok=4)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setitem(synthetic.GEOMETRIES, "tiny-v2-lite", TINY)
    mp.setenv("TANDEM_CACHE", str(tmp_path_factory.mktemp("cache")))
    try:
        path = synthetic.build_synthetic("tiny-v2-lite", layers=2, quant="q4_k_m", progress=False)
        again = synthetic.build_synthetic("tiny-v2-lite", layers=2, quant="q4_k_m", progress=False)
        assert again == path  # cached
        yield path
    finally:
        mp.undo()


def test_synthetic_has_the_geometry_and_recipe(tiny_gguf):
    g = GGUFModel(tiny_gguf)
    assert g.architecture == "deepseek2" and g.kv["general.name"] == tiny_gguf.stem
    assert g.kv["deepseek2.block_count"] == 2 and g.kv["deepseek2.expert_count"] == 16
    assert len(g.kv["tokenizer.ggml.tokens"]) == TINY["vocab_size"]  # padded to the embedding rows
    types = {name: t.qtype.name for name, t in g.tensors.items()}
    assert types["blk.1.ffn_gate_exps.weight"] == "Q4_K"
    assert types["blk.1.ffn_down_exps.weight"] in ("Q4_K", "Q6_K")  # llama-quantize's q4_k_m mix
    assert types["output.weight"] == "Q6_K"
    # weights are random, not zeros, and differ between tensors
    a, b = g.raw("blk.1.ffn_gate_exps.weight"), g.raw("blk.1.ffn_up_exps.weight")
    assert a.any() and not np.array_equal(a, b)


def test_active_bytes_count_top_k_of_the_experts(tiny_gguf):
    g = GGUFModel(tiny_gguf)
    exps = sum(t.nbytes for n, t in g.tensors.items() if "_exps." in n)
    embd = g.tensors["token_embd.weight"]
    rest = sum(t.nbytes for n, t in g.tensors.items() if "_exps." not in n and n != "token_embd.weight")
    assert active_bytes_per_token(g) == rest + exps * 4 // 16 + embd.nbytes // embd.shape[0]


def test_engine_time_covers_every_engine_call():
    """The split 'engine calls / torch + Python outside' times every run_* the model code calls the engine
    through: one left out (as the fused GQA block once was) would count as overhead outside the engine."""
    from offload import torch_ops

    from local.bench import ENGINE_CALLS

    assert {n for n in dir(torch_ops) if n.startswith("run_")} <= set(ENGINE_CALLS)
    assert all(hasattr(torch_ops, n) for n in ENGINE_CALLS)


def test_qwen3_synthetic_benches_against_llama_cpp(tmp_path, monkeypatch):
    """--synthetic qwen3-30b-a3b (a tiny stand-in here): a qwen3moe file with the geometry's GQA heads and per-head
    norms, which both engines load and bench."""
    tiny = dict(synthetic.GEOMETRIES["qwen3-30b-a3b"], vocab_size=4608, hidden_size=256, moe_intermediate_size=256,
                num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    monkeypatch.setitem(synthetic.GEOMETRIES, "tiny-qwen3", tiny)
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path))
    path = synthetic.build_synthetic("tiny-qwen3", layers=2, quant="q4_k_m", experts=16, progress=False)
    assert path.name == "tiny-qwen3-L2-E16-q4_k_m-v2.gguf"
    g = GGUFModel(path)
    assert g.architecture == "qwen3moe" and g.kv["qwen3moe.expert_count"] == 16
    assert g.kv["qwen3moe.attention.head_count_kv"] == 2 and g.tensors["blk.1.attn_q_norm.weight"].shape == (64,)
    result = run_bench(path, p=8, n=4, r=1, threads=2, compare="llama.cpp", log=lambda m: None)
    tg = result["rows"][1]
    assert tg["tps_mean"] > 0 and tg["llama_cpp_tps_mean"] > 0
    steps = tg["decode_step_us"]
    assert steps["attention"] > 0 and steps["experts"] > 0
    with pytest.raises(ValueError, match="--experts 7 must be >= top-k \\(8\\)"):
        synthetic.model_config("qwen3-30b-a3b", experts=7)


def test_bench_rows_against_llama_cpp(tiny_gguf):
    result = run_bench(tiny_gguf, p=24, n=6, r=2, threads=2, compare="llama.cpp", log=lambda m: None)
    pp, tg = result["rows"]
    assert pp["test"] == "pp24" and tg["test"] == "tg6"
    for row in (pp, tg):
        assert len(row["tps"]) == 2 and len(row["llama_cpp_tps"]) == 2
        assert row["tps_mean"] > 0 and row["llama_cpp_tps_mean"] > 0
        assert row["ratio"] == pytest.approx(row["tps_mean"] / row["llama_cpp_tps_mean"])
    assert 0 < tg["bandwidth_pct"] and tg["read_gbs"] > 1
    steps = tg["decode_step_us"]
    assert {"attention", "router", "experts", "lm_head", "other"} <= set(steps)
    assert steps["attention"] > 0 and steps["experts"] > 0
    assert steps["engine calls (all stages)"] > 0 and steps["torch + Python outside the engine"] > 0
    table = render(result)
    assert "pp24" in table and "tg6" in table and "llama.cpp" in table and "% of the measured" in table
    assert "torch + Python outside the engine" in table


def test_bench_depth_runs_each_test_after_the_context(tiny_gguf, monkeypatch):
    """-d: every pp and tg run of both engines starts with `depth` tokens in its cache (llama-bench's
    "pp8 @ d20")."""
    filled = []
    tandem_fill, llama_fill = TandemTarget.fill, LlamaCppTarget.fill

    def spy_tandem(self, cache, context):
        tandem_fill(self, cache, context)
        filled.append(("tandem", cache.length))

    def spy_llama(self, context):
        llama_fill(self, context)
        memory = self.lib.llama_get_memory(self.ctx)
        filled.append(("llama.cpp", self.lib.llama_memory_seq_pos_max(memory, 0) + 1))

    monkeypatch.setattr(TandemTarget, "fill", spy_tandem)
    monkeypatch.setattr(LlamaCppTarget, "fill", spy_llama)
    result = run_bench(tiny_gguf, p=8, n=4, r=1, threads=2, compare="llama.cpp", depth=20, log=lambda m: None)
    pp, tg = result["rows"]
    assert pp["test"] == "pp8 @ d20" and tg["test"] == "tg4 @ d20" and pp["depth"] == 20
    assert pp["tps_mean"] > 0 and tg["llama_cpp_tps_mean"] > 0
    # the first: a short prefill for the memory figures, before any test; then warm-ups, the timed pp and
    # tg runs, and the decode-step breakdown's two passes
    assert filled[0] == ("tandem", 0)
    assert sorted({name for name, _ in filled[1:]}) == ["llama.cpp", "tandem"] and len(filled) >= 7
    assert all(n == 20 for _, n in filled[1:]), filled
    # the decode-step breakdown counts the decode steps, not the untimed context before them (20 positions'
    # prefill spread over 4 steps would be several steps' time); its stages are timed with the layers' blocks
    # called one by one (hooks), a little slower than the timed rows' one-call runs of layers
    steps = tg["decode_step_us"]
    assert 0 < steps["engine calls (all stages)"] < 1e6 / tg["tps_mean"]
    assert 0 < steps["attention"] + steps["experts"] + steps["lm_head"] < 2e6 / tg["tps_mean"]
    assert steps["other"] > 0 and steps["torch + Python outside the engine"] > 0
    assert "pp8 @ d20" in render(result)


def test_bench_kv_cache_dtype_is_both_engines(tiny_gguf, monkeypatch):
    """--kv-cache-dtype bfloat16: our cache in bf16, and llama.cpp's K and V caches too (GGML_TYPE_BF16)."""
    from local import llama_cpp_peer

    opened, dtypes = [], []
    open_llama, tandem_fill = llama_cpp_peer.open_llama, TandemTarget.fill

    def spy_open(path, **kwargs):
        opened.append(kwargs)
        return open_llama(path, **kwargs)

    def spy_fill(self, cache, context):
        dtypes.append(cache.dtype)
        tandem_fill(self, cache, context)

    monkeypatch.setattr(llama_cpp_peer, "open_llama", spy_open)
    monkeypatch.setattr(TandemTarget, "fill", spy_fill)
    result = run_bench(tiny_gguf, p=8, n=4, r=1, threads=2, compare="llama.cpp", depth=8, log=lambda m: None,
                       kv_cache_dtype="bfloat16")
    assert opened and all(k["type_k"] == k["type_v"] == 30 for k in opened)
    assert dtypes and set(dtypes) == {torch.bfloat16}
    tg = result["rows"][1]
    assert tg["kv_cache"] == "bfloat16" and tg["llama_cpp_kv_cache"] == "bfloat16" and tg["tps_mean"] > 0
    assert "attention cache: bfloat16 (llama.cpp: bfloat16)" in render(result)
    with pytest.raises(ValueError, match="--kv-cache-dtype q8_0"):
        run_bench(tiny_gguf, p=8, n=4, r=1, kv_cache_dtype="q8_0", log=lambda m: None)
    # load()'s aliases are the bench's too
    aliased = run_bench(tiny_gguf, p=8, n=4, r=1, kv_cache_dtype="bf16", log=lambda m: None)
    assert aliased["rows"][1]["kv_cache"] == "bfloat16"


def test_bench_cli_json_and_errors(tiny_gguf, capsys):
    assert main(["bench", str(tiny_gguf), "-p", "8", "-n", "4", "-r", "1", "-t", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["test"] for r in rows] == ["pp8", "tg4"] and all("tps_mean" in r and "tps_std" in r for r in rows)
    assert main(["bench"]) == 1
    assert "give a MODEL" in capsys.readouterr().err
    assert main(["bench", str(tiny_gguf), "-p", "0"]) == 1
    assert main(["bench", "--synthetic", "deepseek-v3", "--experts", "7"]) == 1
    assert "--experts 7" in capsys.readouterr().err


def test_llama_cpp_build_args_never_enable_amx():
    """The peer is built with this CPU's instruction sets named one by one, never AMX (whose buffer type
    crashes llama.cpp on deepseek2 graphs), and an AMX build is refused with the command that fixes it."""
    from local.llama_cpp_peer import build_problem, cmake_args, cpu_flags

    spr = cpu_flags("processor: 0\nflags\t\t: fpu sse4_2 avx avx2 fma f16c bmi2 avx512f avx512cd avx512vl avx512dq "
                    "avx512bw avx512_vnni avx512_bf16 amx_tile amx_int8 amx_bf16\n")
    args = cmake_args(spr, "x86_64").split()
    assert "-DGGML_NATIVE=OFF" in args and "-DGGML_AMX_INT8=OFF" in args and "-DGGML_AVX512_VNNI=ON" in args
    assert not any("AMX" in a and a.endswith("=ON") for a in args)
    avx2 = cmake_args(cpu_flags("flags : sse4_2 avx avx2 fma f16c\n"), "x86_64").split()
    assert "-DGGML_AVX2=ON" in avx2 and "-DGGML_AVX512=OFF" in avx2 and "-DGGML_AVX512_VNNI=OFF" in avx2
    assert cmake_args(set(), "aarch64") == "-DGGML_NATIVE=ON"

    class Lib:
        def __init__(self, info):
            self.info = info

        def llama_print_system_info(self):
            return self.info

    assert build_problem(Lib(b"CPU : AVX2 = 1 | AVX512_VNNI = 1 | REPACK = 1 |")) is None
    problem = build_problem(Lib(b"CPU : AVX512_VNNI = 1 | AMX_INT8 = 1 | REPACK = 1 |"))
    assert "AMX" in problem and "cmake-args" in problem


def test_offload_bench_json_is_alone_on_stdout(monkeypatch, capfd):
    """kt-kernel's native code prints to file descriptor 1: `python -m offload.bench --json` keeps stdout for
    the JSON object and sends everything else to stderr."""
    from offload import bench

    def fake_run(args):
        os.write(1, b"CPUInfer: Hello\n")  # what kt-kernel's C++ does
        print("progress", file=sys.stderr)
        return {"read_gbs": 1.0, "gemv": {}, "moe": []}

    monkeypatch.setattr(bench, "run", fake_run)
    assert bench.main(["--json"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out) == {"read_gbs": 1.0, "gemv": {}, "moe": []}
    assert "CPUInfer: Hello" in err and "progress" in err


def test_kt_kernel_measurement_runs_in_a_child_process(monkeypatch, capsys):
    """kt-kernel keeps the memory of every layer it built (several while probing its methods): offload.bench
    measures it in a child process, so nothing of it stays in the benchmark's own; without kt-kernel
    there is nothing to measure, and a child that dies (kt-kernel's native code crashed) costs the row
    its kt-kernel figure instead of hanging the benchmark (multiprocessing.Pool's apply waits forever)."""
    from concurrent.futures.process import BrokenProcessPool

    from offload import bench_kt

    monkeypatch.setitem(sys.modules, "kt_kernel", None)  # import kt_kernel fails
    assert bench_kt.measure_kt({"H": 256, "I": 256, "E": 8, "A": 2}, 4, 2, 1, 3) is None
    monkeypatch.delitem(sys.modules, "kt_kernel")

    calls = []

    class Future:
        def __init__(self, value):
            self.value = value

        def result(self):
            if isinstance(self.value, BaseException):
                raise self.value
            return self.value

    def executor(outcome):
        class FakeExecutor:
            def __init__(self, n, mp_context):
                calls.append(("pool", n, mp_context.get_start_method()))

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def submit(self, fn, *args):
                calls.append(("submit", fn.__name__, args))
                return Future(outcome)

        return FakeExecutor

    monkeypatch.setitem(sys.modules, "kt_kernel", type(sys)("kt_kernel"))
    monkeypatch.setattr(bench_kt, "ProcessPoolExecutor", executor((1e-3, "AMXInt4_MOE", 1, "amx")))
    spec = {"H": 256, "I": 256, "E": 8, "A": 2}
    assert bench_kt.measure_kt(spec, 4, 2, 3, 5) == (1e-3, "AMXInt4_MOE", 1, "amx")
    assert calls == [("pool", 1, "spawn"), ("submit", "_measure", (spec, 4, 2, 3, 5, 0))]

    monkeypatch.setattr(bench_kt, "ProcessPoolExecutor", executor(BrokenProcessPool("died")))
    assert bench_kt.measure_kt(spec, 4, 2, 3, 5) is None
    assert "kt-kernel's process died" in capsys.readouterr().err


def test_offload_bench_gemv_reads_rows_of_the_length_asked():
    """The GEMV rows: each type's matrix has rows of `cols` values (8192, and 2048 for the short-row
    figures), about target_bytes of them, in the layout the loader gives it, and its GB/s and share of
    the read come back per type."""
    from offload import bench
    from offload.engine import CpuEngine, interleaved_layouts

    engine = CpuEngine(1)
    seen = []
    real = engine.linear
    engine.linear = lambda w, x, y: (seen.append((w.type, w.cols, w.rows, x.shape)), real(w, x, y))[1]
    gbs, fraction = bench.bench_gemv(engine, np.random.default_rng(0), ["Q4_K", "Q8_0"], 1 << 20, cols=2048)
    assert set(gbs) == set(fraction) == {"Q4_K", "Q8_0"}
    assert all(v > 0 for v in gbs.values()) and all(v > 0 for v in fraction.values())
    q4k, q8 = ("Q4_K_R16", "Q8_0_R16") if interleaved_layouts() else ("Q4_K", "Q8_0")  # none at TANDEM_ISA=scalar
    assert {(t, c, x) for t, c, _, x in seen} == {(q4k, 2048, (1, 2048)), (q8, 2048, (1, 2048))}
    rows = {t: r for t, _, r, _ in seen}
    assert rows[q4k] == (1 << 20) // 1152 // 16 * 16 and rows[q8] == (1 << 20) // 2176 // 16 * 16


def test_offload_bench_roofline_counts_the_experts_a_call_reads():
    """The MoE rows' memory roofline: a T-token call reads each expert any token picks once, on average
    E (1 - (1 - A/E)^T) of them; checked against routes drawn as the benchmark draws them."""
    from offload import bench

    spec = dict(H=64, I=32, E=8, A=2, n_shared=0, gate="Q8_0", down="Q8_0", shared_gate="Q8_0", shared_down="Q8_0")
    rng = np.random.default_rng(0)
    layer = bench.make_layer(rng, spec)
    per_expert = sum(w.data.nbytes for w in layer[:3]) / spec["E"]
    assert bench.routed_bytes(spec, layer, 1) == pytest.approx(2 * per_expert)
    assert bench.routed_bytes(spec, layer, 10_000) == pytest.approx(8 * per_expert)
    drawn = np.mean([len(np.unique(bench.random_route(rng, 3, 8, 2)[0])) for _ in range(4000)])
    assert bench.routed_bytes(spec, layer, 3) == pytest.approx(drawn * per_expert, rel=0.02)


def test_offload_bench_times_each_moe_call_after_a_read_beyond_l3(monkeypatch):
    """Every timed MoE call finds its experts out of the cache: a streaming read of 1.5x the L3 cache,
    then an untimed call of the copy before (the code back in the cache), then the timed call (at T=1 a
    call reads so few experts that cycling through layer copies left some in the cache). Each row's
    roofline takes the rate of those reads, on the engine's own threads: the bandwidth of the same
    moment, not the figure measured minutes earlier at the start of the run. Checked on stand-ins with
    a fake clock."""
    from offload import bench

    clock = [0.0]
    events = []
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])

    class Engine:
        def moe(self, x, ids, w, gate, up, down, shared, out):
            events.append(("moe", gate, len(shared)))
            clock[0] += 0.002

        def read_pass(self, buf):
            events.append(("read",) if buf.nbytes == 5_000_000 else ("twin", id(buf), buf.nbytes))
            clock[0] += 0.010 if buf.nbytes == 5_000_000 else 0.0015
            return 0.010

    spec = {"H": 8, "E": 4, "A": 2}
    layers = [("g0", "u0", "d0", ["s"]), ("g1", "u1", "d1", ["s"])]
    buf = np.zeros(5_000_000, np.uint8)
    rng = np.random.default_rng(0)
    routed, _, read_gbs, twin = bench.bench_moe_engine(Engine(), rng, spec, layers, 1, 8, buf, with_shared=False)
    assert twin is None and not any(e[0] == "twin" for e in events)
    assert routed == pytest.approx(0.002)
    assert read_gbs == pytest.approx(5_000_000 / 0.010 / 1e9)
    assert all(e[2] == 0 for e in events if e[0] == "moe")  # the routed experts alone
    assert [e[0] for e in events[-24:]] == ["read", "moe", "moe"] * 8
    for i in range(-24, 0, 3):  # the untimed call on the other copy than the timed one
        assert events[i + 1][1] != events[i + 2][1]

    events.clear()
    median, std, _, _ = bench.bench_moe_engine(Engine(), rng, spec, layers, 1, 6, buf)
    assert median == pytest.approx(0.002) and std == pytest.approx(0, abs=1e-12)
    assert all(e[2] == 1 for e in events if e[0] == "moe")  # the shared expert too
    assert [e[0] for e in events[-18:]] == ["read", "moe", "moe"] * 6

    # the twin: a plain read of as many bytes as a call reads, found cold the same way in the same rounds
    events.clear()
    routed, _, _, twin = bench.bench_moe_engine(Engine(), rng, spec, layers, 1, 4, buf, with_shared=False,
                                                twin_bytes=12345)
    assert routed == pytest.approx(0.002) and twin == pytest.approx(0.0015)
    assert [e[0] for e in events[-24:]] == ["read", "moe", "moe", "read", "twin", "twin"] * 4
    for i in range(-24, 0, 6):  # the twin's untimed read on the other buffer than the timed one
        assert events[i + 4][2] == events[i + 5][2] == 12345 and events[i + 4][1] != events[i + 5][1]


def test_offload_bench_measures_the_layers_asked(monkeypatch, capfd):
    """--layer picks MoE layers (a layer without shared experts among them: Qwen3's), --no-gemv skips the
    GEMV rows; on stand-in shapes, without peers."""
    from offload import bench

    tiny = {"plain": dict(H=256, I=256, E=8, A=2, n_shared=0, gate="Q4_K", down="Q4_K"),
            "shared": dict(H=256, I=256, E=8, A=2, n_shared=1, gate="Q4_K", down="Q4_K", shared_gate="Q4_K",
                           shared_down="Q4_K")}
    monkeypatch.setattr(bench, "LAYERS", tiny)
    monkeypatch.setattr(bench, "roofline_read_bytes", lambda: 1 << 20)
    monkeypatch.setattr(bench, "copies_beyond_l3", lambda nbytes: 2)
    monkeypatch.setattr(bench, "timed", lambda *args, **kwargs: None)  # no warm-up, no settling
    assert bench.main(["--json", "--no-gemv", "--no-peers", "--layer", "plain", "--repeats", "3"]) == 0
    result = json.loads(capfd.readouterr().out)
    assert "gemv" not in result and [(r["layer"], r["T"]) for r in result["moe"]] == [("plain", 1), ("plain", 128)]
    assert all(r["us"] > 0 and r["routed_bytes"] > 0 for r in result["moe"])
    # decode's row also times a plain read of the bytes its call reads; prefill's (bound by compute) does not
    assert result["moe"][0]["same_bytes_read_us"] > 0 and "same_bytes_read_us" not in result["moe"][1]
    with pytest.raises(SystemExit):
        bench.main(["--layer", "nonesuch"])


def test_offload_bench_rates_kt_kernel_in_reads_of_the_calls_bytes(monkeypatch, capfd):
    """With kt-kernel measured, decode's row gives its time in plain reads of the bytes a call reads (those
    timed before and after it) and the inverse, the ratio a call as fast as one such read would reach, which
    no engine beats against that run; prefill's row has neither. kt-kernel and torch stand in."""
    from offload import bench, bench_kt

    tiny = {"plain": dict(H=256, I=256, E=8, A=2, n_shared=0, gate="Q4_K", down="Q4_K")}
    monkeypatch.setattr(bench, "LAYERS", tiny)
    monkeypatch.setattr(bench, "roofline_read_bytes", lambda: 1 << 20)
    monkeypatch.setattr(bench, "copies_beyond_l3", lambda nbytes: 2)
    monkeypatch.setattr(bench, "timed", lambda *args, **kwargs: None)
    monkeypatch.setattr(bench, "bench_moe_torch", lambda *args: 1.0)
    monkeypatch.setattr(bench_kt, "measure_kt", lambda spec, T, *args: (0.25, "STAND-IN", 1, "avx512"))
    assert bench.main(["--json", "--no-gemv", "--repeats", "3"]) == 0
    out = capfd.readouterr()
    decode, prefill = json.loads(out.out)["moe"]
    reads = 0.25e6 / ((decode["same_bytes_read_us"] + decode["same_bytes_read_us_after"]) / 2)
    assert decode["kt_kernel_same_bytes_reads"] == pytest.approx(reads)
    assert decode["kt_kernel_ratio_floor"] == pytest.approx(1 / reads)
    assert f"{1 / reads:.2f}x kt-kernel" in out.err
    assert "kt_kernel_same_bytes_reads" not in prefill and "kt_kernel_ratio_floor" not in prefill
    assert prefill["kt_kernel_us"] == pytest.approx(0.25e6)


def test_offload_bench_peers_read_on_one_thread(monkeypatch):
    """The read before each call of a peer (torch, kt-kernel) runs on a one-thread engine: on the calling
    thread, with no worker left spinning beside the peer's threads."""
    from offload import bench

    assert bench.one_thread_reader(np.ones(1 << 20, np.uint8))() > 0
    made = []

    class Engine:
        def __init__(self, threads):
            made.append(threads)

        def read_pass(self, buf):
            return buf.nbytes

    monkeypatch.setattr(bench, "CpuEngine", Engine)
    assert bench.one_thread_reader(np.ones(100, np.uint8))() == 100 and made == [1]


def test_kt_kernel_llamafile_gets_gguf_blocks_of_the_engines_types(monkeypatch):
    """kt-kernel's GGUF path (LLAMAFILE, its `moe.MOE`) is one of the methods raced for its fastest: it
    gets the layer's GGUF blocks of the types the engine runs (the bytes a GGUF file holds), kept alive
    while the layer lives (it reads them in place), and those types by name; the bf16 methods get their
    own bf16 experts. Checked on a stand-in for kt-kernel."""
    from offload import bench, bench_kt

    blocks = []

    def random_weight(rng, typ, shape):
        w = real(rng, typ, shape)
        blocks.append((typ, shape, w.data.nbytes))
        return w

    real = bench.random_weight
    monkeypatch.setattr(bench, "random_weight", random_weight)
    assert "LLAMAFILE" in bench_kt.METHODS and "AMXInt4_MOE" in bench_kt.METHODS
    built = []

    class Config:
        def __init__(self, E, A, H, I, gpu_mask):
            self.shape, self.gpu_mask = (E, A, H, I), gpu_mask

    class Moe:
        def __init__(self, cfg):
            self.cfg = dict(vars(cfg))
            built.append(self)

        def load_weights_task(self, p2l):
            return ("load", p2l)

    class Ext:
        class moe:
            MOEConfig = Config
            MOE = AMXInt4_MOE = Moe

        class kvcache:
            class ggml_type:
                Q4_K, Q6_K, BF16 = 12, 14, 30

        class CPUInfer:
            backend_ = "pool"

            def __init__(self, n):
                self.tasks = []

            def submit(self, task):
                self.tasks.append(task)

            def sync(self):
                pass

    spec = dict(H=512, I=256, E=4, A=2, gate="Q4_K", down="Q6_K")
    rng = np.random.default_rng(0)
    layer = bench_kt.KtMoE(Ext, spec, 3, "LLAMAFILE", 1, rng)
    cfg = built[-1].cfg
    # kt-kernel reads them in place: the layer keeps them alive
    assert [t.data_ptr() for t in layer.blocks[0]] == [cfg["gate_proj"], cfg["up_proj"], cfg["down_proj"]]
    assert (cfg["gate_type"], cfg["up_type"], cfg["down_type"], cfg["hidden_type"]) == (12, 12, 14, 30)
    assert cfg["gpu_mask"] != 0 and cfg["gate_proj"] and cfg["up_proj"] and cfg["down_proj"]
    assert cfg["max_len"] >= 3 and cfg["group_max_len"] >= 3
    assert blocks == [("Q4_K", (4, 256, 512), 4 * 256 * 2 * 144), ("Q4_K", (4, 256, 512), 4 * 256 * 2 * 144),
                      ("Q6_K", (4, 512, 256), 4 * 512 * 210)]
    bench_kt.KtMoE(Ext, spec, 3, "AMXInt4_MOE", 1, rng)
    cfg = built[-1].cfg
    assert "gate_type" not in cfg and cfg["gpu_mask"] == 0 and len(blocks) == 3
