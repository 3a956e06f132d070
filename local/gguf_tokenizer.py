"""A `Tokenizer` rebuilt from a GGUF file's `tokenizer.*` keys (what llama.cpp tokenizes with).

gpt2 models become byte-level BPE behind llama.cpp's pre-tokenizer regexes for their `tokenizer.ggml.pre`;
llama (sentencepiece) models become the byte-fallback BPE on Metaspace that transformers builds for Llama,
with merges ordered by the GGUF scores. Special tokens come from the token types, BOS/EOS from add_bos/add_eos.
"""

from __future__ import annotations

from gguf import Keys, TokenType
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

from quant.gguf_vocab import PRE_REGEXES

from .tokenizer import Tokenizer, _bos_eos_processor, _generate_merges, _llama_backend

MODELS = ("gpt2", "llama")
# llama.cpp's defaults when a llama (SPM) GGUF leaves the ids or flags out; gpt2 has none worth copying
SPM_DEFAULTS = {"bos": 1, "eos": 2, "unk": 0}
ID_KEYS = {"bos_token": Keys.Tokenizer.BOS_ID, "eos_token": Keys.Tokenizer.EOS_ID,
           "unk_token": Keys.Tokenizer.UNK_ID, "pad_token": Keys.Tokenizer.PAD_ID}


def tokenizer_from_gguf(kv: dict, source: str) -> Tokenizer:
    """The tokenizer described by GGUF key-values `kv` (as `GGUFModel(path).kv` returns them)."""
    kind = kv.get(Keys.Tokenizer.MODEL)
    if kind not in MODELS:
        raise ValueError(f"{source}: tokenizer.ggml.model {kind!r} is not supported (supported: {', '.join(MODELS)})")
    if Keys.Tokenizer.LIST not in kv:
        raise ValueError(f"{source}: tokenizer.ggml.model is {kind!r} but there is no tokenizer.ggml.tokens")
    tokens = [str(t) for t in kv[Keys.Tokenizer.LIST]]
    types = [int(t) for t in kv.get(Keys.Tokenizer.TOKEN_TYPE, [TokenType.NORMAL] * len(tokens))]
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    if kind == "gpt2":
        backend = _byte_level_backend(kv, vocab, source)
        add_bos, add_eos = bool(kv.get(Keys.Tokenizer.ADD_BOS, False)), bool(kv.get(Keys.Tokenizer.ADD_EOS, False))
    else:
        scores = kv.get(Keys.Tokenizer.SCORES)
        if scores is None:
            raise ValueError(f"{source}: a llama (sentencepiece) vocabulary needs tokenizer.ggml.scores")
        # merges ordered by the merged token's score, as llama.cpp's SPM tokenizer picks them
        order = sorted(range(len(tokens)), key=lambda i: (-float(scores[i]), i))
        rank = {tokens[i]: r for r, i in enumerate(order) if vocab[tokens[i]] == i}
        merges = _generate_merges(rank)
        prefix = bool(kv.get(Keys.Tokenizer.ADD_PREFIX, True))
        # llama.cpp puts the space prefix before the text after every special token, like legacy Llama
        backend = _llama_backend({"vocab": vocab, "merges": merges}, {"add_prefix_space": prefix, "legacy": True},
                                 None)
        add_bos, add_eos = bool(kv.get(Keys.Tokenizer.ADD_BOS, True)), bool(kv.get(Keys.Tokenizer.ADD_EOS, False))
    # control/unknown tokens are special; user-defined ones are plain added tokens, matched before the model
    added = [AddedToken(tokens[i], special=t != TokenType.USER_DEFINED, normalized=False)
             for i, t in enumerate(types)
             if t in (TokenType.CONTROL, TokenType.UNKNOWN, TokenType.USER_DEFINED) and vocab[tokens[i]] == i]
    if added:
        backend.add_tokens(added)
    named = {}
    for name, key in ID_KEYS.items():
        i = kv.get(key, SPM_DEFAULTS.get(name.split("_")[0]) if kind == "llama" else None)
        if i is not None and 0 <= int(i) < len(tokens):
            named[name] = tokens[int(i)]
    backend.post_processor = _bos_eos_processor(backend, {"add_bos_token": add_bos, "add_eos_token": add_eos}, named)
    return Tokenizer(backend, {}, named, _chat_templates(kv), source)


def _byte_level_backend(kv: dict, vocab: dict, source: str) -> Backend:
    pre = kv.get(Keys.Tokenizer.PRE, "default")
    if pre not in PRE_REGEXES:
        raise ValueError(f"{source}: tokenizer.ggml.pre {pre!r} is not supported "
                         f"(supported: {', '.join(PRE_REGEXES)})")
    merges = []
    for m in kv.get(Keys.Tokenizer.MERGES, []):
        cut = m.find(" ", 1)  # llama.cpp splits at the first space after the first character
        merges.append((m[:cut], m[cut + 1:]))
    backend = Backend(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, fuse_unk=False,
                                 byte_fallback=False))
    if pre == "gpt-2":  # ByteLevel's built-in regex is GPT-2's (llama.cpp's C++ splitter adds the final `\s+`)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in PRE_REGEXES[pre]]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre == "qwen2":  # Qwen2's tokenizer normalizes to NFC (llama.cpp does not)
        backend.normalizer = normalizers.NFC()
    backend.decoder = decoders.ByteLevel()
    return backend


def _chat_templates(kv: dict):
    """tokenizer.chat_template, or a dict with the named tokenizer.chat_template.NAME ones as well."""
    default = kv.get(Keys.Tokenizer.CHAT_TEMPLATE)
    names = [str(n) for n in kv.get(Keys.Tokenizer.CHAT_TEMPLATES, [])]
    if not names:
        return default
    templates = {n: kv[Keys.Tokenizer.CHAT_TEMPLATE_N.format(name=n)] for n in names
                 if Keys.Tokenizer.CHAT_TEMPLATE_N.format(name=n) in kv}
    return {**({"default": default} if default is not None else {}), **templates}
