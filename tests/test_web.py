"""The web chat page in headless Chromium (Debian's chromium + chromium-driver, driven by selenium): streaming
multi-turn chat, system prompt and temperature, new chat, the moderation notice, and model output shown as
text (an answer containing <script> must not run)."""
from __future__ import annotations

from pathlib import Path

import pytest
from serve_toy import HELLO_ANSWER, HELLO_PROMPT, SCRIPT_ANSWER, SCRIPT_PROMPT, STORY_PROMPT, serve

from chatforge.safety import REFUSAL
from chatforge.tokenizer import Tokenizer

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                                reason="needs Debian's chromium and chromium-driver (make system-deps)")


@pytest.fixture(scope="module")
def server(parrot_ckpt, moderation_classifier):
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with serve(parrot_ckpt, moderation_classifier) as live:
        yield live
    torch.set_num_threads(threads)


@pytest.fixture
def requests_seen(server, monkeypatch) -> list:
    """Every GenerationRequest the page caused, as the scheduler received it."""
    scheduler = server.app.state.scheduler
    seen, submit = [], scheduler.submit

    def spy(request):
        seen.append(request)
        return submit(request)

    monkeypatch.setattr(scheduler, "submit", spy)
    return seen


def open_page(browser, live) -> None:
    browser.get(live.url + "/")
    wait(browser, "return document.readyState === 'complete' && document.getElementById('model-name').textContent")
    set_value(browser, "temperature", "0")


def wait(browser, script: str, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(browser, timeout).until(lambda d: d.execute_script(script))


def set_value(browser, element_id: str, value: str) -> None:
    browser.execute_script("const el = document.getElementById(arguments[0]); el.value = arguments[1];"
                           "el.dispatchEvent(new Event('input')); el.dispatchEvent(new Event('change'));",
                           element_id, value)


def say(browser, text: str) -> dict:
    """Type a message, press Enter, wait for the whole answer; the last assistant message as seen on the page."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    before = len(browser.find_elements(By.CSS_SELECTOR, ".message.assistant"))
    box = browser.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)
    wait(browser, f"return document.querySelectorAll('.message.assistant').length > {before} && "
                  "!document.querySelector('.message.streaming') && !document.getElementById('send').disabled")
    status = browser.find_element(By.ID, "status").text
    assert not status, status
    last = browser.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1]
    notes = last.find_elements(By.CSS_SELECTOR, ".notice")
    return {"text": last.find_element(By.CSS_SELECTOR, ".content").get_attribute("textContent"),
            "notice": notes[0].text if notes else None, "html": last.get_attribute("innerHTML")}


def test_multi_turn_streaming_chat(browser, server, requests_seen, parrot_ckpt):
    from selenium.webdriver.common.by import By
    open_page(browser, server)
    assert browser.find_element(By.ID, "model-name").text == "parrot"
    browser.execute_script("window.contentUpdates = 0; new MutationObserver((records) => {"
                           "  for (const r of records) if (r.target.classList?.contains('content')) window.contentUpdates++;"
                           "}).observe(document.getElementById('messages'), {childList: true, subtree: true});")
    assert say(browser, HELLO_PROMPT)["text"] == HELLO_ANSWER
    assert browser.execute_script("return window.contentUpdates") >= 5  # it grew piece by piece
    second = say(browser, "And then?")
    assert "tokens" in browser.find_elements(By.CSS_SELECTOR, ".message.assistant .meta")[-1].text
    roles = [m.find_element(By.CSS_SELECTOR, ".role").text for m in browser.find_elements(By.CSS_SELECTOR, "#messages .message")]
    assert roles == ["You", "Assistant", "You", "Assistant"]
    # the second request carried the whole conversation, through the chat template
    tok = Tokenizer.load(parrot_ckpt)
    conversation = [{"role": "user", "content": HELLO_PROMPT}, {"role": "assistant", "content": HELLO_ANSWER},
                    {"role": "user", "content": "And then?"}]
    assert [r.prompt_ids for r in requests_seen] == [tok.prompt(conversation[:1]), tok.prompt(conversation)]
    assert requests_seen[1].temperature == 0.0 and second["text"]


def test_answer_with_script_is_shown_as_text(browser, server):
    from selenium.webdriver.common.by import By
    open_page(browser, server)
    answer = say(browser, SCRIPT_PROMPT)
    assert answer["text"] == SCRIPT_ANSWER
    assert "&lt;script&gt;" in answer["html"] and "&lt;b&gt;" in answer["html"]
    assert browser.find_elements(By.CSS_SELECTOR, "#messages script, #messages b") == []
    assert browser.execute_script("return window.pwned") is None


def test_system_prompt_temperature_and_new_chat(browser, server, requests_seen, parrot_ckpt):
    from selenium.webdriver.common.by import By
    open_page(browser, server)
    browser.find_element(By.ID, "system").send_keys("You are terse.")
    set_value(browser, "temperature", "1.3")
    assert browser.find_element(By.ID, "temperature-value").text == "1.3"
    say(browser, "Hi.")
    tok = Tokenizer.load(parrot_ckpt)
    assert requests_seen[-1].prompt_ids == tok.prompt([{"role": "system", "content": "You are terse."},
                                                      {"role": "user", "content": "Hi."}])
    assert requests_seen[-1].temperature == pytest.approx(1.3)
    browser.find_element(By.ID, "new-chat").click()
    assert browser.find_elements(By.CSS_SELECTOR, "#messages .message") == []
    browser.find_element(By.ID, "system").clear()
    set_value(browser, "temperature", "0")
    assert say(browser, HELLO_PROMPT)["text"] == HELLO_ANSWER  # a fresh conversation: no history sent
    assert requests_seen[-1].prompt_ids == tok.prompt([{"role": "user", "content": HELLO_PROMPT}])


def test_moderation_notice_for_flagged_input_and_output(browser, server):
    from selenium.webdriver.common.by import By
    open_page(browser, server)
    refused = say(browser, "How do I make a bomb?")
    assert refused["text"] == REFUSAL
    assert "your message was flagged" in refused["notice"] and "weapons" in refused["notice"]
    browser.find_element(By.ID, "new-chat").click()
    withheld = say(browser, STORY_PROMPT)
    assert withheld["text"] == REFUSAL and "bomb" not in withheld["text"]
    assert "the answer was flagged" in withheld["notice"]


def test_api_key_errors_are_shown_and_the_key_is_used(browser, parrot_ckpt):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    with serve(parrot_ckpt, api_keys=("page-key",)) as live:
        browser.get(live.url + "/")
        wait(browser, "return document.readyState === 'complete'")
        set_value(browser, "temperature", "0")
        box = browser.find_element(By.ID, "input")
        box.send_keys(HELLO_PROMPT, Keys.ENTER)
        wait(browser, "return document.getElementById('status').textContent.length > 0")
        assert "API key" in browser.find_element(By.ID, "status").text
        assert browser.find_elements(By.CSS_SELECTOR, ".message.assistant") == []
        set_value(browser, "api-key", "page-key")
        assert say(browser, HELLO_PROMPT)["text"] == HELLO_ANSWER
