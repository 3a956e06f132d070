"""`tandem` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .synthetic import GEOMETRIES

DIM, RESET = "\033[2m", "\033[0m"
CUDA_GRAPH_HELP = "decode steps replay a CUDA graph (CUDA devices; attention spans the whole --ctx cache)"
THREADS_HELP = "CPU threads (default: the physical cores this process may use: CPU affinity, cgroup quota)"
KV_CACHE_HELP = ("attention cache dtype: float16 or bfloat16 halve it; on an AVX512-BF16 CPU bfloat16 also attends "
                 "fastest (default: --dtype)")


QUANT_HELP = ("an HF directory's weights quantized as they load, with a tandem convert recipe (q4_k_m, q8_0, ...): "
              "convert's file, in memory, rebuilt at every load (default: the checkpoint's own precision)")


def load_bar(what: str = "loading"):
    """A load's progress(done, total) for stderr on a terminal: a percentage redrawn in place, erased once
    complete (so the output starts on a clean line); None elsewhere (a log or a pipe gets nothing)."""
    if not sys.stderr.isatty():
        return None
    shown = [-1]

    def progress(done: int, total: int) -> None:
        pct = 100 * done // max(total, 1)
        if done >= total:
            print("\r\033[K", end="", file=sys.stderr, flush=True)
        elif pct != shown[0]:
            print(f"\r{what} {pct:3d}%", end="", file=sys.stderr, flush=True)
        shown[0] = pct
    return progress


def cmd_run(args) -> int:
    from . import SamplingParams, load

    runner = load(args.model, device=args.device, threads=args.threads, dtype=args.dtype,
                  kv_cache_dtype=args.kv_cache_dtype, ctx=args.ctx, chunk=args.chunk,
                  cuda_graph=args.cuda_graph, quant=args.quant,
                  progress=load_bar(f"loading {Path(args.model or 'demo').name}"))
    params = SamplingParams(max_tokens=args.n_predict, temperature=args.temp, top_k=args.top_k, top_p=args.top_p,
                            min_p=args.min_p, repetition_penalty=args.repeat_penalty, seed=args.seed,
                            stop=tuple(args.stop or ()), ignore_eos=args.ignore_eos)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        events = runner.chat(messages + [{"role": "user", "content": args.prompt}], params)
    else:
        events = runner.generate(args.prompt, params)
    color = sys.stdout.isatty()
    if not args.chat:
        sys.stdout.write(args.prompt)
    in_reasoning = False
    for ev in events:
        if ev.kind == "done":
            if color and in_reasoning:
                sys.stdout.write(RESET)
            sys.stdout.write("\n")
            sys.stdout.flush()
            print(f"[{ev.stats.summary()} | {ev.finish_reason}]", file=sys.stderr)
            break
        if ev.text:
            if color and ev.reasoning != in_reasoning:
                sys.stdout.write(DIM if ev.reasoning else RESET)
            in_reasoning = ev.reasoning
            sys.stdout.write(ev.text)
            sys.stdout.flush()
    return 0


def cmd_chat(args) -> int:
    from tui import ChatApp

    ChatApp(args.model, system=args.system, device=args.device, threads=args.threads, ctx=args.ctx,
            cuda_graph=args.cuda_graph, kv_cache_dtype=args.kv_cache_dtype, quant=args.quant).run()
    return 0


def cmd_bench(args) -> int:
    from .bench import main_json, render, run_bench

    model = args.model
    if args.synthetic:
        if model:
            raise ValueError("give either MODEL or --synthetic, not both")
        from .synthetic import build_synthetic

        model = build_synthetic(args.synthetic, args.layers, args.quant or "q4_k_m", args.experts, progress=True)
    elif not model:
        raise ValueError("give a MODEL (GGUF file or HF directory) or --synthetic " + "|".join(GEOMETRIES))
    result = run_bench(model, p=args.n_prompt, n=args.n_gen, r=args.repetitions, threads=args.threads,
                       device=args.device, compare=args.compare, chunk=args.chunk,
                       cuda_graph=args.cuda_graph, depth=args.depth, kv_cache_dtype=args.kv_cache_dtype,
                       quant=None if args.synthetic else args.quant, progress=load_bar())
    print(main_json(result) if args.json else render(result))
    return 0


def cmd_convert(args) -> int:
    from quant.convert import convert
    from quant.recipes import RECIPES

    if args.quant not in RECIPES:
        raise ValueError(f"--quant {args.quant} is not one of {', '.join(RECIPES)}")
    import offload

    quantizer = getattr(offload, "quantize", None)  # the C++ engine's, bit-exact with quant's numpy ones
    out = convert(args.src, args.output, args.quant, force=args.force, progress=not args.quiet, quantizer=quantizer)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)
    return 0


def cmd_inspect(args) -> int:
    from .inspect_model import render, summarize

    summary = summarize(args.model)
    print(render(summary, show_tensors=args.tensors))
    from . import routing

    from offload.placement import make_plan
    from quant.hf_gguf import HFAsGGUF

    stats = routing.read(args.routing) if args.routing else None
    # an HF directory is placed as the GGUF it loads as (quant.hf_gguf): its float tensors, or --quant's
    if args.quant is not None and summary.format == "gguf":
        raise ValueError(f"--quant applies to an HF directory; {Path(args.model).name} is a GGUF file")
    if summary.format == "gguf":
        model = summary.gguf
    else:  # split across a GPU, --quant takes the routed experts only (as load does)
        from .gguf_loader import is_hybrid
        from .runner import resolve_device

        model = HFAsGGUF(args.model, recipe=args.quant, experts_only=is_hybrid(resolve_device(args.device), None))
    plan = make_plan(model, args.device, args.gpu_experts, stats, context=args.ctx_size,
                     kv_bytes_per_token=summary.kv_bytes_per_token)
    print("\n" + plan.render())
    if args.routing_stats:
        from . import load

        text = Path(args.routing_stats).read_text(encoding="utf-8")
        runner = load(args.model, device=args.device, threads=args.threads, quant=args.quant, progress=load_bar())
        bar = _progress_printer("routing")
        stats = routing.gather(runner, text, ctx=args.ctx, progress=bar)
        print("\n" + stats.render())
        if args.routing_out:
            routing.save(stats, args.routing_out)
            print(f"wrote {args.routing_out}", file=sys.stderr)
    return 0


def _progress_printer(what: str):
    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty() or done == total:
            end = "\n" if done == total else ""
            print(f"\r{what}: {done}/{total}", end=end, file=sys.stderr, flush=True)
    return progress


def cmd_perplexity(args) -> int:
    from . import load
    from .perplexity import perplexity

    text = Path(args.file).read_text(encoding="utf-8")
    runner = load(args.model, device=args.device, threads=args.threads, dtype=args.dtype, quant=args.quant,
                  progress=load_bar())
    base = load(args.kld_base, device=args.device, threads=args.threads, dtype=args.dtype,
                progress=load_bar()) if args.kld_base else None

    result = perplexity(runner, text, ctx=args.ctx, base=base, progress=_progress_printer("chunk"))
    print(result.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem", description="Run DeepSeek-style MoE models across GPU and CPU.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="generate text from a prompt")
    r.add_argument("model", nargs="?", default=None,
                   help="GGUF file or HF model directory (default: the bundled demo model)")
    r.add_argument("-p", "--prompt", required=True, help="prompt text (with --chat: the user message)")
    r.add_argument("-n", "--n-predict", type=int, default=128, help="max tokens to generate (default 128)")
    r.add_argument("--temp", type=float, default=0.7, help="temperature; 0 = greedy (default 0.7)")
    r.add_argument("--top-k", type=int, default=0, help="top-k, 0 = off")
    r.add_argument("--top-p", type=float, default=1.0, help="top-p (nucleus), 1 = off")
    r.add_argument("--min-p", type=float, default=0.0, help="min-p, 0 = off")
    r.add_argument("--repeat-penalty", type=float, default=1.0, help="repetition penalty, 1 = off")
    r.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    r.add_argument("--stop", action="append", help="stop string (repeatable)")
    r.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    r.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    r.add_argument("--system", default=None, help="system prompt (with --chat)")
    r.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    r.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    r.add_argument("--kv-cache-dtype", default=None, help=KV_CACHE_HELP)
    r.add_argument("-t", "--threads", type=int, default=None, help=THREADS_HELP)
    r.add_argument("-c", "--ctx", type=int, default=None, help="context length; the KV cache is preallocated for it")
    r.add_argument("--chunk", type=int, default=512, help="prompt tokens per prefill pass (default 512)")
    r.add_argument("--cuda-graph", action="store_true", help=CUDA_GRAPH_HELP)
    r.add_argument("--quant", default=None, help=QUANT_HELP)
    r.set_defaults(func=cmd_run)

    ch = sub.add_parser("chat", help="the terminal chat UI (live throughput, reasoning, expert routing)")
    ch.add_argument("model", nargs="?", default=None, help="GGUF file or HF directory (default: the demo model)")
    ch.add_argument("--system", default=None, help="system prompt")
    ch.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    ch.add_argument("-t", "--threads", type=int, default=None, help=THREADS_HELP)
    ch.add_argument("-c", "--ctx", type=int, default=None, help="context length (default: the model's)")
    ch.add_argument("--kv-cache-dtype", default=None, help=KV_CACHE_HELP)
    ch.add_argument("--cuda-graph", action="store_true", help=CUDA_GRAPH_HELP)
    ch.add_argument("--quant", default=None, help=QUANT_HELP)
    ch.set_defaults(func=cmd_chat)

    b = sub.add_parser("bench", help="prompt and decode throughput (llama-bench style), optionally vs llama.cpp")
    b.add_argument("model", nargs="?", default=None, help="GGUF file or HF model directory")
    b.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens for the pp test (default 512)")
    b.add_argument("-n", "--n-gen", type=int, default=128, help="generated tokens for the tg test (default 128)")
    b.add_argument("-r", "--repetitions", type=int, default=5, help="timed repetitions (default 5)")
    b.add_argument("-d", "--depth", type=int, default=0,
                   help="tokens already in the context before each test, prefilled untimed (llama-bench's -d; "
                        "default 0)")
    b.add_argument("-t", "--threads", type=int, default=None, help=THREADS_HELP)
    b.add_argument("--device", default="cpu", help="cpu (default), auto or cuda[:N]")
    b.add_argument("--chunk", type=int, default=512, help="prefill chunk, tokens (default 512)")
    b.add_argument("--kv-cache-dtype", default=None,
                   help="attention cache dtype, float32, float16 or bfloat16, for llama.cpp too with --compare "
                        "(default: each its own, the compute dtype here and float16 in llama.cpp)")
    b.add_argument("--cuda-graph", action="store_true", help=CUDA_GRAPH_HELP)
    b.add_argument("--compare", default=None, choices=["llama.cpp"],
                   help="also run llama.cpp (llama-cpp-python) on the same file and print the ratios")
    b.add_argument("--synthetic", default=None, choices=list(GEOMETRIES),
                   help="bench a cached random-weight GGUF with this model's real geometry")
    b.add_argument("--layers", type=int, default=None, help="layers of the synthetic model (default: all)")
    b.add_argument("--experts", type=int, default=None, help="routed experts of the synthetic model (default: all)")
    b.add_argument("--quant", default=None,
                   help="recipe of the synthetic model (default q4_k_m); with an HF directory: " + QUANT_HELP)
    b.add_argument("--json", action="store_true", help="one JSON object per row")
    b.set_defaults(func=cmd_bench)

    c = sub.add_parser("convert", help="convert an HF checkpoint or GGUF to a (quantized) GGUF")
    c.add_argument("src", help="HF model directory (BF16/FP16/FP32/FP8 safetensors) or a .gguf file")
    c.add_argument("-o", "--output", required=True, help="output .gguf path")
    c.add_argument("--quant", default="q8_0",
                   help="f32, f16, bf16, q8_0, q4_0, q5_0, q4_k_m, q5_k_m or q6_k (default q8_0)")
    c.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser("inspect", help="architecture, parameters, tensor types and KV cache size of a model")
    i.add_argument("model", help="GGUF file or HF model directory")
    i.add_argument("--tensors", action="store_true", help="also list every tensor")
    i.add_argument("--routing-stats", metavar="FILE", default=None,
                   help="run the text (prompts or prose) in FILE and report how often each expert is picked")
    i.add_argument("--routing-out", metavar="JSON", default=None, help="also write those counts as JSON")
    i.add_argument("-c", "--ctx", type=int, default=512, help="tokens per chunk for --routing-stats (default 512)")
    i.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]: the placement to show (and run on)")
    i.add_argument("--gpu-experts", type=int, default=0, help="routed experts per layer kept on the GPU (placement)")
    i.add_argument("--routing", metavar="JSON", default=None,
                   help="routing counts from --routing-out: --gpu-experts picks the busiest experts")
    i.add_argument("--ctx-size", type=int, default=4096, help="context the placement reserves KV cache for")
    i.add_argument("-t", "--threads", type=int, default=None, help="for --routing-stats: " + THREADS_HELP)
    i.add_argument("--quant", default=None, help="the placement (and RAM) of an HF directory loaded with --quant: "
                   + QUANT_HELP)
    i.set_defaults(func=cmd_inspect)

    q = sub.add_parser("perplexity", help="perplexity over a text, and KL divergence against a base model")
    q.add_argument("model", help="GGUF file or HF model directory")
    q.add_argument("-f", "--file", required=True, help="UTF-8 text file to score")
    q.add_argument("-c", "--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    q.add_argument("--kld-base", default=None, help="base model (same tokenizer) for KL divergence")
    q.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    q.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    q.add_argument("-t", "--threads", type=int, default=None, help=THREADS_HELP)
    q.add_argument("--quant", default=None, help="MODEL (not the base): " + QUANT_HELP + "; with --kld-base DIR, what "
                   "the recipe costs that model")
    q.set_defaults(func=cmd_perplexity)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None):  # more threads than CPUs: a clear slowdown, not an error
        from offload.cpus import threads_warning

        if warning := threads_warning(args.threads):
            print(f"tandem: warning: {warning}", file=sys.stderr)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError, RuntimeError, OSError,
            MemoryError) as e:
        print(f"tandem: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
