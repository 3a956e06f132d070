"""Samplers, the text stream (reasoning split, stop strings), events and the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import local
from local import SamplingParams
from local.generate import TextStream, generate_tokens, starts_in_reasoning
from local.sampling import (TOP_P_BUCKETS, TOP_P_HEAD, apply_repetition_penalty, categorical, min_p_filter,
                            sample_next, top_k_filter, top_p_filter)

NEG = float("-inf")


def test_top_k():
    out = top_k_filter(torch.tensor([1.0, 4.0, 3.0, 2.0]), 2)
    assert out.tolist() == [NEG, 4.0, 3.0, NEG]
    assert top_k_filter(torch.tensor([1.0, 2.0]), 0).tolist() == [1.0, 2.0]


def test_top_p_keeps_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isfinite(top_p_filter(logits, 0.8)).tolist() == [True, True, False, False]
    assert torch.isfinite(top_p_filter(logits, 0.81)).tolist() == [True, True, True, False]
    assert torch.isfinite(top_p_filter(logits, 0.1)).tolist() == [True, False, False, False]


def top_p_by_full_sort(logits, p):
    """top-p by its definition: the whole vocabulary sorted, tokens kept while the mass before them is below p
    (summed in float64, as top_p_filter sums)."""
    probs, order = torch.sort(logits.softmax(-1), descending=True)
    probs = probs.double()
    drop = probs.cumsum(-1) - probs >= p
    drop[0] = False
    return logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), NEG)


@pytest.mark.parametrize("V", [7, TOP_P_HEAD, TOP_P_BUCKETS + 1, 5000, 151936])
@pytest.mark.parametrize("shape", ["peaky", "flat", "masked", "narrow", "plateau"])
def test_top_p_without_a_full_sort_keeps_what_a_full_sort_keeps(V, shape):
    """The nucleus found from the most likely tokens alone (peaky) or by bucketing the logits, with only the
    bucket where the mass reaches p sorted (flat), is the one a full sort gives: most tokens masked, all in a
    few buckets, small and large p."""
    g = torch.Generator().manual_seed(V + len(shape))
    logits = torch.randn(V, generator=g) * 3
    if shape == "peaky":  # a trained model's next token: a few clear candidates
        logits[torch.randint(0, V, (5,), generator=g)] += 15
    if shape == "masked":  # after top_k: most tokens already out
        logits = top_k_filter(logits, max(1, V // 3))
    if shape == "narrow":  # every logit within 0.1 of the others: all in a few buckets
        logits = logits / 300
    if shape == "plateau":  # more likely tokens than the first look takes, close together: the top buckets
        many = torch.randperm(V, generator=g)[:max(1, V // 4)]
        logits[many] = 20 + 0.5 * torch.rand(many.shape[0], generator=g)
    for p in (0.01, 0.3, 0.9, 0.95, 0.999, 1 - 1e-9):  # the last beyond what float32 probabilities sum to
        got, want = top_p_filter(logits, p), top_p_by_full_sort(logits, p)
        assert torch.equal(torch.isfinite(got), torch.isfinite(want)), (p, int(torch.isfinite(got).sum()),
                                                                          int(torch.isfinite(want).sum()))
        assert torch.equal(got[torch.isfinite(got)], logits[torch.isfinite(got)])


def test_categorical_draws_with_the_given_probabilities():
    probs = torch.tensor([0.5, 0.25, 0.0, 0.125, 0.125, 0.0])
    g = torch.Generator().manual_seed(0)
    n = 40000
    counts = torch.bincount(torch.tensor([categorical(probs * 3, g) for _ in range(n)]), minlength=6)
    assert counts[2] == 0 and counts[5] == 0  # zero probability: never, the last token included
    sigma = (probs * (1 - probs) * n).sqrt()
    assert ((counts - probs * n).abs() <= 4 * sigma + 1).all(), counts.tolist()
    assert {categorical(torch.tensor([0.0, 0.0, 1.0, 0.0]), g) for _ in range(100)} == {2}
    for bad in (torch.zeros(4), torch.tensor([float("nan"), 1.0])):
        with pytest.raises(ValueError, match="positive probability"):
            categorical(bad, g)


@pytest.mark.parametrize("draw, want", [(0.0, 1), (0.5, 3), (1.0, 3)])
def test_categorical_at_the_ends_of_the_draw(monkeypatch, draw, want):
    """A uniform draw at 0, on a boundary, and rounded up to the total never lands on a zero-probability token."""
    monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: torch.tensor(draw, dtype=torch.float64))
    assert categorical(torch.tensor([0.0, 0.5, 0.0, 0.5, 0.0])) == want


def test_sampling_follows_the_tempered_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    params = SamplingParams(temperature=0.5)
    g = torch.Generator().manual_seed(1)
    n = 40000
    counts = torch.bincount(torch.tensor([sample_next(logits, params, torch.tensor([]), g) for _ in range(n)]),
                            minlength=5)
    want = (logits / 0.5).softmax(-1)
    assert ((counts - want * n).abs() <= 4 * (want * (1 - want) * n).sqrt() + 1).all(), counts.tolist()


def test_min_p():
    logits = torch.log(torch.tensor([0.6, 0.27, 0.08, 0.05]))
    assert torch.isfinite(min_p_filter(logits, 0.1)).tolist() == [True, True, True, False]
    g = torch.Generator().manual_seed(0)
    logits = top_k_filter(torch.randn(5000, generator=g) * 4, 3000)  # some already out
    for min_p in (0.001, 0.05, 0.3, 0.9):
        probs = logits.softmax(-1)
        assert torch.equal(torch.isfinite(min_p_filter(logits, min_p)), probs >= min_p * probs.max())


def test_repetition_penalty_is_ctrl_style():
    out = apply_repetition_penalty(torch.tensor([2.0, -2.0, 1.0]), torch.tensor([0, 1, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_sampling_with_seed_is_reproducible_and_respects_filters():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=1.0, top_k=5, seed=3)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = [sample_next(logits, p, torch.tensor([]), g1) for _ in range(50)]
    b = [sample_next(logits, p, torch.tensor([]), g2) for _ in range(50)]
    assert a == b
    assert set(a) <= set(torch.topk(logits, 5).indices.tolist()) and len(set(a)) > 1
    assert sample_next(logits, SamplingParams(temperature=0), torch.tensor([])) == int(logits.argmax())


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"min_p": 1.5}, "min_p"),
    ({"top_k": -2}, "top_k"), ({"repetition_penalty": 0}, "repetition_penalty"), ({"max_tokens": -1}, "max_tokens"),
])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def collect(stream: TextStream, deltas):
    out = []
    for d in deltas:
        out += stream.push(d)
    return out + stream.flush()


def test_reasoning_split_across_token_boundaries():
    out = collect(TextStream(), ["<th", "ink>let me", " think</", "think>", "The answer", " is 4."])
    reasoning = "".join(t for t, r in out if r)
    answer = "".join(t for t, r in out if not r)
    assert reasoning == "let me think" and answer == "The answer is 4."


def test_reasoning_opened_by_the_prompt():
    assert starts_in_reasoning("<｜User｜>hi<｜Assistant｜><think>\n")
    assert not starts_in_reasoning("<｜User｜>hi<｜Assistant｜>")
    out = collect(TextStream(in_reasoning=True), ["hmm\n", "</think>\n\nHello"])
    assert [(t, r) for t, r in out] == [("hmm\n", True), ("\n\nHello", False)]


def test_stop_strings_cut_and_hold_back():
    s = TextStream(stop=("\nUser:",))
    out = s.push("Hi there")
    out += s.push("\nUs")  # could be the start of the stop string: held back
    assert "".join(t for t, _ in out) == "Hi there"
    out += s.push("er: more")
    assert s.stopped and "".join(t for t, _ in out) == "Hi there"
    s2 = TextStream(stop=("\nUser:",))
    assert "".join(t for t, _ in collect(s2, ["a\nUs", "ually"])) == "a\nUsually"


@pytest.fixture(scope="module")
def runner(tiny_v3_dir):
    return local.load(tiny_v3_dir, device="cpu")


def test_generate_events_and_stats(runner):
    events = list(runner.generate("def main():", SamplingParams(max_tokens=12, temperature=0.8, seed=7,
                                                                 ignore_eos=True)))
    tokens = [e for e in events if e.token_id is not None]
    assert len(tokens) == 12 and events[-1].kind == "done" and events[-1].finish_reason == "length"
    st = events[-1].stats
    assert st.prompt_tokens == len(runner.tokenizer.encode("def main():"))
    assert st.prompt_tps > 0 and st.decode_tps > 0 and 0 < st.ttft_seconds < 60
    text = "".join(e.text for e in events)
    assert text == runner.tokenizer.decode([e.token_id for e in tokens])
    again = list(runner.generate("def main():", SamplingParams(max_tokens=12, temperature=0.8, seed=7,
                                                                ignore_eos=True)))
    assert [e.token_id for e in again] == [e.token_id for e in events]


def test_generate_stops_at_eos(runner):
    # make the EOS id the only one the model can pick: the generation ends after one token
    runner.eos_ids = set(range(runner.config.vocab_size))
    try:
        events = list(runner.generate("hello", SamplingParams(max_tokens=10, temperature=0)))
    finally:
        runner.eos_ids = {1}
    assert events[-1].finish_reason == "eos" and events[-1].stats.generated_tokens == 1
    assert all(e.text == "" for e in events)


def test_generate_stop_string(runner):
    full = "".join(e.text for e in runner.generate("The", SamplingParams(max_tokens=20, temperature=0,
                                                                         ignore_eos=True)))
    stop = full[5:8]
    events = list(runner.generate("The", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                                        stop=(stop,))))
    assert events[-1].finish_reason == "stop"
    assert "".join(e.text for e in events) == full[: full.index(stop)]


def test_chat_uses_template(runner):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = runner.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert text.endswith("<|Assistant|>") and "Be brief." in text
    ids = runner.tokenizer.encode(text, add_special_tokens=False)
    want = [e.token_id for e in runner.generate(ids, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))]
    got = [e.token_id for e in runner.chat(messages, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))]
    assert got == want


@pytest.fixture(scope="module")
def demo_runner():
    return local.load(None, device="cpu")  # the bundled demo model: a GGUF on the CPU engine


def forward_calls(runner, monkeypatch) -> list[tuple[int, torch.Tensor]]:
    """Each forward of runner.model from now on: (tokens run, logits of the last one)."""
    calls, forward = [], runner.model.forward

    def recorded(ids, cache, *args, **kwargs):
        out = forward(ids, cache, *args, **kwargs)
        calls.append((ids.shape[0], out[-1].float().clone()))
        return out

    monkeypatch.setattr(runner.model, "forward", recorded)
    return calls


def template_ids(runner, messages) -> list[int]:
    text = runner.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return runner.tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("which", ["runner", "demo_runner"])
def test_a_chat_turn_runs_only_what_follows_the_kept_prefix(which, request, monkeypatch):
    """The next turn keeps the cache of what it shares with the last call (its prompt, and its reply as far
    as the template repeats it) and runs the rest; its logits are those of running it all from the start."""
    r = request.getfixturevalue(which)
    r.reset()
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    first = [{"role": "user", "content": "What is a list?"}]
    events = list(r.chat(first, params))
    held = template_ids(r, first) + [e.token_id for e in events if e.token_id is not None][:-1]  # last not run
    second = first + [{"role": "assistant", "content": "".join(e.text for e in events)},
                      {"role": "user", "content": "And a dict?"}]
    ids = template_ids(r, second)
    shared = next(i for i, (a, b) in enumerate(zip(held + [None], ids)) if a != b)
    assert shared >= len(template_ids(r, first))
    calls = forward_calls(r, monkeypatch)
    reused = list(r.chat(second, params))
    assert reused[-1].stats.cached_tokens == shared and reused[-1].stats.prompt_tokens == len(ids)
    assert calls[0][0] == len(ids) - shared  # the prompt's rest, one pass
    r.reset()
    fresh = list(r.chat(second, params))
    assert fresh[-1].stats.cached_tokens == 0 and calls[6][0] == len(ids)
    torch.testing.assert_close(calls[0][1], calls[6][1], atol=2e-4, rtol=2e-4)  # the first token's logits


def test_generate_tokens_refuses_a_cache_that_leaves_no_prompt_token_to_run(runner):
    ids = runner.tokenizer.encode("The quick brown fox")
    cache = runner.new_cache(len(ids) + 4)
    cache.length = len(ids)  # as if the whole prompt were kept: no token left to give the first logits
    with pytest.raises(ValueError, match="at least its last token must be left to run"):
        next(generate_tokens(runner.model, cache, ids, SamplingParams(max_tokens=2, temperature=0)))


def test_the_kept_cache_after_a_stopped_call_and_for_any_prompt(runner, monkeypatch):
    runner.reset()
    params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    ids = runner.tokenizer.encode("The quick brown fox")
    calls = forward_calls(runner, monkeypatch)
    stream = runner.generate(ids, params)
    got = [next(stream).token_id for _ in range(3)]  # the caller stops after three tokens
    stream.close()
    kept, held = runner._kept
    assert kept.length == len(ids) + 2 and held == ids + got[:2]
    # the same prompt again: all but its last token kept, that one run for the first logits
    again = list(runner.generate(ids, params))
    assert again[-1].stats.cached_tokens == len(ids) - 1 and calls[3][0] == 1
    assert [e.token_id for e in again[:3]] == got
    torch.testing.assert_close(calls[3][1], calls[0][1], atol=2e-4, rtol=2e-4)
    # a prompt that shares nothing: a new cache
    other = [i for i in runner.tokenizer.encode("Zebras") if i != ids[0]] or [ids[0] + 1]
    assert list(runner.generate(other, SamplingParams(max_tokens=2, temperature=0)))[-1].stats.cached_tokens == 0
    assert runner._kept[0] is not kept
    # tokens straight after the kept ones: nothing to cut, the cache grows as it must
    runner.reset()
    first = list(runner.generate(ids, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)))
    longer = ids + [e.token_id for e in first if e.token_id is not None] + ids
    out = list(runner.generate(longer, SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)))
    assert out[-1].stats.cached_tokens == len(ids) + 3 and out[-1].stats.generated_tokens == 300


def conversation(turns: int) -> list[dict]:
    out = [{"role": "system", "content": "You answer questions about Python."}]
    for i in range(turns):
        out += [{"role": "user", "content": f"What does json.dumps do with the object number {i}?"},
                {"role": "assistant", "content": f"It serializes object {i} to a JSON formatted string, "
                                                 "following the conversion table."}]
    return out


def test_fit_chat_leaves_out_the_oldest_turns_once_the_context_is_full():
    runner = local.load(None, device="cpu", ctx=256)
    tokens = lambda msgs: len(runner.tokenizer.apply_chat_template(msgs, tokenize=True))  # noqa: E731
    short = conversation(2) + [{"role": "user", "content": "And json.loads?"}]
    assert runner.fit_chat(short, reserve=64) == (short, 0)  # fits: nothing left out
    long = conversation(12) + [{"role": "user", "content": "And json.loads?"}]
    assert tokens(long) + 64 > 256
    kept, k = runner.fit_chat(long, reserve=64)
    assert kept == long[:1] + long[1 + k:]
    assert k > 0 and kept[0]["role"] == "system" and kept[1]["role"] == "user" and kept[-1] == long[-1]
    assert tokens(kept) <= 128 < tokens(long[:1] + long[1 + k - 2:])  # down to half the context, no further
    # the next turn keeps the same start while it fits (the kept cache stays usable), then moves on
    longer = long + [{"role": "assistant", "content": "It parses JSON."}, {"role": "user", "content": "Thanks."}]
    assert runner.fit_chat(longer, reserve=64, dropped=k)[1] == k
    much_longer = longer + conversation(6)[1:] + [{"role": "user", "content": "Bye."}]
    assert runner.fit_chat(much_longer, reserve=64, dropped=k)[1] > k
    # a reserve beyond half the context counts as half; a last message too long alone is all that stays
    assert runner.fit_chat(short, reserve=10_000)[1] == 0
    huge = long + [{"role": "assistant", "content": "x"}, {"role": "user", "content": "json " * 300}]
    assert runner.fit_chat(huge, reserve=64) == (huge[:1] + huge[-1:], len(huge) - 2)
    with pytest.raises(ValueError, match="context is 256"):
        list(runner.chat(huge[:1] + huge[-1:], SamplingParams(max_tokens=4)))


def test_cli_run_streams_and_summarises(tiny_v3_dir):
    out = subprocess.run([sys.executable, "-m", "local.cli", "run", str(tiny_v3_dir), "-p", "Hello", "-n", "8",
                          "--temp", "0", "--ignore-eos"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Hello") and len(out.stdout.strip()) > len("Hello")
    summary = out.stderr.strip().splitlines()[-1]
    assert "prompt" in summary and "decode 8 tok" in summary and "tok/s" in summary and "ttft" in summary


def test_cli_reports_bad_model_cleanly(tmp_path):
    out = subprocess.run([sys.executable, "-m", "local.cli", "run", str(tmp_path / "nope"), "-p", "x"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "tandem: error: no model at" in out.stderr and "Traceback" not in out.stderr
