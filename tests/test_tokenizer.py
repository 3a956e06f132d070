"""local.tokenizer against transformers.AutoTokenizer, on tokenizers trained here (nothing downloaded)."""

import io
import json
import random
import shutil

import pytest

from local.tokenizer import ChatTemplateError, StreamDecoder, Tokenizer

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 2024; numbers: 1234567 and 3.14159!",
    "  leading and trailing spaces  ",
    " single leading space",
    "trailing newline\n",
    "你好世界，这是一个测试。日本語のテキストです。한국어 텍스트",
    "emoji 😀🎉👍 family 👨‍👩‍👧‍👦 flag 🇯🇵 skin 👍🏽 end",
    "def f(x):\n\tif x:\n\t\treturn x  +  1\n    else:\n        return   None\n\n\n# done",
    "\t\t  \n \r\n mixed\twhitespace   ",
    "rare scripts ᚠᛇᚻ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∮ E⋅da = Q, ŝĉĥ e\u0301 Å",
    "<s>a</s> <｜User｜>hi<｜Assistant｜><think>hmm</think>ok<｜end▁of▁sentence｜>",
    "<|im_start|>user\nx<|im_end|> <|endoftext|>",
    "",
    " ",
    "\n\n",
]

DEEPSEEK_SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>",
                     "</think>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
QWEN_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")

DEEPSEEK_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}{%- endif %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% if 'name' in message %}[{{ message['name'] }}]{% endif %}{%- endif %}"
    "{%- if message['role'] == 'assistant' %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{%- endif %}"
    "{%- endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
    "{% if tools is not none %}[tools: {{ tools | length }}]{% endif %}{% if documents is not none %}[docs]{% endif %}"
    "{% if eos_token is defined and pad_token is not defined %}{{ '' }}{% endif %}"
)

QWEN_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "system" %}
        {%- continue %}
    {%- endif %}
    {%- if message.role == "assistant" %}
        {{- '<|im_start|>assistant\\n' }}
        {%- if message.reasoning_content %}
            {{- '<think>\\n' + message.reasoning_content.strip('\\n') + '\\n</think>\\n\\n' }}
        {%- endif %}
        {{- message.content + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

LLAMA_TEMPLATE = """{% for message in messages %}
  {% if message['role'] == 'system' %}
<<SYS>>{{ message['content'] | trim }}<</SYS>>
  {% elif message['role'] == 'user' %}
{{ bos_token }}[INST] {{ message['content'] }} [/INST]
  {% else %}
 {{ message['content'] }} {{ eos_token }}
  {% endif %}
{% endfor %}
{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"""

CHATS = [
    [{"role": "user", "content": "Hello! 你好 😀"}],
    [{"role": "system", "content": "You are terse.\n  Indented  system."},
     {"role": "user", "content": "def f():\n\treturn 1  # tabs"},
     {"role": "assistant", "content": "<think>\nplan\n</think>\n\nIt returns 1.", "reasoning_content": "plan"},
     {"role": "user", "content": "  and <｜User｜> or <|im_end|> inside? 👨‍👩‍👧 "}],
    [{"role": "user", "content": "first", "name": None},
     {"role": "assistant", "content": "reply", "thinking": "old-style reasoning field"},
     {"role": "user", "content": "second"}],
]


@pytest.fixture(scope="session")
def transformers():
    tf = pytest.importorskip("transformers", reason="transformers is the reference implementation (test extra)")
    tf.logging.set_verbosity_error()
    return tf


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    topics = pytest.importorskip("pydoc_data.topics").topics
    text = "\n".join(topics[k] for k in sorted(topics)[:40])
    lines = [line for line in text.splitlines() if line.strip()][:1200]
    extra = ["你好世界，这是一个测试。我们在训练分词器。", "日本語のテキストです。", "emoji 😀🎉👍 test",
             "def f(x):\n\treturn x  +  1", "    indented = [1, 2, 3]  # comment", "한국어 텍스트"]
    return lines + extra * 10


def _train_byte_level(corpus, specials, pre_tokenizer, normalizer=None):
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus, trainer)
    return backend


def _patch_config(directory, **changes):
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config, ensure_ascii=False))


@pytest.fixture(scope="session")
def deepseek_dir(tmp_path_factory, corpus, transformers):
    """DeepSeek-R1-like: ByteLevel BPE, BOS via TemplateProcessing, config naming LlamaTokenizerFast."""
    from tokenizers import Regex, pre_tokenizers, processors

    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    backend = _train_byte_level(corpus, DEEPSEEK_SPECIALS, pre)
    bos = DEEPSEEK_SPECIALS[0]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 $B:1", special_tokens=[(bos, backend.token_to_id(bos))])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=DEEPSEEK_SPECIALS[1])
    tok.chat_template = DEEPSEEK_TEMPLATE
    directory = tmp_path_factory.mktemp("deepseek")
    tok.save_pretrained(directory)
    # like the real checkpoint: transformers ignores these because tokenizer.json exists
    _patch_config(directory, tokenizer_class="LlamaTokenizerFast", add_bos_token=True, add_eos_token=True,
                  legacy=True, bos_token={"__type": "AddedToken", "content": bos, "lstrip": False,
                                          "normalized": True, "rstrip": False, "single_word": False})
    (directory / "config.json").write_text(json.dumps({"model_type": "deepseek_v3"}))
    return directory


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory, corpus, transformers):
    """Qwen-like: NFC + Split regex + ByteLevel, ChatML template, Qwen2Tokenizer class defaults."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_REGEX), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend = _train_byte_level(corpus, QWEN_SPECIALS, pre, normalizers.NFC())  # no post-processor
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                               pad_token="<|endoftext|>")
    directory = tmp_path_factory.mktemp("qwen")
    tok.save_pretrained(directory)
    decoder = {str(backend.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                             "single_word": False, "special": t not in ("<think>", "</think>")}
               for t in QWEN_SPECIALS}
    # add_eos_token is ignored: transformers drops it whenever tokenizer.json exists
    _patch_config(directory, tokenizer_class="Qwen2Tokenizer", bos_token=None, unk_token=None, add_eos_token=True,
                  added_tokens_decoder=decoder, chat_template=QWEN_TEMPLATE, errors="replace")
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    saved = json.loads((directory / "tokenizer.json").read_text())
    (directory / "tokenizer.json").write_text(json.dumps({**saved, "post_processor": None}))
    (directory / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    return directory


def _train_spm(corpus, **options) -> bytes:
    spm = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=800,
                                   character_coverage=0.9995, minloglevel=2, **options)
    return model.getvalue()


@pytest.fixture(scope="session")
def llama_model(corpus) -> bytes:
    """Llama-like sentencepiece BPE: byte fallback, identity normalization, digits split."""
    return _train_spm(corpus, model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                      add_dummy_prefix=True, remove_extra_whitespaces=False, split_digits=True,
                      allow_whitespace_only_pieces=True, user_defined_symbols=["<think>", "</think>"],
                      control_symbols=["<|im_start|>"], unk_id=0, bos_id=1, eos_id=2, pad_id=-1)


LLAMA_CONFIGS = {
    "llama": {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "legacy": False, "chat_template": LLAMA_TEMPLATE,
              "clean_up_tokenization_spaces": True},
    "llama_minimal": {"tokenizer_class": "LlamaTokenizerFast"},
    "llama_legacy_eos": {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": True,
                         "legacy": True},
    "llama_no_prefix_space": {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_prefix_space": False,
                              "chat_template": [{"name": "default", "template": LLAMA_TEMPLATE},
                                                {"name": "other", "template": "{{ messages[0]['content'] }}"}]},
}


@pytest.fixture(scope="session")
def spm_dirs(tmp_path_factory, llama_model, transformers) -> dict:
    """Each LLAMA_CONFIGS entry as tokenizer.model only, plus two re-saved by transformers as tokenizer.json."""
    pytest.importorskip("google.protobuf", reason="transformers needs protobuf to convert tokenizer.model")
    dirs = {}
    for name, config in LLAMA_CONFIGS.items():
        directory = tmp_path_factory.mktemp(name)
        (directory / "tokenizer.model").write_bytes(llama_model)
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
        dirs[name] = directory
    for name in ("llama", "llama_legacy_eos"):
        directory = tmp_path_factory.mktemp(name + "_json")
        transformers.AutoTokenizer.from_pretrained(dirs[name]).save_pretrained(directory)
        (directory / "tokenizer.model").unlink(missing_ok=True)
        assert json.loads((directory / "tokenizer_config.json").read_text())["tokenizer_class"] == "LlamaTokenizer"
        dirs[name + "_json"] = directory
    return dirs


@pytest.fixture(scope="session")
def unigram_dir(tmp_path_factory, corpus, transformers):
    """A generic (non-Llama) sentencepiece unigram model with NFKC charsmap and space clean-up."""
    pytest.importorskip("google.protobuf", reason="transformers needs protobuf to convert tokenizer.model")
    directory = tmp_path_factory.mktemp("unigram")
    (directory / "tokenizer.model").write_bytes(_train_spm(corpus, model_type="unigram", byte_fallback=True))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "TokenizersBackend", "clean_up_tokenization_spaces": True, "add_eos_token": True}))
    return directory


@pytest.fixture(scope="session")
def all_dirs(deepseek_dir, qwen_dir, spm_dirs, unigram_dir) -> dict:
    return {"deepseek": deepseek_dir, "qwen": qwen_dir, "unigram": unigram_dir, **spm_dirs}


@pytest.fixture(scope="session")
def pairs(all_dirs, transformers) -> dict:
    """name -> (ours, reference)."""
    return {name: (Tokenizer.from_pretrained(d), transformers.AutoTokenizer.from_pretrained(d))
            for name, d in all_dirs.items()}


def test_encode_matches_transformers(pairs):
    for name, (ours, ref) in pairs.items():
        for text in TEXTS:
            for add in (True, False):
                assert ours.encode(text, add_special_tokens=add) == ref.encode(text, add_special_tokens=add), \
                    (name, text, add)


def test_decode_matches_transformers(pairs):
    for name, (ours, ref) in pairs.items():
        for text in TEXTS + [" Hello , world . It 's fine , isn 't it ? Yes !"]:
            ids = ref.encode(text)
            for skip in (False, True):
                assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), \
                    (name, text, skip)


def test_special_token_attributes_match(pairs):
    for name, (ours, ref) in pairs.items():
        assert (ours.bos_token, ours.eos_token) == (ref.bos_token, ref.eos_token), name
        assert (ours.bos_token_id, ours.eos_token_id) == (ref.bos_token_id, ref.eos_token_id), name
        assert ours.vocab_size == len(ref), name
        # special_ids are what decode(skip_special_tokens=True) drops
        skipped = {i for i in ref.added_tokens_decoder if ref.decode([i], skip_special_tokens=True) == ""}
        assert ours.special_ids == skipped and {ours.bos_token_id, ours.eos_token_id} - {None} <= skipped, name
        for i in (0, 5, ours.vocab_size - 1):
            assert ours.id_to_token(i) == ref.convert_ids_to_tokens(i)
            assert ours.token_to_id(ours.id_to_token(i)) == i


def test_behaviour_that_differs_between_fixtures(pairs):
    # the fixtures reach the transformers code paths they are meant to cover
    classes = {name: type(ref).__name__ for name, (_, ref) in pairs.items()}
    assert classes["deepseek"] == classes["unigram"] == "TokenizersBackend" and classes["qwen"] == "Qwen2Tokenizer"
    assert {classes[n] for n in LLAMA_CONFIGS} | {classes["llama_json"]} == {"LlamaTokenizer"}
    # guards against a loader that ignores the config: these facts come from transformers itself
    deepseek, qwen = pairs["deepseek"][0], pairs["qwen"][0]
    assert deepseek.encode("hi")[0] == deepseek.bos_token_id and deepseek.encode("hi")[-1] != deepseek.eos_token_id
    assert qwen.bos_token is None and qwen.eos_token == "<|im_end|>" and qwen.encode("hi")[-1] != qwen.eos_token_id
    assert pairs["llama_minimal"][0].encode("hi")[0] != 1  # no add_bos_token: no BOS
    assert pairs["llama_legacy_eos"][0].encode("hi")[-1] == 2
    assert pairs["llama"][0].encode("<think>x") != pairs["llama"][0].encode("<think>x", add_special_tokens=False)


@pytest.mark.parametrize("name", ["deepseek", "qwen", "llama", "llama_no_prefix_space", "llama_json"])
def test_chat_template_matches_transformers(pairs, name):
    ours, ref = pairs[name]
    for chat in CHATS:
        for gen in (True, False):
            expected = ref.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
            assert ours.apply_chat_template(chat, add_generation_prompt=gen) == expected, (chat, gen)
            expected_ids = ref.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True, return_dict=False)
            assert ours.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True) == expected_ids
    chat = CHATS[1]
    assert ours.apply_chat_template(chat) == ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)


def test_chat_template_kwargs_and_tools(pairs):
    ours, ref = pairs["qwen"]
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Wetter in München & <Zürich>",
                                               "parameters": {"type": "object", "properties": {}}}}]
    for kwargs in ({"enable_thinking": False}, {"tools": tools}, {"enable_thinking": True, "tools": tools}):
        expected = ref.apply_chat_template(CHATS[1], add_generation_prompt=True, tokenize=False, **kwargs)
        assert ours.apply_chat_template(CHATS[1], **kwargs) == expected
    assert "<think>\n\n</think>" in ours.apply_chat_template(CHATS[0], enable_thinking=False)
    assert '"Wetter in München & <Zürich>"' in ours.apply_chat_template(CHATS[0], tools=tools)
    marked = "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}|{% endfor %}"
    assert ours.apply_chat_template(CHATS[2], chat_template=marked) == ref.apply_chat_template(
        CHATS[2], chat_template=marked, tokenize=False)
    named = pairs["llama_no_prefix_space"][0]
    assert named.apply_chat_template(CHATS[0], chat_template="other") == CHATS[0][0]["content"]


def test_stream_decoder_matches_decode(pairs):
    for name, (ours, ref) in pairs.items():
        for text in TEXTS + [" Hello , world . It 's fine , isn 't it ? Yes !"]:
            ids = ref.encode(text)
            for skip in (False, True):
                stream = StreamDecoder(ours, skip_special_tokens=skip)
                deltas = [stream.push(i) for i in ids] + [stream.flush()]
                assert "".join(deltas) == ref.decode(ids, skip_special_tokens=skip), (name, text, skip)
                assert not any("\ufffd" in d for d in deltas), (name, text)


def test_stream_decoder_on_chat_with_specials(pairs):
    for name in ("deepseek", "qwen", "llama"):
        ours, ref = pairs[name]
        ids = ref.apply_chat_template(CHATS[1], add_generation_prompt=False, tokenize=True, return_dict=False)
        for skip in (False, True):
            stream = StreamDecoder(ours, skip_special_tokens=skip)
            text = "".join(stream.push(i) for i in ids) + stream.flush()
            assert text == ref.decode(ids, skip_special_tokens=skip), (name, skip)


def test_stream_decoder_on_random_slices(pairs):
    # slices may start inside a character (stray leading bytes); special tokens go in between characters
    # (a cut character is invalid UTF-8, which byte-fallback decoding turns into U+FFFD for the whole byte run)
    rng = random.Random(0)
    for name, (ours, ref) in pairs.items():
        ids = ref.encode(" ".join(TEXTS[1:10]), add_special_tokens=False)
        specials = sorted(ours.special_ids)
        for _ in range(30):
            start = rng.randrange(len(ids))
            window = ids[start:start + rng.randrange(1, 40)]
            while window and ref.decode(window).endswith("\ufffd"):
                window.pop()
            between = [p for p in range(len(window) + 1) if not ref.decode(window[:p]).endswith("\ufffd")]
            for p in sorted(rng.sample(between, min(len(between), rng.randrange(3))), reverse=True):
                window.insert(p, rng.choice(specials))
            for skip in (False, True):
                stream = StreamDecoder(ours, skip_special_tokens=skip)
                text = "".join(stream.push(i) for i in window) + stream.flush()
                assert text == ref.decode(window, skip_special_tokens=skip), (name, window, skip)


@pytest.mark.parametrize("name", ["deepseek", "llama"])
def test_stream_decoder_holds_incomplete_utf8(pairs, name):
    ours = pairs[name][0]
    ids = ours.encode("🦜", add_special_tokens=False)  # not in the training corpus
    assert len(ids) > 2  # byte-level / byte-fallback pieces
    stream = StreamDecoder(ours)
    deltas = [stream.push(i) for i in ids]
    assert deltas[-1].endswith("🦜") and not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == ours.decode(ids) and stream.flush() == ""
    # a stream cut inside the character shows the replacement character only at flush
    stream = StreamDecoder(ours)
    assert [stream.push(i) for i in ids[:-1]][-2:] == ["", ""]
    tail = stream.flush()
    assert tail.endswith("\ufffd") and ours.decode(ids[:-1]).endswith(tail)


def test_stream_decoder_decodes_short_windows(pairs):
    ours, ref = pairs["llama"]
    ids = ref.encode(" ".join(TEXTS) * 3)
    lengths = []

    class CountingBackend:
        def __getattr__(self, attr):
            return getattr(ours.backend, attr)

        def decode(self, window, skip_special_tokens=False):
            lengths.append(len(window))
            return ours.backend.decode(window, skip_special_tokens=skip_special_tokens)

    class Proxy:
        backend = CountingBackend()

        def __getattr__(self, attr):
            return getattr(ours, attr)

    stream = StreamDecoder(Proxy())
    text = "".join(stream.push(i) for i in ids) + stream.flush()
    assert text == ref.decode(ids)
    assert len(ids) > 300 and max(lengths) <= 12


def test_missing_tokenizer_names_what_it_looked_for(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json.*tokenizer\.model"):
        Tokenizer.from_pretrained(tmp_path)


def test_corrupt_files_raise_value_error_naming_them(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\xff\xff\xff\x0fnot a model")
    with pytest.raises(ValueError, match="tokenizer.model"):
        Tokenizer.from_pretrained(tmp_path)


def test_chat_template_errors_are_clear(deepseek_dir, tmp_path):
    ours = Tokenizer.from_pretrained(deepseek_dir)
    with pytest.raises(ChatTemplateError, match="Unknown role: tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="syntax error"):
        ours.apply_chat_template(CHATS[0], chat_template="{% for m in messages %}")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(deepseek_dir / name, tmp_path / name)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        Tokenizer.from_pretrained(tmp_path).apply_chat_template(CHATS[0])
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages[0].content }}!"}))
    assert Tokenizer.from_pretrained(tmp_path).apply_chat_template(CHATS[0]) == CHATS[0][0]["content"] + "!"
