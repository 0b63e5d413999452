"""Pick matplotlib's Agg backend when there is no display (headless servers, CI)."""
import os
import sys

import matplotlib


def use_agg_without_display() -> None:
    """Switch to Agg unless a display is available or a notebook / user already chose a backend."""
    if "matplotlib.pyplot" in sys.modules or "MPLBACKEND" in os.environ:
        return
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        matplotlib.use("Agg")
