"""Evaluation of the served models through ONNX Runtime (`normserve eval classifier|denoiser`).

Torch-free: it runs the exported `model.onnx` of a model repository version with the service's
own session setup and preprocessing, so the numbers are those of the artifact that is served.
Needs the `eval` extra (scikit-image, matplotlib; OpenCV and bm3d for `--baselines`).
"""
