"""Where a run's numbers go: metrics.jsonl, TensorBoard (via clu), and a console progress line.

Only process 0 writes files. Rows follow the public contract in docs/design.md: `step` is the
number of updates done, `epoch` the fraction of epochs done, `lr` the rate that step's
update used, `time` the Unix time the row was written (for wall-clock reports). A resumed
run first drops the rows written after its checkpoint, so the file never holds a step twice.
"""

import json
import os
import time

import jax
import ml_collections
from absl import logging
from clu import metric_writers


def _format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class MetricsLogger:

    def __init__(self, workdir: str, config: ml_collections.ConfigDict, *, total_steps: int,
                 steps_per_epoch: int, start_step: int):
        self.is_chief = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.global_batch_size = config.global_batch_size
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.last_step, self.last_time = start_step, time.perf_counter()
        if self.is_chief:
            os.makedirs(workdir, exist_ok=True)
            with open(os.path.join(workdir, "config.json"), "w") as f:
                json.dump(config.to_dict(), f, indent=2, sort_keys=True)
            self._drop_rows_after(start_step)
        # TensorBoard events from process 0 only; the console line below is our own.
        self.writer = metric_writers.AsyncWriter(
            metric_writers.SummaryWriter(workdir) if self.is_chief
            else metric_writers.MultiWriter([]))

    def _drop_rows_after(self, step: int) -> None:
        """Keep the rows up to the resumed step; a line cut off by a crash is dropped too."""
        if not os.path.exists(self.path):
            return
        kept = []
        with open(self.path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except (json.JSONDecodeError, KeyError):
                    continue
        with open(self.path, "w") as f:
            f.writelines(kept)

    def _write(self, row: dict) -> None:
        if self.is_chief:
            with open(self.path, "a") as f:
                f.write(json.dumps({**row, "time": round(time.time(), 3)}) + "\n")
        self.writer.write_scalars(row["step"], {k: v for k, v in row.items() if k != "step"})

    def write_train(self, step: int, values: dict[str, float]) -> None:
        """Log one step's metrics, with the throughput since the previous row and an ETA."""
        now = time.perf_counter()
        seconds_per_step = (now - self.last_time) / max(step - self.last_step, 1)
        self.last_step, self.last_time = step, now
        row = {"step": step, "epoch": step / self.steps_per_epoch, **values,
               "images_per_sec": self.global_batch_size / seconds_per_step}
        self._write(row)
        eta = _format_seconds((self.total_steps - step) * seconds_per_step)
        logging.info("step %d/%d | epoch %.2f | loss %.4f | top1 %.3f | lr %.5f | %.0f img/s | "
                     "ETA %s", step, self.total_steps, row["epoch"], values["loss"],
                     values["train_top1"], values["lr"], row["images_per_sec"], eta)

    def write_eval(self, step: int, values: dict[str, float]) -> None:
        self._write({"step": step, "epoch": step / self.steps_per_epoch, **values})
        logging.info("eval at step %d | top1 %.4f | top5 %.4f | loss %.4f", step,
                     values["eval_top1"], values["eval_top5"], values["eval_loss"])
        # Evaluation time is not training time: restart the throughput clock.
        self.last_step, self.last_time = step, time.perf_counter()

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
