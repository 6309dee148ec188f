"""The worker process and its client: long jobs run outside Slicer's process, which stays responsive.

Protocol (one JSON object per line, UTF-8):

* start ``python -m MedKDSegmentLib.worker`` with ``MedKDSegment/`` on ``PYTHONPATH``; it imports
  torch and MONAI once and answers ``{"event": "ready", "pid": ..., "devices": [...], "import_seconds": ...}``;
* the parent writes one job spec per line on stdin, e.g. ``{"job": "segment", "id": "7", "input":
  "in.nrrd", "modality": "CT", "model": "phantom-abdomen-ct-student", "device": "auto", "output":
  "out.nrrd"}`` (``compare``, ``finetune`` and ``devices`` too; see ``jobs.run_spec``);
* a ``finetune`` job names ``parent`` and ``output`` bundle folders, ``cases`` (``name``, ``image`` and
  ``labels`` NRRD files, the ``annotated`` label values, ``modality``), ``settings`` (``FineTuneConfig``
  fields) and ``resume``; its progress stages read ``epoch E/N loss L`` (the live loss curve) and its
  outputs are the new version's path, name and version with the before/after Dice and epoch losses;
* ``train_teacher`` (``data``, ``modality``), ``distill`` (``data``, ``teachers``, ``weights``,
  ``assistant``) and ``distill_unpaired`` (``ct_data``, ``mr_data``, ``ct_teacher``, ``mr_teacher``) name
  an ``output`` bundle folder and ``settings`` (``TrainingConfig`` fields, e.g. ``methods``, plus
  ``architecture``...), and ``resume``; they run ``jobs.train_model``, report ``epoch E/N loss L`` (a
  chain prefixes ``assistant: `` / ``student: ``) and answer with the new bundle's path, name, the methods
  and teachers its metadata records, and the epoch losses;
* ``install-teacher`` (``name``, ``models_dir``, optional ``package_file``) fetches or takes a published
  teacher's pinned file and converts it into a bundle (``engine.published``); it answers with its path;
* the worker answers ``{"event": "progress", "id": ..., "fraction": 0.42, "stage": "inference"}`` lines,
  then ``{"event": "done", "id": ..., "outputs": {...}, "seconds": ...}`` or ``{"event": "error", "id": ...,
  "message": ..., "problem": ..., "fix": ..., "type": ...}``, and waits for the next job (it stays warm:
  loaded networks are cached);
* cancel terminates the worker's whole process tree (the parent then deletes the job's files, so
  nothing partial remains); end of stdin or ``{"job": "shutdown"}`` ends it cleanly.

Volumes travel as temporary uncompressed NRRD files (written atomically). Nothing here imports
slicer or Qt: the client is a plain ``subprocess`` with reader threads, and the Slicer widget polls
it from a ``qt.QTimer``.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

LIB_PARENT = Path(__file__).resolve().parents[1]  # the MedKDSegment/ folder, which holds MedKDSegmentLib
TERMINAL_EVENTS = ("done", "error", "cancelled")


class WorkerError(RuntimeError):
    """The worker failed a job or died; ``event`` is the error event it sent (or made up for it)."""

    def __init__(self, event: dict) -> None:
        self.event = event
        super().__init__(event.get("message", "the worker failed"))


# --- the child process ---------------------------------------------------------------------------------


def _protocol_stream():
    """A private line-buffered copy of stdout for protocol lines; fd 1 then points to stderr so that a
    stray print or a C library's output can never corrupt the protocol."""
    stream = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    return stream


def main() -> int:
    started = time.perf_counter()
    protocol = _protocol_stream()
    lock = threading.Lock()

    def send(event: dict) -> None:
        with lock:
            protocol.write(json.dumps(event) + "\n")
            protocol.flush()

    try:
        # The expensive imports happen once per worker, before the first job.
        import monai  # noqa: F401
        import torch

        from . import jobs
        from .engine.device import available_devices
        from .engine.errors import MedKDError
    except Exception as error:  # noqa: BLE001 (any import failure: say so on the protocol, then stop)
        send({"event": "error", "id": None, "message": f"The worker could not start: {error}", "type": "startup",
              "problem": f"The worker could not import its dependencies ({error}).",
              "fix": "Install torch, monai, SimpleITK and scipy in the Python that runs the worker."})
        return 1
    cache = jobs.NetworkCache()
    send({"event": "ready", "pid": os.getpid(), "devices": available_devices(), "torch": torch.__version__,
          "python": sys.executable, "import_seconds": round(time.perf_counter() - started, 3)})

    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            spec = json.loads(line)
        except json.JSONDecodeError as error:
            send({"event": "error", "id": None, "message": f"Not a JSON job spec: {error}", "type": "protocol"})
            continue
        if not isinstance(spec, dict):
            send({"event": "error", "id": None, "message": f"A job spec is a JSON object, not {type(spec).__name__}",
                  "type": "protocol"})
            continue
        job_id = spec.get("id")
        if spec.get("job") == "shutdown":
            break
        job_started = time.perf_counter()
        last = {"time": 0.0, "stage": None}

        def progress(fraction: float, stage: str, job_id=job_id, last=last) -> None:
            now = time.perf_counter()
            # At most ~20 lines a second, but never drop a change of stage or the end.
            if now - last["time"] >= 0.05 or stage != last["stage"] or fraction >= 1.0:
                last.update(time=now, stage=stage)
                send({"event": "progress", "id": job_id, "fraction": round(float(fraction), 4), "stage": stage})

        try:
            progress(0.0, "starting")
            outputs = jobs.run_spec(spec, progress, cache=cache)
            send({"event": "done", "id": job_id, "outputs": outputs,
                  "seconds": round(time.perf_counter() - job_started, 4)})
        except MedKDError as error:
            send({"event": "error", "id": job_id, "message": str(error), "problem": error.problem, "fix": error.fix,
                  "type": type(error).__name__})
        except Exception as error:  # noqa: BLE001 (report it, stay alive for the next job)
            send({"event": "error", "id": job_id, "message": f"{type(error).__name__}: {error}",
                  "type": type(error).__name__, "traceback": traceback.format_exc()})
    return 0


# --- the parent's side ---------------------------------------------------------------------------------


class WorkerClient:
    """Start, feed and stop one warm worker; thread-safe to poll from a GUI timer.

    ``submit`` sends a job (starting the worker if needed), ``events`` drains what arrived,
    ``wait`` blocks until the job ends, ``cancel`` kills the process tree.
    """

    def __init__(self, python: str | None = None, env: dict | None = None, startup_timeout: float = 300.0) -> None:
        self.python = python or sys.executable
        self.env = env
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self.ready: dict | None = None  # the worker's "ready" event
        self.current_job: str | None = None
        self._events: queue.Queue = queue.Queue()
        self._stderr: collections.deque = collections.deque(maxlen=40)
        self._ids = itertools.count(1)
        self._cancelled: set = set()
        self._lock = threading.Lock()

    # lifecycle -----------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def busy(self) -> bool:
        return self.current_job is not None

    def start(self) -> None:
        """Spawn the worker (non-blocking; its ``ready`` event arrives through ``events``)."""
        if self.running:
            return
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONPATH"] = os.pathsep.join([str(LIB_PARENT)] + [p for p in [env.get("PYTHONPATH")] if p])
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("PYTHONIOENCODING", "utf-8")
        kwargs: dict = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True  # its own process group: cancel kills the whole tree
        self.ready = None
        self._events = queue.Queue()
        self.process = subprocess.Popen(
            [self.python, "-m", "MedKDSegmentLib.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=env, text=True, encoding="utf-8", errors="replace", bufsize=1, **kwargs,
        )
        process, events = self.process, self._events
        threading.Thread(target=self._read_stdout, args=(process, events), daemon=True).start()
        threading.Thread(target=self._read_stderr, args=(process,), daemon=True).start()

    def _read_stdout(self, process: subprocess.Popen, events: queue.Queue) -> None:
        for line in process.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = {"event": "log", "message": line}
            if not isinstance(event, dict):
                event = {"event": "log", "message": line}
            if event.get("event") == "ready" and process is self.process:
                self.ready = event
            events.put(event)
        code = process.wait()
        with self._lock:
            job = None
            if process is self.process:  # a worker killed by cancel must not touch its successor's job
                job, self.current_job = self.current_job, None
        if job is not None and job not in self._cancelled:
            tail = "\n".join(self._stderr)
            events.put({"event": "error", "id": job, "type": "crash",
                        "message": f"The worker process stopped unexpectedly (exit code {code}).\n{tail}".strip()})
        events.put({"event": "exit", "returncode": code})

    def _read_stderr(self, process: subprocess.Popen) -> None:
        for line in process.stderr:
            self._stderr.append(line.rstrip())

    def stderr_tail(self) -> str:
        return "\n".join(self._stderr)

    # jobs ----------------------------------------------------------------------------------------------

    def submit(self, spec: dict) -> str:
        """Send one job spec; returns its id. One job at a time."""
        with self._lock:
            if self.current_job is not None:
                raise RuntimeError(f"the worker is busy with job {self.current_job}")
            self.start()
            spec = dict(spec)
            spec["id"] = str(spec.get("id") or f"job-{next(self._ids)}")
            self.current_job = spec["id"]
        try:
            self.process.stdin.write(json.dumps(spec) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError) as error:
            with self._lock:
                self.current_job = None
            raise WorkerError({"event": "error", "id": spec["id"], "type": "crash",
                               "message": f"Could not send the job to the worker ({error}). {self.stderr_tail()}"}) \
                from error
        return spec["id"]

    def events(self) -> list[dict]:
        """Everything that arrived since the last call (non-blocking)."""
        drained = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return drained
            self._note(event)
            drained.append(event)

    def _note(self, event: dict) -> None:
        if event.get("event") in TERMINAL_EVENTS and event.get("id") is not None:
            with self._lock:
                if self.current_job == event.get("id"):
                    self.current_job = None

    def wait(self, job_id: str, timeout: float | None = None, on_event=None) -> dict:
        """Block until ``job_id`` ends; returns its ``done`` event or raises ``WorkerError``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                event = self._events.get(timeout=remaining if remaining is not None else 1.0)
            except queue.Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"job {job_id} did not finish in {timeout} s") from None
                continue
            self._note(event)
            if on_event is not None:
                on_event(event)
            kind = event.get("event")
            if kind == "error" and event.get("id") in (job_id, None):
                raise WorkerError(event)
            if kind == "cancelled" and event.get("id") == job_id:
                raise WorkerError(event)
            if kind == "done" and event.get("id") == job_id:
                return event

    def run(self, spec: dict, timeout: float | None = None, on_event=None) -> dict:
        """``submit`` then ``wait``: the outputs of one job."""
        return self.wait(self.submit(spec), timeout, on_event)["outputs"]

    def wait_ready(self, timeout: float | None = None) -> dict:
        """Start the worker if needed and block until it has imported torch and MONAI."""
        self.start()
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        while self.ready is None:
            if not self.running and self.ready is None:
                for event in self.events():
                    if event.get("event") == "error":
                        raise WorkerError(event)
                raise WorkerError({"event": "error", "type": "crash",
                                   "message": f"The worker did not start. {self.stderr_tail()}"})
            if time.monotonic() > deadline:
                raise TimeoutError("the worker did not become ready in time")
            time.sleep(0.01)
        return self.ready

    # stopping ------------------------------------------------------------------------------------------

    def cancel(self) -> None:
        """Kill the worker's process tree now; the running job ends with a ``cancelled`` event."""
        with self._lock:
            job, self.current_job = self.current_job, None
            if job is not None:
                self._cancelled.add(job)
        self._kill_tree()
        if job is not None:
            self._events.put({"event": "cancelled", "id": job})

    def _kill_tree(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        try:
            if os.name == "nt":
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, check=False)
            else:
                os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, OSError):
            process.kill()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()

    def close(self, timeout: float = 5.0) -> None:
        """Ask the worker to stop; kill it if it does not within ``timeout``."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            try:
                process.stdin.write(json.dumps({"job": "shutdown"}) + "\n")
                process.stdin.close()
                process.wait(timeout=timeout)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                self._kill_tree()
        self.process = None
        self.current_job = None

    def __del__(self) -> None:  # never leave an orphaned worker behind
        with contextlib.suppress(Exception):
            self._kill_tree()


if __name__ == "__main__":
    sys.exit(main())
