"use strict";

let me = null;
// turns: [{messages (the conversation up to this user turn), answers, ratings, preferred, key}]
let chat = { turns: [] };

function remember() { saveDraft(me, "chat", { turns: chat.turns, typing: document.getElementById("message").value }); }

function conversationSoFar() {
  const last = chat.turns[chat.turns.length - 1];
  if (!last) return [];
  const pick = last.preferred !== null ? last.preferred : Math.max(0, last.ratings.indexOf(1));
  return last.messages.concat([{ role: "assistant", content: last.answers[pick] }]);
}

async function sendFeedback(turn, body) {
  try {
    await api("POST", "/chat/feedback", { messages: turn.messages, answers: turn.answers,
      client_key: `${turn.key}-${turn.answers.length}`, ...body });
    status("Thank you: feedback saved.");
  } catch (e) { status(e.message, true); }
}

function rate(turn, i, value) {
  turn.ratings[i] = turn.ratings[i] === value ? 0 : value;
  turn.preferred = null;
  remember();
  render();
  if (turn.ratings.some((r) => r !== 0)) sendFeedback(turn, { ratings: turn.ratings });
}

function prefer(turn, i) {
  turn.preferred = i;
  turn.ratings = turn.answers.map(() => 0);
  remember();
  render();
  sendFeedback(turn, { preferred: i });
}

async function regenerate(turn) {
  try {
    const reply = await api("POST", "/generate", { messages: turn.messages, n: 1 });
    if (turn.answers.includes(reply.answers[0])) { status("The model gave the same answer again; try once more."); return; }
    turn.answers.push(reply.answers[0]);
    turn.ratings.push(0);
    turn.preferred = null;
    remember();
    render();
  } catch (e) { status(e.message, true); }
}

function render() {
  const blocks = [];
  chat.turns.forEach((turn, t) => {
    const isLast = t === chat.turns.length - 1;
    blocks.push(el("li", { class: "turn user" }, el("span", { class: "role" }, "user"),
      el("div", { class: "text" }, turn.messages[turn.messages.length - 1].content)));
    const answers = turn.answers.map((text, i) => el("div", { class: "answer" },
      el("span", { class: "role" }, turn.answers.length > 1 ? `answer ${i + 1}` : "assistant"),
      el("div", { class: "answer-text" }, text),
      isLast ? el("div", { class: "controls" },
        el("button", { type: "button", "aria-pressed": String(turn.ratings[i] === 1), onclick: () => rate(turn, i, 1) },
          turn.ratings[i] === 1 ? "Thumbs up (given)" : "Thumbs up"),
        el("button", { type: "button", "aria-pressed": String(turn.ratings[i] === -1), onclick: () => rate(turn, i, -1) },
          turn.ratings[i] === -1 ? "Thumbs down (given)" : "Thumbs down"),
        turn.answers.length > 1 ? el("button", { type: "button", onclick: () => prefer(turn, i) },
          turn.preferred === i ? `Answer ${i + 1} is better (chosen)` : `Answer ${i + 1} is better`) : null) : null));
    blocks.push(el("li", { class: "turn assistant" }, ...answers,
      isLast && turn.answers.length < 9 ? el("button", { type: "button", onclick: () => regenerate(turn) },
        "Regenerate and compare") : null));
  });
  document.getElementById("chat").replaceChildren(el("ol", { class: "conversation" }, ...blocks));
}

async function send() {
  const box = document.getElementById("message");
  const text = box.value.trim();
  if (!text) { status("Write a message first", true); return; }
  const messages = conversationSoFar().concat([{ role: "user", content: text }]);
  try {
    const reply = await api("POST", "/generate", { messages, n: 1 });
    chat.turns.push({ messages, answers: reply.answers, ratings: reply.answers.map(() => 0), preferred: null,
                      key: newKey() });
    box.value = "";
    remember();
    render();
    status("");
  } catch (e) { status(e.message, true); }
}

document.getElementById("send").addEventListener("click", send);
document.getElementById("restart").addEventListener("click", () => { chat = { turns: [] }; remember(); render(); });
document.getElementById("message").addEventListener("input", remember);
document.getElementById("message").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); send(); }
});
signedIn().then((who) => {
  me = who;
  if (!me) return;
  if (!me.model) status("No model is loaded in this labeling server: chat needs `chatforge label CKPT`.", true);
  const saved = loadDraft(me, "chat");
  if (saved) { chat = { turns: saved.turns }; document.getElementById("message").value = saved.typing || ""; }
  render();
  document.getElementById("message").focus();
}).catch((e) => status(e.message, true));
