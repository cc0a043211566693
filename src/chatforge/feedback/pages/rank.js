"use strict";

let me = null;
let task = null;
let editing = null;  // the submission being changed, when opened from "My submissions"

function draft() {
  const ranks = {};
  const unsafe = [];
  for (const card of document.querySelectorAll(".answer")) {
    const index = Number(card.dataset.index);
    const value = card.querySelector("select").value;
    if (value) ranks[index] = Number(value);
    if (card.querySelector("input[type=checkbox]").checked) unsafe.push(index);
  }
  return { ranks, unsafe };
}

function remember() { saveDraft(me, "rank:" + task.id, draft()); }

function render(saved) {
  const k = task.answers.length;
  const cards = task.answers.map((answer, position) => {
    const select = el("select", { id: `rank-${answer.index}`, "aria-label": `rank of answer ${position + 1}`,
      onchange: remember }, el("option", { value: "" }, "-"),
      ...Array.from({ length: k }, (_, r) => el("option", { value: String(r + 1) }, String(r + 1))));
    const flag = el("input", { type: "checkbox", id: `unsafe-${answer.index}`, onchange: remember });
    if (saved && saved.ranks[answer.index]) select.value = String(saved.ranks[answer.index]);
    if (saved && saved.unsafe.includes(answer.index)) flag.checked = true;
    const card = el("article", { class: "answer", tabindex: "0", "data-index": String(answer.index),
      "aria-label": `answer ${position + 1}` },
      el("h3", {}, `Answer ${position + 1}`), el("div", { class: "answer-text" }, answer.text),
      el("div", { class: "controls" }, el("label", { for: select.id }, "Rank "), select,
        el("label", {}, flag, " unsafe")));
    card.addEventListener("keydown", (event) => {
      if (event.target.tagName === "SELECT" || event.ctrlKey || event.metaKey || event.altKey) return;
      if (/^[1-9]$/.test(event.key) && Number(event.key) <= k) { select.value = event.key; remember(); event.preventDefault(); }
      else if (event.key === "u") { flag.checked = !flag.checked; remember(); event.preventDefault(); }
    });
    return card;
  });
  document.getElementById("task").replaceChildren(el("h2", {}, `Task ${task.id}`), conversationView(task.messages),
    ...cards);
  document.getElementById("submit").hidden = false;
  cards[0].focus();
}

async function load() {
  const params = new URLSearchParams(location.search);
  let saved = null;
  if (params.get("submission")) {
    editing = await api("GET", "/submissions/" + params.get("submission"));
    task = await api("GET", "/tasks/" + editing.task_id);
    const ranks = {};
    editing.payload.ranking.forEach((tier, r) => tier.forEach((i) => { ranks[i] = r + 1; }));
    saved = { ranks, unsafe: editing.payload.unsafe };
    document.getElementById("progress").textContent = `changing submission ${editing.id}`;
  } else {
    const next = await api("GET", "/tasks/next?kind=ranking");
    showProgress(next.progress);
    task = next.task;
    if (!task) {
      document.getElementById("task").replaceChildren(el("p", {}, "Nothing left to rank. Thank you!"));
      document.getElementById("submit").hidden = true;
      return;
    }
  }
  render(loadDraft(me, "rank:" + task.id) || saved);
}

async function submit() {
  const { ranks, unsafe } = draft();
  const missing = task.answers.map((a, p) => (ranks[a.index] ? null : p + 1)).filter((p) => p !== null);
  if (missing.length) { status(`Give a rank to answer ${missing.join(", ")}`, true); return; }
  const levels = [...new Set(Object.values(ranks))].sort((a, b) => a - b);
  const ranking = levels.map((level) => Object.keys(ranks).filter((i) => ranks[i] === level).map(Number));
  try {
    if (editing) await api("PUT", "/submissions/" + editing.id, { ranking, unsafe });
    else await api("POST", "/submissions", { task_id: task.id, ranking, unsafe });
  } catch (e) { status(e.message, true); return; }
  const saved = task.id;
  clearDraft(me, "rank:" + task.id);
  if (editing) { location.href = "/label/"; return; }
  await load();
  status(`Saved your ranking of task ${saved}.`);
}

document.getElementById("submit").addEventListener("click", submit);
document.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && task) { event.preventDefault(); submit(); }
});
signedIn().then((who) => { me = who; if (me) return load(); }).catch((e) => status(e.message, true));
