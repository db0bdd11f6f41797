"""Checkpoint -> test-time graph -> ONNX -> TensorRT, with parity proven against PyTorch."""
