"""The pydoc-cloze docs for the lm-eval task in ``pydoc_cloze.yaml`` (``custom_dataset: !function pydoc_cloze.load``).

Read from this file's location rather than through ``dataset_path: json``, whose relative ``data_files`` resolve
against the working directory: the task then runs from any directory and from an installed wheel, fully offline.
"""

from __future__ import annotations

import json
from pathlib import Path

DATA_PATH = Path(__file__).resolve().parents[1] / "tasks" / "pydoc-cloze.jsonl"


def load(**_metadata):
    """Returns the docs (``prompt``, ``reference``, ``source``) as the task's ``test`` split.

    Args:
        _metadata: what lm-eval passes every custom loader (the task's metadata and the model args); unused.

    Returns:
        A ``datasets.DatasetDict`` with one split, ``test``.
    """
    import datasets

    rows = [json.loads(line) for line in DATA_PATH.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
