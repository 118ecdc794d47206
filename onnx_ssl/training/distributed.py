"""Data-parallel training: N workers, each an onnxruntime-training Module, on torch.distributed.

Every worker holds the whole data set and the same artifacts. Each step takes the global
batch of the single-process run (the epoch's shuffled order, seeded alike on every worker)
and splits it like ``DistributedSampler``: worker ``r`` of ``W`` trains on samples
``r, r+W, r+2W, ...`` of the batch. After its forward and backward pass, every worker sums

    n_r * g_r   (its gradients, read and written through the live ``parameters[name].grad``
                 arrays of onnxruntime-training 1.19.2), n_r * its BatchNorm running
                 statistics, n_r * its loss terms, and n_r

with one all-reduce (gloo on CPU, NCCL where CUDA is present) and divides by ``sum n_r``,
so the optimizer steps with the gradient of the mean loss over the global batch, whatever
the optimizer (SGD, AdamW): the same update as one process, up to the order of the float
additions. The proximal step, the budget controller and the collapse checks then run on
every worker on identical parameters and agree without talking; once per epoch a digest
of the parameters is compared and rank 0's are broadcast should they ever differ.

BatchNorm normalises by each worker's own part of the batch (like PyTorch DDP without
SyncBatchNorm); the running statistics are the workers' weighted mean.

Rank 0 alone writes files (checkpoints, logs, the model, the report) and shows progress.
A worker opening a checkpoint (``--resume``) loads rank 0's, sent as bytes, so a run resumes
with any number of workers and across machines.

Faults: the process group and the store have a timeout (``--dist-timeout``); every worker
publishes a heartbeat and its step in the store, so when a collective fails the others name
the rank that stopped (a heartbeat that no longer moves, or a step behind) and exit with
one line (:class:`WorkerLost`, exit status 4). :func:`launch` (``--workers N``) starts the
workers on this machine, stops the others when one dies and prints that line itself.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from onnx_ssl.errors import InputError, OnnxSslError

if TYPE_CHECKING:
    from .spec import ArtifactInfo


class SharedTrainer(Protocol):
    """What the workers share of a trainer (:class:`onnx_ssl.training.trainer.Trainer`):
    stated here so that this module need not import the trainer, which imports it."""

    @property
    def info(self) -> ArtifactInfo: ...

    @property
    def state(self) -> Any: ...

    @property
    def train_outputs(self) -> list[str]: ...

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 300.0
INSTALL = "the [distributed] extra: pip install -e '.[distributed]' in the onnx-ssl checkout"
# Set by launch() in each worker: "PID:DIR", the launcher's pid and a folder where a worker
# that loses another leaves its line (the launcher prints it).
ENV_LAUNCHER = "ONNX_SSL_LAUNCHER"
# Set by launch(): intra-op threads per worker (the machine's cores shared among them).
ENV_THREADS = "ONNX_SSL_THREADS"
# gloo or nccl instead of the default (nccl where CUDA is present, gloo otherwise).
ENV_BACKEND = "ONNX_SSL_DIST_BACKEND"
# Test hooks: "RANK:STEP" makes that worker os._exit(9) / hang at that (1-based) step.
ENV_TEST_EXIT = "ONNX_SSL_TEST_WORKER_EXIT"
ENV_TEST_HANG = "ONNX_SSL_TEST_WORKER_HANG"
EXIT_WORKER_LOST = 4
_BEAT = 0.5  # seconds between heartbeats


class WorkerLost(OnnxSslError):
    """A worker stopped (died, hung, or the network failed) during distributed training.

    ``quiet``: under :func:`launch`, which prints the line itself."""

    exit_code = EXIT_WORKER_LOST

    def __init__(self, message: str, quiet: bool = False) -> None:
        super().__init__(message)
        self.quiet = quiet


@dataclass(frozen=True)
class Setup:
    """What the environment and ``--workers`` ask for: ``spawn`` > 1 starts that many local
    workers; otherwise this process is worker ``rank`` of ``world`` (``world`` 1: no
    distribution at all)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int | None = None
    master_addr: str = ""
    master_port: int = 0
    spawn: int = 0
    timeout: float = DEFAULT_TIMEOUT

    @property
    def distributed(self) -> bool:
        return self.world > 1


def _env_int(env: Mapping[str, str], name: str, low: int, high: int | None = None) -> int:
    raw = env.get(name, "")
    try:
        v = int(raw)
    except ValueError:
        raise InputError(f"{name}={raw!r} is not an integer (set by the launcher)") from None
    if v < low or (high is not None and v > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise InputError(f"{name} must be {bound}, got {v}")
    return v


def setup(workers: int | None, timeout: float = DEFAULT_TIMEOUT,
          env: Mapping[str, str] | None = None) -> Setup:
    """Read the launcher's settings (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``, optionally ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``) or ``--workers``.
    Bad settings are one-line :class:`InputError`s; nothing is imported."""
    env = os.environ if env is None else env
    if not (timeout > 0 and timeout < 1e7):  # also refuses nan
        raise InputError(f"--dist-timeout must be > 0 seconds, got {timeout}")
    if workers is not None and workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    if "WORLD_SIZE" not in env and "RANK" not in env:
        return Setup(spawn=workers if workers and workers > 1 else 0, timeout=timeout)
    world = _env_int(env, "WORLD_SIZE", 1)
    rank = _env_int(env, "RANK", 0, world - 1)
    if workers is not None and workers != world:
        raise InputError(f"--workers {workers} differs from the launcher's WORLD_SIZE={world}; "
                         f"leave --workers out under a launcher")
    if world == 1:
        return Setup(timeout=timeout)
    addr = env.get("MASTER_ADDR", "").strip()
    if not addr:
        raise InputError("MASTER_ADDR is not set (the host name or address of rank 0)")
    port = _env_int(env, "MASTER_PORT", 1, 65535)
    local_rank = _env_int(env, "LOCAL_RANK", 0) if "LOCAL_RANK" in env else 0
    local_world = _env_int(env, "LOCAL_WORLD_SIZE", 1) if "LOCAL_WORLD_SIZE" in env else None
    return Setup(rank, world, local_rank, local_world, addr, port, timeout=timeout)


def require_torch() -> None:
    """One line saying what to install when torch.distributed is missing."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise InputError(f"more than one worker needs PyTorch (torch.distributed): {INSTALL}")


def _parse_hook(var: str) -> tuple[int, int] | None:
    raw = os.environ.get(var)
    if not raw:
        return None
    r, s = raw.split(":")
    return int(r), int(s)


class Distributed:
    """This process's place among the workers, and the collectives of a training step."""

    def __init__(self, s: Setup) -> None:
        import torch
        import torch.distributed as tdist

        self.torch = torch
        self.tdist = tdist
        self.rank, self.world, self.timeout = s.rank, s.world, s.timeout
        self.addr, self.port = s.master_addr, s.master_port
        parent, _, self._report_dir = os.environ.get(ENV_LAUNCHER, "").partition(":")
        self._parent = int(parent or 0)
        self.quiet = bool(self._parent)
        local = s.local_world or (1 if ENV_THREADS in os.environ else None)
        threads = os.environ.get(ENV_THREADS)
        self.threads = (int(threads) if threads else
                        max(1, (os.cpu_count() or 1) // local) if local else None)
        self.step = 0
        self.local_n = 0
        self.allreduce_seconds = 0.0
        self._tmp = tempfile.TemporaryDirectory(prefix=f"onnx-ssl-rank{self.rank}-")
        self._stop = threading.Event()
        where = f"{self.addr}:{self.port}"
        delta = timedelta(seconds=self.timeout)
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        try:
            # Rank 0 hosts the store (torchrun's agent hosts it when it says so); every
            # worker waits until all have joined.
            self.store = tdist.TCPStore(self.addr, self.port, self.world,
                                        self.rank == 0 and not agent_store,
                                        timeout=delta, wait_for_workers=True)
        except Exception as e:
            self._tmp.cleanup()
            msg = str(e)
            if self.rank == 0 and ("in use" in msg.lower() or "EADDRINUSE" in msg):
                raise InputError(f"MASTER_PORT {self.port} is in use on {self.addr}; choose "
                                 f"another port") from None
            if self.rank == 0 and ("timeout" in msg.lower() or "timed out" in msg.lower()):
                raise InputError(f"only some of the {self.world} workers reached the master "
                                 f"{where} within {self.timeout:g} s (--dist-timeout)") from None
            if self.rank == 0:
                raise InputError(f"cannot listen on MASTER_ADDR:MASTER_PORT {where}: "
                                 f"{_first_line(msg)}") from None
            raise InputError(f"cannot reach the master {where} within {self.timeout:g} s "
                             f"(--dist-timeout): is MASTER_ADDR right and rank 0 started? "
                             f"({_first_line(msg)})") from None
        self.backend = os.environ.get(ENV_BACKEND) or (
            "nccl" if torch.cuda.is_available() and tdist.is_nccl_available() else "gloo")
        self.device = torch.device("cpu")
        if self.backend == "nccl":  # (the buffers go through the GPU of this worker)
            self.device = torch.device("cuda", s.local_rank)
            torch.cuda.set_device(self.device)
        try:
            tdist.init_process_group(self.backend, store=self.store, rank=self.rank,
                                     world_size=self.world, timeout=delta)
        except Exception as e:  # a worker that died while the others connected
            self._tmp.cleanup()
            raise WorkerLost(f"the {self.world} workers could not connect ({self.backend}): "
                             f"{_first_line(str(e))}") from None
        self._hook_exit = _parse_hook(ENV_TEST_EXIT)
        self._hook_hang = _parse_hook(ENV_TEST_HANG)
        self._beat = tdist.TCPStore(self.addr, self.port, self.world, False, timeout=delta,
                                    wait_for_workers=False)
        self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                        name="onnx-ssl-heartbeat")
        self._thread.start()
        log.info("worker %d of %d (%s, %s threads)", self.rank, self.world, self.backend,
                 self.threads or "default")

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    # --- faults ---------------------------------------------------------------------
    def _heartbeat(self) -> None:
        while not self._stop.wait(_BEAT):
            if self._parent and os.getppid() != self._parent:
                os._exit(EXIT_WORKER_LOST)  # the launcher is gone: stop too
            try:
                self._beat.add(f"beat/{self.rank}", 1)
                self._beat.set(f"step/{self.rank}", str(self.step))
            except Exception:  # the store (rank 0) is gone; the main thread will notice
                return

    def _lost(self, e: BaseException, what: str) -> WorkerLost:
        """Which rank stopped: a heartbeat that does not move, or a step behind the others."""
        stale: list[int] = []
        behind: list[int] = []
        try:
            probe = self.tdist.TCPStore(self.addr, self.port, self.world, False,
                                        timeout=timedelta(seconds=min(self.timeout, 5.0)),
                                        wait_for_workers=False)
            others = [r for r in range(self.world) if r != self.rank]
            first = {r: probe.add(f"beat/{r}", 0) for r in others}
            time.sleep(4 * _BEAT)
            stale = [r for r in others if probe.add(f"beat/{r}", 0) == first[r]]
            steps = {r: int(probe.get(f"step/{r}") or 0) for r in others if r not in stale}
            behind = [r for r, st in steps.items() if st < self.step]
        except Exception:  # the store died with rank 0
            stale = [0] if self.rank != 0 else []
        if stale:
            who = ", ".join(str(r) for r in stale)
            msg = (f"worker rank {who} stopped (no heartbeat) during {what} at step "
                   f"{self.step}; the other workers stopped too")
        elif behind:
            who = ", ".join(str(r) for r in behind)
            msg = (f"worker rank {who} did not reach {what} at step {self.step} within "
                   f"{self.timeout:g} s (--dist-timeout); the other workers stopped")
        else:
            msg = f"{what} failed at step {self.step}: {_first_line(str(e))}"
        if self._report_dir:
            Path(self._report_dir, f"lost.{self.rank}").write_text(msg, encoding="utf-8")
        return WorkerLost(msg, quiet=self.quiet)

    def _collective(self, fn: Any, what: str) -> Any:
        try:
            return fn()
        except Exception as e:  # torch.distributed's errors are RuntimeError subclasses
            raise self._lost(e, what) from None

    def close(self) -> None:
        self._stop.set()
        try:
            if self.tdist.is_initialized():
                self.tdist.destroy_process_group()
        finally:
            self._tmp.cleanup()

    # --- the steps ------------------------------------------------------------------
    def shard(self, bidx: np.ndarray) -> np.ndarray:
        """This worker's samples of the global batch ``bidx``. A worker left without one
        (a last batch smaller than the number of workers) runs the first with weight 0."""
        mine = bidx[self.rank :: self.world]
        self.local_n = len(mine)
        return mine if len(mine) else bidx[:1]

    def all_reduce(self, tr: SharedTrainer, res: Sequence[Any], scalars: Sequence[int]) -> None:
        """Average the gradients, the BatchNorm statistics (in ``res``) and the loss terms
        (``res[k]`` for ``k`` in ``scalars``) over the workers, weighted by their samples."""
        if (self.rank, self.step + 1) == self._hook_exit:
            os._exit(9)
        if (self.rank, self.step + 1) == self._hook_hang:  # (stuck before the step)
            time.sleep(3600)
        self.step += 1
        n = float(self.local_n)
        grads = [tr.state.parameters[p].grad for p in tr.info.trainable]
        stats = [np.asarray(res[tr.train_outputs.index(o)]) for o, _ in tr.info.bn_stats]
        scal = [np.asarray(res[k]) for k in scalars]
        parts = [*grads, *stats, *scal]
        flat = np.concatenate([np.asarray(a, dtype=np.float32).reshape(-1) for a in parts]
                              + [np.array([n], dtype=np.float32)]) * np.float32(n)
        flat[-1] = n
        t0 = time.perf_counter()
        total = self.torch.from_numpy(flat)
        if self.device.type != "cpu":
            total = total.to(self.device)
        self._collective(lambda: self.tdist.all_reduce(total), "the gradient all-reduce")
        out = total.cpu().numpy()
        self.allreduce_seconds += time.perf_counter() - t0
        out = out[:-1] / out[-1]
        at = 0
        for a in parts:
            k = a.size
            a[...] = out[at : at + k].reshape(a.shape).astype(a.dtype, copy=False)
            at += k

    def end_epoch(self, tr: SharedTrainer, sums: np.ndarray, wrong: int, seen: int
                  ) -> tuple[np.ndarray, int, int]:
        """The epoch's loss sums, errors and samples over all workers; and the check that
        every worker holds the same parameters (rank 0's are broadcast if not)."""
        names = (*tr.info.trainable, *tr.info.frozen)
        h = hashlib.sha256()
        for name in names:
            h.update(np.ascontiguousarray(tr.state.parameters[name].data).tobytes())
        digest = int.from_bytes(h.digest()[:7], "little")
        buf = np.concatenate([sums, [wrong, seen, 0.0, 0.0]]).astype(np.float64)
        t = self.torch.from_numpy(buf)
        d = self.torch.tensor([digest, -digest], dtype=self.torch.int64)
        if self.device.type != "cpu":
            t, d = t.to(self.device), d.to(self.device)
        self._collective(lambda: self.tdist.all_reduce(t), "the epoch's statistics")
        self._collective(lambda: self.tdist.all_reduce(d, op=self.tdist.ReduceOp.MAX),
                         "the parameter check")
        dd = d.cpu().numpy()
        if int(dd[0]) != -int(dd[1]):  # max == min: the same digest everywhere
            log.warning("the workers' parameters differ after step %d; using rank 0's",
                        self.step)
            self.broadcast_params(tr)
        s = t.cpu().numpy()
        return s[: len(sums)], int(round(s[len(sums)])), int(round(s[len(sums) + 1]))

    def broadcast_params(self, tr: SharedTrainer) -> None:
        for name in (*tr.info.trainable, *tr.info.frozen):
            a = tr.state.parameters[name].data
            t = self.torch.from_numpy(np.ascontiguousarray(a)).to(self.device)
            self._collective(lambda t=t: self.tdist.broadcast(t, 0), "the parameter broadcast")
            a[...] = t.cpu().numpy()

    def share_checkpoint(self, path: Path, resumed: bool) -> tuple[Path, bool]:
        """Rank 0's checkpoint (whether it resumes, and the file) on every worker."""
        data = path.read_bytes() if self.rank == 0 else b""
        box: list[Any] = [(resumed, data)]
        self._collective(lambda: self.tdist.broadcast_object_list(box, 0),
                         "sending the checkpoint")
        resumed, data = box[0]
        if self.rank == 0:
            return path, resumed
        mine = Path(self._tmp.name) / f"shared{self.step}_{path.name}"
        mine.write_bytes(data)
        return mine, resumed


def join(s: Setup) -> Distributed:
    """Join the workers (torch imported here, and only here)."""
    require_torch()
    if s.rank != 0:  # one voice: the others log errors only
        logging.getLogger("onnx_ssl").setLevel(logging.ERROR)
    return Distributed(s)


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0] if lines else "no message"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(argv: Sequence[str], workers: int) -> int:
    """Run ``onnx-ssl ARGV`` as ``workers`` local workers and return the exit status.

    Rank 0 keeps this terminal; the others' output is dropped but for their last error
    line. When a worker stops with an error or a signal, the others are stopped and one
    line names it (rank 0's own error line, when it has one, is that line)."""
    require_torch()
    port = _free_port()
    threads = max(1, (os.cpu_count() or 1) // workers)
    code = "import sys; from onnx_ssl.cli import main; sys.exit(main(sys.argv[1:]))"
    procs: list[subprocess.Popen[bytes]] = []
    errs: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="onnx-ssl-launch-") as reports:
        try:
            for rank in range(workers):
                env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(workers),
                           LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(workers),
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                           OMP_NUM_THREADS=str(threads),
                           **{ENV_LAUNCHER: f"{os.getpid()}:{reports}",
                              ENV_THREADS: str(threads)})
                err = None if rank == 0 else tempfile.TemporaryFile()
                errs.append(err)
                procs.append(subprocess.Popen(
                    [sys.executable, "-c", code, *argv], env=env,
                    stdout=None if rank == 0 else subprocess.DEVNULL, stderr=err))
            return _watch(procs, errs, Path(reports))
        except KeyboardInterrupt:  # the workers got the Ctrl-C too
            _stop(procs)
            return 130
        finally:
            _stop(procs)
            for f in errs:
                if f is not None:
                    f.close()


_GONE = (None, 0, EXIT_WORKER_LOST, -signal.SIGTERM)  # running, done, or stopped for another


def _watch(procs: list[subprocess.Popen[bytes]], errs: list[Any], reports: Path) -> int:
    while True:
        codes = [p.poll() for p in procs]
        if all(c == 0 for c in codes):
            return 0
        bad = [r for r, c in enumerate(codes) if c not in (None, 0)]
        if bad:
            break
        time.sleep(0.05)
    # A failure all workers share (bad input, a collapse) ends them all at once, and a
    # worker that loses another needs a moment to find which: wait a little for them.
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.05)
    codes = [p.poll() for p in procs]
    _stop(procs)
    if codes[0] in (1, 2, 3, 130):  # rank 0 said why on this terminal
        return int(codes[0])
    n = len(procs) - 1
    stopped = f"; stopped the other {n} worker{'s' if n > 1 else ''}"
    culprits = [r for r, c in enumerate(codes) if c not in _GONE]
    if not culprits:  # none died: a worker that hung, named by those that waited for it
        found = sorted(reports.glob("lost.*"))
        line = found[0].read_text(encoding="utf-8") if found else "a worker stopped"
        print(f"onnx-ssl: error: {line}", file=sys.stderr, flush=True)
        return EXIT_WORKER_LOST
    r = culprits[0]
    c = codes[r]
    assert c is not None
    why = f"was killed by {signal.Signals(-c).name}" if c < 0 else f"exited with status {c}"
    line = _last_error(errs[r])
    print(f"onnx-ssl: error: worker rank {r} {why}" + (f" ({line})" if line else "") + stopped,
          file=sys.stderr, flush=True)
    return c if c in (1, 2, 3) else EXIT_WORKER_LOST


def _last_error(f: Any) -> str:
    if f is None:
        return ""
    f.seek(0)
    lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("onnx-ssl: "):
            return ln.split(": ", 2)[-1] if ln.startswith("onnx-ssl: error: ") else ln
    return lines[-1] if lines else ""


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + 5.0
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
