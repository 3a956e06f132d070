"""`tandem chat`: the Textual chat app. A client of `local`'s public API (load, runner.chat events);
it never owns model state beyond the conversation's messages.

Generation runs in a thread worker that only appends events to a queue; the UI drains the queue
up to 10 times a second, so a fast model never floods the event loop (no flicker, no lag), and less often
while drawing the reply would take more than its share of a core from the engine."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import deque
from datetime import datetime
from pathlib import Path

from textual import work
from textual.app import App
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Footer, ProgressBar, Static

from .settings import ChatSettings, SettingsScreen
from .widgets import (AssistantMessage, ErrorMessage, PromptInput, StatsPanel, Throughput, UserMessage,
                      describe_line)

DRAIN_SECONDS = 0.1  # up to 10 UI updates a second: at 20 the Markdown rendering halved decode speed on 2 cores
# ... and while the UI thread has used more than UI_SHARE of a core since the last batch it applied, the next
# waits (up to HOLD_SECONDS: the text still moves twice a second). Each batch re-renders the reply's Markdown
# and the screen it scrolls, 20-40 ms at 120x40 and more as the conversation grows, and on 2 cores that time
# comes out of the engine's threads: an 8-layer Qwen3-30B-A3B decoded at 0.44-0.74x the tokens/s of
# runner.generate alone at 10 batches a second (less the longer the conversation), 0.62-0.90x so held
UI_SHARE = 0.1
HOLD_SECONDS = 0.5
# The routing heatmap, a statistic of the whole conversation, redrawn at most this often while a reply streams
# (and at its end): redrawn with every batch it took as much of the UI's time as the reply itself (the chat at
# 0.64x of generate's tokens/s against 0.76x without it)
ROUTING_SECONDS = 1.0
SYSTEM_SECONDS = 1.0


class SystemSampler:
    """CPU % and RSS of this process (psutil), and GPU memory when CUDA is present."""

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process()
        self.process.cpu_percent(None)

    def __call__(self) -> tuple[float, int, int | None]:
        from local import gpu_memory_allocated

        return self.process.cpu_percent(None), self.process.memory_info().rss, gpu_memory_allocated()


class ChatApp(App):
    """The chat app. `model`: a GGUF file or HF directory (None = the bundled demo model);
    `runner`: an already loaded runner (or any object with `.chat`, `.describe`, routing methods)."""

    CSS_PATH = "chat.tcss"
    TITLE = "Tandem"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("escape", "stop", "Stop"),
        # priority: the prompt box (a TextArea) binds ctrl+e (line end) and others itself
        Binding("ctrl+n", "new_chat", "New", priority=True),
        Binding("ctrl+s", "settings", "Settings", priority=True),
        Binding("ctrl+e", "export", "Export", priority=True),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, model=None, *, system: str | None = None, device: str = "auto", threads: int | None = None,
                 ctx: int | None = None, runner=None, settings: ChatSettings | None = None, sysinfo=None,
                 export_dir=None, cuda_graph: bool = False, kv_cache_dtype: str | None = None,
                 quant: str | None = None) -> None:
        super().__init__()
        self.model_path, self.device, self.threads, self.ctx = model, device, threads, ctx
        self.quant = quant  # an HF directory quantized as it loads (local.load's)
        self.kv_cache_dtype = kv_cache_dtype
        self.cuda_graph = cuda_graph
        self.runner = runner
        self.settings = settings or ChatSettings()
        if system is not None:
            self.settings = ChatSettings(self.settings.params, system, self.settings.show_reasoning)
        self.sysinfo = sysinfo or SystemSampler()
        self.export_dir = Path(export_dir) if export_dir else Path.cwd()
        self.messages: list[dict] = []  # the conversation as the chat template sees it
        self._message_widgets: list = []  # the widget showing each of self.messages
        self.transcript: list[dict] = []  # the same with reasoning and stats, for export
        self.throughput = Throughput()
        self.context_used = 0
        self.generating = False
        self.load_error: str | None = None
        # (turn, event) from the generating thread; a turn's events are dropped once a newer turn started
        # (a failed turn's closing "end" can arrive after the next message was sent)
        self._events: deque = deque()
        self._turn = 0
        self._dropped = 0  # the oldest messages the model no longer sees (the context is full)
        self._stop = threading.Event()
        self._reply: AssistantMessage | None = None
        self._reply_tokens = 0
        self._load_progress: tuple[int, int] = (0, 0)
        self._last_batch = (time.monotonic(), time.thread_time())  # when the UI applied one, and its CPU time
        self._routing_at = float("-inf")  # when the heatmap was last redrawn

    # ---------------------------------------------------------------- layout
    def compose(self):
        yield Static("loading…", id="model-info")
        with Horizontal(id="main"):
            with Vertical(id="left"):
                yield VerticalScroll(id="conversation")
                yield Static("", id="status")
                yield ProgressBar(id="load-progress", show_eta=False)
                yield PromptInput(id="prompt", soft_wrap=True, show_line_numbers=False)
            yield StatsPanel()
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#prompt", PromptInput).disabled = True
        self.set_interval(DRAIN_SECONDS, self._drain)
        self.set_interval(SYSTEM_SECONDS, self._sample_system)
        self._sample_system()
        self._show_speed()
        if self.runner is not None:
            self._loaded()
        else:
            self._set_status(f"Loading {self.model_path or 'the demo model'}…")
            self._load()

    # ---------------------------------------------------------------- loading
    @work(thread=True, exclusive=True, group="load")
    def _load(self) -> None:
        from local import load

        try:
            runner = load(self.model_path, device=self.device, threads=self.threads, ctx=self.ctx,
                          cuda_graph=self.cuda_graph, kv_cache_dtype=self.kv_cache_dtype, quant=self.quant,
                          progress=lambda done, total: setattr(self, "_load_progress", (done, total)))
        except Exception as e:  # noqa: BLE001 - shown in the UI, not as a traceback
            self.call_from_thread(self._load_failed, f"{type(e).__name__}: {e}")
            return
        self.call_from_thread(self._loaded, runner)

    def _loaded(self, runner=None) -> None:
        # set here, on the UI thread, with the header below: a runner set by the loading thread was visible
        # before the header showed it (a test that waited for it read "loading…" in a clean-clone run)
        if runner is not None:
            self.runner = runner
        self.query_one("#load-progress").display = False
        try:
            info = self.runner.describe()
            self.query_one("#model-info", Static).update(describe_line(info))
            self.context_size = int(info.get("context", 0))
            self.runner.record_routing(True)
            if warning := info.get("threads_warning"):
                self.notify(warning, title="Threads", severity="warning", timeout=15)
        except Exception as e:  # noqa: BLE001
            self.query_one("#model-info", Static).update(f"model loaded ({type(e).__name__}: {e})")
            self.context_size = 0
        self._set_status("")
        prompt = self.query_one("#prompt", PromptInput)
        prompt.disabled = False
        prompt.focus()
        self._show_speed()

    def _load_failed(self, message: str) -> None:
        self.load_error = message
        self.query_one("#load-progress").display = False
        self.query_one("#model-info", Static).update("no model loaded")
        self._set_status("")
        self.query_one("#conversation").mount(
            ErrorMessage(f"Could not load the model: {message}\n\nStart again with a GGUF file or an HF "
                         "model directory: tandem chat PATH"))

    # ---------------------------------------------------------------- conversation
    def on_prompt_input_submitted(self, event: PromptInput.Submitted) -> None:
        if self.generating or self.runner is None:
            return
        self.query_one("#prompt", PromptInput).clear()
        self.send(event.text)

    def send(self, text: str) -> None:
        """Start a reply to `text` (as if typed and sent)."""
        conversation = self.query_one("#conversation")
        user = UserMessage(text)
        conversation.mount(user)
        self._message_widgets.append(user)
        self._reply = AssistantMessage(self.settings.show_reasoning)
        conversation.mount(self._reply)
        conversation.scroll_end(animate=False)
        self.messages.append({"role": "user", "content": text})
        self.transcript.append({"role": "user", "content": text})
        system = [{"role": "system", "content": self.settings.system}] if self.settings.system else []
        self.generating = True
        self._reply_tokens = 0
        self._stop.clear()
        self.throughput.current = None
        self._set_status("generating… (Esc stops)")
        self._turn += 1
        self._generate(self._turn, system + list(self.messages), self.settings.params)

    @work(thread=True, exclusive=True, group="generate")
    def _generate(self, turn: int, messages: list[dict], params) -> None:
        try:
            events = self.runner.chat(self._fit(turn, messages, params.max_tokens), params)
            try:
                for ev in events:
                    self._events.append((turn, ev))
                    if self._stop.is_set():
                        break
            finally:
                close = getattr(events, "close", None)
                if close:
                    close()
        except Exception as e:  # noqa: BLE001 - shown in the UI
            self._events.append((turn, ("error", f"{type(e).__name__}: {e}")))
        self._events.append((turn, ("end", self._stop.is_set())))

    def _fit(self, turn: int, messages: list[dict], reserve: int) -> list[dict]:
        """The conversation as the model sees it: once it outgrows the context, without its oldest messages
        (Runner.fit_chat; the system prompt stays)."""
        kept, dropped = self.runner.fit_chat(messages, reserve, self._dropped)
        if dropped > self._dropped:
            self._events.append((turn, ("dropped", dropped)))
        self._dropped = dropped
        return kept

    async def _drain(self) -> None:
        """Apply the queued events to the UI, one batch per tick."""
        if not self.is_running:
            return  # shutting down: a tick can land after the screen's widgets are gone
        if self.runner is None and self.load_error is None:
            done, total = self._load_progress
            if total:
                self.query_one("#load-progress", ProgressBar).update(total=total, progress=done)
            return
        if not self._events or self._hold_batch():
            return
        reply = self._reply
        batch = []
        while self._events:
            turn, ev = self._events.popleft()
            if turn == self._turn:
                batch.append(ev)
        text: list = []  # the batch's text events in a row, added together (_add_text)
        for ev in batch:
            if not self.is_running:
                return  # shutdown began during an await below
            if not isinstance(ev, tuple) and ev.kind != "done":
                self.throughput.current = ev.stats
                self._reply_tokens += 1 if ev.token_id is not None else 0
                if ev.text or ev.token_id is not None:
                    text.append(ev)
                continue
            await self._add_text(reply, text)
            if isinstance(ev, tuple):
                kind, value = ev
                if kind == "dropped":
                    for widget in self._message_widgets[:value]:
                        widget.add_class("unseen")  # dimmed: the model no longer sees it
                    self.notify(f"The conversation outgrew the context ({self.context_size} tokens): the model "
                                f"no longer sees its first {value} messages.", title="Context full", timeout=10)
                elif kind == "error":
                    await self._failed_reply(reply, value)
                else:
                    await self._finish_reply(reply, "stopped" if value else None)
                continue
            reply.finish_reason = ev.finish_reason  # "done"
            self.throughput.current = ev.stats
        await self._add_text(reply, text)
        if not self.is_running:
            return
        stats = self.throughput.current
        if stats is not None:  # each reply's prompt is the whole conversation so far (most of it kept in the cache)
            self.context_used = stats.prompt_tokens + stats.generated_tokens
        self._show_speed()
        if not self.generating or time.monotonic() - self._routing_at >= ROUTING_SECONDS:
            self._show_routing()
        self.query_one("#conversation").scroll_end(animate=False)

    async def _add_text(self, reply: AssistantMessage, events: list) -> None:
        """Token events in a row, added to the reply as one run of reasoning or answer each, not token by token:
        every add appends to the reply's Markdown, which re-lays out the screen. Empties `events`."""
        for reasoning, run in itertools.groupby(events, key=lambda ev: ev.reasoning):
            if not self.is_running:
                break
            run = list(run)
            await reply.add("".join(ev.text for ev in run), reasoning, sum(ev.token_id is not None for ev in run))
        events.clear()

    def _hold_batch(self) -> bool:
        """Whether the queued events wait for a later tick: while a reply streams, if this (the UI) thread used
        more than UI_SHARE of a core since the last batch it applied, for at most HOLD_SECONDS; never the end
        of a reply."""
        now, cpu = time.monotonic(), time.thread_time()
        last_wall, last_cpu = self._last_batch
        if (self.generating and now - last_wall < HOLD_SECONDS and cpu - last_cpu > UI_SHARE * (now - last_wall)
                and not any(isinstance(ev, tuple) or ev.kind == "done" for _, ev in self._events)):
            return True
        self._last_batch = (now, cpu)
        return False

    async def _finish_reply(self, reply: AssistantMessage, stopped: str | None) -> None:
        if reply is None or not self.generating:
            return
        stats = self.throughput.current
        reason = stopped or getattr(reply, "finish_reason", None) or "done"
        footer = f"{stats.generated_tokens} tok · {stats.decode_tps:.1f} tok/s · {reason}" if stats else reason
        await reply.finish(footer)
        self.messages.append({"role": "assistant", "content": reply.answer})
        self._message_widgets.append(reply)
        self.transcript.append({"role": "assistant", "content": reply.answer, "reasoning": reply.reasoning,
                                "finish_reason": reason, "stats": _stats_dict(stats)})
        if stats is not None:
            self.throughput.last = stats
            if stats.decode_tps > 0:
                self.throughput.history.append(stats.decode_tps)
        self._finish(reason)

    async def _failed_reply(self, reply: AssistantMessage, error: str) -> None:
        """A generation error: shown as a message; the failed turn leaves the conversation the model
        sees (so the next message starts clean) but stays in the transcript and the export."""
        self.query_one("#conversation").mount(ErrorMessage(f"Generation failed: {error}"))
        await reply.finish("error")
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()
            self._message_widgets.pop()
        self.transcript.append({"role": "assistant", "content": reply.answer, "reasoning": reply.reasoning,
                                "finish_reason": "error", "error": error,
                                "stats": _stats_dict(self.throughput.current)})
        self._finish("error")

    def _finish(self, reason: str) -> None:
        self.generating = False
        self._set_status("" if reason != "stopped" else "stopped")

    def on_unmount(self) -> None:
        # Quitting mid-reply ends the generating thread at its next token, and the model goes now rather
        # than at interpreter exit, where nanobind reports every engine layer still alive as a leak.
        self._stop.set()
        self.runner = None

    # ---------------------------------------------------------------- panel
    def _show_speed(self) -> None:
        self.query_one(StatsPanel).show_speed(self.throughput, self.context_used, getattr(self, "context_size", 0))

    def _show_routing(self) -> None:
        self._routing_at = time.monotonic()
        try:
            routed = self.runner.routing_counts() if self.runner is not None else None
        except Exception:  # noqa: BLE001
            routed = None
        if routed is not None:
            self.query_one(StatsPanel).heatmap.set_counts(*routed)

    def _sample_system(self) -> None:
        if not self.is_running:
            return  # as in _drain
        self.query_one(StatsPanel).show_system(*self.sysinfo())

    def _set_status(self, text: str) -> None:
        self.query_one("#status", Static).update(text)

    # ---------------------------------------------------------------- keys
    def check_action(self, action: str, parameters) -> bool | None:
        if action in ("new_chat", "settings", "export") and len(self.screen_stack) > 1:
            return False  # not under the settings dialog
        return True

    def action_stop(self) -> None:
        if self.generating:
            self._stop.set()

    def action_new_chat(self) -> None:
        if self.generating:
            self._stop.set()
        self.messages.clear()
        self._message_widgets.clear()
        self.transcript.clear()
        self._dropped = 0
        self.throughput = Throughput()
        self.context_used = 0
        self._reply = None
        self.query_one("#conversation").remove_children()
        if self.runner is not None:
            try:
                self.runner.record_routing(True)
            except Exception:  # noqa: BLE001
                pass
        self.query_one(StatsPanel).heatmap.set_counts([], [])
        self._show_speed()
        self._set_status("new conversation")

    def action_settings(self) -> None:
        def apply(new: ChatSettings | None) -> None:
            if new is not None:
                self.settings = new
                for reply in self.query(AssistantMessage):
                    reply.set_show_reasoning(new.show_reasoning)
                self._set_status(f"temperature {new.params.temperature}, top-p {new.params.top_p}, "
                                 f"top-k {new.params.top_k}, min-p {new.params.min_p}, "
                                 f"max {new.params.max_tokens} tokens")
        self.push_screen(SettingsScreen(self.settings), apply)

    def action_export(self) -> None:
        paths = self.export()
        self.notify(f"saved {paths[0].name} and {paths[1].name}", title="Exported")

    def export(self) -> tuple[Path, Path]:
        """Write the conversation to tandem-chat-<time>.md and .json in the export directory."""
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        base = self.export_dir / f"tandem-chat-{stamp}"
        md = [f"# Tandem chat, {stamp}\n"]
        if self.settings.system:
            md.append(f"**System:** {self.settings.system}\n")
        for m in self.transcript:
            if m["role"] == "user":
                md.append(f"## User\n\n{m['content']}\n")
            else:
                md.append("## Assistant\n")
                if m.get("reasoning"):
                    md.append("> " + m["reasoning"].strip().replace("\n", "\n> ") + "\n")
                md.append(f"{m['content']}\n")
        self.export_dir.mkdir(parents=True, exist_ok=True)
        base.with_suffix(".md").write_text("\n".join(md))
        base.with_suffix(".json").write_text(json.dumps(
            {"model": str(getattr(self.runner, "path", self.model_path)), "system": self.settings.system,
             "messages": self.transcript}, indent=2))
        return base.with_suffix(".md"), base.with_suffix(".json")


def _stats_dict(stats) -> dict | None:
    if stats is None:
        return None
    return {"prompt_tokens": stats.prompt_tokens, "cached_tokens": stats.cached_tokens,
            "generated_tokens": stats.generated_tokens,
            "prompt_tps": round(stats.prompt_tps, 2), "decode_tps": round(stats.decode_tps, 2),
            "ttft_ms": round(stats.ttft_seconds * 1000, 1)}


def run(model=None, **kwargs) -> None:
    ChatApp(model, **kwargs).run()

