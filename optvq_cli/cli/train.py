"""`optvq train` (placeholder until its issue lands)."""

from .app import app, not_yet


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train() -> None:
    """Train a tokenizer (not implemented yet)."""
    not_yet("train", 6)
