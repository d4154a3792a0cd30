"""The bench's workloads: what is sent where, built once and identical for every server.

Images are deterministic: the classifier gets a 32×32 PNG of a shipped sample photo (CIFAR
size); the denoiser gets a sample photo scaled to 256² or 512² with Gaussian noise (σ = 25/255,
seed 0), the input a denoiser is for (noise also keeps the PNG as large as real noisy photos).
V2 binary infer sends the classify image's tensor, as `tritonclient.http` would.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from importlib.resources import files

import numpy as np
import orjson
from PIL import Image

from normserve.contract import LOGITS_OUTPUT, RECONSTRUCTION_OUTPUT
from normserve.service import imaging

BOUNDARY = "normservebench7d1f0a"
NOISE_SIGMA = 25.0 / 255.0
SAMPLES = files("normserve.service") / "static" / "samples"

WORKLOAD_NAMES = ("classify", "reconstruct256", "reconstruct512", "v2")


@dataclass(frozen=True)
class Workload:
    """One kind of request: a route, a fixed body and its headers, and what it feeds the model."""

    name: str
    path: str
    body: bytes
    headers: dict[str, str]
    model: str  # the model it runs (for the raw ORT comparison)
    tensor: np.ndarray = field(repr=False)  # the model input the server builds from `body`, (1, 3, H, W)
    output: str  # the model output the route asks for
    expect_type: str  # Content-Type of a good answer
    servers: tuple[str, ...]  # servers that offer it ("normserve", "naive")
    description: str

    @property
    def image_side(self) -> int:
        return int(self.tensor.shape[-1])


def _sample(name: str) -> Image.Image:
    with (SAMPLES / f"{name}.png").open("rb") as f:
        return Image.open(io.BytesIO(f.read())).convert("RGB")


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")  # Pillow's default compression, as a client's
    return buf.getvalue()


def classify_image() -> np.ndarray:
    """A 32×32 RGB photo (the shipped car sample, bilinear with antialiasing)."""
    return np.asarray(_sample("car").resize((32, 32), Image.Resampling.BILINEAR), dtype=np.uint8)


def noisy_image(side: int, seed: int = 0) -> np.ndarray:
    """A side×side RGB photo (the shipped sailboat sample, bicubic) with Gaussian noise."""
    clean = np.asarray(_sample("sailboat").resize((side, side), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    noise = np.random.default_rng(seed).normal(0.0, NOISE_SIGMA, clean.shape).astype(np.float32)
    return np.clip(np.rint((clean + noise) * 255.0), 0, 255).astype(np.uint8)


def served_tensor(png: bytes) -> np.ndarray:
    """The model input the server builds from these PNG bytes: the service's own decoding and
    preprocessing (no resize is needed: the bench's images are already the size they run at)."""
    return imaging.to_tensor(imaging.decode_image(png, max_pixels=1 << 30))


def multipart(data: bytes, filename: str = "image.png", content_type: str = "image/png") -> tuple[bytes, str]:
    """A multipart/form-data body with one file field `file`, and its Content-Type header."""
    head = (
        f"--{BOUNDARY}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{BOUNDARY}--\r\n".encode(), f"multipart/form-data; boundary={BOUNDARY}"


def v2_binary(
    tensor: np.ndarray, input_name: str = "image", output: str = LOGITS_OUTPUT
) -> tuple[bytes, dict[str, str]]:
    """An Open Inference Protocol v2 request with the binary tensor data extension (input and
    output binary, as tritonclient sends with binary_data=True), and its headers."""
    raw = np.ascontiguousarray(tensor, dtype="<f4").tobytes()
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": input_name,
                    "shape": list(tensor.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": output, "parameters": {"binary_data": True}}],
        }
    )
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }
    return header + raw, headers


def build_workloads(names: list[str] | tuple[str, ...] = WORKLOAD_NAMES) -> list[Workload]:
    unknown = sorted(set(names) - set(WORKLOAD_NAMES))
    if unknown:
        raise ValueError(f"unknown workloads {unknown}; choose from {list(WORKLOAD_NAMES)}")
    small_png = png_bytes(classify_image())
    out: list[Workload] = []
    for name in names:
        if name == "classify":
            body, ctype = multipart(small_png)
            out.append(
                Workload(
                    name,
                    "/classify",
                    body,
                    {"Content-Type": ctype},
                    "gncnn",
                    served_tensor(small_png),
                    LOGITS_OUTPUT,
                    "application/json",
                    ("normserve", "naive"),
                    "POST /classify, 32×32 PNG, multipart",
                )
            )
        elif name.startswith("reconstruct"):
            side = int(name.removeprefix("reconstruct"))
            png = png_bytes(noisy_image(side))
            body, ctype = multipart(png)
            out.append(
                Workload(
                    name,
                    "/reconstruct",
                    body,
                    {"Content-Type": ctype},
                    "in_autoencoder",
                    served_tensor(png),
                    RECONSTRUCTION_OUTPUT,
                    "image/png",
                    ("normserve", "naive"),
                    f"POST /reconstruct, {side}×{side} noisy PNG, multipart → PNG",
                )
            )
        else:  # v2
            tensor = served_tensor(small_png)
            body, headers = v2_binary(tensor)
            out.append(
                Workload(
                    name,
                    "/v2/models/gncnn/infer",
                    body,
                    headers,
                    "gncnn",
                    tensor,
                    LOGITS_OUTPUT,
                    "application/octet-stream",
                    ("normserve",),
                    "POST /v2/models/gncnn/infer, 1×3×32×32 FP32, binary tensor extension",
                )
            )
    return out
