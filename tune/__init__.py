"""homefire.tune: Ray Tune sweeps over a model's optimized variants, measured on the engines that would serve them.

    homefire tune tune/configs/demo-quantize.yaml

``run_tune(load_tune_config(path))`` is the same from Python.
"""

if __name__ != "homefire.tune":  # the folder is mapped into the homefire namespace
    raise ImportError(
        f"'{__name__}' was imported from the repository's tune/ folder; import it as homefire.tune "
        "(pip install -e . maps tune/ to homefire.tune)"
    )

from homefire.tune.config import TuneConfig, load_tune_config
from homefire.tune.runner import TuneReport, run_tune

__all__ = ["TuneConfig", "TuneReport", "load_tune_config", "run_tune"]
