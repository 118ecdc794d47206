"""Training with onnxruntime-training: SSL's group Lasso inside the loss graph.

Modules:

* :mod:`~onnx_ssl.training.penalty`: the groups of each structure (filter, channel, shape,
  filter2d, neuron, depth, coupled) built from an :class:`~onnx_ssl.groups.Analysis`, the
  penalty as ONNX nodes, vectorised numpy (proximal step, sparsity) and a group-by-group
  reference;
* :mod:`~onnx_ssl.training.artifacts`: the four onnxruntime-training artifacts whose loss is
  equation (1) of Wen et al. 2016;
* :mod:`~onnx_ssl.training.data`: ``.npz``, MNIST IDX folders, scikit-learn's digits;
* :mod:`~onnx_ssl.training.trainer`: the training loop (Module, Optimizer, CheckpointState),
  proximal step, logs, resumable checkpoints, export;
* :mod:`~onnx_ssl.training.chain`: train with SSL, threshold, prune, fine-tune, report; the
  demo;
* :mod:`~onnx_ssl.training.cli`: the ``artifacts``, ``train``, ``ssl`` and ``demo`` commands;
* :mod:`~onnx_ssl.training._ort`: imports the training API without importing torch.

Nothing here imports onnxruntime or torch at package import time.
"""
