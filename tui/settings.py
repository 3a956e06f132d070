"""Ctrl+S: sampling settings, system prompt and whether reasoning is shown."""

from __future__ import annotations

from dataclasses import dataclass, replace

from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Label, Static

from local import SamplingParams


@dataclass(frozen=True)
class ChatSettings:
    params: SamplingParams = SamplingParams(max_tokens=512, temperature=0.7, top_p=0.95, min_p=0.05)
    system: str = ""
    show_reasoning: bool = True


FIELDS = (  # (field, label, parse)
    ("temperature", "temperature", float),
    ("top_p", "top-p", float),
    ("top_k", "top-k", int),
    ("min_p", "min-p", float),
    ("max_tokens", "max tokens", int),
)


class SettingsScreen(ModalScreen[ChatSettings | None]):
    """Edits a ChatSettings; dismisses with the new one (Save) or None (Esc / Cancel)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, settings: ChatSettings) -> None:
        super().__init__()
        self.settings = settings

    def compose(self):
        p = self.settings.params
        with Vertical(id="settings"):
            yield Static("Settings", id="settings-title")
            with Grid(id="settings-grid"):
                for name, label, _ in FIELDS:
                    yield Label(label)
                    yield Input(str(getattr(p, name)), id=f"set-{name}", compact=True)
                yield Label("system prompt")
                yield Input(self.settings.system, id="set-system", placeholder="(none)", compact=True)
                yield Label("show reasoning")
                yield Checkbox("", self.settings.show_reasoning, id="set-reasoning", compact=True)
            yield Static("", id="settings-error")
            with Horizontal(id="settings-buttons"):
                yield Button("Save", variant="primary", id="save", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "save":
            self.action_save()
        else:
            self.action_cancel()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.action_save()

    def action_save(self) -> None:
        values = {}
        try:
            for name, label, parse in FIELDS:
                raw = self.query_one(f"#set-{name}", Input).value.strip()
                try:
                    values[name] = parse(raw)
                except ValueError:
                    raise ValueError(f"{label}: '{raw}' is not a {'whole ' if parse is int else ''}number") from None
            params = replace(self.settings.params, **values)  # SamplingParams checks the ranges
        except ValueError as e:
            self.query_one("#settings-error", Static).update(str(e))
            return
        self.dismiss(ChatSettings(params, self.query_one("#set-system", Input).value,
                                  self.query_one("#set-reasoning", Checkbox).value))

    def action_cancel(self) -> None:
        self.dismiss(None)
