"""The demo page's built-in samples are what a visitor sees first: the shipped classifier (the
version `/classify` serves by default) gets each one right, with a clear margin."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from normserve.service.routes.ui import STATIC_DIR

# The button's text -> the CIFAR-10 label the sample shows.
EXPECTED = {"Ship": "ship", "Car": "automobile", "Frog": "frog"}
SAMPLE = re.compile(r'data-src="(/static/samples/[^"]+)".*?<span>([^<]+)</span>')


def _samples() -> list[tuple[str, str]]:
    return SAMPLE.findall((STATIC_DIR / "index.html").read_text())


def test_the_page_offers_the_checked_samples() -> None:
    assert sorted(text for _, text in _samples()) == sorted(EXPECTED)


@pytest.mark.parametrize(("src", "text"), _samples(), ids=[text for _, text in _samples()])
def test_the_served_classifier_gets_each_sample_right_clearly(client: TestClient, src: str, text: str) -> None:
    image = client.get(src)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    body = client.post("/classify", files={"file": ("sample.png", image.content, "image/png")}).json()
    first, second = body["predictions"][:2]
    assert first["label"] == EXPECTED[text], body
    assert first["probability"] >= 0.8 and first["probability"] - second["probability"] >= 0.5, body
