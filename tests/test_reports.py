"""Reports a user can act on: analyze's table and summary beside its JSON, bench's batch,
threads and spread (and a warning where the timings are too noisy to trust), what "params"
counts, the public API, and a help text for every option."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import onnx
import pytest

import onnx_ssl
from onnx_ssl import env, models
from onnx_ssl.analysis import analyze
from onnx_ssl.bench import MAX_SPREAD, BenchReport, BenchRow
from onnx_ssl.cli import build_parser, main
from onnx_ssl.io import initializer_elements

needs_ort = pytest.mark.skipif(not env.has_ort(), reason="needs an ONNX Runtime")


@pytest.fixture
def lenet_path(tmp_path: Path) -> Path:
    p = tmp_path / "lenet.onnx"
    onnx.save_model(models.build("lenet"), p)
    return p


@pytest.fixture
def dynamic_lenet(tmp_path: Path) -> Path:
    """LeNet with a symbolic batch N on its input and output."""
    m = models.build("lenet")
    for vi in (*m.graph.input, *m.graph.output):
        d = vi.type.tensor_type.shape.dim[0]
        d.Clear()
        d.dim_param = "N"
    p = tmp_path / "lenet_dyn.onnx"
    onnx.save_model(m, p)
    return p


# --- analyze --------------------------------------------------------------------------------


def test_analyze_prints_its_table_and_summary_beside_a_json_file(lenet_path, tmp_path, capsys):
    out = tmp_path / "a.json"
    assert main(["analyze", str(lenet_path), "--json", str(out)]) == 0
    got = capsys.readouterr()
    assert "conv1" in got.out and "blocked spaces:" in got.out
    assert ("prunable: 98.1% of the channels (570 of 581, in 3 of 5 spaces); 100.0% of the "
            "MACs (2,293,000 of 2,293,000) are in layers that read or write a prunable space"
            in got.out)
    assert f"wrote {out}" in got.err and "conv1" not in got.err
    assert json.loads(out.read_text()) == analyze(onnx.load(lenet_path),
                                                  name=str(lenet_path)).to_json()


def test_analyze_json_on_stdout_moves_the_table_to_stderr(capsys):
    assert main(["analyze", "builtin:lenet", "--json", "-"]) == 0
    got = capsys.readouterr()
    doc = json.loads(got.out)  # stdout is the JSON alone
    assert doc == analyze(models.build("lenet"), name="builtin:lenet").to_json()
    assert "conv1" in got.err and "prunable: 98.1% of the channels" in got.err
    assert not Path("-").exists()


def test_summary_counts_blocked_channels_and_their_macs(capsys):
    # LayerNorm over the channel axis blocks every space: nothing prunable, said in numbers.
    assert main(["analyze", "builtin:syn_block_layernorm"]) == 0
    out = capsys.readouterr().out
    a = analyze(models.build("syn_block_layernorm"))
    total = sum(s.channels for s in a.spaces)
    assert (f"prunable: 0.0% of the channels (0 of {total}, in 0 of {len(a.spaces)} spaces); "
            f"0.0% of the MACs (0 of {a.macs:,})" in out)


def test_params_say_what_they_count(capsys):
    """resnet20's BatchNorms are initializers but no layer's weight or bias: the two counts
    differ, and the report names both."""
    m = models.build("resnet20")
    a = analyze(m)
    layers = sum(la.params for la in a.layers)
    everything = initializer_elements(m)
    assert everything > layers
    assert main(["analyze", "builtin:resnet20"]) == 0
    out = capsys.readouterr().out
    assert (f"params: {layers:,} in the weights and biases of the {len(a.layers)} "
            f"Conv/ConvTranspose/Gemm/MatMul layers (the table's column); the model stores "
            f"{everything:,} in all its initializers" in out)
    assert "layer params (their weights and biases)" in out and "params (W+b)" in out


# --- bench ----------------------------------------------------------------------------------


@needs_ort
def test_bench_says_batch_threads_and_spread(dynamic_lenet, capsys):
    assert main(["bench", str(dynamic_lenet), str(dynamic_lenet), "--iters", "5",
                 "--threads", "1", "--batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "batch 4 (the models' batch is symbolic, bound by --batch)" in out
    assert "1 intra-op thread;" in out and "5 timed runs per model" in out
    assert "median ms" in out and "IQR ms" in out and "min - max ms" in out
    a1 = analyze(onnx.load(dynamic_lenet), kinds=())
    assert a1.macs_per_sample
    assert f"{4 * a1.macs / 1e6:.1f} M" in out  # MACs at the batch that ran
    assert main(["bench", str(dynamic_lenet), "--iters", "2"]) == 0
    assert "batch 1 (the models' batch is symbolic, bound to 1 by default; set it with --batch)" \
        in capsys.readouterr().out


@needs_ort
def test_bench_static_batch_is_the_models_and_refuses_another(lenet_path, dynamic_lenet, capsys):
    assert main(["bench", str(lenet_path), str(dynamic_lenet), "--iters", "2"]) == 0
    out = capsys.readouterr().out
    assert f"batch 1 (static in {lenet_path}; the others' symbolic batch bound to it)" in out
    assert "ONNX Runtime's default intra-op threads" in out
    assert main(["bench", str(lenet_path), "--batch", "4", "--iters", "2"]) == 2
    err = capsys.readouterr().err
    assert "has a static batch of 1; --batch 4 applies only" in err
    assert main(["bench", str(dynamic_lenet), "--batch", "0"]) == 2
    assert "--batch must be >= 1" in capsys.readouterr().err


def _row(name: str, median: float, iqr: float, speedup: float, bound: float) -> BenchRow:
    return BenchRow(name, 1000, median, median - iqr / 2, median + iqr / 2, median * 0.9,
                    median * 1.5, speedup, bound)


def _report(*rows: BenchRow) -> BenchReport:
    return BenchReport(rows, "cpu", 1, "static in the models", 1, 20, 3)


def test_bench_warns_when_the_spread_is_too_wide():
    noisy = _report(_row("base", 10.0, 10.0 * (MAX_SPREAD + 0.1), 1.0, 1.0),
                    _row("small", 1.0, 0.01, 10.0, 4.0))
    text = noisy.to_text()
    assert "10.00x *" in text
    assert ("warning: the speed-up of small is not to be trusted: the timings of base "
            "(interquartile range 30% of the median) spread over 20%; it reads 2.50x its MAC "
            "bound, which these timings cannot support" in text)
    # The spread of the model itself counts too, and a speed-up within the bound still warns.
    own = _report(_row("base", 10.0, 0.1, 1.0, 1.0), _row("small", 5.0, 2.0, 2.0, 4.0)).to_text()
    assert "the timings of small (interquartile range 40% of the median)" in own
    assert "MAC bound, which" not in own


def test_bench_notes_a_trusted_speedup_above_the_bound_and_is_quiet_otherwise():
    above = _report(_row("base", 10.0, 0.1, 1.0, 1.0), _row("small", 2.0, 0.02, 5.0, 4.0))
    text = above.to_text()
    assert "note: small runs 1.25x faster than its MAC bound allows with tight timings" in text
    assert "warning" not in text and " *" not in text
    plain = _report(_row("base", 10.0, 0.1, 1.0, 1.0), _row("small", 3.0, 0.03, 3.3, 4.0))
    assert plain.warnings() == [] and "note:" not in plain.to_text()


# --- the public API and the help texts --------------------------------------------------------


def test_public_api_is_all_and_leaks_no_typing_names():
    assert {"analyze", "prune", "benchmark", "convert_opset", "load_model",
            "save_model"} <= set(onnx_ssl.__all__)
    assert all(callable(getattr(onnx_ssl, n)) for n in onnx_ssl.__all__)
    for leak in ("Any", "TYPE_CHECKING", "annotations"):
        assert leak not in onnx_ssl.__all__ and not hasattr(onnx_ssl, leak), leak
    star: dict[str, object] = {}
    exec("from onnx_ssl import *", star)
    assert set(star) - {"__builtins__"} == set(onnx_ssl.__all__)


@needs_ort
def test_public_benchmark_and_convert_work():
    m = models.build("lenet")
    report = onnx_ssl.benchmark([("a", m), ("b", m)], iters=2, threads=1)
    assert [r.name for r in report.rows] == ["a", "b"] and report.batch == 1
    assert onnx_ssl.convert_opset(m, 17).opset_import[0].version == 17


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    for a in build_parser()._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    raise AssertionError("no subcommands")


@pytest.mark.parametrize("command", ["analyze", "prune", "convert", "bench", "train", "ssl",
                                     "demo"])
def test_every_option_has_a_help_text(command):
    parser = _subcommands()[command]
    missing = [a.option_strings[0] for a in parser._actions
               if a.option_strings and not a.help]
    assert missing == []


def test_prune_seed_says_what_it_seeds():
    help_text = _subcommands()["prune"].format_help()
    assert "--seed SEED" in help_text and "seed of the random inputs" in help_text
