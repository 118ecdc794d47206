"""The four onnxruntime-training artifacts, with the SSL group-Lasso term inside the loss.

:func:`build_artifacts` writes into a folder:

``training_model.onnx``   forward + loss + gradient graph (ONNX Runtime's GradientGraphBuilder)
``eval_model.onnx``       forward + loss, BatchNorm and Dropout in inference form
``optimizer_model.onnx``  AdamW or SGD over the trainable parameters
``checkpoint``            the parameters (trainable and frozen) and the artifacts' fingerprint
``inference_model.onnx``  the model the trained weights are exported into
``ssl.json``              what the trainer needs: inputs, targets, loss, the penalty's groups

The loss graph computes (equation (1) of Wen et al. 2016)::

    ssl_loss = E_D(W) + weight_decay/2 * sum_l ||W_l||^2 + s * sum_g lambda_g R_g(W)

where ``E_D`` is the data loss of the model output, ``R_g`` the group-Lasso sums of
:mod:`onnx_ssl.training.penalty` and ``s`` the scalar input ``ssl_penalty_scale`` (1 gives
equation (1); the trainer feeds 0 when it applies the penalty as a proximal step instead).
``ssl_data_loss``, ``ssl_group_lasso`` (the unscaled sum) and ``ssl_weight_decay`` are
extra outputs, followed by the model outputs and the BatchNorm batch statistics.

Traps of onnxruntime-training 1.19.2 handled here: onnx >= 1.17 stamps IR version 11+ which
the runtime refuses (every file is written with IR <= 10); BatchNormalization trains in
``training_mode=1`` with its running-statistics outputs, which are frozen parameters updated
by the trainer from those outputs, and the eval model must drop them; Dropout needs its
``training_mode`` input and mask output; LayerNormalization needs its Mean and InvStdDev
outputs for its gradient; ``Sum`` and ``ReduceSumSquare`` have no gradient (the penalty uses
Add chains and Mul + ReduceSum); some ops have no gradient at all (GlobalMaxPool,
InstanceNormalization, HardSwish, Elu, LRN, ...): :mod:`.lowering` rewrites them into exact
compositions for training, and any other op without a gradient is refused in one line naming
the op and the node.

The build is split by job: :mod:`.spec` (the folder's files, options and ``ssl.json``),
:mod:`.probe` (which batch sizes the model computes right at), :mod:`.params` (trainable and frozen
initializers), :mod:`.forms` (training and inference forms, opset conversion, export of
trained weights), :mod:`.loss_block` (the loss graph), :mod:`.native` (the runtime's stderr
and one-line errors); :func:`build_artifacts` runs them in order.

The forward graph is rewritten on onnx-graphsurgeon, the compiler's IR: the training base
is imported once (:func:`onnx_ssl.io.shaped_graph`), put in training form and lowered in
place (:class:`~onnx_ssl.training.forms.ToTrainingFormPass`,
:class:`~onnx_ssl.training.lowering.LowerForTrainingPass`), and exported once, the door to
onnxblock; the inference model is the prepared graph in inference form
(:func:`~onnx_ssl.training.forms.export_template`). Protobuf is handled only at the doors:
the opset conversion and the batch probes (ONNX Runtime sessions) before, onnxblock's loss
graph and the models it hands back after.
"""


from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx_graphsurgeon as gs

from onnx_ssl import analysis as _analysis
from onnx_ssl.errors import InputError, OnnxSslError, UnsupportedModelError
from onnx_ssl.groups import Analysis
from onnx_ssl.io import (
    ModelMeta,
    current_umask,
    default_opset,
    from_graph,
    shaped_graph,
    to_graph,
    write_text_atomic,
)

from . import _ort
from .distill import distilled_outputs, parse_weights, term_loss
from .forms import (
    ToTrainingFormPass,
    export_inference_model,
    export_template,
    fix_eval_model,
    to_training_opset,
)
from .loss_block import LossSpec, make_training_block, target_spec
from .lowering import LowerForTrainingPass
from .native import native_stderr_captured, ort_error_line
from .params import classify_parameters
from .penalty import build_penalty
from .probe import (
    BatchCheck,
    free_batch_indices,
    free_batch_literals,
    set_batch,
    static_batch,
)
from .proto import fix_ir, graph_inputs, keep_initializer_order
from .spec import (  # re-exported: scripts and benchmarks import these from here
    ARTIFACT_FILES,
    BATCH_PARAM,
    CHECKPOINT,
    EVAL_MODEL,
    FINGERPRINT_PROPERTY,
    INFERENCE_MODEL,
    INFO,
    LOSSES,
    OPTIMIZER_MODEL,
    OPTIMIZERS,
    PENALTY_SCALE,
    TRAINING_MODEL,
    ArtifactInfo,
    ArtifactOptions,
    Artifacts,
    TensorSpec,
    load_artifacts,
)

__all__ = [
    "ARTIFACT_FILES",
    "BATCH_PARAM",
    "LOSSES",
    "OPTIMIZERS",
    "PENALTY_SCALE",
    "ArtifactInfo",
    "ArtifactOptions",
    "Artifacts",
    "TensorSpec",
    "build_artifacts",
    "export_inference_model",
    "load_artifacts",
]

log = logging.getLogger(__name__)


def build_artifacts(
    model: onnx.ModelProto,
    out_dir: str | os.PathLike[str],
    options: ArtifactOptions | None = None,
    *,
    name: str = "",
) -> Artifacts:
    """Write the training artifacts of ``model`` into ``out_dir`` (created or updated).

    Everything is built in a temporary folder beside ``out_dir`` and moved in file by file
    at the end, so a failure leaves ``out_dir`` as it was.
    """
    opts = options or ArtifactOptions()
    ob = _ort.load().onnxblock
    model, converted_from = to_training_opset(model)
    out = Path(out_dir)
    parent = _check_destination(out)
    loss_output = _loss_output(model, opts)
    opset = default_opset(model)
    forms = _batch_forms(model, opts.fallback_batch)
    an = _analysis.analyze(
        forms.analysed, kinds=("depth", "head"), name=name or model.graph.name, prepared=True
    )
    base = forms.base
    # The training graph: imported once, put in training form and lowered on the graph,
    # exported once to onnxblock (_training_graph).
    graph = shaped_graph(base)

    trainable, frozen = classify_parameters(graph, loss_output)
    if not trainable:
        raise UnsupportedModelError(
            "the model has no trainable parameters (no float32 "
            "weights in Conv, Gemm, MatMul, normalisation or bias "
            "slots)"
        )
    shapes = {n: tuple(int(d) for d in t.shape) for n, t in graph.tensors().items()
              if isinstance(t, gs.Constant)}
    penalty = build_penalty(
        an, opts.lambdas, {n: shapes[n] for n in trainable}, scale_by_size=opts.scale_by_size
    )
    for line in (f"{t.structure} {t.label}: {t.groups} groups" for t in penalty.active_terms):
        log.debug("penalty term %s", line)
    taken = set(graph.tensors())
    train_base, stats = _training_graph(graph, base, frozen)

    in_specs = tuple(TensorSpec.of(i) for i in graph_inputs(base))
    out_specs = tuple(TensorSpec.of(o) for o in base.graph.output)
    loss_spec_out = next(o for o in out_specs if o.name == loss_output)
    terms, weights, targets = _distill_terms(opts, out_specs, taken)
    if opts.distill is not None:
        target = targets[0]
        classes = (loss_spec_out.shape[-1] if len(loss_spec_out.shape) == 2
                   and (loss_spec_out.shape[-1] or 0) > 1 else None)
    else:
        target = target_spec(opts.loss, loss_spec_out, taken)
        classes = loss_spec_out.shape[-1] if opts.loss == "cross-entropy" else None
    decay = [la.weight for la in an.layers if la.weight in set(trainable)]
    spec = LossSpec(
        opts.loss,
        loss_output,
        target.name,
        [o.name for o in out_specs],
        [s for s, _ in stats],
        penalty,
        opts.weight_decay,
        decay,
        opset,
        distill=terms,
        targets=targets,
        output_types={o.name: o.dtype for o in out_specs},
        output_ranks={o.name: len(o.shape) for o in out_specs},
        temperature=opts.temperature,
    )
    models, params = _generate(ob, train_base, spec, trainable, frozen, opts.optimizer)
    models[EVAL_MODEL] = keep_initializer_order(
        fix_eval_model(models[EVAL_MODEL], {s for s, _ in stats}), models[EVAL_MODEL])
    for m in models.values():
        fix_ir(m)

    # A free batch: the form that was checked to compute each sample as the input model does
    # (a model prepared at its own batch may have folded a batch index: see probe.BatchCheck).
    inference_base = forms.base if forms.fixed_batch is None else forms.prepared
    template = export_template(model, to_graph(inference_base), ModelMeta.of(forms.prepared),
                               dynamic_ok=forms.fixed_batch is None)
    models[INFERENCE_MODEL] = fix_ir(keep_initializer_order(template, forms.prepared))
    fingerprint = _fingerprint(
        in_specs,
        {n: shapes[n] for n in (*trainable, *frozen)},
        frozen,
        json.dumps(
            [opts.loss, opts.optimizer, target.to_json(), penalty.to_json(),
             *([opts.distill, terms, weights, opts.temperature] if opts.distill else [])],
            sort_keys=True,
        ),
    )
    info = ArtifactInfo(
        model_name=name or model.graph.name or "model",
        inputs=in_specs,
        outputs=tuple(TensorSpec.of(o) for o in template.graph.output),
        loss_output=loss_output,
        target=target,
        loss=opts.loss,
        optimizer=opts.optimizer,
        weight_decay=opts.weight_decay,
        penalty=penalty,
        trainable=tuple(trainable),
        frozen=tuple(frozen),
        bn_stats=tuple(stats),
        fixed_batch=forms.fixed_batch,
        fingerprint=fingerprint,
        classes=classes,
        layers=_layers_json(an),
        converted_from_opset=converted_from,
        distill=opts.distill,
        distill_terms=terms,
        distill_weights=weights,
        temperature=opts.temperature,
    )
    _write_folder(out, parent, ob, models, params, info)
    log.info(
        "wrote training artifacts to %s (%d trainable, %d frozen parameters; penalty: %s)",
        out,
        len(trainable),
        len(frozen),
        opts.lambdas.describe(),
    )
    return Artifacts(out, info)


# --- the steps of build_artifacts ------------------------------------------------------------


def _check_destination(out: Path) -> Path:
    """Refuse an output folder that cannot be written; return the folder it goes in."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{out}: parent folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise InputError(f"{out}: not writable")
    return parent


def _loss_output(model: onnx.ModelProto, opts: ArtifactOptions) -> str:
    """The model output the data loss reads (``opts.output``, else the first output)."""
    if not graph_inputs(model):
        raise UnsupportedModelError("the model has no graph inputs to feed data into")
    outputs = [TensorSpec.of(o) for o in model.graph.output]
    loss_output = opts.output or outputs[0].name
    if loss_output not in {o.name for o in outputs}:
        raise InputError(
            f"--output {loss_output!r} is not a model output (outputs: "
            f"{', '.join(o.name for o in outputs)})"
        )
    return loss_output


def _distill_terms(
    opts: ArtifactOptions, outputs: Sequence[TensorSpec], taken: set[str]
) -> tuple[tuple[tuple[str, str, str], ...], tuple[float, ...], tuple[TensorSpec, ...]]:
    """Distillation's loss terms (output, teacher target input, loss), the outputs' weights
    and the target inputs (none without ``opts.distill``)."""
    if opts.distill is None:
        return (), (), ()
    outs = distilled_outputs(outputs)
    weights = parse_weights(opts.distill_weights, [o.name for o in outs])
    terms = []
    targets = []
    for o in outs:
        name = f"{o.name}_teacher"
        while name in taken:
            name = f"ssl_{name}"
        taken.add(name)
        terms.append((o.name, name, term_loss(opts.distill, o.shape, o.name)))
        targets.append(TensorSpec(name, o.shape, "float32"))
    return tuple(terms), weights, tuple(targets)


@dataclass(frozen=True)
class _BatchForms:
    """The model at the batch sizes the build needs.

    ``prepared``: at its own batch size (the inference model is built from it);
    ``analysed``: what the group analysis reads (static shapes); ``base``: what the
    training graph is built from (a symbolic batch when the model runs with any);
    ``fixed_batch``: the batch size training is held to, ``None`` when free.
    """

    prepared: onnx.ModelProto
    analysed: onnx.ModelProto
    base: onnx.ModelProto
    fixed_batch: int | None


def _batch_forms(model: onnx.ModelProto, fallback_batch: int) -> _BatchForms:
    # The analysis needs static shapes: prepare at the model's own batch size (1 if free).
    # Every form the training graph may be built from is checked on values (BatchCheck):
    # a form that runs at another batch size can still mix the samples.
    b0 = static_batch(model)
    prepared = _analysis.prepare(set_batch(model, b0))
    check = BatchCheck(model, b0)
    params = _float_initializers(prepared)
    tried: list[str] = []
    for form, candidate, freed in _batch_free_forms(model, prepared, b0):
        missing = params - _float_initializers(candidate)
        why = (f"it lacks the prepared model's tensor(s) {', '.join(sorted(missing)[:3])}"
               if missing else check.mismatch(candidate, b0 + 2))
        if why is not None:
            log.debug("%s is not batch-free: %s", form, why)
            tried.append(f"{form}: {why}")
            continue
        if freed:
            log.info("the training graph takes any batch size (batch-free shape targets or "
                     "indices of %s); the inference model keeps the input's shapes",
                     ", ".join(freed[:5]))
        return _BatchForms(prepared, prepared, onnx.shape_inference.infer_shapes(candidate),
                           None)
    # Shapes computed from the batch size fold to constants: prepare at the training batch
    # size; if the model holds literal batch-sized constants, only its own works.
    base, fixed_batch = prepared, b0
    if fallback_batch != b0:
        candidate = _analysis.prepare(set_batch(model, fallback_batch))
        why = check.mismatch(candidate, fallback_batch)
        if why is None:
            base, fixed_batch = candidate, fallback_batch
        else:
            log.debug("the model prepared at batch %d is wrong: %s", fallback_batch, why)
    log.warning(
        "the model's shapes depend on its batch size (re-export it with a dynamic batch "
        "axis to avoid this); training at a fixed batch size of %d (%s)",
        fixed_batch, tried[-1] if tried else "no batch-free form",
    )
    return _BatchForms(prepared, base, base, fixed_batch)


def _batch_free_forms(model: onnx.ModelProto, prepared: onnx.ModelProto, b0: int
                      ) -> Iterator[tuple[str, onnx.ModelProto, list[str]]]:
    """The forms of ``model`` with a symbolic batch the training graph may be built from,
    cheapest first, as (what it is, the form, the Reshape nodes whose batch literal was
    freed); each is still to be checked on values.

    ``prepared`` (folded at batch ``b0``) with the batch made symbolic, then with its batch
    literals freed (a static-batch export); then ``model`` prepared with its batch symbolic,
    where the shape arithmetic computed from the batch size stays computed (or is written
    back from it): folded at ``b0``, a gather index such as ``arange(batch) * seq`` that
    builds a BERT attention mask becomes the constant of batch 1, which broadcasts to any
    batch and makes every sample read sample 0's mask; last, where a static-batch export
    holds that ``arange(b0)`` as a literal, with it computed from the batch size
    (:func:`free_batch_indices`).
    """
    dynamic = set_batch(prepared, BATCH_PARAM)
    yield f"the model prepared at batch {b0}", dynamic, []
    freed_form, freed = free_batch_literals(dynamic, b0)
    if freed:
        yield f"the model prepared at batch {b0} with batch-free shape targets", freed_form, freed
    symbolic, freed = free_batch_literals(set_batch(model, BATCH_PARAM), b0, prepared)
    indexed, indices = free_batch_indices(symbolic, b0)
    for what, source, changed in (("", symbolic, freed),
                                  (" and batch indices", indexed, freed + indices)):
        if source is indexed and not indices:
            break
        try:
            with native_stderr_captured():
                form = _analysis.prepare(source)
        except OnnxSslError as e:
            log.debug("the model cannot be prepared with a symbolic batch%s: %s", what, e)
            continue
        yield f"the model prepared with a symbolic batch{what}", form, changed


def _float_initializers(model: onnx.ModelProto) -> set[str]:
    return {t.name for t in model.graph.initializer
            if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                               onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)}


def _training_graph(
    graph: gs.Graph, base: onnx.ModelProto, frozen: Sequence[str]
) -> tuple[onnx.ModelProto, list[tuple[str, str]]]:
    """The forward graph the gradient is built on: ``graph`` (imported from ``base``, with
    its shapes) put in training form and lowered in place, then exported, the door to
    onnxblock, with its shapes inferred and ``base``'s initializer order; and the
    (running-statistic output, parameter) pairs of its BatchNorms."""
    stats = ToTrainingFormPass(frozen)(graph).report.stats
    # Ops without a gradient in the training runtime train as exact compositions; the
    # inference model (built from the prepared model) keeps the original ops.
    for node_name, op_type in LowerForTrainingPass()(graph).report.lowered:
        log.info("node %s (%s) is lowered for training", node_name, op_type)
    # A trailing optional input left empty (Clip(x, min, "") as torch exports clamp(min=))
    # means the same as one left out, and the gradient builder takes "" for a missing tensor.
    for node in graph.nodes:
        while node.inputs and not node.inputs[-1].name:
            node.inputs.pop()
    model = from_graph(graph, ModelMeta.of(base))
    model = onnx.shape_inference.infer_shapes(keep_initializer_order(model, base))
    return fix_ir(model), list(stats)


def _generate(
    ob: Any,
    train_base: onnx.ModelProto,
    spec: LossSpec,
    trainable: Sequence[str],
    frozen: Sequence[str],
    optimizer: str,
) -> tuple[dict[str, onnx.ModelProto], Any]:
    """The training, eval and optimizer models (by file name) and the block's parameters,
    built by onnxblock; its failures become one-line UnsupportedModelErrors."""
    block = make_training_block(ob, spec)
    for p in trainable:
        block.requires_grad(p, True)
    for p in frozen:
        block.requires_grad(p, False)
    try:
        with native_stderr_captured(), ob.base(train_base):
            block(*[o.name for o in train_base.graph.output])
            training_model, eval_model = block.to_model_proto()
            params = block.parameters()
        opt_block = ob.optim.AdamW(weight_decay=0.0) if optimizer == "adamw" else ob.optim.SGD()
        with native_stderr_captured(), ob.empty_base(opset_version=spec.opset):
            opt_block(params)
            optimizer_model = opt_block.to_model_proto()
    except OnnxSslError:
        raise
    except Exception as e:  # onnxruntime raises RuntimeError/Fail/ValidationError
        raise UnsupportedModelError(
            f"cannot build the training graph: {ort_error_line(e)}"
        ) from e
    models = {
        TRAINING_MODEL: training_model,
        EVAL_MODEL: eval_model,
        OPTIMIZER_MODEL: optimizer_model,
    }
    return models, params


def _layers_json(an: Analysis) -> tuple[dict[str, Any], ...]:
    """The analysis' layers as ``ssl.json`` records them; ``bypassed``: the layer lies in a
    residual branch, so a shortcut carries the signal around it."""
    in_branch = {n for b in an.branches for n in b.layers}
    return tuple(
        {
            "node": la.node,
            "op_type": la.op_type,
            "weight": la.weight,
            "bias": la.bias,
            "out_axis": la.out_axis,
            "in_axis": la.in_axis,
            "weight_shape": list(la.weight_shape),
            "params": la.params,
            "macs": la.macs,
            "bypassed": la.node in in_branch,
        }
        for la in an.layers
    )


def _fingerprint(
    inputs: Sequence[TensorSpec],
    params: Mapping[str, Sequence[int]],
    frozen: Sequence[str],
    extra: str,
) -> str:
    h = hashlib.sha256()
    for s in inputs:
        h.update(repr((s.name, s.shape, s.dtype)).encode())
    for name in sorted(params):
        h.update(repr((name, tuple(params[name]), name in frozen)).encode())
    h.update(extra.encode())
    return h.hexdigest()[:16]


def _write_folder(
    out: Path,
    parent: Path,
    ob: Any,
    models: Mapping[str, onnx.ModelProto],
    params: Any,
    info: ArtifactInfo,
) -> None:
    """Write the four models, the checkpoint (with the fingerprint) and ``ssl.json`` into a
    temporary folder, check that ONNX Runtime loads them, and move them into ``out``."""
    created = not out.exists()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.artifacts.", dir=parent if created else out))
    try:
        for file in (TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL, INFERENCE_MODEL):
            _save_proto(models[file], tmp / file)
        with native_stderr_captured():
            ob.save_checkpoint(params, tmp / CHECKPOINT)
        api = _ort.load().api
        state = api.CheckpointState.load_checkpoint(str(tmp / CHECKPOINT))
        state.properties[FINGERPRINT_PROPERTY] = info.fingerprint
        api.CheckpointState.save_checkpoint(state, str(tmp / CHECKPOINT))
        write_text_atomic(tmp / INFO, json.dumps(info.to_json(), indent=1) + "\n")
        _check_loadable(tmp)
        if created:
            os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0o700
            os.rename(tmp, out)
        else:
            # ssl.json goes last: a folder with a new ssl.json has all the new files.
            for f in (*ARTIFACT_FILES[:-1], INFO):
                os.replace(tmp / f, out / f)
    except OnnxSslError:
        raise
    except OSError as e:
        raise InputError(f"{out}: cannot write the artifacts: {e.strerror or e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_proto(m: onnx.ModelProto, path: Path) -> None:
    with open(path, "wb") as f:
        f.write(m.SerializeToString())
        f.flush()
        os.fsync(f.fileno())


def _check_loadable(folder: Path) -> None:
    """Open the four artifacts with ONNX Runtime, as the trainer will."""
    api = _ort.load().api
    try:
        with native_stderr_captured():
            state = api.CheckpointState.load_checkpoint(str(folder / CHECKPOINT))
            module = api.Module(str(folder / TRAINING_MODEL), state, str(folder / EVAL_MODEL))
            api.Optimizer(str(folder / OPTIMIZER_MODEL), module)
    except Exception as e:  # onnxruntime's own exception types
        raise UnsupportedModelError(
            f"ONNX Runtime cannot load the generated artifacts: {ort_error_line(e)}"
        ) from e
