"""`optvq encode / decode / reconstruct` (placeholder until its issue lands)."""

from .app import app, not_yet


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def encode() -> None:
    """Encode images to token grids (not implemented yet)."""
    not_yet("encode", 4)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def decode() -> None:
    """Decode token grids to images (not implemented yet)."""
    not_yet("decode", 4)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def reconstruct() -> None:
    """Encode and decode images in one pass (not implemented yet)."""
    not_yet("reconstruct", 4)
