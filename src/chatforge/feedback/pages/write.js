"use strict";

let me = null;
let state = null;  // {mode: task|free|edit, taskId, submissionId, fixed: [...], turns: [...], suggestions, clientKey}

function draftName() {
  if (state.mode === "task") return "write:task:" + state.taskId;
  if (state.mode === "edit") return "write:sub:" + state.submissionId;
  return "write:free";
}

function remember() {
  state.turns = [...document.querySelectorAll(".editable textarea")].map((area) => ({
    role: area.dataset.role, content: area.value }));
  saveDraft(me, draftName(), state);
}

function render() {
  const editable = state.turns.map((turn, i) => {
    const area = el("textarea", { id: `turn-${i}`, "data-role": turn.role, oninput: remember });
    area.value = turn.content;
    return el("li", { class: "turn editable " + turn.role },
      el("label", { class: "role", for: area.id }, `${turn.role} (you write this)`), area);
  });
  document.getElementById("task").replaceChildren(
    el("h2", {}, state.mode === "free" ? "Your own prompt" : state.taskId ? `Task ${state.taskId}` : "Your demonstration"),
    state.note ? el("p", { class: "hint" }, state.note) : null, conversationView(state.fixed),
    el("ol", { class: "conversation" }, ...editable));
  document.getElementById("suggestions").replaceChildren(...state.suggestions.map((text, i) =>
    el("li", { class: "suggestion" }, el("div", { class: "text" }, text),
      el("button", { type: "button", id: `use-${i}`, onclick: () => useSuggestion(text) }, "Use this"))));
  document.getElementById("free").hidden = state.mode !== "task";
  document.getElementById("ask").hidden = !me.model;
}

function useSuggestion(text) {
  remember();
  const last = state.turns.length - 1;
  if (last >= 0 && state.turns[last].role === "assistant") state.turns[last].content = text;
  saveDraft(me, draftName(), state);
  render();
  document.getElementById(`turn-${last}`).focus();
}

function fresh(mode, task) {
  if (mode === "free") {
    return { mode, taskId: null, fixed: [], turns: [{ role: "user", content: "" }, { role: "assistant", content: "" }],
             suggestions: [], clientKey: newKey() };
  }
  return { mode, taskId: task.id, fixed: task.messages, turns: [{ role: "assistant", content: "" }],
           suggestions: task.suggestions, clientKey: null };
}

async function load() {
  const params = new URLSearchParams(location.search);
  if (params.get("submission")) {
    const sub = await api("GET", "/submissions/" + params.get("submission"));
    const task = await api("GET", "/tasks/" + sub.task_id);
    const fixed = task.source === "labeler" ? [] : task.messages;
    state = loadDraft(me, "write:sub:" + sub.id) || {
      mode: "edit", taskId: sub.task_id, submissionId: sub.id, fixed,
      turns: sub.payload.messages.slice(fixed.length), suggestions: task.suggestions || [], clientKey: null };
    document.getElementById("progress").textContent = `changing submission ${sub.id}`;
  } else if (params.get("free") || loadDraft(me, "write:free")) {
    state = loadDraft(me, "write:free") || fresh("free");
  } else {
    const next = await api("GET", "/tasks/next?kind=demonstration");
    showProgress(next.progress);
    state = next.task ? (loadDraft(me, "write:task:" + next.task.id) || fresh("task", next.task)) : fresh("free");
    if (!next.task) state.note = "No demonstration tasks left: write a prompt of your own, or go home.";
  }
  render();
  const first = document.querySelector(".editable textarea");
  if (first) first.focus();
}

async function ask() {
  remember();
  const conversation = state.fixed.concat(state.turns);
  while (conversation.length && conversation[conversation.length - 1].role === "assistant") conversation.pop();
  try {
    const reply = await api("POST", "/generate", { messages: conversation, n: 1 });
    state.suggestions = state.suggestions.concat(reply.answers);
    saveDraft(me, draftName(), state);
    render();
  } catch (e) { status(e.message, true); }
}

async function submit() {
  remember();
  const messages = state.fixed.concat(state.turns);
  const empty = state.turns.findIndex((t) => !t.content.trim());
  if (empty >= 0) { status(`The ${state.turns[empty].role} turn ${empty + 1} is empty`, true); return; }
  try {
    if (state.mode === "edit") await api("PUT", "/submissions/" + state.submissionId, { messages });
    else if (state.mode === "task") await api("POST", "/submissions", { task_id: state.taskId, messages });
    else await api("POST", "/submissions", { messages, client_key: state.clientKey });
  } catch (e) { status(e.message, true); return; }
  clearDraft(me, draftName());
  if (state.mode === "edit") { location.href = "/label/"; return; }
  if (state.mode === "free") history.replaceState(null, "", "write.html");
  await load();
  status(`Saved your demonstration (${messages.length} turns).`);
}

document.getElementById("add-turn").addEventListener("click", () => {
  remember();
  state.turns.push({ role: "user", content: "" }, { role: "assistant", content: "" });
  saveDraft(me, draftName(), state);
  render();
  document.getElementById(`turn-${state.turns.length - 2}`).focus();
});
document.getElementById("remove-turn").addEventListener("click", () => {
  remember();
  if (state.turns.length > 2) state.turns.splice(-2, 2);
  saveDraft(me, draftName(), state);
  render();
});
document.getElementById("free").addEventListener("click", () => {
  state = fresh("free");
  saveDraft(me, draftName(), state);
  render();
  document.getElementById("turn-0").focus();
});
document.getElementById("ask").addEventListener("click", ask);
document.getElementById("submit").addEventListener("click", submit);
document.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); submit(); }
});
signedIn().then((who) => { me = who; if (me) return load(); }).catch((e) => status(e.message, true));
