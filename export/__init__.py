"""Export the PyTorch models to ONNX (opset 18), check them, and write the model repository.

Needs the `export` extra (torch, onnx, onnxscript); the service never imports this package.
"""
