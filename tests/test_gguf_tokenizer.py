"""GGUF tokenizer metadata: quant.gguf_vocab writes it, local.gguf_tokenizer reads it back, llama.cpp agrees.

Each tokenizer is trained here (nothing downloaded), written as `tokenizer.*` keys into a GGUF with
gguf.GGUFWriter, read back with our GGUF reader and compared with `Tokenizer.from_pretrained(dir)` (itself
tested against transformers) and with llama.cpp's own tokenizer (llama-cpp-python, vocab only).
"""

import ctypes
import io
import json
import re
import unicodedata

import gguf
import numpy as np
import pytest
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend

from local.demo import CHAT_TEMPLATE, build_tokenizer_files
from local.gguf_tokenizer import tokenizer_from_gguf
from local.tokenizer import QWEN2_PRETOKENIZE_REGEX, Tokenizer
from quant.gguf_file import GGUFModel
from quant.gguf_vocab import PRE_REGEXES, vocab_key_values

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 2024; numbers: 1234567 and 3.14159!",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
    "  leading and trailing spaces  ",
    " single leading space",
    "trailing newline\n",
    "你好世界，这是一个测试。日本語のテキストです。カタカナ 한국어 텍스트",
    "emoji 😀🎉👍 family 👨‍👩‍👧‍👦 flag 🇯🇵 skin 👍🏽 end 🦙🦙 ✅",
    "def f(x):\n\tif x:\n\t\treturn x  +  1\n    else:\n        return   None\n\n\n# done",
    "\t\t  \n \r\n mixed\twhitespace   ",
    "rare scripts ᚠᛇᚻ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∮ E⋅da = Q, ŝĉĥ Å Ελληνικά нещо на Български",
    "3 33 333 3333 33333 3.3 3..3 ------======= ''''''```````\"\"\"\"......!!!!!!??????",
    " Hello , world . It 's fine , isn 't it ? Yes !",
    # llama.cpp's own pre-tokenizer check text (convert_hf_to_gguf.py `get_vocab_base_pre`)
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 "
    "333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= "
    "нещо на Български ```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure "
    "I'll make it, 'D you like some tea? We'Ve a'lL",
    "",
    " ",
    "\n\n",
]
DECOMPOSED = "cafe\u0301 A\u030a"  # not NFC: Qwen2's tokenizer normalizes it, llama.cpp does not
DEEPSEEK_SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>",
                     "</think>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
SPECIAL_TEXT = {  # special-token text for each fixture, glued to words and spaces
    "demo": "<|begin_of_text|>Hi<|User|> x <|Assistant|><think>y</think> <|end_of_text|>",
    "deepseek_v3": "<｜begin▁of▁sentence｜>a<｜User｜>hi <｜Assistant｜><think>\nhmm</think>ok<｜end▁of▁sentence｜>",
    "deepseek_llm": "<｜begin▁of▁sentence｜>a<｜User｜>hi <｜Assistant｜><think>\nhmm</think>ok<｜end▁of▁sentence｜>",
    "qwen2": "<|im_start|>user\nx<think> y </think><|im_end|>\n<|endoftext|>",
    "llama": "<s>a</s> <unk> [INST]<think>x</think> y<|im_start|>z",
    "llama_json": "<s>a</s> <unk> [INST]<think>x</think> y<|im_start|>z",
}
DEEPSEEK_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>{% else %}"
    "{{ m['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}")
QWEN_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% if enable_thinking is defined and "
    "enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}{% endif %}")
LLAMA_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] {{ m['content'] }} "
                  "[/INST]{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}")
CHATS = [
    [{"role": "user", "content": "Hello! 你好 😀"}],
    [{"role": "system", "content": "You are terse.\n  Indented."},
     {"role": "user", "content": "def f():\n\treturn 1  # tabs"},
     {"role": "assistant", "content": "It returns 1."},
     {"role": "user", "content": "  and <think> inside? 👨‍👩‍👧 "}],
]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    from pydoc_data.topics import topics
    text = "\n".join(topics[k] for k in sorted(topics)[:40])
    lines = [line for line in text.splitlines() if line.strip()][:1200]
    extra = ["你好世界，这是一个测试。我们在训练分词器。", "日本語のテキストです。カタカナ", "emoji 😀🎉👍 test",
             "def f(x):\n\treturn x  +  1", "    indented = [1, 2, 3]  # comment", "한국어 텍스트", "Ελληνικά"]
    return lines + extra * 10


def _train_byte_level(directory, corpus, specials, pre_tokenizer, normalizer=None, post_processor=None):
    backend = Backend(models.BPE())
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if post_processor:
        bos = specials[0]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 $B:1", special_tokens=[(bos, backend.token_to_id(bos))])
    backend.save(str(directory / "tokenizer.json"))
    return backend


def _write(directory, name, data):
    (directory / name).write_text(json.dumps(data, ensure_ascii=False))


def _splits(pre: str) -> list:
    return [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_REGEXES[pre]]


def build_demo(d, corpus):
    """local.demo's GPT-2-style BPE (ByteLevel's own regex), in a 520-token model (8 [PAD] holes)."""
    build_tokenizer_files(d, 512, CHAT_TEMPLATE)
    _write(d, "config.json", {"model_type": "deepseek_v3", "vocab_size": 520, "bos_token_id": 0, "eos_token_id": 1})


def build_deepseek_v3(d, corpus):
    """DeepSeek-V3/R1 layout: three Splits + ByteLevel, BOS by TemplateProcessing, LlamaTokenizerFast config."""
    pre = pre_tokenizers.Sequence(_splits("deepseek-v3") + [pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                      use_regex=False)])
    _train_byte_level(d, corpus, DEEPSEEK_SPECIALS, pre, normalizers.Sequence([]), post_processor=True)
    bos = {"__type": "AddedToken", "content": DEEPSEEK_SPECIALS[0], "lstrip": False, "normalized": True,
           "rstrip": False, "single_word": False}
    _write(d, "tokenizer_config.json", {"tokenizer_class": "LlamaTokenizerFast", "add_bos_token": True,
                                        "add_eos_token": False, "legacy": True, "bos_token": bos,
                                        "eos_token": DEEPSEEK_SPECIALS[1], "chat_template": DEEPSEEK_TEMPLATE})
    _write(d, "config.json", {"model_type": "deepseek_v3", "bos_token_id": 0, "eos_token_id": 1})


def build_deepseek_llm(d, corpus):
    """DeepSeek-LLM/V2 layout: five Splits + Digits(individual) + ByteLevel."""
    pre = pre_tokenizers.Sequence(_splits("deepseek-llm")[:-1] + [pre_tokenizers.Digits(individual_digits=True),
                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    _train_byte_level(d, corpus, DEEPSEEK_SPECIALS, pre, normalizers.Sequence([]), post_processor=True)
    _write(d, "tokenizer_config.json", {"tokenizer_class": "LlamaTokenizerFast", "bos_token": DEEPSEEK_SPECIALS[0],
                                        "eos_token": DEEPSEEK_SPECIALS[1], "chat_template": DEEPSEEK_TEMPLATE})


def build_qwen2(d, corpus):
    """Qwen2/Qwen3: NFC + Qwen's regex + ByteLevel, no post-processor, <think> a non-special added token."""
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend = _train_byte_level(d, corpus, QWEN_SPECIALS, pre, normalizers.NFC())
    decoder = {str(backend.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                             "single_word": False, "special": t not in ("<think>", "</think>")}
               for t in QWEN_SPECIALS}
    _write(d, "tokenizer_config.json", {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "unk_token": None,
                                        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                        "added_tokens_decoder": decoder, "errors": "replace"})
    (d / "chat_template.jinja").write_text(QWEN_TEMPLATE)
    _write(d, "config.json", {"model_type": "qwen3_moe"})


def _spm_model(corpus) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=800, character_coverage=0.9995,
        minloglevel=2, model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
        add_dummy_prefix=True, remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        user_defined_symbols=["<think>", "</think>"], control_symbols=["<|im_start|>"], unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1)
    return model.getvalue()


LLAMA_CONFIG = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": True,
                "chat_template": LLAMA_TEMPLATE}


def build_llama(d, corpus):
    """Llama-style sentencepiece BPE (byte fallback), tokenizer.model only."""
    (d / "tokenizer.model").write_bytes(_spm_model(corpus))
    _write(d, "tokenizer_config.json", LLAMA_CONFIG)


def build_llama_json(d, corpus):
    """The same as an as-saved tokenizer.json (Metaspace, byte fallback, BOS by TemplateProcessing)."""
    (d / "tokenizer.model").write_bytes(_spm_model(corpus))
    _write(d, "tokenizer_config.json", LLAMA_CONFIG)
    Tokenizer.from_pretrained(d).backend.save(str(d / "tokenizer.json"))
    (d / "tokenizer.model").unlink()
    _write(d, "tokenizer_config.json", {**{k: v for k, v in LLAMA_CONFIG.items() if k != "tokenizer_class"},
                                        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})


BUILDERS = {"demo": build_demo, "deepseek_v3": build_deepseek_v3, "deepseek_llm": build_deepseek_llm,
            "qwen2": build_qwen2, "llama": build_llama, "llama_json": build_llama_json}


def write_gguf(directory, path) -> dict:
    """`vocab_key_values(directory)` + a dummy tensor into a deepseek2 GGUF; returns the key-values written."""
    kv = vocab_key_values(directory)
    writer = gguf.GGUFWriter(str(path), "deepseek2")
    for key, (value, vtype) in kv.items():
        writer.add_key_value(key, value, vtype)
    writer.add_tensor("token_embd.weight", np.zeros((len(kv["tokenizer.ggml.tokens"][0]), 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return kv


@pytest.fixture(scope="module")
def cases(tmp_path_factory, corpus) -> dict:
    """name -> (HF directory tokenizer, GGUF tokenizer, GGUF path)."""
    out = {}
    for name, build in BUILDERS.items():
        d = tmp_path_factory.mktemp(name)
        build(d, corpus)
        path = d / "vocab.gguf"
        write_gguf(d, path)
        out[name] = (Tokenizer.from_pretrained(d), tokenizer_from_gguf(GGUFModel(path).kv, str(path)), path)
    return out


def _texts(name):
    return TEXTS + [SPECIAL_TEXT[name], DECOMPOSED]


BYTE_LEVEL = ["demo", "deepseek_v3", "deepseek_llm", "qwen2"]
SPM = ["llama", "llama_json"]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_gguf_tokenizer_matches_directory(cases, name):
    hf, ours, _ = cases[name]
    assert (ours.bos_token, ours.eos_token) == (hf.bos_token, hf.eos_token)
    assert (ours.bos_token_id, ours.eos_token_id) == (hf.bos_token_id, hf.eos_token_id)
    assert ours.special_ids == hf.special_ids
    for text in _texts(name):
        for add in (True, False):
            assert ours.encode(text, add_special_tokens=add) == hf.encode(text, add_special_tokens=add), (text, add)
        ids = hf.encode(text)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), (text, skip)
    for chat in CHATS:
        for gen in (True, False):
            assert ours.apply_chat_template(chat, add_generation_prompt=gen) == \
                hf.apply_chat_template(chat, add_generation_prompt=gen)
            assert ours.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True) == \
                hf.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True)


def test_key_values(cases):
    kv = {name: GGUFModel(path).kv for name, (_, _, path) in cases.items()}
    assert [kv[n]["tokenizer.ggml.pre"] for n in BUILDERS] == ["gpt-2", "deepseek-v3", "deepseek-llm", "qwen2",
                                                               "default", "default"]
    assert {kv[n]["tokenizer.ggml.model"] for n in BYTE_LEVEL} == {"gpt2"}
    assert {kv[n]["tokenizer.ggml.model"] for n in SPM} == {"llama"}
    # demo: 512 trained tokens padded to config.json's vocab_size 520 with UNUSED [PAD{i}], like llama.cpp
    demo = kv["demo"]
    assert demo["tokenizer.ggml.tokens"][512:] == [f"[PAD{i}]" for i in range(512, 520)]
    assert list(demo["tokenizer.ggml.token_type"][510:]) == [1, 1] + [gguf.TokenType.UNUSED] * 8
    # special added tokens are CONTROL, Qwen's non-special <think> USER_DEFINED
    qwen, qwen_types = kv["qwen2"]["tokenizer.ggml.tokens"], kv["qwen2"]["tokenizer.ggml.token_type"]
    assert {qwen[i]: int(t) for i, t in enumerate(qwen_types) if t != gguf.TokenType.NORMAL} == {
        "<|endoftext|>": 3, "<|im_start|>": 3, "<|im_end|>": 3, "<think>": 4, "</think>": 4}
    # add_bos follows the post-processor (DeepSeek-LLM's config does not say add_bos_token; Qwen adds nothing)
    assert [bool(kv[n]["tokenizer.ggml.add_bos_token"]) for n in BUILDERS] == [True, True, True, False, True, True]
    assert not any(kv[n]["tokenizer.ggml.add_eos_token"] for n in BUILDERS)
    assert "tokenizer.ggml.bos_token_id" not in kv["qwen2"] and kv["qwen2"]["tokenizer.ggml.padding_token_id"] == 0
    # sentencepiece: scores, BYTE pieces, UNKNOWN/CONTROL/USER_DEFINED like llama.cpp's converter
    llama = kv["llama"]
    types = {t: int(llama["tokenizer.ggml.token_type"][i]) for i, t in enumerate(llama["tokenizer.ggml.tokens"])}
    assert (types["<unk>"], types["<s>"], types["<|im_start|>"], types["<think>"], types["<0x0A>"], types["▁the"]) == \
        (gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED,
         gguf.TokenType.BYTE, gguf.TokenType.NORMAL)
    assert llama["tokenizer.ggml.scores"].dtype == np.float32 and llama["tokenizer.ggml.add_space_prefix"] is True
    assert list(kv["llama_json"]["tokenizer.ggml.tokens"]) == list(llama["tokenizer.ggml.tokens"])
    assert list(kv["llama_json"]["tokenizer.ggml.token_type"]) == list(llama["tokenizer.ggml.token_type"])


@pytest.mark.parametrize("name", BYTE_LEVEL)
def test_special_vocab_agrees(cases, name):
    """gguf-py's SpecialVocab (what llama.cpp's converter uses) reads the same merges, ids, flags and template."""
    directory = cases[name][2].parent
    kv = vocab_key_values(directory)
    special = gguf.SpecialVocab(directory, load_merges=True)
    assert special.merges == kv["tokenizer.ggml.merges"][0]
    keys = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "pad": "padding_token_id"}
    assert special.special_token_ids == \
        {t: kv[f"tokenizer.ggml.{k}"][0] for t, k in keys.items() if f"tokenizer.ggml.{k}" in kv}
    for typ in ("bos", "eos"):
        assert special.add_special_token.get(typ, False) == kv[f"tokenizer.ggml.add_{typ}_token"][0]
    assert special.chat_template == kv["tokenizer.chat_template"][0]


def _llama_cpp(path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp, llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


def _detokenize(llama_cpp, llm, ids, skip: bool) -> str:
    """llama.cpp's own `llama_detokenize` (what llama-server uses), not llama-cpp-python's per-piece join."""
    tokens = (llama_cpp.llama_token * len(ids))(*ids)
    buf = ctypes.create_string_buffer(1 << 16)
    n = llama_cpp.llama_detokenize(llm._model.vocab, tokens, len(ids), buf, len(buf), skip, not skip)
    return buf.raw[:n].decode("utf-8")


def _spm_space_view(ours, text: str) -> str:
    """`text` with one more space where a piece between special tokens starts with a space: llama.cpp (like
    sentencepiece) prefixes '▁' to every such piece, transformers' Metaspace only when none is there."""
    specials = sorted((t.content for t in ours.backend.get_added_tokens_decoder().values()), key=len, reverse=True)
    pieces = re.split("(" + "|".join(map(re.escape, specials)) + ")", text)
    return "".join(" " + p if p.startswith(" ") and p not in specials else p for p in pieces)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_llama_cpp_reads_the_same_vocab(cases, name):
    _, ours, path = cases[name]
    llama_cpp, llm = _llama_cpp(path)
    no_bos = 11  # llama.cpp's placeholder BOS for a gpt2 vocabulary that names none (Qwen)
    assert (llm.token_bos(), llm.token_eos()) == (no_bos if ours.bos_token_id is None else ours.bos_token_id,
                                                  ours.eos_token_id)
    for text in _texts(name):
        expected = ours.encode(text)
        if name == "qwen2" and text == DECOMPOSED:  # llama.cpp skips Qwen2's NFC normalizer
            assert llm.tokenize(text.encode(), add_bos=True, special=True) != expected
            text = unicodedata.normalize("NFC", text)
        if name in SPM:  # llama.cpp always prefixes '▁', transformers not before a space
            expected = ours.encode(_spm_space_view(ours, text))
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == expected, text
        without_bos = expected[1:] if ours.encode("") else expected
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == without_bos, text
        ids = ours.encode(text)
        # llama-cpp-python joins token pieces; it agrees everywhere
        assert llm.detokenize(ids, special=True) == ours.decode(ids).encode(), text
        # llama.cpp's detokenizer cleans up spaces for gpt-2 (` ,` -> `,`, ` 's` -> `'s`, ...), like
        # clean_up_tokenization_spaces, and keeps the first space of an SPM text when it drops the BOS
        if name == "demo" and re.search(r" [?!.,]| ' | '(s|m|re|ve)", ours.decode(ids)):
            assert _detokenize(llama_cpp, llm, ids, skip=False) != ours.decode(ids)
            continue
        assert _detokenize(llama_cpp, llm, ids, skip=False) == ours.decode(ids), text
        lead = " " if name in SPM and len(ids) > 1 else ""
        assert _detokenize(llama_cpp, llm, ids, skip=True) == lead + ours.decode(ids, skip_special_tokens=True), text


def test_llama_cpp_clean_up_spaces_for_gpt2(cases):
    _, ours, path = cases["demo"]
    llama_cpp, llm = _llama_cpp(path)
    ids = ours.encode(" Hello , world . It 's fine , isn 't it ? Yes !", add_special_tokens=False)
    assert ours.decode(ids) == " Hello , world . It 's fine , isn 't it ? Yes !"
    assert _detokenize(llama_cpp, llm, ids, skip=False) == " Hello, world. It's fine, isn 't it? Yes!"


def test_unsupported_pre_tokenizers_are_refused(tmp_path, corpus):
    llama3 = QWEN2_PRETOKENIZE_REGEX.replace(r"\p{N}|", r"\p{N}{1,3}|")
    cases = {
        "llama3": (pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(llama3), behavior="isolated"),
                                            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
                   None, r"Split(Regex '(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"),
        "prefix": (pre_tokenizers.ByteLevel(add_prefix_space=True), None, "ByteLevel(add_prefix_space=True"),
        "nfkc": (pre_tokenizers.Sequence(_splits("deepseek-v3") + [pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                              use_regex=False)]),
                 normalizers.NFKC(), "normalizer"),
    }
    for name, (pre, norm, shown) in cases.items():
        d = tmp_path / name
        d.mkdir()
        _train_byte_level(d, corpus[:200], ["<s>"], pre, norm)
        with pytest.raises(ValueError, match="llama.cpp would tokenize it differently") as err:
            vocab_key_values(d)
        assert shown in str(err.value), name


def test_unsupported_gguf_tokenizers_are_refused(cases):
    kv = GGUFModel(cases["demo"][2]).kv
    with pytest.raises(ValueError, match=r"tokenizer.ggml.model 'bert' is not supported \(supported: gpt2, llama\)"):
        tokenizer_from_gguf({**kv, "tokenizer.ggml.model": "bert"}, "x.gguf")
    with pytest.raises(ValueError, match=r"tokenizer.ggml.pre 'llama-bpe' is not supported \(supported: gpt-2, "
                                         r"deepseek-llm, deepseek-v3, qwen2\)"):
        tokenizer_from_gguf({**kv, "tokenizer.ggml.pre": "llama-bpe"}, "x.gguf")
