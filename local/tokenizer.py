"""Text side of the runner: ids <-> text, chat templates and streaming detokenization.

Reproduces what `transformers.AutoTokenizer` (v5) builds from an HF directory, using only
`tokenizers` and `jinja2`: `tokenizer.json` as saved, a `LlamaTokenizer` rebuilt on Metaspace,
or a sentencepiece `tokenizer.model` converted to an equivalent `tokenizers` pipeline.
"""

import json
import re
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from quant.jsonfile import read_optional_json as _read_json
from quant.sentencepiece_model import read_sentencepiece_model

NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Named tokens a transformers tokenizer class fills in when the config leaves them out.
CLASS_DEFAULT_TOKENS = {
    "LlamaTokenizer": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "Qwen2Tokenizer": {"unk_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
}
CLEANUP_PATTERNS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                    (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))
QWEN2_PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """A chat template failed to compile or raised while rendering."""


class Tokenizer:
    """Encoder/decoder and chat template of one HF model directory (see `from_pretrained`)."""

    def __init__(self, backend: Backend, config: dict, named: dict, chat_template, source: str):
        self.backend = backend
        self.source = source
        self.chat_template = chat_template  # str, or dict of name -> template
        self.named_tokens = {k: str(v) for k, v in named.items()}
        self.bos_token = self.named_tokens.get("bos_token")
        self.eos_token = self.named_tokens.get("eos_token")
        self.bos_token_id = self.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self.token_to_id(self.eos_token) if self.eos_token else None
        self.special_ids = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        # transformers only applies `clean_up_tokenization_spaces` to non-BPE models
        self.clean_up_spaces = bool(config.get("clean_up_tokenization_spaces")) and (
            type(backend.model).__name__ != "BPE"
            or bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")))

    @classmethod
    def from_pretrained(cls, path) -> "Tokenizer":
        """Load the tokenizer of an HF model or tokenizer directory, as `AutoTokenizer` would."""
        root = Path(path)
        config = _read_json(root / "tokenizer_config.json") or {}
        model_config = _read_json(root / "config.json") or {}
        class_name = (config.get("tokenizer_class") or model_config.get("tokenizer_class") or "").removesuffix("Fast")
        backend, config, class_name, json_added, spm_extras = _load_backend(root, config, class_name)
        # tokens the config lists by id, else (legacy) those saved in tokenizer.json
        added = ({int(i): _as_added_token(t) for i, t in config["added_tokens_decoder"].items()}
                 if "added_tokens_decoder" in config else json_added)
        named, extras = _special_tokens(root, config, class_name, added, spm_extras)
        _add_tokens_like_transformers(backend, added, named, extras)
        if backend.post_processor is None:
            backend.post_processor = _bos_eos_processor(backend, config, named)
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
        return cls(backend, config, named, _load_chat_template(root, config), str(root))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds the BOS/EOS the model's post-processor defines."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; `skip_special_tokens` drops special added tokens (BOS, EOS, role markers...)."""
        ids = [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]
        return self._clean(self.backend.decode(ids, skip_special_tokens=skip_special_tokens))

    def _clean(self, text: str) -> str:
        if self.clean_up_spaces:
            for old, new in CLEANUP_PATTERNS:
                text = text.replace(old, new)
        return text

    def token_to_id(self, s) -> int | None:
        """Id of token string `s`, or None when it is not in the vocabulary."""
        return self.backend.token_to_id(s)

    def id_to_token(self, i) -> str | None:
        """Token string of id `i`, or None when out of range."""
        return self.backend.id_to_token(int(i))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = False,
                            **template_kwargs) -> str | list[int]:
        """Render `messages` with the model's chat template (as transformers does); ids when `tokenize`.

        `template_kwargs` reach the template (`tools`, `documents`, `enable_thinking`, ...) and override the
        special-token variables; `chat_template=` picks a named template or passes a template string.
        """
        template = self._select_template(template_kwargs.pop("chat_template", None), template_kwargs.get("tools"))
        compiled = _compile_template(template)
        chat = [_alias_reasoning({k: v for k, v in m.items() if v is not None}) for m in messages]
        variables = {**self.named_tokens, "tools": None, "documents": None, **template_kwargs}
        try:
            text = compiled.render(messages=chat, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template of {self.source} failed: {e}") from e
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _select_template(self, name_or_template, tools):
        templates = self.chat_template
        if isinstance(templates, dict):
            if name_or_template in templates:
                return templates[name_or_template]
            if name_or_template is None:
                key = "tool_use" if tools is not None and "tool_use" in templates else "default"
                if key not in templates:
                    raise ChatTemplateError(f"{self.source} has chat templates {sorted(templates)} but no 'default'; "
                                            "pass chat_template=NAME")
                return templates[key]
        if name_or_template is not None:
            return name_or_template
        if templates is None:
            raise ChatTemplateError(f"{self.source} has no chat template: looked for chat_template.jinja, "
                                    "'chat_template' in tokenizer_config.json and chat_template.json")
        return templates


class StreamDecoder:
    """Incremental detokenizer: `push` one id at a time and get the new text; `flush` at the end.

    The concatenated deltas equal `tokenizer.decode(all_ids, skip_special_tokens)` whenever the ids spell
    valid UTF-8. Text that ends in an incomplete UTF-8 sequence is held back until its bytes complete; each
    step decodes a short window. (Byte-fallback decoding turns a whole run of byte tokens into U+FFFD when
    the run is invalid; characters already emitted from such a run cannot be taken back.)
    With `clean_up_tokenization_spaces` (non-BPE models only) the last few characters are held back and
    the clean-up reruns on the text so far.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []  # window; text of _ids[:_read] was already emitted
        self._read = 0
        # cleanup mode only: raw text since start and how much of its cleaned form went out
        self._raw, self._sent = "", 0

    def push(self, token_id) -> str:
        """Add one token id; return the text it completes (possibly empty)."""
        self._ids.append(int(token_id))
        text = self._decode(self._ids)
        if text.endswith("\ufffd"):  # incomplete multi-byte character: wait for its remaining bytes
            return ""
        return self._emit(text, final=False)

    def flush(self) -> str:
        """Return whatever is still held back (an invalid byte tail decodes to U+FFFD here)."""
        return self._emit(self._decode(self._ids), final=True) if self._ids or self._raw else ""

    def _decode(self, ids) -> str:
        return self.tokenizer.backend.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _emit(self, text: str, final: bool) -> str:
        delta = text[len(self._decode(self._ids[:self._read])):]
        emitted = self._ids[self._read:]
        skip = self.tokenizer.special_ids if self.skip_special_tokens else ()
        # Keep one decoder-visible token before the new ones, so decoders that strip the first token's
        # leading space (Metaspace, Strip) treat the window like the full sequence.
        if any(i not in skip for i in emitted):
            del self._ids[:self._read]
        self._read = len(self._ids)
        if not self.tokenizer.clean_up_spaces:
            return delta
        self._raw += delta
        cleaned = self.tokenizer._clean(self._raw)
        # a clean-up pattern (at most 4 characters) may still complete across the next token
        end = len(cleaned) if final else max(self._sent, len(cleaned) - 5)
        out, self._sent = cleaned[self._sent:end], end
        return out


def _load_backend(root: Path, config: dict, class_name: str):
    """The `tokenizers` pipeline transformers builds; returns it with the config and class name it applies."""
    json_file, spm_file = root / "tokenizer.json", root / "tokenizer.model"
    if json_file.is_file():
        text = json_file.read_text(encoding="utf-8")
        try:
            backend = Backend.from_str(text)
        except Exception as e:
            raise ValueError(f"{json_file} is not a valid `tokenizers` file ({e}); re-download or re-save it") from e
        json_added = backend.get_added_tokens_decoder()
        # transformers ignores add_bos_token/add_eos_token when tokenizer.json exists
        config = {k: v for k, v in config.items() if k not in ("add_bos_token", "add_eos_token")}
        # its Llama/Qwen2 classes rebuild the pipeline around tokenizer.json's vocab and merges,
        # but AutoTokenizer loads a ByteLevel tokenizer.json declared as Llama as saved
        rebuild = {"LlamaTokenizer": _llama_backend, "Qwen2Tokenizer": _qwen2_backend}.get(class_name)
        if rebuild and not (class_name == "LlamaTokenizer" and '"ByteLevel"' in text):
            backend = rebuild(json.loads(text)["model"], config, backend.post_processor)
        else:
            class_name = "TokenizersBackend"
        return backend, config, class_name, json_added, None
    if spm_file.is_file():
        backend, spm_extras, spm_named = _spm_backend(read_sentencepiece_model(spm_file), config, class_name)
        return backend, {**spm_named, **config}, class_name, {}, spm_extras
    raise FileNotFoundError(
        f"no tokenizer in {root}: looked for tokenizer.json (HF `tokenizers`) and tokenizer.model (sentencepiece)")


def _as_added_token(value, special=None) -> AddedToken | str:
    """A config token value (string, or dict with "content") as transformers' AddedToken/str."""
    if isinstance(value, dict):
        keys = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")
        fields = {k: v for k, v in value.items() if k in keys}
        if special is not None:
            fields["special"] = special
        return AddedToken(**fields)
    return value


def _special_tokens(root: Path, config: dict, class_name: str, added: dict, spm_extras):
    """Named special tokens (bos_token, ..., plus model-specific *_token) and extra special tokens."""
    named = dict(CLASS_DEFAULT_TOKENS.get(class_name, {}))
    for key, value in config.items():
        if key in NAMED_TOKENS or (key.endswith("_token") and isinstance(value, str)):
            named[key] = _as_added_token(value)
    extras = config.get("extra_special_tokens") or config.get("additional_special_tokens")
    if "added_tokens_decoder" not in config:  # legacy special_tokens_map.json
        for key, value in (_read_json(root / "special_tokens_map.json") or {}).items():
            if key == "additional_special_tokens" or key == "extra_special_tokens":
                extras = [_as_added_token(v, special=True) for v in value] if isinstance(value, list) else value
            elif key in NAMED_TOKENS or key.endswith("_token"):
                named[key] = _as_added_token(value, special=True)
    if "extra_special_tokens" not in config and "additional_special_tokens" not in config and spm_extras:
        extras = spm_extras
    if isinstance(extras, dict):  # named extra tokens
        named.update(extras)
        extras = []
    by_content = {t.content: t for t in added.values()}
    order = {k: i for i, k in enumerate(NAMED_TOKENS)}
    named = {k: by_content.get(str(v), v) if k in order else v
             for k, v in sorted(named.items(), key=lambda kv: order.get(kv[0], len(order))) if v is not None}
    return named, [_as_added_token(e) for e in (extras or [])]


def _add_tokens_like_transformers(backend: Backend, added: dict, named: dict, extras: list):
    """Register added/special tokens in the order and with the flags transformers' TokenizersBackend uses."""
    # re-adding an identical token changes nothing; a changed one takes the config's flags
    to_add = [t for _, t in sorted(added.items())]
    contents = {t.content for t in backend.get_added_tokens_decoder().values()} | {t.content for t in to_add}
    named_strs = {str(v) for v in named.values()}
    for token in [*named.values(), *extras]:
        if str(token) in contents:
            continue
        if isinstance(token, str):
            token = AddedToken(token, special=True)
        elif not token.special and token.content in named_strs:
            token = AddedToken(token.content, single_word=token.single_word, lstrip=token.lstrip,
                               rstrip=token.rstrip, normalized=token.normalized, special=True)
        to_add.append(token)
        contents.add(token.content)
    if to_add:
        backend.add_tokens(to_add)


def _bos_eos_processor(backend: Backend, config: dict, named: dict):
    """transformers' `update_post_processor`: BOS/EOS around the text per add_bos_token/add_eos_token."""
    bos, eos = named.get("bos_token"), named.get("eos_token")
    add_bos = bool(config.get("add_bos_token")) and bos is not None
    add_eos = bool(config.get("add_eos_token")) and eos is not None
    bos, eos = str(bos), str(eos)
    single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
    pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
    specials = [(bos, backend.token_to_id(bos))] if add_bos else []
    specials += [(eos, backend.token_to_id(eos))] if add_eos else []
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def _vocab_and_merges(model: dict):
    vocab = model["vocab"]
    if isinstance(vocab, list):
        vocab = {piece[0] if isinstance(piece, list) else piece: i for i, piece in enumerate(vocab)}
    return vocab, [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]


def _qwen2_backend(model: dict, config: dict, post_processor) -> Backend:
    """transformers' Qwen2Tokenizer: NFC, Qwen's split regex, byte-level BPE."""
    vocab, merges = _vocab_and_merges(model)
    backend = Backend(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                                 end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space")), use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = post_processor
    return backend


def _llama_backend(model: dict, config: dict, post_processor) -> Backend:
    """transformers' LlamaTokenizer: byte-fallback BPE on Metaspace, ignoring tokenizer.json's normalizer."""
    vocab, merges = _vocab_and_merges(model)
    backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    add_prefix_space = config.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else add_prefix_space
    scheme = ("always" if config.get("legacy", False) else "first") if add_prefix_space else "never"
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if add_prefix_space else []))
    if post_processor is not None:
        backend.post_processor = post_processor
    return backend


def _spm_backend(proto: dict, config: dict, class_name: str):
    """Convert a sentencepiece model like transformers 5 does; returns (backend, extra tokens, named defaults)."""
    pieces = proto["pieces"]
    # control (3) and user-defined (4) pieces become added tokens; only control ones are special
    extras = [AddedToken(p, normalized=False, special=t == 3) for p, _, t in pieces if t in (3, 4)]
    vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
    if class_name == "LlamaTokenizer":
        model = {"vocab": vocab, "merges": _generate_merges(vocab)}
        return _llama_backend(model, config, None), extras, {}
    spec = proto["trainer"]
    named = {k: spec[k.split("_")[0] + "_piece"] for k in ("bos_token", "eos_token", "unk_token")
             if spec[k.split("_")[0] + "_id"] >= 0}
    if spec["model_type"] == 1:  # unigram
        model = models.Unigram([(p, s) for p, s, _ in pieces], unk_id=spec["unk_id"],
                               byte_fallback=spec["byte_fallback"])
    else:
        for i, token in config.get("added_tokens_decoder", {}).items():  # placeholder pieces renamed by config
            old, new = pieces[int(i)][0] if int(i) < len(pieces) else None, str(_as_added_token(token))
            if old and old != new and new not in vocab:
                vocab[new] = vocab.pop(old)
        # only normal pieces (type 1) merge, ranked by score, as sentencepiece's BPE does
        ids = {i: p for p, i in vocab.items()}
        normal = {ids[i]: (score, i) for i, (_, score, t) in enumerate(pieces) if t == 1 and i in ids}
        ranked = sorted((-normal[tok][0], normal[tok][1], tok[:k], tok[k:]) for tok in normal
                        for k in range(1, len(tok)) if tok[:k] in normal and tok[k:] in normal)
        model = models.BPE(vocab=vocab, merges=[(left, right) for *_, left, right in ranked],
                           unk_token=spec["unk_piece"], fuse_unk=True, byte_fallback=spec["byte_fallback"],
                           dropout=None, ignore_merges=any(t == 4 for _, _, t in pieces))
    backend = Backend(model)
    _spm_text_steps(backend, proto, spec["byte_fallback"], legacy=config.get("legacy", True),
                    user_defined=[p for p, _, t in pieces if t == 4])
    return backend, extras, named


def _spm_text_steps(backend, proto: dict, byte_fallback: bool, legacy: bool, user_defined: list[str]) -> None:
    """Normalizer, pre-tokenizer and decoder that follow the model's NormalizerSpec, so text encodes as
    SentencePieceProcessor.encode does (transformers 5's build_tokenizer_from_spm_proto): charsmap,
    extra-space removal, whitespace escaping, the dummy prefix (every chunk between added tokens when
    `legacy`, else only the first), user-defined pieces kept whole."""
    spec = proto["normalizer"]
    steps = [normalizers.Precompiled(proto["charsmap"])] if proto["charsmap"] else []
    if spec["remove_extra_whitespaces"]:  # spaces only: sentencepiece leaves newlines alone
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec["escape_whitespaces"]:
        steps.append(normalizers.Replace(" ", "▁"))
    if spec["add_dummy_prefix"] and legacy:  # Metaspace skips the prefix before a leading "▁"; sentencepiece does not
        steps.append(normalizers.Replace(Regex(r"\A▁"), "▁▁"))
    backend.normalizer = normalizers.Sequence(steps)
    pre = []
    if spec["add_dummy_prefix"]:
        pre.append(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always" if legacy else "first",
                                            split=False))
    if user_defined:
        pattern = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
        pre.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    if pre:
        backend.pre_tokenizer = pre_tokenizers.Sequence(pre)
    steps = [decoders.Replace("▁", " ")] + ([decoders.ByteFallback()] if byte_fallback else [])
    if spec["add_dummy_prefix"]:  # Strip works per token: fuse first, so only the text's start loses its space
        steps += [decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    elif byte_fallback:
        steps.append(decoders.Fuse())
    backend.decoder = decoders.Sequence(steps)


def _generate_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocab, ordered by the merged piece's id (transformers' order)."""
    merges = []
    for piece, piece_id in vocab.items():
        local = [(piece[:k], piece[k:], piece_id) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])))
    return [(left, right) for left, right, _ in merges]


def _load_chat_template(root: Path, config: dict):
    """chat_template.jinja (+ additional_chat_templates/) > tokenizer_config > chat_template.json."""
    templates = {}
    if (root / "chat_template.jinja").is_file():
        templates["default"] = (root / "chat_template.jinja").read_text(encoding="utf-8")
    for extra in sorted((root / "additional_chat_templates").glob("*.jinja")):
        templates[extra.stem] = extra.read_text(encoding="utf-8")
    if templates:
        return templates["default"] if list(templates) == ["default"] else templates
    found = config.get("chat_template")
    if found is None:
        found = (_read_json(root / "chat_template.json") or {}).get("chat_template")
    if isinstance(found, list):
        found = {t["name"]: t["template"] for t in found}
    return found


def _alias_reasoning(message: dict) -> dict:
    """Expose a message's reasoning as both `reasoning_content` and `thinking`, like transformers."""
    reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' filter: no HTML escaping, json.dumps options exposed
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker) renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


@lru_cache(maxsize=16)
def _compile_template(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from e
