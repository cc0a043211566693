"""The labeling pages in headless Chromium: sign in, rank four answers with a tie by keyboard, write a two-turn
demonstration, with reloads in the middle; the export holds exactly those records. Label text is shown as
text: an answer containing <script> runs nothing."""
import json

import pytest
from serve_toy import LiveServer

from chatforge.data.chat import read_conversations
from chatforge.data.preferences import read_comparisons
from chatforge.feedback.api import label_app
from chatforge.feedback.export import export
from chatforge.feedback.store import FeedbackStore

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
BEST, TIED_A, TIED_B = "The capital of France is Paris.", "Paris.", "Paris, I think."
SCRIPT = "<script>window.pwned = 1; alert('x')</script><b>Lyon</b>"
DEMO_PROMPT = [{"role": "user", "content": "Name a large animal."}]


@pytest.fixture
def server(tmp_path):
    store = FeedbackStore.open(tmp_path / "feedback.db")
    store.add_tasks("ranking", [(PROMPT, [TIED_A, SCRIPT, BEST, TIED_B])], source="test")
    store.add_tasks("demonstration", [(DEMO_PROMPT, ["An elephant is large."])], source="test")
    token = store.add_labeler("alice")
    calls = []

    def sampler(messages, n):  # a stand-in model: a different answer on every call
        calls.append(1)
        return [f"Answer number {len(calls)}." for _ in range(n)]

    with LiveServer(label_app(store, sampler)) as live:
        yield live.url, store, token
    store.close()


def wait(driver, condition, seconds=15):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, seconds).until(lambda d: condition(d))


def test_sign_in_rank_with_a_tie_write_two_turns_and_export(browser, server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select
    url, store, token = server
    d = browser

    d.get(url + "/label/")
    field = wait(d, lambda d: d.find_element(By.ID, "token-input"))
    assert d.switch_to.active_element == field  # the sign-in field has the focus: type and press Enter
    field.send_keys(token, Keys.ENTER)
    wait(d, lambda d: d.find_element(By.ID, "home").is_displayed())
    cells = [[td.text for td in row.find_elements(By.TAG_NAME, "td")]
             for row in d.find_elements(By.CSS_SELECTOR, "#progress-table tbody tr")]
    rows = {kind: f"{done}/{todo}" for kind, done, todo in cells}
    assert rows["ranking"] == "0/1" and rows["demonstration"] == "0/1"

    # --- rank four answers: 1 = best, two answers tied at 2, the script-bearing one last and flagged unsafe
    d.find_element(By.ID, "go-rank").click()
    cards = wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, ".answer") or None)
    assert len(cards) == 4 and "done 0 / to do 1" in d.find_element(By.ID, "progress").text
    texts = {c.find_element(By.CSS_SELECTOR, ".answer-text").text: c for c in cards}
    assert SCRIPT in texts  # shown literally, as text
    assert d.execute_script("return window.pwned === undefined && document.querySelectorAll('.answer b').length === 0")
    wanted = {BEST: "1", TIED_A: "2", TIED_B: "2", SCRIPT: "3"}
    for text, card in list(texts.items())[:2]:  # the keyboard: focus a card, press its rank
        card.send_keys(wanted[text])
    d.refresh()  # a reload keeps the draft
    cards = wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, ".answer") or None)
    texts = {c.find_element(By.CSS_SELECTOR, ".answer-text").text: c for c in cards}
    for text, card in list(texts.items())[:2]:
        assert Select(card.find_element(By.TAG_NAME, "select")).first_selected_option.text == wanted[text]
    for text, card in list(texts.items())[2:]:
        Select(card.find_element(By.TAG_NAME, "select")).select_by_visible_text(wanted[text])
    texts[SCRIPT].send_keys("u")  # flag unsafe by key
    assert texts[SCRIPT].find_element(By.CSS_SELECTOR, "input[type=checkbox]").is_selected()
    d.save_screenshot(str(tmp_path / "rank.png"))
    d.find_element(By.TAG_NAME, "body").send_keys(Keys.CONTROL, Keys.ENTER)
    wait(d, lambda d: "Nothing left to rank" in d.find_element(By.ID, "task").text)
    assert "Saved your ranking" in d.find_element(By.ID, "status").text

    # --- a two-turn demonstration: answer the task's prompt, add a turn, play the user and the assistant
    d.get(url + "/label/write.html")
    first = wait(d, lambda d: d.find_element(By.ID, "turn-0"))
    assert "Name a large animal." in d.find_element(By.ID, "task").text
    d.find_element(By.ID, "use-0").click()  # start from the model's suggestion, then edit it
    first = d.find_element(By.ID, "turn-0")
    assert first.get_attribute("value") == "An elephant is large."
    first.clear()
    first.send_keys("An elephant.")
    d.find_element(By.ID, "add-turn").click()
    d.find_element(By.ID, "turn-1").send_keys("And a <i>small</i> one?")
    d.refresh()  # the draft survives a reload, turn by turn
    wait(d, lambda d: d.find_element(By.ID, "turn-2"))
    assert d.find_element(By.ID, "turn-0").get_attribute("value") == "An elephant."
    assert d.find_element(By.ID, "turn-1").get_attribute("value") == "And a <i>small</i> one?"
    d.find_element(By.ID, "turn-2").send_keys("A mouse.", Keys.CONTROL, Keys.ENTER)
    wait(d, lambda d: "Saved your demonstration (4 turns)" in d.find_element(By.ID, "status").text)
    d.save_screenshot(str(tmp_path / "write.png"))

    d.get(url + "/label/")
    mine = wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#mine li") or None)
    assert len(mine) == 2

    sft, comparisons = tmp_path / "sft.jsonl", tmp_path / "comparisons.jsonl"
    assert export(store, "sft", sft)[0] == 1 and export(store, "comparisons", comparisons)[0] == 1
    assert [json.loads(line) for line in sft.read_text().splitlines()] == [{"messages": DEMO_PROMPT + [
        {"role": "assistant", "content": "An elephant."}, {"role": "user", "content": "And a <i>small</i> one?"},
        {"role": "assistant", "content": "A mouse."}]}]
    record = json.loads(comparisons.read_text())
    assert record["messages"] == PROMPT and record["unsafe"] == [SCRIPT]
    assert record["responses"][0] == BEST and sorted(record["responses"][1]) == sorted([TIED_A, TIED_B])
    assert record["responses"][2] == SCRIPT
    assert [sorted(t) for t in read_comparisons(comparisons)[0].tiers] == [[BEST], sorted([TIED_A, TIED_B]), [SCRIPT]]
    assert len(read_conversations(sft)[0].messages) == 4


def test_chat_thumbs_and_regenerate_and_compare_become_comparisons(browser, server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    url, store, token = server
    d = browser
    d.get(url + "/label/")
    wait(d, lambda d: d.find_element(By.ID, "token-input")).send_keys(token, Keys.ENTER)
    wait(d, lambda d: d.find_element(By.ID, "home").is_displayed())
    d.get(url + "/label/chat.html")
    box = wait(d, lambda d: d.find_element(By.ID, "message"))
    box.send_keys("Tell me <b>something</b>.", Keys.CONTROL, Keys.ENTER)
    wait(d, lambda d: "Answer number 1." in d.find_element(By.ID, "chat").text)
    assert "Tell me <b>something</b>." in d.find_element(By.ID, "chat").text

    def button(label):
        return next(b for b in d.find_elements(By.CSS_SELECTOR, "#chat button") if b.text == label)

    button("Thumbs down").click()
    wait(d, lambda d: "feedback saved" in d.find_element(By.ID, "status").text)
    button("Regenerate and compare").click()
    wait(d, lambda d: "Answer number 2." in d.find_element(By.ID, "chat").text)
    d.refresh()  # the conversation and its answers survive a reload
    wait(d, lambda d: "Answer number 2." in d.find_element(By.ID, "chat").text)
    button("Answer 2 is better").click()
    wait(d, lambda d: d.find_elements(By.XPATH, "//button[text()='Answer 2 is better (chosen)']") or None)
    wait(d, lambda d: len(store.submissions(kind="chat")) == 2)
    out = tmp_path / "comparisons.jsonl"
    written, skipped = export(store, "comparisons", out)
    assert (written, skipped["unpaired_chat"]) == (1, 1)  # a lone thumbs-down pairs with nothing
    assert json.loads(out.read_text()) == {"messages": [{"role": "user", "content": "Tell me <b>something</b>."}],
                                           "chosen": "Answer number 2.", "rejected": "Answer number 1."}
