"""The runtime onnx-ssl runs beside: any single ONNX Runtime distribution, none for analyze,
opset and IR limits read from the installed onnx and runtime, the convert command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper

from onnx_ssl import env, models, runtime
from onnx_ssl.analysis import analyze
from onnx_ssl.compiler import prune
from onnx_ssl.errors import EnvironmentProblem, UnsupportedModelError
from onnx_ssl.io import default_opset, load_model, save_model

HAS_ORT = env.has_ort()
needs_ort = pytest.mark.skipif(not HAS_ORT, reason="needs an ONNX Runtime")


def _tiny(opset: int, ir: int = 8) -> onnx.ModelProto:
    """conv(4) -> relu -> conv(3): the second conv reads every channel of the first."""
    rng = np.random.default_rng(0)
    m = onnx.parser.parse_model(
        f'<ir_version: {ir}, opset_import: ["" : {opset}]>\n'
        "tiny (float[1, 2, 6, 6] x) => (float[1, 3, 6, 6] y) {\n"
        "  a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)\n"
        "  r = Relu(a)\n"
        "  y = Conv <pads = [1, 1, 1, 1]> (r, w2, b2)\n"
        "}")
    for name, shape in (("w1", (4, 2, 3, 3)), ("b1", (4,)), ("w2", (3, 4, 3, 3)), ("b2", (3,))):
        arr = rng.standard_normal(shape).astype(np.float32)
        if name == "w1":
            arr[1] = 0  # filter 1 is zero...
        if name == "b1":
            arr[1] = -1.0  # ...and its ReLU'd bias is 0: channel 1 carries a zero constant
        m.graph.initializer.append(numpy_helper.from_array(arr, name))
    for i, node in enumerate(m.graph.node):
        node.name = f"n{i}"
    onnx.checker.check_model(m)
    return m


# --- which runtime ---------------------------------------------------------------------


@pytest.mark.parametrize("dists, keep, extra", [
    ([("onnxruntime", "1.31.1"), ("onnxruntime-training-cpu", "1.19.2")], "onnxruntime 1.31.1",
     "train in an environment of its own"),
    ([("onnxruntime-gpu", "1.22.0"), ("onnxruntime-training-cpu", "1.19.2")],
     "onnxruntime-gpu 1.22.0", "train in an environment of its own"),
    ([("onnxruntime", "1.31.1"), ("onnxruntime-gpu", "1.31.1")], "onnxruntime-gpu 1.31.1", None),
])
def test_mixed_runtimes_are_refused_with_advice_that_keeps_the_users(monkeypatch, dists, keep,
                                                                     extra):
    monkeypatch.setattr(env, "installed_ort_distributions", lambda: list(dists))
    with pytest.raises(EnvironmentProblem) as e:
        env.check_runtime_environment()
    msg = str(e.value)
    assert "\n" not in msg
    assert f"keep {keep}: pip uninstall -y" in msg
    assert f"pip install {keep.replace(' ', '==')}" in msg
    assert (extra in msg) if extra else ("environment of its own" not in msg)


def test_one_runtime_or_none_is_fine(monkeypatch):
    for dists in ([("onnxruntime", "1.17.0")], [("onnxruntime-training-cpu", "1.19.2")], []):
        monkeypatch.setattr(env, "installed_ort_distributions", lambda d=dists: list(d))
        assert env.check_runtime_environment() == dists
    # The near miss: a second distribution of the same module is refused.
    two = [("onnxruntime", "1.17.0"), ("onnxruntime-gpu", "1.17.0")]
    monkeypatch.setattr(env, "installed_ort_distributions", lambda: list(two))
    with pytest.raises(EnvironmentProblem, match="several ONNX Runtime distributions"):
        env.check_runtime_environment()


def test_training_reason_names_the_python_and_the_extra(monkeypatch):
    r313 = env.training_unavailable_reason((3, 13))
    assert "Python 3.10 to 3.12" in r313 and "this is Python 3.13" in r313
    assert env.train_venv_hint() in r313 and "[train]'" in r313
    monkeypatch.setattr(env, "installed_ort_distributions", lambda: [("onnxruntime", "1.31.1")])
    r = env.training_unavailable_reason((3, 11))
    assert "onnxruntime 1.31.1, an inference build" in r and env.train_venv_hint() in r
    assert env.supports_training_python((3, 12)) and not env.supports_training_python((3, 13))


def test_training_without_a_training_build_is_one_line(monkeypatch):
    from onnx_ssl.training import _ort

    monkeypatch.setattr(env, "installed_ort_distributions", lambda: [("onnxruntime", "1.31.1")])
    monkeypatch.setattr(_ort, "_LOADED", None)
    with pytest.raises(EnvironmentProblem, match=r"pip install -e '.*\[train\]'"):
        _ort.load()


ROOT = Path(__file__).resolve().parents[1]


def test_install_advice_works_from_the_checkout(monkeypatch):
    """onnx-ssl is on no registry: advice names the checkout it was installed from, never
    `pip install 'onnx-ssl[...]'`, which would find nothing (or someone else's package)."""
    assert env.checkout_dir() == ROOT
    assert env.pip_install("train") == f"pip install -e '{ROOT}[train]'"
    assert env.train_venv_hint().endswith(f".venv-train/bin/pip install -e '{ROOT}[train]'")
    assert env.install_hint().startswith(f"pip install -e '{ROOT}[cpu]'")
    monkeypatch.setattr(env, "checkout_dir", lambda: None)
    assert env.pip_install("gpu") == "pip install -e '.[gpu]' (from your onnx-ssl checkout)"


def test_no_message_suggests_installing_from_a_registry():
    offenders = [f"{p.relative_to(ROOT)}:{i}"
                 for p in sorted((ROOT / "onnx_ssl").rglob("*.py"))
                 for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
                 if "install 'onnx-ssl[" in line or "install onnx-ssl[" in line]
    assert offenders == []


# --- limits read from the installed onnx and runtime -------------------------------------


def test_onnx_limits_are_the_installed_onnx():
    lim = env.onnx_limits()
    assert (lim.max_ir, lim.max_opset) == (onnx.IR_VERSION, onnx.defs.onnx_opset_version())


@needs_ort
def test_runtime_limits_are_probed_exactly():
    lim = env.runtime_limits()
    rt = runtime.ort()
    so = rt.SessionOptions()
    so.log_severity_level = 4

    def loads(ir: int, opset: int) -> bool:
        try:
            rt.InferenceSession(_tiny(opset, ir).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
        except Exception:
            return False
        return True

    assert loads(lim.max_ir, lim.max_opset)
    if lim.max_ir < onnx.IR_VERSION:
        assert not loads(lim.max_ir + 1, 13)
    if lim.max_opset < onnx.defs.onnx_opset_version():
        assert not loads(lim.max_ir, lim.max_opset + 1)
    assert lim.version == rt.__version__


def test_model_newer_than_onnx_reads_is_one_line(tmp_path: Path):
    lim = env.onnx_limits()
    for opset, ir, what in ((lim.max_opset + 1, 8, "opset"), (13, lim.max_ir + 1, "IR version")):
        m = _tiny(13)
        m.opset_import[0].version = opset
        m.ir_version = ir
        p = tmp_path / f"{what.replace(' ', '_')}.onnx"
        p.write_bytes(m.SerializeToString())
        with pytest.raises(UnsupportedModelError) as e:
            load_model(p)
        msg = str(e.value)
        assert f"installed onnx {onnx.__version__}" in msg and "pip install -U onnx" in msg
        assert what in msg


@needs_ort
def test_opset_newer_than_the_runtime_runs_names_both_and_the_conversion():
    top = env.runtime_limits().max_opset
    if top >= env.onnx_limits().max_opset:
        pytest.skip("the installed runtime runs every opset the installed onnx reads")
    m = _tiny(top + 1)
    assert analyze(m).macs > 0  # analysis needs only onnx
    with pytest.raises(UnsupportedModelError) as e:
        prune(m)
    msg = str(e.value)
    assert f"opset {top + 1}" in msg and f"opset <= {top}" in msg
    assert f"onnx-ssl convert MODEL.onnx --opset {top}" in msg


@needs_ort
def test_written_model_keeps_opset_and_gets_an_ir_the_runtime_loads(tmp_path: Path):
    top = env.runtime_limits()
    opset = min(top.max_opset, 18)
    m = _tiny(opset, ir=onnx.IR_VERSION)  # onnx >= 1.17 stamps IRs that older runtimes refuse
    res = prune(m)
    assert res.report.macs_after < res.report.macs_before
    out = save_model(res.model, tmp_path / "out.onnx")
    written = onnx.load(out)
    assert default_opset(written) == opset
    assert written.ir_version == min(onnx.IR_VERSION, top.max_ir)
    runtime.session(written)  # loads


# --- convert --------------------------------------------------------------------------------


def _cli(*args: str, block_ort: bool = False) -> subprocess.CompletedProcess[str]:
    pre = "import sys; sys.modules['onnxruntime'] = None; " if block_ort else "import sys; "
    code = pre + "from onnx_ssl.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})


@needs_ort
def test_convert_down_is_checked_numerically(tmp_path: Path):
    src = tmp_path / "m.onnx"
    src.write_bytes(_tiny(18).SerializeToString())
    out = tmp_path / "m17.onnx"
    r = _cli("convert", str(src), "--opset", "17", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "from opset 18 to 17; numeric check passed" in r.stdout
    assert default_opset(onnx.load(out)) == 17


def test_convert_without_an_adapter_names_the_node(tmp_path: Path):
    m = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 18]>\n'
        "c (float[1, 4, 4] x) => (float[1, 1, 4, 4] y) {\n"
        "  r = Relu(x)\n"
        "  s = Constant <value = int64[2] {4, 4}> ()\n"
        "  k = Constant <value = int64[2] {1, 1}> ()\n"
        "  y = Col2Im <pads = [0, 0, 0, 0]> (r, s, k)\n"
        "}")
    m.graph.node[3].name = "col2im_node"
    src = tmp_path / "c.onnx"
    src.write_bytes(m.SerializeToString())
    r = _cli("convert", str(src), "--opset", "17", "-o", str(tmp_path / "o.onnx"))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1, r.stderr
    assert "at node 'col2im_node' (Col2Im)" in r.stderr and "opset 18 to 17" in r.stderr
    assert not (tmp_path / "o.onnx").exists()


# --- without any runtime ---------------------------------------------------------------------


def test_analyze_needs_no_runtime_and_prune_names_the_extra(tmp_path: Path):
    # syn_same_pad folds TF-style "same" padding arithmetic: the fold runs without a runtime.
    for name in ("lenet", "syn_same_pad"):
        src = tmp_path / f"{name}.onnx"
        src.write_bytes(models.build(name).SerializeToString())
        blocked = tmp_path / f"{name}.noort.json"
        r = _cli("analyze", str(src), "--json", str(blocked), block_ort=True)
        assert r.returncode == 0, r.stderr
        if HAS_ORT:
            with_ort = tmp_path / f"{name}.ort.json"
            assert _cli("analyze", str(src), "--json", str(with_ort)).returncode == 0
            assert json.loads(blocked.read_text()) == json.loads(with_ort.read_text())
        else:
            assert json.loads(blocked.read_text())["spaces"]
    r = _cli("prune", str(tmp_path / "lenet.onnx"), "-o", str(tmp_path / "o.onnx"),
             block_ort=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert ("needs ONNX Runtime, and none is installed: pip install -e '" in r.stderr
            and "[cpu]'" in r.stderr)
    assert not (tmp_path / "o.onnx").exists()


def test_training_commands_without_training_say_why_in_one_line(tmp_path: Path):
    if any(n in env.TRAINING_DISTRIBUTIONS for n, _ in env.installed_ort_distributions()):
        pytest.skip("this environment has a training build")
    r = _cli("demo", "-o", str(tmp_path / "demo.onnx"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert env.training_unavailable_reason() in r.stderr
    assert not list(tmp_path.iterdir())


@needs_ort
def test_bench_on_cuda_without_a_cuda_build_names_the_extra():
    if "CUDAExecutionProvider" in runtime.ort().get_available_providers():
        pytest.skip("this runtime has CUDA")
    r = _cli("bench", "builtin:lenet", "--provider", "cuda")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "CUDAExecutionProvider is not available" in r.stderr and "[gpu]'" in r.stderr
    assert "pip install -e '" in r.stderr
