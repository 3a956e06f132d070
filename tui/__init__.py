"""tui: the Textual chat app (`tandem chat`), a client of local's public API."""
