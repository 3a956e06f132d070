"""tui: the Textual chat app (`tandem chat`), a client of local's public API."""

from .app import ChatApp, run
from .settings import ChatSettings

__all__ = ["ChatApp", "ChatSettings", "run"]
