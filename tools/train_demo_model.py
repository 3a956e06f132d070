"""Train the bundled demo model: a small DeepSeek-V3 (MLA, 1 dense + MoE layers with sigmoid routing and
the aux-loss-free correction bias) on text that ships with CPython, and write it as a Q8_0 GGUF.

    python tools/train_demo_model.py                 # ~30 min on 2 cores -> local/demo_model/
    python tools/train_demo_model.py --steps 40 --out /tmp/demo   # a quick smoke run

Text (PSF-licensed, offline, inside every CPython): the reference topics that `pydoc_data` ships and
the docstrings of the standard library's modules, classes and functions. One item in 20 (a topic, or a
docstring in both its forms) is held out for the perplexity figure; repeated docstrings count once.
Docstrings also become chat turns ("What does json.dumps do?" -> a short <think> note, then the
docstring) so `tandem chat` has something to answer.

Deterministic for a given CPython, torch and --threads: fixed seeds, a fixed step count.
The model trains with transformers' DeepseekV3ForCausalLM (the reference implementation); the
correction bias is updated after each step as in DeepSeek-V3 (bias += gamma * sign(mean load - load)).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import random
import shutil
import sys
import sysconfig
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from local.demo import CHAT_TEMPLATE, SPECIAL_TOKENS, save_tokenizer  # noqa: E402

CONFIG = dict(
    model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], vocab_size=4096, hidden_size=256,
    intermediate_size=768, moe_intermediate_size=128, num_hidden_layers=4, first_k_dense_replace=1,
    num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
    v_head_dim=32, n_routed_experts=32, num_experts_per_tok=4, n_shared_experts=1, n_group=4, topk_group=2,
    topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
    max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=0,
    eos_token_id=1, rope_theta=10000.0, rope_interleave=True, num_nextn_predict_layers=0,
    attention_bias=False, hidden_act="silu", initializer_range=0.02, dtype="float32",
)
SKIP_DIRS = {"test", "tests", "site-packages", "idlelib", "lib2to3", "turtledemo", "ensurepip"}
HOLDOUT_EVERY = 20


# ---------------------------------------------------------------- text

def stdlib_docstrings() -> list[tuple[str, str, str]]:
    """(qualified name, kind, docstring) for the standard library, in path order."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(lib.rglob("*.py")):
        rel = path.relative_to(lib)
        if SKIP_DIRS & set(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        if any(part.startswith("_") for part in module.split(".")):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue

        def visit(node, prefix):
            for child in node.body:
                if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    if child.name.startswith("_"):
                        continue
                    name = f"{prefix}.{child.name}"
                    doc = ast.get_docstring(child)
                    if doc and len(doc) >= 60:
                        out.append((name, "class" if isinstance(child, ast.ClassDef) else "function", doc))
                    if isinstance(child, ast.ClassDef):
                        visit(child, name)

        doc = ast.get_docstring(tree)
        if doc and len(doc) >= 60:
            out.append((module, "module", doc))
        visit(tree, module)
    return out


def documents() -> list[tuple[str, ...]]:
    """The corpus as items, each a tuple of the texts the model sees (chat turns already templated).
    A docstring is one item with two texts (plain, and as a chat turn), so a held-out item keeps both
    out of training; repeated docstrings (inherited or copied in the stdlib) are kept once."""
    from pydoc_data.topics import topics

    bos, eos = SPECIAL_TOKENS[0], SPECIAL_TOKENS[1]
    items = [(bos + topics[key].strip() + eos,) for key in sorted(topics)]
    seen = set()
    for name, kind, doc in stdlib_docstrings():
        doc = doc.strip()
        if doc in seen:
            continue
        seen.add(doc)
        where = name.rsplit(".", 1)[0]
        what = {"module": f"the {name} module", "class": f"the class {name}", "function": name}[kind]
        place = f"a {kind} in the {where} module" if kind != "module" else "a module of the standard library"
        question = f"What is {what}?" if kind != "function" else f"What does {name} do?"
        think = f"<think>The user asks about {name}, {place}. I will explain what it does.</think>"
        items.append((bos + doc + eos, f"{bos}<|User|>{question}<|Assistant|>{think}{doc}{eos}"))
    return items


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [t for t in SPECIAL_TOKENS if t not in ("<think>", "</think>")]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 2, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    stripped = [t for t in texts]
    for s in SPECIAL_TOKENS:
        stripped = [t.replace(s, " ") for t in stripped]
    tok.train_from_iterator(stripped, trainer)
    # as in DeepSeek-R1: the reasoning markers are added tokens that decode as text (not special)
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False),
                    AddedToken("</think>", special=False, normalized=False)])
    return tok


# ---------------------------------------------------------------- training

def batches(stream: torch.Tensor, seq: int, batch: int, gen: torch.Generator):
    """Random windows of seq+1 tokens from the concatenated training ids."""
    while True:
        starts = torch.randint(0, len(stream) - seq - 1, (batch,), generator=gen)
        yield torch.stack([stream[s:s + seq + 1] for s in starts.tolist()])


def routed_load_hooks(model, counts: dict):
    """Count, per MoE layer, how often each routed expert is picked in the current step."""
    def hook(module, args, out):
        ids = out[2]
        counts[module] = counts.get(module, 0) + torch.bincount(ids.flatten(), minlength=module.num_experts)
    for layer in model.model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(gate, "e_score_correction_bias"):
            gate.register_forward_hook(hook)


def evaluate(model, ids: torch.Tensor, seq: int) -> float:
    """Mean next-token NLL (nats) over non-overlapping windows of the held-out ids."""
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - seq - 1, seq):
            x = ids[s:s + seq + 1][None]
            logits = model(input_ids=x[:, :-1]).logits
            total += torch.nn.functional.cross_entropy(logits[0], x[0, 1:], reduction="sum").item()
            n += seq
    model.train()
    return total / max(n, 1)


def unigram_nll(train: torch.Tensor, held: torch.Tensor, vocab: int) -> float:
    counts = torch.bincount(train, minlength=vocab).double() + 1.0  # add-one smoothing
    logp = (counts / counts.sum()).log()
    return float(-logp[held].mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "local" / "demo_model"), help="output directory")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--keep-hf", action="store_true", help="also keep the float HF directory in OUT/hf")
    args = ap.parse_args(argv)

    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from quant.convert import convert

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    t0 = time.time()

    items = documents()
    held_docs = [d for item in items[::HOLDOUT_EVERY] for d in item]
    train_docs = [d for i, item in enumerate(items) if i % HOLDOUT_EVERY for d in item]
    tok = train_tokenizer(train_docs, CONFIG["vocab_size"])
    assert tok.token_to_id(SPECIAL_TOKENS[0]) == 0 and tok.token_to_id(SPECIAL_TOKENS[1]) == 1

    def encode(ds):
        return torch.tensor([i for d in ds for i in tok.encode(d).ids], dtype=torch.long)

    train_ids, held_ids = encode(train_docs), encode(held_docs)
    print(f"text: {len(items)} items, {len(train_ids)} training / {len(held_ids)} held-out tokens "
          f"({time.time() - t0:.0f} s)", flush=True)

    config = DeepseekV3Config(**{k: v for k, v in CONFIG.items() if k not in ("model_type", "architectures")})
    model = DeepseekV3ForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.1f} M parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    warmup = max(args.steps // 20, 1)

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(args.steps - warmup, 1))))

    counts: dict = {}
    routed_load_hooks(model, counts)
    gen = torch.Generator().manual_seed(args.seed)
    data = batches(train_ids, args.seq, args.batch, gen)
    gamma = 1e-3
    model.train()
    t_train, smooth = time.time(), None
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x = next(data)
        counts.clear()
        out = model(input_ids=x[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():  # DeepSeek-V3's auxiliary-loss-free balancing
            for gate, c in counts.items():
                load = c.float()
                gate.e_score_correction_bias += gamma * torch.sign(load.mean() - load)
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if step % 50 == 0 or step == args.steps - 1:
            el = time.time() - t_train
            eta = el / (step + 1) * (args.steps - step - 1)
            print(f"step {step + 1}/{args.steps}  loss {smooth:.3f}  lr {lr_at(step):.2e}  "
                  f"{(step + 1) * args.batch * args.seq / el:.0f} tok/s  eta {eta / 60:.1f} min", flush=True)

    nll = evaluate(model, held_ids, args.seq)
    uni = unigram_nll(train_ids, held_ids, CONFIG["vocab_size"])
    print(f"held-out perplexity {math.exp(nll):.2f} (unigram baseline {math.exp(uni):.1f})", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        hf = Path(tmp) / "tandem-demo-deepseek-v3"  # the GGUF general.name
        model.save_pretrained(hf, safe_serialization=True)
        cfg = json.loads((hf / "config.json").read_text())
        cfg["model_type"], cfg["architectures"] = "deepseek_v3", ["DeepseekV3ForCausalLM"]
        (hf / "config.json").write_text(json.dumps(cfg, indent=2))
        (hf / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
        save_tokenizer(tok, hf, CHAT_TEMPLATE, model_max_length=2048, add_bos_token=False)
        convert(hf, out / "demo.gguf", recipe="q8_0", force=True, progress=False)
        if args.keep_hf:
            shutil.copytree(hf, out / "hf", dirs_exist_ok=True)
    report = {
        "python": sys.version.split()[0], "torch": torch.__version__, "seed": args.seed, "steps": args.steps,
        "batch": args.batch, "seq": args.seq, "parameters": n_params, "train_tokens": len(train_ids),
        "heldout_tokens": len(held_ids), "heldout_ppl": math.exp(nll), "unigram_ppl": math.exp(uni),
        "minutes": (time.time() - t0) / 60,
    }
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    held_path = out / "heldout.txt"
    plain = [d for item in items[::HOLDOUT_EVERY] for d in item[:1]]  # the held-out items as prose
    held_path.write_text("".join(plain).replace(SPECIAL_TOKENS[0], "").replace(SPECIAL_TOKENS[1], "\n\n")[:120_000])
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
