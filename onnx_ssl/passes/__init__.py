"""onnx-ssl graph passes (installed as onnx_ssl.passes)."""
