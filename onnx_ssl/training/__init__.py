"""Training with onnxruntime-training: SSL's group Lasso inside the loss graph.

Modules:

* :mod:`~onnx_ssl.training.penalty`: the groups of each structure (filter, channel, shape,
  filter2d, neuron, depth, coupled) built from an :class:`~onnx_ssl.groups.Analysis`, the
  penalty as ONNX nodes and vectorised numpy (proximal step, sparsity);
* :mod:`~onnx_ssl.training.artifacts`: the four onnxruntime-training artifacts whose loss is
  equation (1) of Wen et al. 2016 (``build_artifacts``), built from
  :mod:`~onnx_ssl.training.spec` (the folder, its options and ``ssl.json``),
  :mod:`~onnx_ssl.training.probe` (batch sizes the model runs with),
  :mod:`~onnx_ssl.training.params` (trainable and frozen initializers),
  :mod:`~onnx_ssl.training.forms` (training and inference forms, export),
  :mod:`~onnx_ssl.training.loss_block` (the loss graph) and
  :mod:`~onnx_ssl.training.native` (the runtime's stderr, one-line errors);
* :mod:`~onnx_ssl.training.lowering`: the pass replacing ops without a gradient by their
  exact compositions (:mod:`onnx_ssl.decompositions`, in the core);
* :mod:`~onnx_ssl.training.data`: ``.npz`` (labelled, or inputs only), MNIST IDX folders,
  scikit-learn's digits;
* :mod:`~onnx_ssl.training.distill`: self-distillation without labels (the input model's
  outputs, cached once, as targets; the losses over every output);
  :mod:`~onnx_ssl.training.fidelity` the fidelity to the teacher per output (top-1
  agreement, cosine similarity or relative error);
* :mod:`~onnx_ssl.training.trainer`: the training loop (Module, Optimizer, CheckpointState),
  proximal step, logs, resumable checkpoints, export;
* :mod:`~onnx_ssl.training.chain`: train with SSL, threshold, prune, fine-tune, report;
  :mod:`~onnx_ssl.training.budget` its MAC/param budget controller;
  :mod:`~onnx_ssl.training.evaluate` the held-out error and fidelity of any model;
  :mod:`~onnx_ssl.training.speedup` the measured speedups;
* :mod:`~onnx_ssl.training.demo`: LeNet on the digits and the paper's Table 1;
* :mod:`~onnx_ssl.training._ort`: imports the training API without importing torch.

Nothing here imports onnxruntime or torch at package import time.
"""
