"""The demo's stage runner: one line per stage, a log file per stage, reuse of finished stages.

A stage is a named step with the settings that determine its output (`config`), the folders it
writes (`outputs`) and a function that does the work and returns a JSON-able summary. The runner

- hashes `config` together with the hashes of the stages run before it, so that changing an
  upstream stage (a setting, or being redone) redoes everything downstream of it;
- skips a stage whose done marker (`OUT/stages/NAME.json`) carries the same hash, and reuses its
  summary: a rerun of the demo redoes only what changed or never finished;
- lets a stage that was killed part-way resume from what it left (the jobs skip finished shards and
  resume from their newest complete checkpoint) when its settings are the same, and deletes its
  outputs first when they are not (a checkpoint of other settings must not be resumed);
- sends the stage's output to `OUT/logs/NAME.log` and prints one line of what it did and how long
  it took; a failure raises `StageFailed`, whose message names the stage and the log to read.
"""
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.shards import atomic_write_json

LOG_TAIL_LINES = 15  # lines of a failed stage's log repeated on the console


class StageFailed(RuntimeError):
    """A stage did not finish; the message names the stage and the log file to read."""

    def __init__(self, stage: str, log_path: Path, reason: str):
        super().__init__(f"stage {stage!r} failed ({reason}): read {log_path}")
        self.stage, self.log_path = stage, log_path


@dataclass
class Stage:
    name: str
    config: dict                          # everything its output depends on (JSON-able)
    work: Callable[[Path], dict]          # work(log_path) -> summary (JSON-able)
    describe: Callable[[dict], str]       # summary -> the one line printed
    outputs: list[Path] = field(default_factory=list)  # deleted before a run with other settings


def config_hash(config: dict, upstream: list[str]) -> str:
    text = json.dumps({"config": config, "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class StageRunner:
    """Runs stages in order under OUT/stages (markers) and OUT/logs (one log per stage)."""

    def __init__(self, out_dir: Path, reuse: bool = True, echo: Callable[[str], None] = print):
        self.out_dir, self.reuse, self.echo = Path(out_dir), reuse, echo
        self.hashes: list[str] = []       # of the stages run so far, in order
        self.reused: list[str] = []       # stages whose earlier result was reused
        (self.out_dir / "stages").mkdir(parents=True, exist_ok=True)
        (self.out_dir / "logs").mkdir(parents=True, exist_ok=True)

    def log_path(self, name: str) -> Path:
        return self.out_dir / "logs" / f"{name}.log"

    def _marker(self, name: str, kind: str) -> Path:
        return self.out_dir / "stages" / f"{name}.{kind}.json"

    def _read(self, path: Path) -> dict | None:
        return json.loads(path.read_text()) if path.is_file() else None

    def run(self, stage: Stage) -> dict:
        """The stage's summary: from its done marker when the hash matches, else by running it."""
        digest = config_hash(stage.config, self.hashes)
        self.hashes.append(digest)
        done = self._read(self._marker(stage.name, "done"))
        if self.reuse and done is not None and done["hash"] == digest:
            self.reused.append(stage.name)
            self.echo(f"[demo] {stage.name:<17} reused ({done['line']}; took {done['seconds']:.1f} s)")
            return done["summary"]
        self._prepare(stage, digest)
        start, cpu_start = time.perf_counter(), cpu_seconds()
        summary = stage.work(self.log_path(stage.name))
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
        line = stage.describe(summary)
        atomic_write_json(self._marker(stage.name, "done"), {"hash": digest, "config": stage.config, "line": line,
                                                            "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
                                                            "summary": summary})
        self.echo(f"[demo] {stage.name:<17} {line} ({seconds:.1f} s)")
        return summary

    def _prepare(self, stage: Stage, digest: str) -> None:
        """Forget the old result; keep a killed run's partial outputs only if made with these settings."""
        self._marker(stage.name, "done").unlink(missing_ok=True)
        started = self._read(self._marker(stage.name, "started"))
        if not (self.reuse and started is not None and started["hash"] == digest):
            for path in stage.outputs:
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        self.log_path(stage.name).unlink(missing_ok=True)
        atomic_write_json(self._marker(stage.name, "started"), {"hash": digest, "config": stage.config})

    def elapsed(self, name: str, key: str = "seconds") -> float:
        """Wall time (key "seconds") or CPU time ("cpu_seconds") of a stage when it ran: in this run,
        or in the run whose result was reused."""
        done = self._read(self._marker(name, "done")) or {}
        return float(done.get(key, 0.0))


def cpu_seconds() -> float:
    """User + system CPU time of this process and of the child processes it has waited for (the jobs
    and their torchrun ranks; daemons a job leaves behind are not counted). On a machine shared with
    other work, wall time grows with the load; CPU time much less."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_logged(stage: str, command: list[str], log_path: Path, env: dict[str, str] | None = None) -> str:
    """Run `command` with its stdout and stderr appended to `log_path`; returns what it wrote there.
    StageFailed on a non-zero exit, after repeating the end of the log on the console."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        start = log_path.stat().st_size
        done = subprocess.run(command, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
    with open(log_path, "rb") as log:
        log.seek(start)
        output = log.read().decode(errors="replace")
    if done.returncode != 0:
        tail = output.splitlines()[-LOG_TAIL_LINES:]
        print("\n".join(f"  | {line}" for line in tail), file=sys.stderr, flush=True)
        raise StageFailed(stage, log_path, f"exit code {done.returncode}")
    return output


def last_json_line(output: str, stage: str, log_path: Path) -> dict:
    """The job's summary: the last output line that is a JSON object (jobs.config.hydra_main prints it)."""
    for line in reversed(output.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise StageFailed(stage, log_path, "it printed no JSON summary line")
