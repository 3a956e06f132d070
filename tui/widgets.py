"""The chat screen's parts: messages, the prompt box, the stats panel and the expert-routing heatmap."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.color import Color
from rich.text import Text
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Collapsible, Markdown, Sparkline, Static, TextArea

from local import Stats


def human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.1f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def describe_line(info: dict) -> str:
    """One line about the model for the header: architecture, parameters, types, placement, threads."""
    types = "/".join(info.get("types", [])[:3]) or "?"
    return (f"{info.get('architecture', '?')} · {human(info.get('total_params', 0))} params "
            f"({human(info.get('active_params', 0))} active) · {types} · {info.get('placement', '?')} · "
            f"{info.get('threads', '?')} threads")


class PromptInput(TextArea):
    """Multi-line input: Enter sends; Shift+Enter or Ctrl+J starts a new line."""

    BINDINGS = [Binding("ctrl+j,shift+enter", "newline", "New line", show=False)]

    class Submitted(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    async def _on_key(self, event) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            text = self.text.strip()
            if text:
                self.post_message(self.Submitted(text))
            return
        await super()._on_key(event)

    def action_newline(self) -> None:
        self.insert("\n")


class UserMessage(Static):
    pass


class ErrorMessage(Static):
    pass


class AssistantMessage(Vertical):
    """One reply: reasoning (dimmed, collapsible, with its token count), the Markdown answer, a footer."""

    def __init__(self, show_reasoning: bool = True) -> None:
        super().__init__()
        self.answer = ""
        self.reasoning = ""
        self.reasoning_tokens = 0
        self.finish_reason: str | None = None
        self.show_reasoning = show_reasoning
        self._reasoning_text = Static("", classes="reasoning-text")
        self._collapsible = Collapsible(self._reasoning_text, title="Reasoning", collapsed=False)
        self._collapsible.display = False
        self._markdown = Markdown("")
        self._footer = Static("", classes="reply-footer")
        self._stream = None

    def compose(self):
        yield self._collapsible
        yield self._markdown
        yield self._footer

    async def add(self, text: str, reasoning: bool, tokens: int) -> None:
        if reasoning:
            self.reasoning += text
            self.reasoning_tokens += tokens
            self._reasoning_text.update(self.reasoning.strip())
            self._collapsible.title = f"Reasoning ({self.reasoning_tokens} tokens)"
            self._collapsible.display = self.show_reasoning
        elif text:
            if not self.answer and self.reasoning:  # the answer started: fold the reasoning away
                self._collapsible.collapsed = True
            self.answer += text
            if self._stream is None:
                self._stream = Markdown.get_stream(self._markdown)
            await self._stream.write(text)

    async def finish(self, footer: str) -> None:
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        self._footer.update(footer)

    def set_show_reasoning(self, show: bool) -> None:
        self.show_reasoning = show
        self._collapsible.display = show and bool(self.reasoning)


@dataclass
class Throughput:
    """Figures for the stats panel, the current reply and the last finished one."""

    current: Stats | None = None
    last: Stats | None = None
    history: list[float] = field(default_factory=list)  # decode tok/s of each finished reply


class StatsPanel(Vertical):
    """Live side panel: speeds, TTFT, sparkline, context, CPU/RSS/GPU, routing heatmap."""

    def __init__(self) -> None:
        super().__init__(id="stats")
        self.speed = Static("", id="speed")
        self.sparkline = Sparkline([], id="sparkline")
        self.system = Static("", id="system")
        self.heatmap = Heatmap(id="heatmap")

    def compose(self):
        yield self.speed
        yield self.sparkline
        yield self.system
        yield Static("routing: layer × expert", id="heatmap-title")
        yield self.heatmap

    def show_speed(self, t: Throughput, context_used: int, context_size: int) -> None:
        def col(s: Stats | None, attr: str, fmt: str) -> str:
            if s is None:
                return "—"
            v = getattr(s, attr)
            return fmt.format(v * 1000 if attr == "ttft_seconds" else v)

        rows = [("", "now", "last"),
                ("prompt t/s", col(t.current, "prompt_tps", "{:.1f}"), col(t.last, "prompt_tps", "{:.1f}")),
                ("decode t/s", col(t.current, "decode_tps", "{:.1f}"), col(t.last, "decode_tps", "{:.1f}")),
                ("TTFT ms", col(t.current, "ttft_seconds", "{:.0f}"), col(t.last, "ttft_seconds", "{:.0f}"))]
        text = Text()
        for i, (name, now, last) in enumerate(rows):
            text.append(f"{name:<11}", style="bold" if i == 0 else "")
            text.append(f"{now:>7}", style="bold" if i == 0 else "green")
            text.append(f"{last:>8}\n", style="bold" if i == 0 else "")
        text.append(f"context    {context_used} / {context_size}")
        self.speed.update(text)
        self.sparkline.data = t.history[-64:] or [0.0]

    def show_system(self, cpu_percent: float, rss: int, gpu: int | None) -> None:
        line = f"CPU {cpu_percent:>4.0f}%  RSS {human(rss, 'B')}"
        line += f"\nGPU {human(gpu, 'B')}" if gpu is not None else "\nGPU none"
        self.system.update(line)


HEAT_LOW, HEAT_HIGH = Color.parse("#203040").triplet, Color.parse("#ffb000").triplet


class Heatmap(Static):
    """Rows are MoE layers, columns routed experts (binned to fit); brightness = how often each fired.
    A dot marks an expert (bin) that never fired."""

    def __init__(self, **kwargs) -> None:
        super().__init__("", **kwargs)
        self.moe_layers: list[int] = []
        self.counts = None  # [layers, experts] tensor or nested list

    def set_counts(self, layers: list[int], counts) -> None:
        self.moe_layers = list(layers)
        self.counts = counts.tolist() if hasattr(counts, "tolist") else counts
        self.refresh()  # its size is the layout's (CSS), not its content's: a repaint, no layout pass

    def render(self):
        return self.grid_text(self.size.width, self.size.height)

    def grid_text(self, width: int, height: int) -> Text:
        """The heatmap in `width` x `height` cells (4 columns of layer labels)."""
        if not self.counts:
            return Text("no routing yet", style="dim")
        width, height = max(width - 4, 4), max(height, 1)
        n_layers, n_experts = len(self.counts), len(self.counts[0])
        per_cell = -(-n_experts // width)
        per_row = -(-n_layers // height)
        rows = []
        for r in range(0, n_layers, per_row):
            group = self.counts[r:r + per_row]
            rows.append((self.moe_layers[r], [sum(sum(row[c:c + per_cell]) for row in group)
                                          for c in range(0, n_experts, per_cell)]))
        peak = max((v for _, row in rows for v in row), default=0) or 1
        text = Text()
        for k, (layer, row) in enumerate(rows):
            text.append(f"{layer:>3} ", style="dim")
            for v in row:
                if v == 0:
                    text.append("·", style="#505050")
                else:
                    f = v / peak
                    rgb = tuple(int(lo + (hi - lo) * f) for lo, hi in zip(HEAT_LOW, HEAT_HIGH))
                    text.append("█", style=f"rgb({rgb[0]},{rgb[1]},{rgb[2]})")
            if k < len(rows) - 1:
                text.append("\n")
        return text
