"""`tandem` command line."""

from __future__ import annotations

import argparse
import logging
import sys

DIM, RESET = "\033[2m", "\033[0m"


def cmd_run(args) -> int:
    from . import SamplingParams, load

    runner = load(args.model, device=args.device, threads=args.threads, dtype=args.dtype,
                  kv_cache_dtype=args.kv_cache_dtype)
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

    print(render(summarize(args.model), show_tensors=args.tensors))
    return 0


def cmd_perplexity(args) -> int:
    from pathlib import Path

    from . import load
    from .perplexity import perplexity

    text = Path(args.file).read_text(encoding="utf-8")
    runner = load(args.model, device=args.device, threads=args.threads, dtype=args.dtype)
    base = load(args.kld_base, device=args.device, threads=args.threads, dtype=args.dtype) if args.kld_base else None

    def progress(done, total):
        sys.stderr.write(f"\rchunk {done}/{total}")
        sys.stderr.flush()

    result = perplexity(runner, text, ctx=args.ctx, base=base, progress=progress)
    sys.stderr.write("\n")
    print(result.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem", description="Run DeepSeek-style MoE models across GPU and CPU.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="generate text from a prompt")
    r.add_argument("model", nargs="?", default=None, help="HF model directory (default: the bundled demo model)")
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
    r.add_argument("--kv-cache-dtype", default=None, help="attention cache dtype: float16 halves it (default: --dtype)")
    r.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    r.set_defaults(func=cmd_run)

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
    i.set_defaults(func=cmd_inspect)

    q = sub.add_parser("perplexity", help="perplexity over a text, and KL divergence against a base model")
    q.add_argument("model", help="GGUF file or HF model directory")
    q.add_argument("-f", "--file", required=True, help="UTF-8 text file to score")
    q.add_argument("-c", "--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    q.add_argument("--kld-base", default=None, help="base model (same tokenizer) for KL divergence")
    q.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    q.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    q.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    q.set_defaults(func=cmd_perplexity)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
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
