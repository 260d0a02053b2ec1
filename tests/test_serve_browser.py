"""The web page in a real browser: Debian's chromium, driven by Playwright, against a live server.

One conversation, as a user has it, by keyboard alone: type the API key, send two messages
(Enter), watch the replies stream and each memory update's timing appear, continue from the
first turn (a fork), compare with a stateless model, download the state and upload it back,
and have a damaged and a foreign state refused with the server's reason. The fork's reply must
be exactly what the API answers when asked to continue from the first response id with
greedy decoding — the page really continued from the first turn's memory.

The browser is the system's chromium (``apt-get install chromium``), never a downloaded one;
without it the test is skipped, unless ``RXT_REQUIRE_BROWSER`` is set (CI sets it), where a
missing browser fails. Screenshots (wide and phone width) go to ``$RXT_ARTIFACTS_DIR`` or the
test's tmp dir; their paths are printed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from rxt.engine.state import stm_to_bytes
from rxt.serve.auth import KeyRing, digest
from rxt.serve.settings import ServerSettings
from serve_support import MODEL_NAME, LiveServer, never_silent, small_model

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # CI runs as root, where chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
KEY = "browser-key-123"
MAX_TOKENS = 8
TIMEOUT_MS = 15_000


@pytest.fixture(scope="module")
def chromium() -> Path:
    if CHROMIUM.exists():
        return CHROMIUM
    if os.environ.get("RXT_REQUIRE_BROWSER"):
        pytest.fail(
            f"RXT_REQUIRE_BROWSER is set but {CHROMIUM} is missing (apt-get install chromium)"
        )
    pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium; Playwright drives it)")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[LiveServer]:
    store = tmp_path_factory.mktemp("browser") / "state.db"
    settings = ServerSettings(model_name=MODEL_NAME, store_url=str(store))
    with LiveServer(never_silent(small_model()), settings, KeyRing([digest(KEY)])) as live:
        yield live


@pytest.fixture
def artifacts(tmp_path) -> Path:
    where = Path(os.environ.get("RXT_ARTIFACTS_DIR") or tmp_path)
    where.mkdir(parents=True, exist_ok=True)
    return where


def api(server: LiveServer) -> httpx.Client:
    headers = {"Authorization": f"Bearer {KEY}"}
    return httpx.Client(base_url=server.base_url, headers=headers, timeout=30)


def reply_of(page, n: int) -> tuple[str, str]:
    """(text, response id) of turn ``n`` once its reply has streamed to the end."""
    done = page.locator(f'#log li[data-turn="{n}"] .msg.assistant[data-state="done"]')
    done.wait_for()
    assert int(done.get_attribute("data-deltas")) >= 1  # it arrived as streamed deltas
    return done.locator(".text").inner_text(), done.get_attribute("data-response-id")


def timing_of(page, n: int) -> list[float]:
    """The turn's memory update times (answer done, started, finished), once committed."""
    row = page.locator(f'#timing tbody tr[data-turn="{n}"]')
    row.locator("td.update-finished").wait_for()
    cells = [
        row.locator(f"td.{c}").inner_text()
        for c in ("answer-done", "update-started", "update-finished")
    ]
    return [float(re.match(r"([\d.]+) ms", c).group(1)) for c in cells]


def send(page, text: str) -> None:
    page.focus("#message")
    page.keyboard.type(text)
    page.keyboard.press("Enter")


def test_chat_memory_fork_and_state_files_in_a_browser(chromium, server, artifacts):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright, api(server) as client:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.set_default_timeout(TIMEOUT_MS)
            crashes: list[str] = []
            page.on("pageerror", lambda exc: crashes.append(str(exc)))
            page.goto(server.base_url + "/")
            page.locator("body[data-ready=true]").wait_for()
            assert "API key required" in page.inner_text("#server-status")

            # Keyboard only: the tab order is key, message, send, settings, state controls.
            order = []
            for _ in range(8):
                page.keyboard.press("Tab")
                order.append(page.evaluate("document.activeElement.id"))
            assert order == [
                *("api-key", "message", "send", "temperature", "max-tokens"),
                *("reset", "upload", "heat-mode"),  # download and compare wait for a state
            ]
            unlabelled = page.evaluate(
                "[...document.querySelectorAll('input, textarea, select')]"
                ".filter(e => !e.labels.length).map(e => e.id)"
            )
            assert unlabelled == []
            page.focus("#api-key")
            page.keyboard.type(KEY)
            page.fill("#max-tokens", str(MAX_TOKENS))

            send(page, "My cat is called Felix.")
            first, first_id = reply_of(page, 1)
            answer, started, finished = timing_of(page, 1)
            assert 0 < answer <= started <= finished
            send(page, "I live in Paris.")
            second, second_id = reply_of(page, 2)
            timing_of(page, 2)
            assert page.inner_text('#timing tr[data-turn="1"] td.next-waited').startswith(
                ("no", "yes")
            )
            heat = page.locator("#heatmap")
            layers, slots, _ = server.app.state.model.config.stm_shape
            assert heat.get_attribute("data-layers") == str(layers)
            assert heat.get_attribute("data-slots") == str(slots)
            assert "after turn 2" in heat.get_attribute("aria-label")
            for n, (text, rid) in enumerate([(first, first_id), (second, second_id)], 1):
                stored = client.get(f"/v1/responses/{rid}").json()
                assert stored["output"][0]["content"][0]["text"] == text, n

            # Fork from turn 1, by keyboard; the next reply must come from turn 1's memory.
            page.focus('#log li[data-turn="1"] button.fork')
            page.keyboard.press("Enter")
            assert page.locator("#log li.turn").count() == 1
            assert "after turn 1" in page.inner_text("#fork-note")
            send(page, "What is my cat called?")
            forked, forked_id = reply_of(page, 2)
            direct = client.post(
                "/v1/responses",
                json={
                    "input": "What is my cat called?",
                    "previous_response_id": first_id,
                    "temperature": 0,
                    "max_output_tokens": MAX_TOKENS,
                    "store": False,
                },
            ).json()
            assert forked == direct["output"][0]["content"][0]["text"]
            assert (
                client.get(f"/v1/responses/{forked_id}").json()["previous_response_id"] == first_id
            )
            timing_of(page, 2)

            # The stateless comparison of this branch: turn 1, then the fork's turn.
            page.focus("#compare")
            page.keyboard.press("Enter")
            rows = page.locator("#comparison tbody tr")
            rows.nth(1).wait_for()
            rxt = int(rows.nth(1).locator("td.rxt-tokens").inner_text())
            stateless = int(rows.nth(1).locator("td.stateless-tokens").inner_text())
            assert stateless > rxt > 0
            assert "a stateless model would have re-read" in page.inner_text("#comparison-summary")
            wide = artifacts / "rxt-page.png"  # the fork's branch, its memory and the comparison
            page.screenshot(path=str(wide), full_page=True)

            # Download the state, upload it back: a new conversation from that memory.
            with page.expect_download() as download:
                page.focus("#download")
                page.keyboard.press("Enter")
            saved = Path(download.value.path()).read_bytes()
            owner = server.app.state.keys.owner(f"Bearer {KEY}")
            fork_cid, version = server.store.lookup(owner, "resp:" + forked_id)
            assert download.value.suggested_filename == f"{fork_cid}-v{version}.stm.safetensors"
            assert saved == client.get(f"/v1/conversations/{fork_cid}/state").content
            page.set_input_files("#upload", files=[_file("mine.safetensors", saved)])
            page.locator("#log li.turn .msg.system").wait_for()
            assert "mine.safetensors" in page.inner_text("#log")
            assert "loaded from a file" in page.inner_text('#timing tr[data-turn="1"]')
            send(page, "Are you still there?")
            reply_of(page, 2)

            # Foreign and damaged states are refused with the server's own reason.
            foreign = stm_to_bytes(torch.zeros(layers, slots, 64), fingerprint="0" * 64)
            for name, blob, reason in [
                ("foreign.safetensors", foreign, "another model"),
                ("broken.safetensors", saved[:-9], "truncated or corrupt"),
            ]:
                page.set_input_files("#upload", files=[_file(name, blob)])
                page.wait_for_function(
                    "reason => document.querySelector('#error').textContent.includes(reason)",
                    arg=reason,
                )

            # Phone width: one column, nothing wider than the window.
            page.set_viewport_size({"width": 390, "height": 844})
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
            chat_box = page.locator("section.chat").bounding_box()
            memory_box = page.locator("section.memory").bounding_box()
            assert memory_box["y"] >= chat_box["y"] + chat_box["height"]
            phone = artifacts / "rxt-page-phone.png"
            page.screenshot(path=str(phone), full_page=True)
            assert crashes == []
        finally:
            browser.close()
    print(f"\nscreenshots: {wide} {phone}")
    assert wide.stat().st_size > 0 and phone.stat().st_size > 0


def _file(name: str, data: bytes) -> dict:
    return {"name": name, "mimeType": "application/octet-stream", "buffer": data}
