"""`optvq eval` (placeholder until its issue lands)."""

from .app import app, not_yet


@app.command(name="eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def eval_() -> None:
    """PSNR / SSIM / LPIPS / rFID of reconstructions (not implemented yet)."""
    not_yet("eval", 5)
