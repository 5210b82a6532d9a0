"""Export a trained captioner to ONNX (``onnx_export``) and caption with ONNX Runtime
(``onnx_runtime``), through the same search as the PyTorch model."""
