"""`ssl` killed (SIGKILL) in the SSL phase, while writing a checkpoint, or in fine-tuning,
then `ssl --resume DIR`: the result has the structure of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_training_helpers import digits, pretrained_tiny

from onnx_ssl.cli import main
from onnx_ssl.training import _ort
from onnx_ssl.training.chain import PHASES
from onnx_ssl.training.trainer import EPOCH_PROPERTY, STATE

EPOCHS = 4
# The kill: in phase P at the N-th training step, or while the N-th checkpoint of phase P
# is written (after its temporary file, before the rename).
KILLER = textwrap.dedent('''
    import os, signal, sys
    from onnx_ssl.training import _ort, trainer as T
    phase, when, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    count = {"n": 0}

    def hit(self):
        if self.art.path.name == phase:
            count["n"] += 1
            return count["n"] == n
        return False

    feeds = T.Trainer._feeds
    def _feeds(self, names, *a):
        if when == "step" and self.module.training and hit(self):
            os.kill(os.getpid(), signal.SIGKILL)
        return feeds(self, names, *a)
    T.Trainer._feeds = _feeds

    save = T.Trainer.save_state
    def save_state(self, epoch):
        api = self.api
        real = api.CheckpointState.save_checkpoint
        def half(state, path, **kw):
            real(state, path, **kw)
            if when == "save" and hit(self):
                os.kill(os.getpid(), signal.SIGKILL)  # temporary file written, not renamed
        api.CheckpointState.save_checkpoint = half
        try:
            save(self, epoch)
        finally:
            api.CheckpointState.save_checkpoint = real
    T.Trainer.save_state = save_state

    from onnx_ssl.cli import main
    sys.exit(main(sys.argv[4:]))
''')


def _args(tmp: Path, work: Path, out: Path, resume: bool = False) -> list[str]:
    return ["ssl", str(tmp / "model.onnx"), "--data", str(tmp / "data.npz"), "-o",
            str(out), "--report", f"{out}.json", "--epochs", str(EPOCHS),
            "--finetune-epochs", str(EPOCHS), "--batch-size", "32", "--lambda-filter", "0.3",
            "--lambda-channel", "0.3", "--threshold", "0.15", "--seed", "3",
            *(["--resume", str(work)] if resume else ["--work-dir", str(work)])]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    onnx.save(pretrained_tiny(), str(tmp / "model.onnx"))
    d = digits(320)
    np.savez(tmp / "data.npz", x=d.x[next(iter(d.x))], y=d.y)
    assert main(_args(tmp, tmp / "work_ref", tmp / "ref.onnx")) == 0
    ref = json.loads((tmp / "ref.onnx.json").read_text())
    # Some layers lose filters or channels, others keep them all: the structure tells runs
    # apart (the threshold cuts where the group norms are spread).
    kept = [(f, c) for _, f, c in _structure(ref)]
    before = [(r["filters_before"], r["channels_before"]) for r in ref["layers"]]
    assert kept != before and any(a == b for a, b in zip(kept, before, strict=True))
    return tmp, ref


def _structure(report: dict) -> list[tuple[str, int, int]]:
    return [(r["node"], r["filters_after"], r["channels_after"]) for r in report["layers"]]


def _epoch(path: Path) -> int:
    state = _ort.load().api.CheckpointState.load_checkpoint(str(path))
    return int(dict(state.properties)[EPOCH_PROPERTY])


@pytest.mark.parametrize(("phase", "when", "n", "saved"), [
    ("ssl", "step", 2 * 8 + 3, 2),   # in the 3rd SSL epoch (8 steps an epoch)
    ("ssl", "save", 3, 2),           # writing the 3rd SSL checkpoint
    ("finetune", "step", 8 + 5, 1),  # in the 2nd fine-tuning epoch
])
def test_killed_run_resumes_to_the_same_structure(setup, tmp_path, phase, when, n, saved):
    tmp, ref = setup
    work = tmp_path / "work"
    (tmp_path / "killer.py").write_text(KILLER)
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "killer.py"), phase, when, str(n),
         *_args(tmp, work, tmp_path / "out.onnx")],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (tmp_path / "out.onnx").exists()
    # The checkpoint of the killed phase is whole and at most one epoch behind.
    assert _epoch(work / phase / STATE) == saved
    if phase == "finetune":
        assert _epoch(work / PHASES[0] / STATE) == EPOCHS
    logged = (work / phase / "train_log.csv").read_text().splitlines()
    assert len(logged) == saved + 1

    assert main(_args(tmp, work, tmp_path / "out.onnx", resume=True)) == 0
    got = json.loads((tmp_path / "out.onnx.json").read_text())
    assert _structure(got) == _structure(ref)
    assert got["params_after"] == ref["params_after"]
    for ph in PHASES:
        assert _epoch(work / ph / STATE) == EPOCHS
        rows = (work / ph / "train_log.csv").read_text().splitlines()
        assert len(rows) == EPOCHS + 1  # one row per epoch, none repeated
    # The finished epochs were not trained again (their rows, timings included, are kept).
    assert (work / phase / "train_log.csv").read_text().splitlines()[: saved + 1] == logged
    assert got["error"] == ref["error"]
    onnx.checker.check_model(onnx.load(str(tmp_path / "out.onnx")))


def test_resume_refuses_other_options_and_missing_runs(setup, tmp_path, capsys):
    tmp, _ = setup
    args = _args(tmp, tmp / "work_ref", tmp_path / "x.onnx", resume=True)
    args[args.index("--lambda-filter") + 1] = "0.5"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "options differ" in err and "lambdas" in err
    assert main(_args(tmp, tmp_path / "empty", tmp_path / "x.onnx", resume=True)) == 2
    assert "no interrupted run" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
    assert os.path.exists(tmp / "work_ref" / "ssl_run.json")
