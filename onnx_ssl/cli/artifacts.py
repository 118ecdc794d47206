"""``onnx-ssl artifacts``: the onnxruntime-training artifacts with the group-Lasso loss
(:func:`onnx_ssl.training.artifacts.build_artifacts`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._common import Opt, add_options, needs_training, options_from
from ._training import add_lambdas, lambdas


def _opts() -> tuple[tuple[Opt, ...], tuple[Opt, ...]]:
    """The options before and after the lambdas."""
    from onnx_ssl.training.distill import DISTILL_LOSSES
    from onnx_ssl.training.spec import LOSSES, OPTIMIZERS

    return ((Opt("loss", "data loss on the model output (default {default})", choices=LOSSES),
             Opt("output", "model output the loss reads (default: the first)",
                 flags=("--output-name",), metavar="NAME")),
            (Opt("distill", "distil the model's own outputs instead of labels: the loss over "
                 "every float output (auto, mse on outputs divided by the teacher's RMS, kl, "
                 "cosine; see `ssl --distill`); `train` then runs this model as the teacher",
                 flags=("--distill-loss",), choices=DISTILL_LOSSES),
             Opt("temperature", "KL temperature (default {default:g})",
                 flags=("--distill-temperature",), metavar="T"),
             Opt("distill_weights", "weights of the outputs: W1,W2,... or NAME=W,... "
                 "(default equal)", metavar="W,..."),
             Opt("weight_decay", "lambda R(W) of eq. 1: X/2 times the squared L2 norm of every "
                 "layer weight, in the loss (default {default:g})", metavar="X"),
             Opt("optimizer", "optimizer model (default {default})", choices=OPTIMIZERS),
             Opt("fallback_batch", "batch size to fix when the model's shapes depend on it "
                 "(default {default})", flags=("--batch-size",), metavar="B")))


def register(sub: Any) -> None:
    from onnx_ssl.training.spec import ArtifactOptions

    p = sub.add_parser(
        "artifacts",
        help="write onnxruntime-training artifacts with the group-Lasso loss",
        description="Write the four onnxruntime-training artifacts (training, eval and "
        "optimizer models, checkpoint) whose loss is E_D(W) + weight_decay/2 "
        "||W||^2 + sum_g lambda_g sum_groups ||w_group||_2 (SSL, eq. 1), plus "
        "ssl.json and the inference model the trained weights go into.",
    )
    p.add_argument("model", help="input .onnx (or builtin:NAME)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="artifacts folder")
    head, tail = _opts()
    d = ArtifactOptions()
    add_options(p, d, head)
    add_lambdas(p, {})
    add_options(p, d, tail)
    p.set_defaults(func=needs_training(run))


def run(args: argparse.Namespace) -> int:
    from onnx_ssl import env
    from onnx_ssl.io import check_writable
    from onnx_ssl.loading import input_files, load
    from onnx_ssl.training.artifacts import build_artifacts
    from onnx_ssl.training.spec import ARTIFACT_FILES, ArtifactOptions

    head, tail = _opts()
    opts = options_from(ArtifactOptions, args, (*head, *tail), lambdas=lambdas(args, {}),
                        scale_by_size=args.scale_by_size)
    inputs = input_files(args.model)
    for f in ARTIFACT_FILES:
        check_writable(Path(args.output) / f, *inputs, create_folders=True)
    model = load(args.model)
    art = build_artifacts(model, args.output, opts, name=Path(args.model).stem)
    info = art.info
    counts: dict[str, int] = {}
    for t in info.penalty.active_terms:
        counts[t.structure] = counts.get(t.structure, 0) + t.groups
    print(
        f"wrote {art.path}: training_model.onnx, eval_model.onnx, optimizer_model.onnx, "
        f"checkpoint, inference_model.onnx, ssl.json"
    )
    print(
        f"  trainable parameters: {len(info.trainable)}, frozen (BatchNorm statistics): "
        f"{len(info.frozen)}; loss "
        + (f"{info.loss} on '{info.loss_output}'" if info.distill is None else
           f"distillation ({info.distill}) on {', '.join(o for o, _, _ in info.distill_terms)}")
        + ", optimizer "
        f"{info.optimizer}"
    )
    print(
        f"  group Lasso: {info.penalty.lambdas.describe()}"
        + (f" ({', '.join(f'{k} {v} groups' for k, v in counts.items())})" if counts else "")
    )
    if info.fixed_batch:
        print(f"  batch size fixed at {info.fixed_batch} (the model's shapes depend on it)")
    if info.converted_from_opset is not None:
        lim = env.runtime_limits()
        print(f"  converted from opset {info.converted_from_opset} to {lim.max_opset} with "
              f"onnx.version_converter: {lim.name} {lim.version} trains no newer opset")
    return 0
