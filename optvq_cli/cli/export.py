"""`optvq export / info` (placeholder until its issue lands)."""

from .app import app, not_yet


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def export() -> None:
    """Export a model (not implemented yet)."""
    not_yet("export", 3)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def info() -> None:
    """Describe a model (not implemented yet)."""
    not_yet("info", 3)
