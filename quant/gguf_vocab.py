"""The `tokenizer.*` GGUF keys llama.cpp reads, built from an HF directory's JSON (and tokenizer.model) files.

Writes what llama.cpp's converter writes (`_set_vocab_gpt2` / `_set_vocab_sentencepiece` plus gguf-py's
`SpecialVocab`), without running transformers: the token list and types follow the ids transformers'
AutoTokenizer uses, `tokenizer.ggml.pre` is chosen from tokenizer.json's pre-tokenizer structure rather than
from a hash of encoded text, and add_bos/add_eos say what encoding with special tokens actually adds.
A pipeline llama.cpp would tokenize differently raises ValueError instead of producing a quietly wrong file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from gguf import Keys, TokenType
from gguf import GGUFValueType as T

from .jsonfile import read_optional_json as _read_json
from .sentencepiece_model import read_sentencepiece_model

# llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp, llm_tokenizer_bpe), applied in order, each one
# splitting the pieces the previous ones left ("Isolated"). CR/LF are written as \r \n escapes.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"  # + `|\s+` in its C++ splitter
QWEN2_REGEX = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
DEEPSEEK_LLM_LETTERS = (
    "\\s?[A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376\u0377"
    "\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556"
    "\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a"
    "\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4"
    "\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc"
    "\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f"
    "\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b"
    "\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a"
    "\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2"
    "\U000118a0-\U000118df\U0001e900-\U0001e943]+")
PRE_REGEXES = {
    "gpt-2": (GPT2_REGEX,),
    "deepseek-llm": (r"[\r\n]", DEEPSEEK_LLM_LETTERS,
                     "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+", r"\s+$",
                     "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+", r"\p{N}+"),
    "deepseek-v3": (r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
                    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
                    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
    "qwen2": (QWEN2_REGEX,),
}
DIGITS = "Digits(individual_digits=True)"
# The Split steps (before a ByteLevel without regex) an HF tokenizer.json uses for each `pre`, besides
# llama.cpp's own list: DeepSeek-LLM/V2 ends in a Digits step, Qwen2 writes its contractions with (?i:...).
HF_SPLITS = {
    "deepseek-llm": [PRE_REGEXES["deepseek-llm"][:-1] + (DIGITS,)],
    "qwen2": [(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+",)],
}
NAMED = {"bos": "bos_token", "eos": "eos_token", "unk": "unk_token", "pad": "pad_token"}
ID_KEYS = {"bos": Keys.Tokenizer.BOS_ID, "eos": Keys.Tokenizer.EOS_ID, "unk": Keys.Tokenizer.UNK_ID,
           "pad": Keys.Tokenizer.PAD_ID}
# tokens transformers' tokenizer classes name when the config does not
CLASS_DEFAULTS = {"LlamaTokenizer": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
                  "Qwen2Tokenizer": {"unk_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                                     "pad_token": "<|endoftext|>"}}
PAD_SCORE = -10000.0  # llama.cpp's converter: score of [PAD{i}] fillers; -1000 for config-listed added tokens
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def vocab_key_values(model_dir: Path) -> dict[str, tuple[object, T]]:
    """Every `tokenizer.*` key llama.cpp expects for the HF tokenizer in `model_dir`: key -> (value, type).

    Arrays are Python lists (their element type follows from the values), ready for
    `GGUFWriter.add_key_value(key, value, type)`. Raises ValueError for a tokenizer llama.cpp cannot reproduce.
    """
    root = Path(model_dir)
    config = _read_json(root / "tokenizer_config.json") or {}
    model_config = _read_json(root / "config.json") or {}
    class_name = (config.get("tokenizer_class") or model_config.get("tokenizer_class") or "").removesuffix("Fast")
    if (root / "tokenizer.json").is_file():
        kv, named, add_bos, add_eos = _from_tokenizer_json(root, config, model_config, class_name)
    elif (root / "tokenizer.model").is_file():
        if class_name != "LlamaTokenizer":
            raise ValueError(f"{root}/tokenizer.model: only Llama-style sentencepiece tokenizers are supported "
                             f"(tokenizer_class is {class_name or 'not set'}); save it with transformers to get "
                             "a tokenizer.json")
        tokens, types, scores, prefix = _spm_tokens(root / "tokenizer.model", config, model_config)
        kv = _llama_kv(tokens, types, scores, prefix)
        named = _named_tokens(root, config, class_name)
        add_bos = bool(config.get("add_bos_token")) and "bos_token" in named
        add_eos = bool(config.get("add_eos_token")) and "eos_token" in named
    else:
        raise FileNotFoundError(f"no tokenizer in {root}: looked for tokenizer.json and tokenizer.model")
    ids = _special_ids(root, named, kv[Keys.Tokenizer.LIST][0], model_config)
    for typ, key in ID_KEYS.items():
        if typ in ids:
            kv[key] = (ids[typ], T.UINT32)
    for typ, flag in (("bos", add_bos), ("eos", add_eos)):
        if flag and typ not in ids:
            raise ValueError(f"{root}: the tokenizer adds a {typ.upper()} token but none is named in "
                             "tokenizer_config.json or config.json")
    kv[Keys.Tokenizer.ADD_BOS] = (add_bos, T.BOOL)
    kv[Keys.Tokenizer.ADD_EOS] = (add_eos, T.BOOL)
    kv.update(_chat_template_kv(root, config))
    return kv


def _from_tokenizer_json(root: Path, config: dict, model_config: dict, class_name: str):
    """(vocabulary keys, named tokens, add_bos, add_eos) of a tokenizer.json, as transformers would load it."""
    tok = _read_json(root / "tokenizer.json")
    added = _added_tokens(tok, config)
    byte_level = _is_byte_level(tok, class_name)
    # transformers rebuilds the Qwen2 / Llama classes' pipelines; other tokenizer.json files load as saved
    rebuilt = class_name if class_name == ("Qwen2Tokenizer" if byte_level else "LlamaTokenizer") else ""
    named = _named_tokens(root, config, rebuilt)
    if byte_level:
        pre = _pre_type(tok, config, class_name)
        tokens, types = _bpe_tokens(tok, added, model_config)
        kv = {Keys.Tokenizer.MODEL: ("gpt2", T.STRING), Keys.Tokenizer.PRE: (pre, T.STRING),
              Keys.Tokenizer.LIST: (tokens, T.ARRAY), Keys.Tokenizer.TOKEN_TYPE: ([int(t) for t in types], T.ARRAY),
              Keys.Tokenizer.MERGES: (_merges(tok), T.ARRAY)}
    else:
        kv = _llama_kv(*_llama_json_tokens(tok, added, config, rebuilt, model_config, named.get("unk_token")))
    add_bos, add_eos, named = _post_processor_flags(tok.get("post_processor"), named)
    return kv, named, add_bos, add_eos


def _llama_kv(tokens: list[str], types: list, scores: list[float], prefix: bool) -> dict:
    return {Keys.Tokenizer.MODEL: ("llama", T.STRING), Keys.Tokenizer.PRE: ("default", T.STRING),
            Keys.Tokenizer.LIST: (tokens, T.ARRAY), Keys.Tokenizer.TOKEN_TYPE: ([int(t) for t in types], T.ARRAY),
            Keys.Tokenizer.SCORES: ([float(s) for s in scores], T.ARRAY), Keys.Tokenizer.ADD_PREFIX: (prefix, T.BOOL)}


def _content(value):
    return value.get("content") if isinstance(value, dict) else value


def _added_tokens(tok: dict, config: dict) -> dict[int, dict]:
    """id -> {"content", "special"}: tokenizer.json's added tokens, overridden by tokenizer_config's list."""
    added = {int(t["id"]): {"content": t["content"], "special": bool(t.get("special"))}
             for t in tok.get("added_tokens") or []}
    for i, t in (config.get("added_tokens_decoder") or {}).items():
        added[int(i)] = {"content": _content(t), "special": bool(t.get("special")) if isinstance(t, dict) else False}
    return added


def _is_byte_level(tok: dict, class_name: str) -> bool:
    """Whether transformers runs this tokenizer.json as byte-level BPE (else as a Llama/Metaspace BPE)."""
    if class_name == "Qwen2Tokenizer":
        return True  # transformers rebuilds Qwen2's byte-level pipeline around the vocab
    text = json.dumps(tok.get("pre_tokenizer")) + json.dumps(tok.get("decoder"))
    return '"ByteLevel"' in text


def _steps(node) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [s for child in node.get("pretokenizers", []) for s in _steps(child)]
    return [node]


def _canonical(regex: str) -> str:
    return regex.replace("\r", r"\r").replace("\n", r"\n")


def _describe(step: dict) -> str:
    if step.get("type") == "Split":
        pattern = step.get("pattern", {})
        kind, value = next(iter(pattern.items())) if pattern else ("?", "?")
        return f"Split({kind} '{_canonical(str(value))}', {step.get('behavior')}, invert={step.get('invert')})"
    return f"{step.get('type')}({', '.join(f'{k}={v}' for k, v in step.items() if k != 'type')})"


def _pre_type(tok: dict, config: dict, class_name: str) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level tokenizer.json, from its pre-tokenizer structure."""
    model = tok.get("model") or {}
    bad = [k for k in ("byte_fallback", "ignore_merges", "continuing_subword_prefix", "end_of_word_suffix")
           if model.get(k)]
    if model.get("type") != "BPE" or bad:
        raise ValueError(f"tokenizer.json's model is {model.get('type')} with {bad or 'no options'}; llama.cpp's "
                         "gpt2 tokenizer is plain byte-level BPE and would tokenize it differently")
    if class_name == "Qwen2Tokenizer":  # transformers replaces the pipeline: NFC + Qwen2's regex
        if config.get("add_prefix_space"):
            raise ValueError("Qwen2Tokenizer with add_prefix_space=true: llama.cpp's qwen2 pre-tokenizer adds no "
                             "prefix space and would tokenize it differently")
        return "qwen2"
    steps = _steps(tok.get("pre_tokenizer"))
    shape = " -> ".join(_describe(s) for s in steps) or "none"
    pre = None
    last = steps[-1] if steps else {}
    if last.get("type") == "ByteLevel" and not last.get("add_prefix_space"):
        if len(steps) == 1 and last.get("use_regex", True):
            pre = "gpt-2"
        elif not last.get("use_regex", True):
            splits = tuple(_split_regex(s) for s in steps[:-1])
            pre = next((name for name, regexes in PRE_REGEXES.items()
                        if splits == regexes or splits in HF_SPLITS.get(name, [])), None)
    if pre is None:
        raise ValueError(f"tokenizer.json's pre-tokenizer ({shape}) is none of those llama.cpp implements here "
                         f"({', '.join(PRE_REGEXES)}); llama.cpp would tokenize it differently")
    norm = tok.get("normalizer")
    allowed = [None, {"type": "Sequence", "normalizers": []}] + ([{"type": "NFC"}] if pre == "qwen2" else [])
    if norm not in allowed:
        raise ValueError(f"tokenizer.json has normalizer {json.dumps(norm)}, which llama.cpp's {pre} tokenizer "
                         "does not apply; llama.cpp would tokenize it differently")
    return pre


def _split_regex(step: dict) -> str | None:
    if step.get("type") == "Digits" and step.get("individual_digits"):
        return DIGITS
    if step.get("type") == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
        return _canonical(step.get("pattern", {}).get("Regex", ""))
    return None


def _vocab_size(model_config: dict, n_tokens: int, what: str) -> int:
    size = model_config.get("vocab_size") or model_config.get("text_config", {}).get("vocab_size") or n_tokens
    if size < n_tokens:
        raise ValueError(f"config.json's vocab_size {size} is smaller than the {n_tokens} tokens of {what}")
    return size


def _bpe_tokens(tok: dict, added: dict, model_config: dict):
    """Tokens in id order and their types, like llama.cpp's `get_vocab_base`: holes become [PAD{i}] UNUSED."""
    by_id = {int(i): t for t, i in tok["model"]["vocab"].items()}
    by_id.update({i: t["content"] for i, t in added.items()})
    n = _vocab_size(model_config, max(by_id) + 1, "tokenizer.json")
    tokens, types = [], []
    for i in range(n):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL if i not in added else
                         TokenType.CONTROL if added[i]["special"] else TokenType.USER_DEFINED)
    return tokens, types


def _merges(tok: dict) -> list[str]:
    out = []
    for m in tok["model"].get("merges", []):
        if isinstance(m, str):
            out.append(m)
        else:  # [left, right]; spaces inside a part are written as U+0120 (Ġ) like gguf-py does
            out.append(" ".join(p.replace(" ", "\u0120") for p in m))
    return out


def _llama_json_tokens(tok: dict, added: dict, config: dict, class_name: str, model_config: dict, unk: str | None):
    """A byte-fallback BPE on Metaspace (Llama/Mistral style tokenizer.json) as an SPM vocab for llama.cpp.

    llama.cpp's SPM tokenizer merges the adjacent pair whose joined token scores highest, so a token's score
    is minus the rank of the first merge that produces it (others rank last).
    """
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise ValueError(f"tokenizer.json's model is {model.get('type')} (byte_fallback="
                         f"{model.get('byte_fallback')}); llama.cpp supports byte-level BPE (gpt2) and "
                         "byte-fallback BPE on Metaspace (llama) only")
    if class_name == "LlamaTokenizer":  # transformers rebuilds the Metaspace pipeline from the config
        prefix = config.get("add_prefix_space")
        prefix = True if prefix is None else bool(prefix)
    else:
        prefix = _metaspace_prefix(tok)
    vocab = model["vocab"]
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges", [])]
    rank = {}
    for r, (left, right) in enumerate(merges):
        rank.setdefault(left + right, r)
    by_id = {int(i): t for t, i in vocab.items()}
    by_id.update({i: t["content"] for i, t in added.items()})
    n = _vocab_size(model_config, max(by_id) + 1, "tokenizer.json")
    unk = model.get("unk_token") or unk
    tokens, types, scores = [], [], []
    for i in range(n):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            scores.append(PAD_SCORE)
            continue
        tokens.append(text)
        if i in added and text != unk:
            types.append(TokenType.CONTROL if added[i]["special"] else TokenType.USER_DEFINED)
        elif text == unk:
            types.append(TokenType.UNKNOWN)
        elif BYTE_TOKEN.fullmatch(text):
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL)
        scores.append(-float(rank.get(text, len(merges))))
    return tokens, types, scores, prefix


def _metaspace_prefix(tok: dict) -> bool:
    """Whether an as-saved Llama-style tokenizer.json prepends '▁' (llama.cpp: add_space_prefix)."""
    steps = _steps(tok.get("pre_tokenizer"))
    norm = tok.get("normalizer") or {}
    norms = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm] if norm else []
    if len(steps) == 1 and steps[0].get("type") == "Metaspace" and not steps[0].get("split") and not norms:
        return steps[0].get("prepend_scheme", "always") != "never"
    if not steps and [n.get("type") for n in norms] in (["Prepend", "Replace"], ["Replace"]):
        return norms[0].get("type") == "Prepend"  # older Llama files: Prepend("▁") + Replace(" ", "▁")
    shape = " -> ".join(_describe(s) for s in steps) or "none"
    raise ValueError(f"tokenizer.json's byte-fallback BPE has pre-tokenizer {shape} and normalizer "
                     f"{json.dumps(tok.get('normalizer'))}; llama.cpp's SPM tokenizer expects a plain Metaspace "
                     "and would tokenize it differently")


def _spm_tokens(path: Path, config: dict, model_config: dict):
    """llama.cpp's `_create_vocab_sentencepiece`, except that user-defined pieces stay USER_DEFINED
    (transformers treats them as added tokens; as NORMAL, llama.cpp could not produce them)."""
    pieces, model_type = _read_spm_pieces(path)
    if model_type != 2:
        raise ValueError(f"{path} is a sentencepiece {'unigram' if model_type == 1 else model_type} model; "
                         "llama.cpp's llama tokenizer needs a BPE one")
    n = _vocab_size(model_config, len(pieces), str(path))
    tokens = [f"[PAD{i}]" for i in range(n)]
    scores = [PAD_SCORE] * n
    types = [TokenType.UNUSED] * n
    for i, (piece, score, kind) in enumerate(pieces):
        tokens[i], scores[i], types[i] = piece, score, TokenType(kind)  # spm piece types are gguf's
    for i, t in (config.get("added_tokens_decoder") or {}).items():
        i = int(i)
        if i < n:
            special = isinstance(t, dict) and t.get("special")
            tokens[i], scores[i] = _content(t), -1000.0
            types[i] = TokenType.CONTROL if special else TokenType.USER_DEFINED
    prefix = config.get("add_prefix_space")
    return tokens, types, scores, True if prefix is None else bool(prefix)


def _read_spm_pieces(path: Path) -> tuple[list[tuple[str, float, int]], int]:
    """(piece, score, type) of a sentencepiece ModelProto and its trainer model_type (1 unigram, 2 BPE)."""
    model = read_sentencepiece_model(path)
    return model["pieces"], model["trainer"]["model_type"]


def _named_tokens(root: Path, config: dict, class_name: str) -> dict[str, str]:
    """bos_token/eos_token/unk_token/pad_token contents as transformers resolves them (None: explicitly unset)."""
    named = dict(CLASS_DEFAULTS.get(class_name, {}))
    for key in NAMED.values():
        if key in config:
            named[key] = _content(config[key])
    if "added_tokens_decoder" not in config:  # legacy special_tokens_map.json
        for key, value in (_read_json(root / "special_tokens_map.json") or {}).items():
            if key in NAMED.values():
                named[key] = _content(value)
    return {k: v for k, v in named.items() if v is not None}


def _post_processor_flags(node, named: dict) -> tuple[bool, bool, dict]:
    """(add_bos, add_eos, named) from tokenizer.json's post-processor: the special tokens that encoding
    with special tokens puts before and after the text. transformers ignores the config's add_bos_token
    and add_eos_token whenever tokenizer.json exists, so this is all that is added."""
    processors = (node.get("processors", []) if node.get("type") == "Sequence" else [node]) if node else []
    add = {"bos_token": False, "eos_token": False}
    for proc in processors:
        kind = proc.get("type")
        if kind == "ByteLevel":
            continue
        if kind != "TemplateProcessing":
            raise ValueError(f"tokenizer.json's post-processor {kind} is not supported; llama.cpp can only add "
                             "one BOS and one EOS token around the text")
        single = proc.get("single", [])
        if not any("Sequence" in item for item in single):
            raise ValueError(f"tokenizer.json's TemplateProcessing {single} has no $A sequence")
        specials = proc.get("special_tokens", {})
        at = next(i for i, item in enumerate(single) if "Sequence" in item)
        for key, items in (("bos_token", single[:at]), ("eos_token", single[at + 1:])):
            if not items:
                continue
            ids = [t for item in items for t in specials.get(item["SpecialToken"]["id"], {}).get("tokens", [])]
            if len(ids) != 1:
                where = "before" if key == "bos_token" else "after"
                raise ValueError(f"tokenizer.json's TemplateProcessing adds {ids} {where} the text; llama.cpp can "
                                 "only add a single BOS/EOS token there")
            if named.get(key, ids[0]) != ids[0]:
                raise ValueError(f"tokenizer.json's post-processor adds {ids[0]!r} where the config's {key} is "
                                 f"{named[key]!r}; llama.cpp can only add the {key} itself")
            named = {**named, key: ids[0]}
            add[key] = True
    return add["bos_token"], add["eos_token"], named


def _special_ids(root: Path, named: dict, tokens: list[str], model_config: dict) -> dict[str, int]:
    """bos/eos/unk/pad ids: the named tokens, else config.json's (then generation_config.json's) *_token_id,
    the order gguf-py's SpecialVocab uses."""
    index = {}
    for i, t in enumerate(tokens):
        index.setdefault(t, i)
    ids = {}
    for typ, key in NAMED.items():
        if key in named:
            if named[key] not in index:
                raise ValueError(f"{root}: {key} {named[key]!r} is not in the vocabulary")
            ids[typ] = index[named[key]]
    generation = _read_json(root / "generation_config.json") or {}
    for source in (model_config, generation):
        for typ in NAMED:
            value = source.get(f"{typ}_token_id")
            value = value[0] if isinstance(value, list) and value else value
            if typ not in ids and isinstance(value, int) and 0 <= value < len(tokens):
                ids[typ] = value
    return ids


def _chat_template_kv(root: Path, config: dict) -> dict[str, tuple[object, T]]:
    """chat_template.jinja (+ additional_chat_templates/) > tokenizer_config > chat_template.json, written
    like gguf-py: the default as tokenizer.chat_template, others as tokenizer.chat_template.NAME."""
    templates = {}
    if (root / "chat_template.jinja").is_file():
        templates["default"] = (root / "chat_template.jinja").read_text(encoding="utf-8")
    for extra in sorted((root / "additional_chat_templates").glob("*.jinja")):
        templates[extra.stem] = extra.read_text(encoding="utf-8")
    if not templates:
        found = config.get("chat_template")
        if found is None:
            found = (_read_json(root / "chat_template.json") or {}).get("chat_template")
        if isinstance(found, str):
            templates["default"] = found
        elif isinstance(found, list):
            templates = {t["name"]: t["template"] for t in found}
    kv = {}
    if "default" in templates:
        kv[Keys.Tokenizer.CHAT_TEMPLATE] = (templates.pop("default"), T.STRING)
    names = [re.sub(r"[^A-Za-z0-9]", "_", name) for name in templates]
    for name, template in zip(names, templates.values()):
        kv[Keys.Tokenizer.CHAT_TEMPLATE_N.format(name=name)] = (template, T.STRING)
    if names:
        kv[Keys.Tokenizer.CHAT_TEMPLATES] = (names, T.ARRAY)
    return kv
