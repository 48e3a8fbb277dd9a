"""Inference engines: ONNX Runtime sentence encoder, vLLM generalist."""
