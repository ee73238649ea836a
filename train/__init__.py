"""homefire.train: LoRA (or full) fine-tuning on Ray Train, handed to the registry and the running endpoint.

    homefire train train/configs/demo-lora.yaml --serve

``run_training(cfg)`` is the same from Python.
"""

if __name__ != "homefire.train":  # the folder is mapped into the homefire namespace
    raise ImportError(
        f"'{__name__}' was imported from the repository's train/ folder; import it as homefire.train "
        "(pip install -e . maps train/ to homefire.train)"
    )

from homefire.train.config import TrainConfig, load_train_config
from homefire.train.trainer import RunReport, run_training

__all__ = ["RunReport", "TrainConfig", "load_train_config", "run_training"]
