"""The model `tandem run` and `tandem chat` use when none is given.

The bundled demo model is `local/demo_model/demo.gguf`: a 13M-parameter DeepSeek-V3 (MLA, one dense
and three MoE layers, sigmoid routing with the correction bias) that `tools/train_demo_model.py`
trains on the CPython documentation, stored as Q8_0 with its tokenizer and chat template.
`build_tiny_model` makes tiny random-weight stand-ins for tests (and is the fallback when the
bundled file is missing, e.g. a checkout without it): every code path, but gibberish text.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("tandem")

BUNDLED = Path(__file__).resolve().parent / "demo_model" / "demo.gguf"
TINY_VERSION = 1

CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}<|User|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|Assistant|>{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|User|>", "<|Assistant|>", "<think>", "</think>"]

TINY_CONFIG = dict(
    model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], vocab_size=1024, hidden_size=128,
    intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=3, first_k_dense_replace=1,
    num_attention_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
    v_head_dim=32, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, n_group=4, topk_group=2,
    topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
    max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=0,
    eos_token_id=1, dtype="float32",
    rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=1024,
                         beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
)


def cache_dir() -> Path:
    root = os.environ.get("TANDEM_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "tandem")
    return Path(root).expanduser()


def demo_model_path() -> Path:
    """The bundled demo model, or the tiny random stand-in (built on first use)."""
    if BUNDLED.exists():
        return BUNDLED
    path = cache_dir() / f"tiny-deepseek-v3-random-v{TINY_VERSION}"
    if not (path / "model.safetensors").exists():
        log.warning("the bundled demo model %s is missing; building a tiny random-weight DeepSeek-V3 at %s "
                    "(its output is gibberish)", BUNDLED, path)
        build_tiny_model(path)
    return path


def train_tokenizer(vocab_size: int):
    """A byte-level BPE trained on the CPython docs that `pydoc_data` ships (offline, PSF-licensed)."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(topics.values(), trainer)
    bos = SPECIAL_TOKENS[0]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def save_tokenizer(tok, directory: Path, chat_template: str, **config) -> None:
    """`tok` as tokenizer.json + tokenizer_config.json (BOS/EOS, the chat template, `config` keys)."""
    tok.save(str(Path(directory) / "tokenizer.json"))
    (Path(directory) / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIAL_TOKENS[0],
        "eos_token": SPECIAL_TOKENS[1], "chat_template": chat_template, **config,
    }, indent=2))


def build_tokenizer_files(directory: Path, vocab_size: int, chat_template: str) -> None:
    """tokenizer.json + tokenizer_config.json (with the chat template) into `directory`."""
    save_tokenizer(train_tokenizer(vocab_size), directory, chat_template, model_max_length=4096)


def build_tiny_model(path: Path, seed: int = 0) -> Path:
    """Write a random-weight tiny DeepSeek-V3 HF directory (config, safetensors, tokenizer) to `path`."""
    from safetensors.torch import save_file

    from .models import get_architecture

    arch = get_architecture("deepseek_v3")
    cfg = arch.Config.from_dict(TINY_CONFIG)
    torch.manual_seed(seed)
    model = arch.build(cfg, [])
    state = {}
    for name, t in model.state_dict().items():
        if name.endswith("norm.weight"):
            state[name] = torch.ones_like(t)
        elif name.endswith("e_score_correction_bias"):
            state[name] = torch.randn_like(t) * 0.05
        else:
            state[name] = torch.randn_like(t) * 0.08
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors", metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(TINY_CONFIG, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    build_tokenizer_files(tmp, cfg.vocab_size, CHAT_TEMPLATE)
    if path.exists():
        import shutil
        shutil.rmtree(path)
    tmp.rename(path)
    return path
