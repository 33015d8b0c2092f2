"""Run logs: a JSON-lines file that scripts read and TensorBoard scalars that people look at."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # One progress bar per run is ours; transformers' per-load bars would bury it.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


class MetricLogger:
    def __init__(self, output_dir: str | Path, enabled: bool = True) -> None:
        self.enabled = enabled
        if not enabled:
            return
        self.path = Path(output_dir) / "log.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tensorboard = self._writer()

    def _writer(self, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter  # imported here: tensorboard is slow to import

        return SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=purge_step)

    def cut_back(self, step: int) -> None:
        """On resume from ``step``: the rows a stopped run wrote after its checkpoint go (and a half-written last
        line), and TensorBoard drops its events after the step, so no step appears twice."""
        if not self.enabled:
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines() if self.path.is_file() else []:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self.tensorboard.close()
        self.tensorboard = self._writer(purge_step=step + 1)

    def log(self, step: int, split: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        # Strict JSON: a non-finite value is null (json.dumps would write NaN, which JSON parsers refuse).
        row = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in values.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "split": split, "time": time.time(), **row}, allow_nan=False) + "\n")
        for key, value in values.items():
            self.tensorboard.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            self.tensorboard.close()
