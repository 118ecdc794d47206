"""The command line: outputs, one-line errors with exit code 2, never a half-written file."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import pick_groups, zero_groups
from onnx import numpy_helper

from onnx_ssl import env, models
from onnx_ssl.analysis import analyze, prepare
from onnx_ssl.cli import main
from onnx_ssl.errors import EnvironmentProblem


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "onnx_ssl", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


@pytest.fixture
def lenet_path(tmp_path: Path) -> Path:
    p = tmp_path / "lenet.onnx"
    onnx.save_model(models.build("lenet"), p)
    return p


def test_analyze_table_and_json(lenet_path: Path, tmp_path: Path):
    r = cli("analyze", str(lenet_path))
    assert r.returncode == 0, r.stderr
    assert "conv1" in r.stdout and "params" in r.stdout
    out = tmp_path / "a.json"
    r = cli("analyze", str(lenet_path), "--json", str(out), "--kinds", "channel,neuron")
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert {g["kind"] for g in doc["groups"]} == {"channel", "neuron"}
    assert doc["model"] == str(lenet_path)


def test_builtin_models_are_reachable():
    r = cli("analyze", "builtin:resnet20")
    assert r.returncode == 0 and "residual branches: 9" in r.stdout


def _garbage(tmp: Path) -> dict[str, Path]:
    good = models.build("lenet").SerializeToString()
    files = {
        "not onnx": tmp / "text.onnx",
        "truncated": tmp / "trunc.onnx",
        "empty": tmp / "empty.onnx",
        "IR version": tmp / "ir.onnx",
        "opset": tmp / "opset.onnx",
    }
    files["not onnx"].write_text("this is not a model\n")
    files["truncated"].write_bytes(good[: len(good) // 3])
    files["empty"].write_bytes(b"")
    # Newer than the installed onnx reads (the limit is the installed onnx, not a constant).
    m = models.build("lenet")
    m.ir_version = onnx.IR_VERSION + 1
    files["IR version"].write_bytes(m.SerializeToString())
    m = models.build("lenet")
    m.opset_import[0].version = onnx.defs.onnx_opset_version() + 1
    files["opset"].write_bytes(m.SerializeToString())
    return files


@pytest.mark.parametrize("command", ["analyze", "prune"])
def test_bad_input_is_one_line_exit_2(tmp_path: Path, command: str):
    for what, path in {**_garbage(tmp_path), "no such file": tmp_path / "nope.onnx"}.items():
        args = [command, str(path)] + (["-o", str(tmp_path / "out.onnx")]
                                       if command == "prune" else [])
        r = cli(*args)
        assert r.returncode == 2, (what, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("onnx-ssl: error:"), (what, r.stderr)
        assert "Traceback" not in r.stderr
        assert not (tmp_path / "out.onnx").exists()


def test_debug_shows_the_traceback(tmp_path: Path):
    p = tmp_path / "x.onnx"
    p.write_text("nope")
    r = cli("--debug", "analyze", str(p))
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_prune_writes_model_and_report(tmp_path: Path):
    model = prepare(models.build("lenet"))
    a = analyze(model, prepared=True)
    z = zero_groups(model, pick_groups(a, 6, seed=1))
    src = tmp_path / "z.onnx"
    onnx.save_model(z, src)
    before = src.read_bytes()
    out, rep = tmp_path / "small.onnx", tmp_path / "rep.json"
    r = cli("prune", str(src), "-o", str(out), "--report", str(rep))
    assert r.returncode == 0, r.stderr
    assert src.read_bytes() == before  # the input is never touched
    small = onnx.load(out)
    assert small.ir_version <= 10
    doc = json.loads(rep.read_text())
    assert doc["macs_after"] < doc["macs_before"] and doc["verification"]["outputs"]
    assert "numeric check: passed" in r.stdout
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_prune_refuses_to_overwrite_input_or_write_nowhere(lenet_path: Path, tmp_path: Path):
    before = lenet_path.read_bytes()
    r = cli("prune", str(lenet_path), "-o", str(lenet_path))
    assert r.returncode == 2 and "input" in r.stderr
    assert lenet_path.read_bytes() == before
    r = cli("prune", str(lenet_path), "-o", str(tmp_path / "missing" / "x.onnx"))
    assert r.returncode == 2 and "does not exist" in r.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only folders")
def test_prune_unwritable_folder(lenet_path: Path, tmp_path: Path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    r = cli("prune", str(lenet_path), "-o", str(ro / "x.onnx"))
    assert r.returncode == 2 and "not writable" in r.stderr


def _one_line_error(r: subprocess.CompletedProcess[str], *words: str) -> None:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnx-ssl: error:"), r.stderr
    for w in words:
        assert w in lines[0], r.stderr


def _external(tmp: Path, name: str = "ext.onnx", location: str = "ext.data") -> Path:
    src = tmp / name
    onnx.save_model(models.build("lenet"), src, save_as_external_data=True, location=location)
    return src


def test_outputs_never_overwrite_inputs_through_any_spelling(lenet_path: Path, tmp_path: Path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.onnx").symlink_to(lenet_path)
    os.link(lenet_path, tmp_path / "hard.onnx")
    ext = _external(tmp_path)
    watched = [lenet_path, ext, tmp_path / "ext.data"]
    before = {p: p.read_bytes() for p in watched}
    names = sorted(p.name for p in tmp_path.iterdir())
    cases = [
        ("analyze", "lenet.onnx", "--json", "lenet.onnx"),
        ("analyze", "lenet.onnx", "--json", "sub/../lenet.onnx"),
        ("analyze", str(lenet_path), "--json", "link.onnx"),
        ("analyze", "link.onnx", "--json", str(lenet_path)),
        ("analyze", "hard.onnx", "--json", "lenet.onnx"),
        ("prune", "lenet.onnx", "-o", "x.onnx", "--report", "./lenet.onnx"),
        ("prune", "lenet.onnx", "-o", "x.onnx", "--report", "x.onnx"),
        ("prune", "lenet.onnx", "-o", "x.onnx", "--report", "x.onnx.data"),
        ("prune", "ext.onnx", "-o", "ext.data"),  # the input's external data file
        ("analyze", "ext.onnx", "--json", "sub/../ext.data"),
        ("prune", "lenet.onnx", "-o", "ext.data.onnx"),  # would write ext.data.onnx.data: fine
    ]
    for args in cases[:-1]:
        _one_line_error(cli(*args, cwd=tmp_path))
        assert {p: p.read_bytes() for p in watched} == before, args
        assert sorted(p.name for p in tmp_path.iterdir()) == names, args
    r = cli(*cases[-1], "--no-verify", cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_output_onto_a_device_or_fifo_is_refused(lenet_path: Path, tmp_path: Path):
    # Symlinks to the devices and a FIFO in tmp_path: a regression replaces these, never the
    # machine's /dev/null.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "null").symlink_to("/dev/null")
    (tmp_path / "full").symlink_to("/dev/full")
    for out in ("null", "full", "fifo"):
        for args in (("prune", str(lenet_path), "-o", out),
                     ("analyze", str(lenet_path), "--json", out),
                     ("prune", str(lenet_path), "-o", "x.onnx", "--report", out)):
            _one_line_error(cli(*args, cwd=tmp_path), "not a regular file", "rename")
    assert (tmp_path / "null").is_symlink() and (tmp_path / "full").is_symlink()
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "full", "lenet.onnx", "null"]


def test_missing_external_data_names_the_file(tmp_path: Path):
    ext = _external(tmp_path)
    (tmp_path / "ext.data").unlink()
    for args in (("analyze", str(ext)), ("prune", str(ext), "-o", str(tmp_path / "o.onnx"))):
        _one_line_error(cli(*args), "external data file", "ext.data", "missing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx"]


def test_prune_refuses_negative_verify_and_non_finite_threshold(lenet_path: Path,
                                                                tmp_path: Path):
    out = tmp_path / "o.onnx"
    for bad in (["--verify", "-3"], ["--threshold", "nan"], ["--threshold", "inf"],
                ["--threshold", "-1"]):
        _one_line_error(cli("prune", str(lenet_path), "-o", str(out), *bad), bad[0])
        assert not out.exists()
    # Nothing checked: the report says so, never "passed".
    for skip in (["--verify", "0"], ["--no-verify"]):
        r = cli("prune", str(lenet_path), "-o", str(out), "--threshold", "0.01", *skip)
        assert r.returncode == 0, r.stderr
        assert "numeric check: skipped" in r.stdout and "passed" not in r.stdout
        assert "not measured" in r.stdout


def test_written_files_follow_the_umask(tmp_path: Path):
    ext = _external(tmp_path)
    for mask, mode in ((0o022, 0o644), (0o027, 0o640)):
        out, rep, js = (tmp_path / f"o{mask:o}.onnx", tmp_path / f"r{mask:o}.json",
                        tmp_path / f"a{mask:o}.json")
        old = os.umask(mask)
        try:
            assert main(["prune", str(ext), "-o", str(out), "--report", str(rep)]) == 0
            assert main(["analyze", str(ext), "--json", str(js)]) == 0
        finally:
            os.umask(old)
        for p in (out, tmp_path / f"{out.name}.data", rep, js):
            assert stat.S_IMODE(p.stat().st_mode) == mode, (p, oct(p.stat().st_mode))


def test_failed_verification_writes_nothing(lenet_path: Path, tmp_path: Path, monkeypatch,
                                            capsys):
    from onnx_ssl import compiler as prune_mod
    from onnx_ssl.errors import VerificationError

    def broken(*a, **k):
        raise VerificationError("output 'logits' differs by 1 (simulated); nothing written")

    monkeypatch.setattr(prune_mod, "verify_outputs", broken)
    out = tmp_path / "o.onnx"
    assert main(["prune", str(lenet_path), "-o", str(out)]) == 2
    assert "differs" in capsys.readouterr().err
    assert not out.exists()


def test_dynamic_batch_is_verified_other_dynamic_dims_are_refused(tmp_path: Path):
    m = prepare(models.build("syn_mlp_input_gather"))
    arrs = {t.name: numpy_helper.to_array(t).copy() for t in m.graph.initializer}
    arrs["fc1.weight"][3] = 0
    arrs["fc1.bias"][3] = 0
    for t in m.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(arrs[t.name], t.name))
    del m.graph.value_info[:]
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    m.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    p = tmp_path / "dyn.onnx"
    onnx.save_model(m, p)
    r = cli("prune", str(p), "-o", str(tmp_path / "o.onnx"))
    assert r.returncode == 0, r.stderr
    assert "numeric check: passed" in r.stdout
    out = onnx.load(tmp_path / "o.onnx")
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    # A dynamic feature dimension cannot be verified: one-line error, nothing written.
    m2 = models.build("mlp")
    m2.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "F"
    p2 = tmp_path / "dyn2.onnx"
    onnx.save_model(m2, p2)
    r = cli("prune", str(p2), "-o", str(tmp_path / "o2.onnx"))
    assert r.returncode == 2 and "dynamic" in r.stderr, r.stderr
    assert not (tmp_path / "o2.onnx").exists()


def test_external_data_model_stays_external(tmp_path: Path):
    m = prepare(models.build("lenet"))
    arrs = {t.name: numpy_helper.to_array(t).copy() for t in m.graph.initializer}
    arrs["ip1.weight"][:100] = 0
    arrs["ip1.bias"][:100] = 0
    for t in m.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(arrs[t.name], t.name))
    src = tmp_path / "ext.onnx"
    onnx.save_model(m, src, save_as_external_data=True, location="ext.data")
    out = tmp_path / "out.onnx"
    r = cli("prune", str(src), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.onnx.data").exists()
    small = onnx.load(out)
    assert not any(p.key.startswith("onnx_ssl") for p in small.metadata_props)
    w = {t.name: numpy_helper.to_array(t) for t in small.graph.initializer}
    assert w["ip1.weight"].shape == (400, 800) and np.all(np.isfinite(w["ip1.weight"]))


def test_two_runtime_distributions_are_detected(monkeypatch):
    monkeypatch.setattr(env, "installed_ort_distributions",
                        lambda: [("onnxruntime", "1.23.0"), ("onnxruntime-training-cpu", "1.19.2")])
    # The advice keeps the user's inference runtime and moves training to its own environment.
    with pytest.raises(EnvironmentProblem,
                       match=r"keep onnxruntime 1\.23\.0: pip uninstall -y "
                             r"onnxruntime-training-cpu onnxruntime && pip install "
                             r"onnxruntime==1\.23\.0; train in an environment of its own"):
        env.check_runtime_environment()


def test_runtime_distributions_are_read_from_the_package_metadata(monkeypatch):
    """Names are normalised (case, underscores), other packages ignored, one entry per
    distribution; the result is what the environment check judges."""
    class Dist:
        def __init__(self, name: str, version: str) -> None:
            self.metadata = {"Name": name}
            self.version = version

    fake = [Dist("numpy", "2.0"), Dist("onnxruntime_training_cpu", "1.19.2"),
            Dist("ONNXRuntime-GPU", "1.20.1"), Dist("onnxruntime-extensions", "0.9"),
            Dist("onnx", "1.16")]
    monkeypatch.setattr(env.metadata, "distributions", lambda: iter(fake))
    assert env.installed_ort_distributions() == [("onnxruntime-gpu", "1.20.1"),
                                                 ("onnxruntime-training-cpu", "1.19.2")]
    with pytest.raises(EnvironmentProblem, match="keep onnxruntime-gpu 1.20.1"):
        env.check_runtime_environment()


def test_the_imported_runtime_is_among_the_distributions_found():
    ort = pytest.importorskip("onnxruntime")
    found = env.installed_ort_distributions()
    assert ort.__version__ in {v for _, v in found}, found
