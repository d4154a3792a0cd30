"""normserve service: FastAPI on ONNX Runtime. Never imports torch."""
