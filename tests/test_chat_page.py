"""The chat page of `lmlab serve`, driven in a real headless Chromium against the real server.

Needs Debian's chromium at /usr/bin/chromium (tests/install_chromium.sh, run by `make setup`) and the
playwright Python package; Playwright's own browser download is not used.
"""
import os
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import spread_weights

import lmlab

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"

if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"{CHROMIUM} is missing (run tests/install_chromium.sh as root)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
uvicorn = pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama with a tokenizer trained on the built-in world (it carries lmlab's ChatML template)."""
    from lmlab.data.world import make_world
    tok = lmlab.Tokenizer.train(make_world(seed=0, n_people=20).pretrain_docs(), vocab_size=600, kind="bpe",
                                show_progress=False)
    torch.manual_seed(0)
    cfg = lmlab.preset("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id)
    model = lmlab.build(cfg).eval()
    spread_weights(model)  # outputs that depend on the prompt (conftest)
    d = tmp_path_factory.mktemp("chatmodel")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def reference(model_dir):
    """messages, max_tokens -> the greedy reply lmlab computes in-process."""
    model, tok = lmlab.load_model(model_dir), lmlab.load_tokenizer(model_dir)
    return lambda messages, n: "".join(lmlab.stream(model, tok, messages=messages, temperature=0.0,
                                                    max_new_tokens=n))


@pytest.fixture(scope="module")
def server(model_dir):
    """The real app on a free local port, served by uvicorn in a background thread."""
    from lmlab.serve.app import create_app
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(model_dir), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).json().get("status") == "ok":
                break
        except httpx.HTTPError:
            pass
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.1)
    model_id = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    yield url, model_id
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1100, "height": 700})  # a fresh profile per test
    p = context.new_page()
    errors = []
    p.on("pageerror", lambda e: errors.append(str(e)))
    p.goto(server[0] + "/")
    p.set_default_timeout(30_000)
    yield p
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def settings(page, temperature, max_tokens, system=""):
    page.fill("#temperature", str(temperature))
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#system", system)


def send_with_keyboard(page, text):
    page.focus("#input")
    page.keyboard.type(text)
    page.keyboard.press("Enter")


def test_chat_streams_the_greedy_reply_and_clears(page, server, reference):
    url, model_id = server
    sync_api.expect(page.locator("#model")).to_have_text(model_id)
    settings(page, 0, 12)
    send_with_keyboard(page, "Where does Alice live?")
    done = page.locator('#messages .msg.assistant[data-done="true"]')
    done.wait_for()
    assert page.locator("#messages .msg.user").text_content() == "Where does Alice live?"
    expected = reference([{"role": "user", "content": "Where does Alice live?"}], 12)
    assert expected and done.text_content() == expected
    assert page.evaluate("document.activeElement.id") == "input"  # focus is back in the message box
    assert page.input_value("#input") == ""
    assert page.locator("#error").is_hidden()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat_page.png"))

    page.keyboard.press("Tab")  # keyboard order: message box, then Send
    assert page.evaluate("document.activeElement.id") == "send"

    page.click("#clear")
    assert page.locator("#messages > *").count() == 0
    # the conversation starts over; Shift+Enter is a newline, Enter sends
    page.focus("#input")
    page.keyboard.type("Hello")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("there")
    assert page.input_value("#input") == "Hello\nthere" and page.locator("#messages > *").count() == 0
    page.keyboard.press("Enter")
    done.wait_for()
    assert done.text_content() == reference([{"role": "user", "content": "Hello\nthere"}], 12)


def test_system_prompt_is_sent_and_stop_keeps_the_partial_reply(page, reference):
    system, question = "You answer questions about the world.", "Who is Bob?"
    settings(page, 0, 10, system=system)
    send_with_keyboard(page, question)
    first = page.locator("#messages .msg.assistant").nth(0)
    sync_api.expect(first).to_have_attribute("data-done", "true")
    expected = reference([{"role": "system", "content": system}, {"role": "user", "content": question}], 10)
    assert expected != reference([{"role": "user", "content": question}], 10)  # the system prompt matters
    assert first.text_content() == expected

    # a long reply to the whole conversation, stopped as soon as some of it has streamed in
    settings(page, 0, 400)
    full = reference([{"role": "user", "content": question}, {"role": "assistant", "content": first.text_content()},
                      {"role": "user", "content": "Tell me a story."}], 400)
    assert len(full) > 200  # long enough that Stop lands mid-stream
    send_with_keyboard(page, "Tell me a story.")
    second = page.locator("#messages .msg.assistant").nth(1)
    page.wait_for_function("el => el.textContent.length > 0", arg=second.element_handle())
    page.click("#stop")
    sync_api.expect(second).to_have_attribute("data-done", "true")
    partial = second.text_content()
    assert partial and full.startswith(partial) and len(partial) < len(full)
    assert second.get_attribute("data-stopped") == "true"
    assert page.locator("#stop").is_disabled() and page.locator("#send").is_enabled()
    assert page.locator("#error").is_hidden()

    # a request the server refuses: its error message is shown, the turn is undone and the text given back
    n_before = page.locator("#messages > *").count()
    settings(page, 0, 10**7)
    send_with_keyboard(page, "Too long")
    sync_api.expect(page.locator("#error")).to_be_visible()
    assert "max_tokens" in page.text_content("#error")
    assert page.locator("#messages > *").count() == n_before and page.input_value("#input") == "Too long"
