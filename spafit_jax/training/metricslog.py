"""The run's log: metrics.jsonl and TensorBoard events, written by process 0 as the run goes.

`MetricsWriter` appends one record per log step, evaluation and epoch, and on resume drops what the
run will log again; `read_metrics` reads the records back (the report, resume).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from spafit_jax.training.rundir import METRICS, TENSORBOARD, WorkdirError, finite_json, naming, write_atomic

log = logging.getLogger("spafit_jax")


class MetricsWriter:
    """metrics.jsonl and TensorBoard events, written by process 0 only (`enabled`).

    Opening drops the records logged after `resume_step` (a run resumed from that checkpoint
    logs them again) and a torn last line (what a crash or a full disk leaves), with a warning.
    An eval record of a step and split already kept is not written again (resuming from the
    final checkpoint re-runs the same final evaluation), so no record is ever duplicated.
    """

    def __init__(self, workdir: Path, *, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX.event_file_writer import EventsWriter

        path = workdir / METRICS
        self.path, self.evals = path, set()
        if path.exists():
            kept = [(line, r) for line, r in read_metrics(path) if r["step"] <= resume_step]
            write_atomic(path, "".join(line + "\n" for line, _ in kept))
            self.evals = {(r["step"], r.get("split")) for _, r in kept if r.get("kind") == "eval"}
        with naming(path):
            self.jsonl = open(path, "a", encoding="utf-8")
        # Events are written in this thread (tensorboardX's EventsWriter, not SummaryWriter, whose
        # background thread dies on a full disk and then blocks the trainer for ever).
        with naming(workdir / TENSORBOARD):
            (workdir / TENSORBOARD).mkdir(exist_ok=True)
            self.tb = EventsWriter(str(workdir / TENSORBOARD / "events"))
        self.tb_path = Path(self.tb._file_name)  # events.out.tfevents.<time>.<host>, named in errors

    def write(self, record: dict) -> None:
        """Appends one record (a dict with "step") to metrics.jsonl and its numbers to TensorBoard."""
        if not self.enabled:
            return
        if record.get("kind") == "eval" and (record["step"], record.get("split")) in self.evals:
            return
        record = finite_json(record)  # NaN / inf as null: every line stays valid JSON
        with naming(self.path):  # a full disk: the caller stops; a torn line is dropped on resume
            self.jsonl.write(json.dumps(record, allow_nan=False) + "\n")
            self.jsonl.flush()
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        prefix = "/".join(str(record[k]) for k in ("kind", "split") if k in record) or "train"
        with naming(self.tb_path):
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    summary = scalar(f"{prefix}/{key}", float(value))
                    self.tb.write_event(Event(wall_time=time.time(), step=record["step"], summary=summary))
            self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            try:
                with naming(self.tb_path):
                    self.tb.close()
            finally:
                with naming(self.path):
                    self.jsonl.close()


def read_metrics(path: Path) -> list[tuple[str, dict]]:
    """(line, record) of each record of a metrics.jsonl. A torn last line is dropped with a
    warning; any other line that is not a JSON object with an integer "step" is a WorkdirError."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise WorkdirError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); move it aside to "
                           "start the log afresh") from None
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    out = []
    for i, line in numbered:
        try:
            record = json.loads(line)
            ok = isinstance(record, dict) and isinstance(record.get("step"), int)
        except json.JSONDecodeError:
            ok = False
        if ok:
            out.append((line, record))
        elif i == numbered[-1][0]:
            log.warning("%s: dropping the torn last line %d (a crash or a full disk cut it short): %.60r",
                        path, i, line)
        else:
            raise WorkdirError(f"{path} line {i} is not a metrics record ({line[:60]!r}); fix or delete that "
                               "line, or move the file aside")
    return out
