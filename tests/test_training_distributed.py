"""Data-parallel training (onnx_ssl/training/distributed.py): 2 workers on localhost with
gloo give the weights of 1 worker; a worker that dies or hangs stops the others with one
line naming it; bad launcher settings are one-line errors; --resume works with another
number of workers; a single process never imports torch."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_training_helpers import digits, tiny_cnn

from onnx_ssl.cli import main

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                reason="needs torch (the [distributed] extra)")

HERE = Path(__file__).parent
# Uneven shards on purpose: 160 training samples in global batches of 35 (18 + 17 per
# worker) and a last one of 20.
TRAIN = ["--epochs", "2", "--batch-size", "35", "--lr", "0.1", "--prox", "--seed", "3"]
LIMIT = 120  # seconds: no test may hang


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    """(artifacts folder of a tiny CNN without BatchNorm, with SGD and group Lasso; data)."""
    from onnx_ssl.training.artifacts import ArtifactOptions, build_artifacts
    from onnx_ssl.training.penalty import Lambdas

    root = tmp_path_factory.mktemp("dist")
    build_artifacts(tiny_cnn(bn=False), root / "art",
                    ArtifactOptions(lambdas=Lambdas(filter=0.05, channel=0.05), optimizer="sgd"))
    d = digits(200)
    np.savez(root / "data.npz", x=next(iter(d.x.values())), y=d.y)
    return root / "art", root / "data.npz"


def _copy(base: tuple[Path, Path], tmp: Path, name: str) -> Path:
    dst = tmp / name
    shutil.copytree(base[0], dst)
    return dst


def _cli(args: list[str], env: dict[str, str] | None = None,
         timeout: float = LIMIT) -> subprocess.CompletedProcess[str]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "onnx_ssl", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=HERE,
                          env={**os.environ, **(env or {})})
    proc.seconds = time.monotonic() - t0  # type: ignore[attr-defined]
    return proc


def _weights(path: Path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def _errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("onnx-ssl: error")]


def test_two_workers_give_the_weights_of_one(base, tmp_path):
    one, two = _copy(base, tmp_path, "one"), _copy(base, tmp_path, "two")
    r1 = _cli(["train", str(one), "--data", str(base[1]), *TRAIN])
    assert r1.returncode == 0, r1.stderr
    r2 = _cli(["train", str(two), "--data", str(base[1]), *TRAIN, "--workers", "2"])
    assert r2.returncode == 0, r2.stderr
    w1, w2 = _weights(one / "trained_model.onnx"), _weights(two / "trained_model.onnx")
    assert w1.keys() == w2.keys()
    moved = max(float(np.abs(w1[k] - _weights(base[0] / "inference_model.onnx")[k]).max())
                for k in w1)
    assert moved > 1e-2  # it trained
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # The logged epoch losses are those of the global batches, not of one worker's share.
    log1 = (one / "train_log.csv").read_text().splitlines()
    log2 = (two / "train_log.csv").read_text().splitlines()
    assert len(log1) == len(log2) == 3
    for a, b in zip(log1[1:], log2[1:], strict=True):
        l1, l2 = a.split(","), b.split(",")
        np.testing.assert_allclose(float(l2[2]), float(l1[2]), rtol=1e-5)  # loss
        assert l2[6] == l1[6]  # training error
    # Rank 0 alone reports (one summary on stdout), and the workers' parameters never
    # differed (the per-epoch digest check would say so).
    assert r2.stdout.count("trained 2 epoch(s)") == 1
    assert "parameters differ" not in r2.stderr


def test_resume_with_another_number_of_workers(base, tmp_path):
    ref, run = _copy(base, tmp_path, "ref"), _copy(base, tmp_path, "run")
    # (a constant learning rate: --epochs 1 then 2 is then the schedule of --epochs 2)
    args = [*TRAIN, "--schedule", "constant"]
    assert _cli(["train", str(ref), "--data", str(base[1]), *args]).returncode == 0
    first = [*args]
    first[1] = "1"  # one epoch on 1 worker, then the second on 2 workers
    assert _cli(["train", str(run), "--data", str(base[1]), *first]).returncode == 0
    r = _cli(["train", str(run), "--data", str(base[1]), *args, "--resume", "--workers", "2"])
    assert r.returncode == 0, r.stderr
    w1, w2 = _weights(ref / "trained_model.onnx"), _weights(run / "trained_model.onnx")
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_ssl_with_two_workers_writes_once_and_matches_one(base, tmp_path):
    model = tmp_path / "tiny.onnx"
    onnx.save(tiny_cnn(bn=False), str(model))
    common = ["ssl", str(model), "--data", str(base[1]), "--epochs", "2", "--finetune-epochs",
              "1", "--batch-size", "32", "--lambda-filter", "0.05", "--verify", "0"]
    r1 = _cli([*common, "-o", str(tmp_path / "one.onnx"), "--report", str(tmp_path / "one.json")])
    assert r1.returncode == 0, r1.stderr
    r2 = _cli([*common, "-o", str(tmp_path / "two.onnx"), "--report", str(tmp_path / "two.json"),
               "--work-dir", str(tmp_path / "work"), "--workers", "2"])
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout.count("wrote ") == 1
    rep1 = json.loads((tmp_path / "one.json").read_text())
    rep2 = json.loads((tmp_path / "two.json").read_text())
    assert rep2["macs_after"] == rep1["macs_after"]
    assert len(rep2["ssl_history"]) == 2
    w1, w2 = _weights(tmp_path / "one.onnx"), _weights(tmp_path / "two.onnx")
    assert {k: v.shape for k, v in w1.items()} == {k: v.shape for k, v in w2.items()}
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], rtol=1e-4, atol=1e-5, err_msg=k)
    assert (tmp_path / "work" / "ssl" / "train_state.ckpt").exists()


@pytest.mark.parametrize("rank", [1, 0])
def test_a_dead_worker_stops_the_others_with_one_line(base, tmp_path, rank):
    art = _copy(base, tmp_path, "art")
    r = _cli(["train", str(art), "--data", str(base[1]), *TRAIN, "--workers", "2"],
             env={"ONNX_SSL_TEST_WORKER_EXIT": f"{rank}:3"})
    assert r.returncode == 4, r.stderr
    errors = _errors(r.stderr)
    assert len(errors) == 1, r.stderr
    assert f"worker rank {rank} exited with status 9" in errors[0]
    assert r.seconds < 60  # type: ignore[attr-defined]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, art: Path, data: Path, port: int, extra: dict[str, str],
            *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), **extra}
    return subprocess.Popen([sys.executable, "-m", "onnx_ssl", "train", str(art), "--data",
                             str(data), *TRAIN, *args], env=env, cwd=HERE, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_under_a_launcher_a_dead_worker_is_named_by_the_survivor(base, tmp_path):
    """As under torchrun: no --workers, the environment says who is who."""
    art = _copy(base, tmp_path, "art")
    port = _free_port()
    hook = {"ONNX_SSL_TEST_WORKER_EXIT": "1:2"}
    procs = [_worker(r, art, base[1], port, hook) for r in (0, 1)]
    outs = [p.communicate(timeout=LIMIT) for p in procs]
    assert procs[1].returncode == 9
    assert procs[0].returncode == 4, outs[0][1]
    errors = _errors(outs[0][1])
    assert len(errors) == 1 and "worker rank 1 stopped" in errors[0], outs[0][1]


def test_a_hung_worker_is_named_after_the_timeout(base, tmp_path):
    art = _copy(base, tmp_path, "art")
    r = _cli(["train", str(art), "--data", str(base[1]), *TRAIN, "--workers", "2",
              "--dist-timeout", "3"], env={"ONNX_SSL_TEST_WORKER_HANG": "1:2"})
    assert r.returncode == 4, r.stderr
    errors = _errors(r.stderr)
    assert len(errors) == 1, r.stderr
    assert "worker rank 1 did not reach the gradient all-reduce at step 2" in errors[0]


@pytest.mark.parametrize(("env", "args", "message"), [
    ({"RANK": "0", "WORLD_SIZE": "0"}, [], "WORLD_SIZE must be >= 1, got 0"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, [], "RANK must be in [0, 1], got 2"),
    ({"RANK": "0", "WORLD_SIZE": "x"}, [], "WORLD_SIZE='x' is not an integer"),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "29500"}, [], "MASTER_ADDR is not set"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "0"}, [],
     "MASTER_PORT must be in [1, 65535], got 0"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
     ["--workers", "3"], "--workers 3 differs from the launcher's WORLD_SIZE=2"),
    ({}, ["--workers", "0"], "--workers must be >= 1, got 0"),
    ({}, ["--workers", "2", "--dist-timeout", "0"], "--dist-timeout must be > 0 seconds"),
])
def test_bad_launcher_settings_are_one_line(base, tmp_path, monkeypatch, capsys, env, args,
                                            message):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    code = main(["train", str(_copy(base, tmp_path, "a")), "--data", str(base[1]), *TRAIN,
                 *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("onnx-ssl: error: ") and message in err[0], err


def test_an_unreachable_master_and_a_port_in_use(base, tmp_path, monkeypatch, capsys):
    art = _copy(base, tmp_path, "a")
    cmd = ["train", str(art), "--data", str(base[1]), *TRAIN, "--dist-timeout", "2"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))  # nobody listens there
    monkeypatch.setenv("RANK", "1")
    t0 = time.monotonic()
    assert main(cmd) == 2
    assert time.monotonic() - t0 < 30
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach the master 127.0.0.1:" in err[0], err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        monkeypatch.setenv("MASTER_PORT", str(busy.getsockname()[1]))
        monkeypatch.setenv("RANK", "0")
        assert main(cmd) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is in use" in err[0], err


def test_without_torch_more_workers_say_what_to_install(base, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real(name, *a))
    art = _copy(base, tmp_path, "a")
    assert main(["train", str(art), "--data", str(base[1]), *TRAIN, "--workers", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install -e '.[distributed]'" in err[0], err


@pytest.mark.parametrize("command", ["train", "ssl"])
def test_a_single_process_does_not_import_torch(base, tmp_path, command):
    art = _copy(base, tmp_path, "a")
    model = tmp_path / "tiny.onnx"
    onnx.save(tiny_cnn(bn=False), str(model))
    args = (["train", str(art), "--data", str(base[1]), *TRAIN] if command == "train" else
            ["ssl", str(model), "--data", str(base[1]), "-o", str(tmp_path / "out.onnx"),
             "--epochs", "1", "--finetune-epochs", "1", "--verify", "0"])
    code = ("import json, sys; from onnx_ssl.cli import main; rc = main(sys.argv[1:]); "
            "print(json.dumps([rc, 'torch' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         timeout=LIMIT, cwd=HERE)
    rc, torch_loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert rc == 0, out.stderr
    assert not torch_loaded


def test_ssl_killed_with_two_workers_resumes_with_one(base, tmp_path):
    """A worker dies in the second SSL epoch: the run stops (one line), and --resume on a
    single worker continues from rank 0's last epoch checkpoint to the uninterrupted
    result."""
    from onnx_ssl.training import _ort
    from onnx_ssl.training.trainer import EPOCH_PROPERTY

    model = tmp_path / "tiny.onnx"
    onnx.save(tiny_cnn(bn=False), str(model))
    common = ["ssl", str(model), "--data", str(base[1]), "--epochs", "3", "--finetune-epochs",
              "1", "--batch-size", "32", "--lambda-filter", "0.05", "--verify", "0"]
    ref = _cli([*common, "-o", str(tmp_path / "ref.onnx")])
    assert ref.returncode == 0, ref.stderr
    work = tmp_path / "work"
    # 160 training samples: 5 steps per epoch; step 8 is in the second epoch.
    killed = _cli([*common, "-o", str(tmp_path / "out.onnx"), "--work-dir", str(work),
                   "--workers", "2"], env={"ONNX_SSL_TEST_WORKER_EXIT": "1:8"})
    assert killed.returncode == 4, killed.stderr
    assert len(_errors(killed.stderr)) == 1
    assert not (tmp_path / "out.onnx").exists()
    state = _ort.load().api.CheckpointState.load_checkpoint(str(work / "ssl" / "train_state.ckpt"))
    assert int(dict(state.properties)[EPOCH_PROPERTY]) == 1
    resumed = _cli([*common, "-o", str(tmp_path / "out.onnx"), "--resume", str(work)])
    assert resumed.returncode == 0, resumed.stderr
    w1, w2 = _weights(tmp_path / "ref.onnx"), _weights(tmp_path / "out.onnx")
    assert {k: v.shape for k, v in w1.items()} == {k: v.shape for k, v in w2.items()}
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], rtol=1e-4, atol=1e-5, err_msg=k)
