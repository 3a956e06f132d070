"""`tandem chat`: pilot tests drive the real app (on the bundled demo model, and on a fake runner with a
deterministic event stream), snapshot tests pin the main screen at 80x24 and 120x40."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
import torch

from local import Event, SamplingParams, Stats
from tui import ChatApp, ChatSettings
from tui.widgets import AssistantMessage, ErrorMessage, Heatmap, PromptInput, StatsPanel, UserMessage

FIXED_SYSTEM = lambda: (150.0, 412 * 2**20, None)  # noqa: E731 - deterministic CPU % / RSS / GPU


class FakeRunner:
    """Stands in for `local.Runner`: a fixed reply (reasoning, then Markdown) with fixed timings."""

    REASONING = ["The ", "user ", "asks ", "about ", "lists."]
    ANSWER = ["A **list** ", "holds items ", "in order.\n\n", "- `append` adds one\n", "- `pop` removes one"]

    def __init__(self, delay: float = 0.0, endless: bool = False):
        self.delay, self.endless = delay, endless
        self.calls: list[tuple[list[dict], SamplingParams]] = []
        self.after_stop = 0  # events pulled after the app asked to stop
        self.stop_flag: threading.Event | None = None
        self.counts = None

    def describe(self) -> dict:
        return {"architecture": "deepseek_v3", "total_params": 12_954_720, "active_params": 4_697_184,
                "types": ["Q8_0"], "placement": "CPU engine: every linear and expert", "threads": 2,
                "context": 2048}

    def record_routing(self, on: bool = True) -> None:
        self.counts = torch.zeros(3, 32, dtype=torch.int64) if on else None

    def routing_counts(self):
        return None if self.counts is None else ([1, 2, 3], self.counts.clone())

    def fit_chat(self, messages, reserve, dropped=0):
        return messages, dropped  # its conversations never fill the context

    def chat(self, messages, params):
        self.calls.append((list(messages), params))
        prompt = 12 + 10 * (len(messages) - 1)
        pieces = [(t, True) for t in self.REASONING] + [(t, False) for t in self.ANSWER]
        n = 0
        while True:
            for text, reasoning in pieces:
                n += 1
                if self.stop_flag is not None and self.stop_flag.is_set():
                    self.after_stop += 1
                if self.delay:
                    time.sleep(self.delay)
                self.counts[:, (n * 7) % 32] += 1
                self.counts[:, (n * 3) % 32] += 2
                stats = Stats(prompt, n, 0.04, 0.02 * (n - 1), 0.05)
                yield Event("token", text, 100 + n, reasoning, stats=stats)
                if n >= params.max_tokens:
                    yield Event("done", finish_reason="length", stats=stats)
                    return
            if not self.endless:
                break
        yield Event("done", finish_reason="eos", stats=stats)


async def wait_for(pilot, condition, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while not condition():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("timed out waiting for the app")
        await pilot.pause(0.05)


async def send(pilot, app, text: str) -> None:
    await pilot.click("#prompt")
    await pilot.press(*text)
    before = len(app.transcript)
    await pilot.press("enter")
    await wait_for(pilot, lambda: len(app.transcript) >= before + 2 and not app.generating)


async def save(pilot) -> None:
    await pilot.click("#save")
    await pilot.pause(0.25)  # a Button ignores clicks during its 0.2 s press effect


# ---------------------------------------------------------------- the real model

@pytest.fixture(scope="module")
def demo_path():
    from local.demo import demo_model_path

    return demo_model_path()


def test_reply_streams_on_demo_model(demo_path, tmp_path):
    async def main():
        app = ChatApp(demo_path, export_dir=tmp_path, threads=2,
                      settings=ChatSettings(SamplingParams(max_tokens=40, temperature=0.0)))
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_for(pilot, lambda: app.runner is not None or app.load_error)
            assert app.load_error is None
            assert "deepseek_v3" in str(app.query_one("#model-info").render())
            await send(pilot, app, "What does json.dumps do?")
            assert [str(m.render()) for m in app.query(UserMessage)] == ["What does json.dumps do?"]
            reply = app.query(AssistantMessage).last()
            assert (reply.answer + reply.reasoning).strip(), "no text streamed"
            stats = app.throughput.last
            assert stats is not None and stats.generated_tokens > 1 and stats.decode_tps > 0
            speed = str(app.query_one(StatsPanel).speed.render())
            assert f"{stats.decode_tps:.1f}" in speed
            heat = app.query_one(Heatmap)
            assert heat.counts and sum(map(sum, heat.counts)) > 0
            # each routed token picks num_experts_per_tok experts in every MoE layer
            k = app.runner.config.num_experts_per_tok
            assert all(sum(row) == k * (stats.prompt_tokens + stats.generated_tokens - 1) for row in heat.counts)
            assert app.context_used == stats.prompt_tokens + stats.generated_tokens
            # a second turn carries the first reply in the prompt, and runs only what follows the kept cache:
            # every position of the conversation routed once
            await send(pilot, app, "And json.loads?")
            second = app.throughput.last
            assert second.prompt_tokens > stats.prompt_tokens + 3 and second.cached_tokens >= stats.prompt_tokens
            run = (stats.prompt_tokens + stats.generated_tokens - 1
                   + second.prompt_tokens - second.cached_tokens + second.generated_tokens - 1)
            assert all(sum(row) == k * run for row in app.query_one(Heatmap).counts)
            assert [m["role"] for m in app.messages] == ["user", "assistant", "user", "assistant"]

    asyncio.run(main())


def test_more_threads_than_cpus_is_a_warning_toast(demo_path, monkeypatch):
    from offload import cpus

    monkeypatch.setattr(cpus, "affinity_cpus", lambda: [0])

    async def main():
        app = ChatApp(demo_path, threads=2)
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_for(pilot, lambda: app.runner is not None or app.load_error)
            await pilot.pause(0.1)
            toasts = [(n.title, n.message, n.severity) for n in app._notifications]
            assert [(t, s) for t, _, s in toasts] == [("Threads", "warning")]
            assert "2 threads on 1 CPUs" in toasts[0][1]

    asyncio.run(main())


def test_a_conversation_longer_than_the_context_goes_on(demo_path):
    """Once the conversation outgrows --ctx, the model stops seeing its oldest messages (with a toast saying
    so) instead of every later reply coming back empty, cut by the context."""
    async def main():
        app = ChatApp(demo_path, threads=2, ctx=96,
                      settings=ChatSettings(SamplingParams(max_tokens=40, temperature=0.0)))
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_for(pilot, lambda: app.runner is not None or app.load_error)
            for turn in range(5):
                app.query_one("#prompt", PromptInput).text = f"What does json.dumps do? ({turn})"  # not typed: fast
                await pilot.click("#prompt")
                await pilot.press("enter")
                await wait_for(pilot, lambda: len(app.transcript) == 2 * turn + 2 and not app.generating)
                reply = app.transcript[-1]
                assert reply["finish_reason"] in ("length", "eos") and (reply["content"] + reply["reasoning"]).strip()
                assert app.throughput.last.prompt_tokens < 96
            assert app._dropped > 0 and len(app.messages) == 10  # the transcript keeps them all
            shown = list(app.query(UserMessage)) + list(app.query(AssistantMessage))
            unseen = [w for w in shown if w.has_class("unseen")]  # dimmed
            assert len(unseen) == app._dropped and set(unseen) == set(app._message_widgets[:app._dropped])
            assert app.query(UserMessage).first().has_class("unseen")  # the oldest
            assert not app.query(UserMessage).last().has_class("unseen")
            titles = [n.title for n in app._notifications]
            assert titles and set(titles) == {"Context full"}

    asyncio.run(main())


def test_escape_stops_a_long_reply_on_demo_model(demo_path):
    async def main():
        params = SamplingParams(max_tokens=1500, temperature=0.8, ignore_eos=True, seed=1)
        app = ChatApp(demo_path, threads=2, settings=ChatSettings(params))
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: app.runner is not None)
            chat = app.runner.chat

            def paced(messages, params):  # the demo model's ~1000 tokens/s at most 300: 1500 take 5 s
                for ev in chat(messages, params):
                    time.sleep(1 / 300)
                    yield ev

            app.runner.chat = paced
            await pilot.click("#prompt")
            await pilot.press(*"Tell me about lists")
            await pilot.press("enter")
            # five tokens out of the generating thread (shown or still queued: a batch may wait while the UI
            # has had its share of a core)
            await wait_for(pilot, lambda: app._reply_tokens + len(app._events) >= 5)
            await pilot.press("escape")
            await wait_for(pilot, lambda: not app.generating, timeout=5)
            reply = app.query(AssistantMessage).last()
            assert app.throughput.last.generated_tokens < 1500
            assert "stopped" in str(reply._footer.render())
            assert app.messages[-1] == {"role": "assistant", "content": reply.answer}  # kept what was written

    asyncio.run(main())


def test_bad_model_path_shows_an_error(tmp_path):
    async def main():
        app = ChatApp(tmp_path / "missing.gguf")
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: app.load_error is not None)
            errors = [str(e.render()) for e in app.query(ErrorMessage)]
            assert len(errors) == 1 and "no model at" in errors[0] and "Traceback" not in errors[0]
            assert app.query_one("#prompt").disabled

    asyncio.run(main())


# ---------------------------------------------------------------- a fake runner

def test_escape_stops_within_one_token():
    async def main():
        runner = FakeRunner(delay=0.01, endless=True)
        app = ChatApp(runner=runner, sysinfo=FIXED_SYSTEM,
                      settings=ChatSettings(SamplingParams(max_tokens=100_000)))
        runner.stop_flag = app._stop
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.click("#prompt")
            await pilot.press(*"go", "enter")
            await wait_for(pilot, lambda: app.throughput.current is not None
                           and app.throughput.current.generated_tokens > 10)
            await pilot.press("escape")
            await wait_for(pilot, lambda: not app.generating, timeout=5)
            assert runner.after_stop <= 1
            assert app.transcript[-1]["finish_reason"] == "stopped"

    asyncio.run(main())


def test_reasoning_is_separate_and_can_be_hidden():
    async def main():
        app = ChatApp(runner=FakeRunner(), sysinfo=FIXED_SYSTEM)
        async with app.run_test(size=(120, 40)) as pilot:
            await send(pilot, app, "lists?")
            reply = app.query(AssistantMessage).last()
            assert reply.reasoning == "".join(FakeRunner.REASONING)
            assert reply.answer == "".join(FakeRunner.ANSWER)
            assert reply.reasoning_tokens == len(FakeRunner.REASONING)
            assert f"Reasoning ({len(FakeRunner.REASONING)} tokens)" in reply._collapsible.title
            assert reply._collapsible.display and reply._collapsible.collapsed  # folded once the answer came
            assert app.messages[-1]["content"] == reply.answer  # reasoning is not sent back to the model
            app.action_settings()
            await pilot.pause()
            await pilot.click("#set-reasoning")
            await save(pilot)
            assert not app.settings.show_reasoning and not reply._collapsible.display

    asyncio.run(main())


def test_a_batch_adds_each_run_of_text_at_once(monkeypatch):
    """The tokens a tick drains go to the reply as one piece of reasoning and one of answer, not one by one:
    every Markdown append re-laid out the screen (a fake runner at 150 tok/s, 2000 tokens: the UI thread used
    35% of a core, 25-29% with the runs joined)."""
    adds = []
    original = AssistantMessage.add

    async def counting(self, text, reasoning, tokens):
        adds.append((text, reasoning, tokens))
        await original(self, text, reasoning, tokens)
    monkeypatch.setattr(AssistantMessage, "add", counting)

    async def main():
        app = ChatApp(runner=FakeRunner(), sysinfo=FIXED_SYSTEM)
        async with app.run_test(size=(120, 40)) as pilot:
            app._hold_batch = lambda: True  # the whole reply queues, then goes in one batch
            await pilot.click("#prompt")
            await pilot.press(*"lists?")
            await pilot.press("enter")
            await wait_for(pilot, lambda: len(app._events) >= 11)  # 10 tokens and the end
            del app._hold_batch
            await wait_for(pilot, lambda: not app.generating)
            reply = app.query(AssistantMessage).last()
            assert adds == [("".join(FakeRunner.REASONING), True, 5), ("".join(FakeRunner.ANSWER), False, 5)]
            assert reply.reasoning_tokens == 5 and reply.answer == "".join(FakeRunner.ANSWER)

    asyncio.run(main())


def test_settings_change_the_next_reply():
    async def main():
        runner = FakeRunner()
        app = ChatApp(runner=runner, sysinfo=FIXED_SYSTEM)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("ctrl+s")
            await pilot.pause()
            temp = app.screen.query_one("#set-temperature")
            temp.value = "abc"
            await save(pilot)
            assert "temperature: 'abc' is not a number" in str(app.screen.query_one("#settings-error").render())
            temp.value = "1.5"
            app.screen.query_one("#set-top_p").value = "2"
            await save(pilot)
            assert "top_p must be in (0, 1]" in str(app.screen.query_one("#settings-error").render())
            app.screen.query_one("#set-top_p").value = "0.9"
            app.screen.query_one("#set-max_tokens").value = "7"
            app.screen.query_one("#set-system").value = "Be brief."
            await save(pilot)
            await send(pilot, app, "hi")
            messages, params = runner.calls[-1]
            assert params.temperature == 1.5 and params.top_p == 0.9 and params.max_tokens == 7
            assert messages[0] == {"role": "system", "content": "Be brief."}
            assert app.throughput.last.generated_tokens == 7

    asyncio.run(main())


def test_a_timer_tick_during_shutdown_is_harmless():
    # The app's timers outlive its screen's widgets by a few awaits at exit; a tick there once failed
    # CI with NoMatches('StatsPanel'). Replay such ticks after the widgets are gone.
    async def main():
        app = ChatApp(runner=FakeRunner(), sysinfo=FIXED_SYSTEM)
        async with app.run_test(size=(80, 24)) as pilot:
            await send(pilot, app, "hi")
            app._events.append((app._turn, ("done", False)))
        assert not app.query(StatsPanel)
        app._sample_system()
        await app._drain()

    asyncio.run(main())


def test_ctrl_n_clears_and_ctrl_e_exports(tmp_path):
    async def main():
        app = ChatApp(runner=FakeRunner(), sysinfo=FIXED_SYSTEM, export_dir=tmp_path)
        async with app.run_test(size=(80, 24)) as pilot:
            await send(pilot, app, "first")
            await send(pilot, app, "second")
            assert len(app.query(AssistantMessage)) == 2 and app.throughput.history
            await pilot.press("ctrl+e")
            await pilot.pause()
            md, js = sorted(tmp_path.glob("tandem-chat-*.md")), sorted(tmp_path.glob("tandem-chat-*.json"))
            assert len(md) == 1 and len(js) == 1
            text = md[0].read_text()
            assert "## User\n\nfirst" in text and "A **list**" in text and "> The user asks about lists." in text
            data = json.loads(js[0].read_text())
            assert [m["role"] for m in data["messages"]] == ["user", "assistant"] * 2
            assert data["messages"][1]["stats"]["generated_tokens"] == 10
            await pilot.press("ctrl+n")
            await pilot.pause()
            assert not app.query(AssistantMessage) and not app.query(UserMessage)
            assert app.messages == [] and app.throughput.history == [] and app.context_used == 0
            assert app.query_one(Heatmap).counts == []
            await send(pilot, app, "third")
            assert len(app.runner.calls[-1][0]) == 1  # the new conversation starts empty

    asyncio.run(main())


def test_heatmap_bins_many_experts_to_fit():
    heat = Heatmap()
    counts = torch.zeros(58, 256, dtype=torch.int64)
    counts[:, 5] = 10
    heat.set_counts(list(range(3, 61)), counts)
    lines = heat.grid_text(26, 6).plain.split("\n")
    assert len(lines) <= 6 and all(len(line) <= 26 for line in lines)
    assert "█" in lines[0] and "·" in lines[0]  # the hot bin and the cold ones


# ---------------------------------------------------------------- snapshots

async def _one_reply(pilot):
    app = pilot.app
    await send(pilot, app, "What is a list?")
    await pilot.pause()


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
def test_main_screen_snapshot(snap_compare, size):
    app = ChatApp(runner=FakeRunner(), sysinfo=FIXED_SYSTEM)
    assert snap_compare(app, terminal_size=size, run_before=_one_reply)



def test_ctrl_j_starts_a_new_line_and_enter_sends():
    async def main():
        runner = FakeRunner()
        app = ChatApp(runner=runner, sysinfo=FIXED_SYSTEM)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.click("#prompt")
            await pilot.press("a", "ctrl+j", "b")
            assert app.query_one("#prompt").text == "a\nb" and not runner.calls
            await pilot.press("enter")
            await wait_for(pilot, lambda: len(app.transcript) == 2 and not app.generating)
            assert runner.calls[0][0][-1] == {"role": "user", "content": "a\nb"}
            assert app.query_one("#prompt").text == ""

    asyncio.run(main())


def test_batches_wait_while_the_ui_has_had_its_share_of_a_core(monkeypatch):
    """While a reply streams, a batch waits if the UI thread used more than UI_SHARE of a core since the last
    one it applied (its rendering takes the engine's cores), but never past HOLD_SECONDS, and never the end."""
    import tui.app as chat

    clock = {"wall": 100.0, "cpu": 5.0}
    monkeypatch.setattr(chat.time, "monotonic", lambda: clock["wall"])
    monkeypatch.setattr(chat.time, "thread_time", lambda: clock["cpu"])
    app = ChatApp(runner=FakeRunner(), sysinfo=FIXED_SYSTEM)
    app.generating = True
    token = (app._turn, Event("token", "x", 1, False))
    app._events.append(token)

    def step(wall: float, cpu: float) -> bool:
        clock["wall"] += wall
        clock["cpu"] += cpu
        return app._hold_batch()

    assert not step(0.1, 0.0)  # a first batch: applied
    assert step(0.1, 0.025)  # 25% of a core since: held
    assert step(0.1, 0.0)  # 12.5% over the 0.2 s
    assert not step(0.1, 0.0)  # 8%: applied
    assert step(0.1, 0.5)
    assert step(chat.HOLD_SECONDS - 0.2, 0.0) and not step(0.25, 0.0)  # held no longer than HOLD_SECONDS
    assert step(0.01, 0.01)
    app._events.append((app._turn, Event("done", "", None, False)))
    assert not step(0.0, 0.0)  # the end of the reply: at once
    app._events.clear()
    app._events.append(token)
    assert step(0.01, 0.01)
    app.generating = False
    assert not step(0.0, 0.0)  # not streaming (a stopped or failed reply's last events): at once


def test_the_heatmap_waits_while_a_reply_streams_and_is_drawn_at_its_end(monkeypatch):
    import tui.app as chat

    monkeypatch.setattr(chat, "ROUTING_SECONDS", 3600.0)

    async def main():
        app = ChatApp(runner=FakeRunner(delay=0.02, endless=True), sysinfo=FIXED_SYSTEM)  # until Esc
        async with app.run_test(size=(80, 24)) as pilot:
            heat = app.query_one(Heatmap)
            await pilot.click("#prompt")
            await pilot.press(*"hi", "enter")
            await wait_for(pilot, lambda: heat.counts is not None)  # the reply's first batch draws it
            first = [list(row) for row in heat.counts]
            await wait_for(pilot, lambda: app._reply_tokens >= 20)
            assert app.generating and heat.counts == first  # not again while the reply streams
            await pilot.press("escape")
            await wait_for(pilot, lambda: not app.generating)
            assert heat.counts == app.runner.counts.tolist() != first  # the whole reply, at its end

    asyncio.run(main())


def test_a_late_event_of_an_earlier_turn_is_dropped():
    """The generating thread's events carry their turn: one that arrives after the next message was sent
    (a failed turn's closing "end", say) must not finish the new reply early."""
    async def main():
        app = ChatApp(runner=FakeRunner(), sysinfo=FIXED_SYSTEM)
        async with app.run_test(size=(80, 24)) as pilot:
            await send(pilot, app, "first")
            earlier = app._turn
            app.runner.delay = 0.05  # the next reply takes half a second
            await pilot.click("#prompt")
            await pilot.press(*"next", "enter")
            app._events.append((earlier, ("end", False)))  # late, from the finished turn
            await wait_for(pilot, lambda: len(app.transcript) >= 4 and not app.generating)
            assert app.transcript[-1]["finish_reason"] == "eos"
            assert app.transcript[-1]["content"] == "".join(FakeRunner.ANSWER)

    asyncio.run(main())


def test_a_generation_error_is_a_message_not_a_traceback():
    class Failing(FakeRunner):
        def chat(self, messages, params):
            self.calls.append((list(messages), params))
            yield Event("token", "Half", 7, False, stats=Stats(3, 1, 0.01, 0.0, 0.01))
            raise RuntimeError("the engine ran out of memory")

    async def main():
        app = ChatApp(runner=Failing(), sysinfo=FIXED_SYSTEM)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.click("#prompt")
            await pilot.press(*"go", "enter")
            await wait_for(pilot, lambda: app.query(ErrorMessage) and not app.generating)
            text = str(app.query(ErrorMessage).last().render())
            assert "Generation failed: RuntimeError: the engine ran out of memory" in text
            assert not app.query_one("#prompt").disabled  # the conversation goes on
            assert app.messages == [] and app.transcript[-1]["finish_reason"] == "error"
            await send(pilot, app, "again")  # the next turn starts clean: no dangling user message
            assert app.runner.calls[-1][0] == [{"role": "user", "content": "again"}]

    asyncio.run(main())
