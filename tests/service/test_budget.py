"""The worker's memory budget, the decode CPU bounds and the request governor (deadline,
cancellation), in-process. The same rules over a real socket: test_adversarial.py."""

from __future__ import annotations

import asyncio
import io
import os
import struct
import threading
import time
from typing import Any

import numpy as np
import pytest
from conftest import ClientFactory, ErrorCheck, SettingsFactory
from images import encode, gradient, noise
from inprocess import batcher, serving, until
from PIL import Image

from normserve.bench.budget import decode_cases, measure_decode, measure_route
from normserve.service import imaging
from normserve.service.budget import MIB, MemoryBudget
from normserve.service.errors import Overloaded, PayloadTooLarge
from normserve.service.imaging import DecodeLimits, decode_image, jpeg_scans, open_image
from normserve.service.state import server_state

HEAVY = os.environ.get("NORMSERVE_HEAVY") == "1"  # every calibration case (scripts/adversarial.sh)
_heavy = pytest.mark.skipif(not HEAVY, reason="NORMSERVE_HEAVY=1")

# -- MemoryBudget ---------------------------------------------------------------------------------


def test_budget_refuses_what_can_never_fit_and_names_the_setting() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(100 * MIB, wait_s=1)
        with pytest.raises(PayloadTooLarge, match="NORMSERVE_WORKER_MEMORY_MB"):
            await budget.acquire(101 * MIB, "a big image")
        assert budget.used == 0

    asyncio.run(scenario())


def test_budget_waits_for_a_release_then_admits() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(100 * MIB, wait_s=10)
        await budget.acquire(80 * MIB, "first")
        second = asyncio.create_task(budget.acquire(40 * MIB, "second"))
        await asyncio.sleep(0.05)
        assert not second.done(), "admitted past the budget"
        budget.release(80 * MIB)
        await asyncio.wait_for(second, 5)
        assert budget.used == 40 * MIB and budget.peak == 80 * MIB

    asyncio.run(scenario())


def test_budget_gives_503_with_retry_after_when_the_wait_is_over() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(100 * MIB, wait_s=0.1)
        await budget.acquire(80 * MIB, "first")
        with pytest.raises(Overloaded, match="NORMSERVE_MEMORY_WAIT_S") as info:
            await budget.acquire(40 * MIB, "second")
        assert info.value.headers == {"Retry-After": "1"}
        assert budget.used == 80 * MIB

    asyncio.run(scenario())


# -- decode CPU bounds ------------------------------------------------------------------------------


def progressive_jpeg_repeating_scans(times: int, side: int = 64) -> bytes:
    """A progressive JPEG (a smooth `side` x `side` image) whose smallest scan (its SOS segment
    and entropy-coded data) is repeated until the file has `times` times the scans: valid markers,
    and libjpeg decodes every scan (the 1,000-scan attack of issue 26: 6000 x 6000 in 334 KiB)."""
    data = encode(Image.fromarray(gradient(side, side)), "JPEG", progressive=True, quality=90)
    starts = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xDA]
    end = data.rindex(b"\xff\xd9")
    scans = [data[a:b] for a, b in zip(starts, [*starts[1:], end], strict=True)]
    smallest = min(scans, key=len)
    return data[:end] + smallest * (len(scans) * (times - 1)) + b"\xff\xd9"


def gif_declaring_canvas(width: int, height: int) -> bytes:
    """A 35-byte GIF: a `width` x `height` logical screen holding one 1x1 frame (Pillow decodes
    the whole canvas)."""
    header = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"," + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return header + frame + b";"


def test_jpeg_scans_counts_the_scans_after_the_header() -> None:
    base = encode(Image.fromarray(noise(64, 64)), "JPEG", progressive=True)
    n = jpeg_scans(base)
    assert 6 <= n <= 20  # libjpeg's standard progression
    assert jpeg_scans(encode(Image.fromarray(noise(64, 64)), "JPEG")) == 1
    assert jpeg_scans(progressive_jpeg_repeating_scans(100)) == 100 * n


def test_jpeg_with_too_many_scans_is_refused_before_decoding() -> None:
    data = progressive_jpeg_repeating_scans(1000)
    started = time.process_time()
    with pytest.raises(PayloadTooLarge, match=r"scans; at most 100 are decoded \(NORMSERVE_MAX_JPEG_SCANS\)"):
        open_image(data, 10**9, limits=DecodeLimits(max_jpeg_scans=100))
    assert time.process_time() - started < 1.0  # a pass over the bytes, not a decode
    assert open_image(data, 10**9, limits=DecodeLimits()).size == (64, 64)  # 0: no limit


@pytest.mark.parametrize(
    ("make", "fmt"),
    [
        (lambda: gif_declaring_canvas(6000, 6300), "GIF"),
        (lambda: encode(Image.new("RGB", (16383, 300)), "WEBP", lossless=True, method=0), "WEBP"),
    ],
)
def test_tiny_files_declaring_megapixels_are_refused(make: Any, fmt: str) -> None:
    data = make()
    assert len(data) < 2048
    limits = DecodeLimits(max_pixels_per_byte=2000)
    with pytest.raises(PayloadTooLarge, match=f"{fmt} of {len(data)} bytes declares .*NORMSERVE_MAX_PIXELS_PER_BYTE"):
        open_image(data, 10**9, limits=limits)
    small = encode(Image.new("RGB", (1000, 1000)), "PNG")  # 1 MP of zeros: ~1,000 px/byte, under the floor
    assert open_image(small, 10**9, limits=limits).size == (1000, 1000)


def test_animated_files_are_refused_without_walking_their_frames() -> None:
    frames = [Image.new("P", (4, 4), i % 2) for i in range(2000)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], optimize=False)
    started = time.process_time()
    with pytest.raises(Exception, match="multi-frame GIF is not accepted"):
        open_image(buf.getvalue(), 10**9)
    assert time.process_time() - started < 0.5


# -- the lean pipeline ------------------------------------------------------------------------------


def _reference_rgb(img: Image.Image) -> np.ndarray:
    """The pre-budget pipeline: the whole image converted at once."""
    img.load()
    return np.asarray(imaging._to_rgb(img, imaging._high_bit_scale(img)))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "I;16", "I", "F", "1", "CMYK", "PA"])
@pytest.mark.parametrize("factor", [1, 3])
def test_chunked_conversion_equals_whole_image_conversion(
    mode: str, factor: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(imaging, "CHUNK_PIXELS", 97 * 5)  # many chunks, not aligned to anything
    rgb = Image.fromarray(noise(97, 61))
    if mode in ("I;16", "I"):
        img = Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257 - 3).clip(0).astype(np.uint16))
        img = img if mode == "I;16" else img.convert("I")
    elif mode == "F":
        img = Image.fromarray(np.asarray(rgb.convert("L"), np.float32) / 300.0, mode="F")
    else:
        img = rgb.convert(mode)
    want = _reference_rgb(img.copy())
    if factor > 1:
        want = np.asarray(Image.fromarray(want).reduce(factor))
    assert np.array_equal(imaging._rgb_array(img, factor), want)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_on_the_array_matches_pillow(orientation: int) -> None:
    from images import exif_jpeg
    from PIL import ImageOps

    data = exif_jpeg(orientation)
    want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert np.array_equal(decode_image(data, 10**9).pixels, want)


def test_resizing_routes_decode_large_images_reduced() -> None:
    data = encode(Image.fromarray(gradient(2000, 1500)), "JPEG")
    plan = imaging.plan_decode(open_image(data, 10**9), (32, 32))
    assert plan.img.size == (250, 188)  # JPEG DCT scaling 1/8: at least 3 x 32 a side
    image = imaging.decode_planned(plan)
    assert (image.width, image.height) == (2000, 1500) and image.pixels.shape == (188, 250, 3)
    png = imaging.plan_decode(open_image(encode(Image.fromarray(gradient(1000, 600)), "PNG"), 10**9), (32, 32))
    assert png.factor == 6 and png.out_pixels == 167 * 100


# every format natively, and the resize path where the decode differs (JPEG's draft, reduce)
_PEAK_NAMES = {
    "PNG I;16 ramp, native",
    "PNG I;16 ramp, resized to 32x32",
    "TIFF F, native",
    "PNG RGBA noise, native",
    "PNG P, native",
    "WebP lossless, native",
    "JPEG progressive, native",
    "JPEG progressive, resized to 32x32",
    "JPEG rotated (EXIF 6), native",
    "PNG RGB noise, resized to 32x32",
}
_PEAK_CASES = [c for c in decode_cases(600) if c.name in _PEAK_NAMES or HEAVY]


@pytest.mark.parametrize("case", _PEAK_CASES, ids=lambda c: c.name)
def test_decode_estimate_bounds_the_measured_peak(case: Any) -> None:
    """The plan's estimate is at least the peak RSS the pipeline really reached (fresh process,
    VmHWM reset; bench/budget.py prints the same table at larger sizes)."""
    result = measure_decode(case)
    assert result["peak"] <= result["estimate"], result


def _v2(shape: list[int]) -> tuple[bytes, dict[str, str]]:
    size = 4 * int(np.prod(shape))
    header = b'{"inputs":[{"name":"image","shape":%s,"datatype":"FP32","parameters":{"binary_data_size":%d}}]}' % (
        str(shape).replace(" ", "").encode(),
        size,
    )
    headers = {"inference-header-content-length": str(len(header)), "content-type": "application/octet-stream"}
    return header + np.full(size // 4, 0.5, np.float32).tobytes(), headers


_PNG = {"content-type": "image/png"}
ROUTE_CASES = {
    "features 384x384 native": ("/features?resize=false", encode(Image.fromarray(noise(384, 384)), "PNG"), _PNG),
    "reconstruct 1500x1000 tiled": ("/reconstruct", encode(Image.fromarray(noise(1500, 1000)), "JPEG"), _PNG),
    "reconstruct 512x512 whole": ("/reconstruct", encode(Image.fromarray(noise(512, 512)), "PNG"), _PNG),
    "classify 16-bit 3000x3000": ("/classify", encode(Image.fromarray(np.zeros((3000, 3000), np.uint16)), "PNG"), _PNG),
    "V2 denoiser [2,3,512,512]": ("/v2/models/in_autoencoder/infer", *_v2([2, 3, 512, 512])),
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        c if c.startswith(("features", "reconstruct 1500")) or HEAVY else pytest.param(c, marks=_heavy)
        for c in ROUTE_CASES
    ],
)
def test_route_reservation_bounds_the_measured_peak(case: str, committed_model_repository: Any) -> None:
    """A whole request (decode, run, answer) in a fresh process: the peak RSS it adds is at most
    what it reserved from the budget."""
    path, body, headers = ROUTE_CASES[case]
    result = measure_route(committed_model_repository, path, body, headers)
    assert result["estimate"] > 0 and result["peak"] <= result["estimate"], result


# -- the routes -----------------------------------------------------------------------------------


def test_a_request_larger_than_the_budget_is_413(app_client: ClientFactory, expect_error: ErrorCheck) -> None:
    client = app_client(worker_memory_mb=16)
    data = encode(Image.fromarray(noise(1200, 1000)), "PNG", compress_level=1)
    r = client.post("/reconstruct", content=data, headers={"content-type": "image/png"})
    expect_error(r, 413, "1200x1000", "NORMSERVE_WORKER_MEMORY_MB")


def test_features_native_beyond_its_limit_is_413(client: Any, expect_error: ErrorCheck) -> None:
    data = encode(Image.fromarray(noise(400, 400)), "PNG")
    r = client.post("/features?resize=false", content=data, headers={"content-type": "image/png"})
    expect_error(r, 413, "160000", "NORMSERVE_MAX_FEATURES_PIXELS")


def test_v2_denoiser_larger_than_one_tile_batch_is_413(client: Any, expect_error: ErrorCheck) -> None:
    side = 1600
    header = (
        b'{"inputs":[{"name":"image","shape":[1,3,%d,%d],"datatype":"FP32","parameters":{"binary_data_size":%d}}]}'
        % (side, side, 12 * side * side)
    )
    body = header + bytes(12 * side * side)
    r = client.post(
        "/v2/models/in_autoencoder/infer",
        content=body,
        headers={"inference-header-content-length": str(len(header)), "content-type": "application/octet-stream"},
    )
    expect_error(r, 413, "2560000 pixels", "NORMSERVE_MAX_BATCH_PIXELS", "/reconstruct")


def test_waiting_for_memory_ends_in_503_with_retry_after(
    settings_factory: SettingsFactory, expect_error: ErrorCheck
) -> None:
    async def scenario() -> None:
        async with serving(settings_factory(memory_wait_s=0.2, version_policy="latest:1")) as (app, client):
            budget: MemoryBudget = server_state(app).budget
            budget.used = budget.capacity  # every byte held by someone else
            data = encode(Image.fromarray(noise(64, 64)), "PNG")
            r = await client.post("/classify", content=data, headers={"content-type": "image/png"})
            expect_error(r, 503, "NORMSERVE_WORKER_MEMORY_MB", "retry later")
            assert r.headers["retry-after"] == "1"
            budget.used = 0
            ok = await client.post("/classify", content=data, headers={"content-type": "image/png"})
            assert ok.status_code == 200
            assert budget.used == 0, "a finished request still holds memory"

    asyncio.run(scenario())


def test_the_deadline_covers_tiles_and_drops_those_not_started(
    settings_factory: SettingsFactory, expect_error: ErrorCheck, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tiled /reconstruct past NORMSERVE_REQUEST_TIMEOUT_S: 504, no tile batch starts after it,
    the run in progress is told to terminate, and the memory is released."""

    async def scenario() -> None:
        settings = settings_factory(
            request_timeout_s=0.5, reconstruct_tile=64, reconstruct_overlap=8, version_policy="latest:1"
        )
        async with serving(settings) as (app, client):
            b = batcher(app, "in_autoencoder/3")
            predict, calls = b.model.predict, []

            def slow_predict(*args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
                calls.append(kwargs.get("run_options"))
                time.sleep(0.15)
                return predict(*args, **kwargs)

            monkeypatch.setattr(b.model, "predict", slow_predict)
            data = encode(Image.fromarray(noise(600, 600)), "PNG")  # 100 tiles: ~8 s at 0.15 s a call
            started = time.perf_counter()
            r = await client.post("/reconstruct", content=data, headers={"content-type": "image/png"})
            expect_error(r, 504, "NORMSERVE_REQUEST_TIMEOUT_S")
            assert time.perf_counter() - started < 0.5 + 1.0
            await until(lambda: b.dispatched == 0, "the last run is over")
            n = len(calls)
            await asyncio.sleep(0.5)
            assert len(calls) == n < 100 / settings.reconstruct_tile_batch, "tiles kept running after the 504"
            assert server_state(app).budget.used == 0

    asyncio.run(scenario())


def test_an_abandoned_run_is_terminated(settings_factory: SettingsFactory) -> None:
    """The caller of a run in progress gives up: the run's RunOptions get terminate, so ORT stops
    between operators instead of finishing the run."""

    async def scenario() -> None:
        async with serving(settings_factory(model_instances=1, version_policy="latest:1")) as (app, _):
            b = batcher(app, "in_autoencoder/3")
            predict, seen, running = b.model.predict, [], threading.Event()

            def watched_predict(*args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
                seen.append(kwargs["run_options"])
                running.set()
                return predict(*args, **kwargs)

            b.model.predict = watched_predict  # type: ignore[method-assign]
            x = np.zeros((1, 3, 1024, 1024), np.float32)  # ~1 s of CPU
            task = asyncio.create_task(b.submit({"image": x}))
            await asyncio.to_thread(running.wait, 10)
            task.cancel()
            await asyncio.sleep(0)
            assert seen[0].terminate
            await until(lambda: b.dispatched == 0, "the run stopped")

    asyncio.run(scenario())


def test_memory_stays_reserved_until_an_abandoned_step_returns(
    settings_factory: SettingsFactory, expect_error: ErrorCheck, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the deadline the request stops waiting for its decode, but the decode's thread still
    holds the memory: the reservation is released only when that thread returns."""
    from normserve.service import tasks

    async def scenario() -> None:
        async with serving(settings_factory(request_timeout_s=0.3, version_policy="latest:1")) as (app, client):
            entered, leave = threading.Event(), threading.Event()
            real = tasks.decode_planned

            def stuck_decode(plan: Any) -> Any:
                entered.set()
                leave.wait(30)
                return real(plan)

            monkeypatch.setattr(tasks, "decode_planned", stuck_decode)
            data = encode(Image.fromarray(noise(600, 600)), "PNG")
            answer = asyncio.create_task(
                client.post("/reconstruct", content=data, headers={"content-type": "image/png"})
            )
            await asyncio.to_thread(entered.wait, 10)
            await asyncio.sleep(0.6)  # past the deadline: the request was cancelled
            budget: MemoryBudget = server_state(app).budget
            assert budget.used > 0, "released while the decode still runs"
            leave.set()
            expect_error(await answer, 504, "NORMSERVE_REQUEST_TIMEOUT_S")
            await until(lambda: budget.used == 0, "the reservation is released")

    asyncio.run(scenario())


def test_large_decodes_run_one_at_a_time_within_the_deadline(
    settings_factory: SettingsFactory, expect_error: ErrorCheck, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above NORMSERVE_SERIAL_DECODE_PIXELS one decode at a time per worker: a second large one
    waits (and its wait counts against its deadline: 504, never decoded), a small one does not
    wait; the slot stays taken until the abandoned decode's thread returns, then serves again."""
    from normserve.service import tasks

    async def scenario() -> None:
        settings = settings_factory(request_timeout_s=2.0, version_policy="latest:1", serial_decode_pixels=100_000)
        async with serving(settings) as (app, client):
            leave = threading.Event()
            decoded: list[tuple[int, int]] = []
            real = tasks.decode_planned

            def decode(plan: Any) -> Any:
                decoded.append(plan.size)
                if len(decoded) == 1:
                    leave.wait(30)  # the first large decode holds the slot
                return real(plan)

            monkeypatch.setattr(tasks, "decode_planned", decode)
            gate = server_state(app).decode_gate.semaphore

            def post(side: int) -> asyncio.Task[Any]:
                data = encode(Image.fromarray(noise(side, side)), "PNG")
                return asyncio.create_task(
                    client.post("/reconstruct", content=data, headers={"content-type": "image/png"})
                )

            first = post(600)
            await until(lambda: len(decoded) == 1, "the first large decode started")
            second, small = post(600), post(200)  # 360,000 px waits; 40,000 px does not
            answer = await small
            assert answer.status_code == 200, answer.text
            assert decoded == [(600, 600), (200, 200)]
            # the second timed out waiting (after the first's deadline: it came later)
            expect_error(await second, 504, "NORMSERVE_REQUEST_TIMEOUT_S")
            assert gate.locked(), "the slot was freed while the abandoned decode still runs"
            leave.set()
            expect_error(await first, 504, "NORMSERVE_REQUEST_TIMEOUT_S")
            await until(lambda: not gate.locked(), "the slot is free once the decode returns")
            answer = await post(600)
            assert answer.status_code == 200, answer.text
            assert decoded == [(600, 600), (200, 200), (600, 600)]  # the timed-out one never decoded

    asyncio.run(scenario())


def test_to_tensor_gives_the_same_values_by_either_path(monkeypatch: pytest.MonkeyPatch) -> None:
    image = imaging.DecodedImage(noise(97, 61), "PNG")
    small = imaging.to_tensor(image)
    monkeypatch.setattr(imaging, "SMALL_TENSOR_PIXELS", 0)  # the large-image path: no temporaries
    large = imaging.to_tensor(image)
    assert large.shape == small.shape == (1, 3, 61, 97) and np.array_equal(large, small)
