"""`optvq toy` (placeholder until the toy experiment lands)."""

from .app import app, not_yet


@app.command()
def toy() -> None:
    """The paper's 2-D experiment (Fig. 6) and Sinkhorn convergence (Fig. 9)."""
    not_yet("toy", 2)
