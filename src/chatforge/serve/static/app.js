// The chat page: multi-turn conversation streamed from /v1/chat/completions (Server-Sent Events).
// Model output is untrusted: it is only ever put on the page with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let history = [];          // OpenAI-style messages of the current conversation (system prompt excluded)
let controller = null;     // aborts the answer being streamed

function addMessage(role, text) {
  const box = document.createElement("div");
  box.className = `message ${role}`;
  const who = document.createElement("div");
  who.className = "role";
  who.textContent = role === "user" ? "You" : "Assistant";
  const body = document.createElement("div");
  body.className = "content";
  body.textContent = text;
  box.append(who, body);
  $("messages").append(box);
  box.scrollIntoView({block: "end"});
  return box;
}

function addNote(box, cls, text) {
  const note = document.createElement("div");
  note.className = cls;
  note.textContent = text;
  box.append(note);
  return note;
}

function flaggedCategories(result) {
  return Object.entries(result.categories || {}).filter(([, on]) => on).map(([name]) => name.replace(/_/g, " "));
}

// A visible notice when the moderation filter acted: which side it stopped, and the categories it saw.
function moderationNotice(box, moderation) {
  const input = moderation?.input?.results?.[0];
  const output = (moderation?.output?.results || []).find((r) => r.flagged);
  const [side, result] = input?.flagged ? ["your message", input] : ["the answer", output];
  const cats = result ? flaggedCategories(result) : [];
  addNote(box, "notice moderation",
          `Moderation filter: ${side} was flagged${cats.length ? ` (${cats.join(", ")})` : ""}, so the assistant declined.`);
}

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({role: "system", content: system});
  const body = {model: $("model-name").textContent || "chatforge", messages: messages.concat(history),
                stream: true, stream_options: {include_usage: true},
                temperature: Number($("temperature").value)};
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  return body;
}

// Yields each parsed `data:` payload of an SSE response; "[DONE]" ends it.
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body?.error?.message || `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("input").disabled = busy;
  document.body.classList.toggle("busy", busy);
}

async function send(text) {
  history.push({role: "user", content: text});
  const userBox = addMessage("user", text);
  const box = addMessage("assistant", "");
  const content = box.querySelector(".content");
  box.classList.add("streaming");
  setBusy(true);
  $("status").textContent = "";
  controller = new AbortController();
  let answer = "", refusal = null, finish = null, usage = null;
  try {
    const response = await fetch("/v1/chat/completions", {method: "POST", headers: headers(),
                                                          body: JSON.stringify(requestBody()),
                                                          signal: controller.signal});
    if (!response.ok) throw new Error(await errorText(response));
    for await (const chunk of sseEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices?.[0];
      if (!choice) continue;
      if (choice.delta?.content) {
        answer += choice.delta.content;
        content.textContent = answer;
      }
      if (choice.delta?.refusal) refusal = choice.delta.refusal;
      if (choice.finish_reason) finish = choice.finish_reason;
      if (finish === "content_filter") {
        answer = refusal || answer;
        content.textContent = answer;
        box.classList.add("refused");
        moderationNotice(box, chunk.moderation);
      }
    }
    history.push({role: "assistant", content: answer});
    if (usage) addNote(box, "meta", `${usage.completion_tokens} tokens` + (finish === "length" ? " (cut at the limit)" : ""));
  } catch (err) {
    if (err.name === "AbortError") {
      history.push({role: "assistant", content: answer});
      addNote(box, "meta", "stopped");
    } else {
      history.pop();  // the turn failed: the user can send it again
      userBox.classList.add("failed");
      box.remove();
      $("status").textContent = `Error: ${err.message}`;
    }
  } finally {
    box.classList.remove("streaming");
    controller = null;
    setBusy(false);
    $("input").focus();
  }
}

function newChat() {
  if (controller) controller.abort();
  history = [];
  $("messages").replaceChildren();
  $("status").textContent = "";
  $("input").value = "";
  $("input").focus();
}

async function loadModelName() {
  try {
    const response = await fetch("/v1/models", {headers: headers()});
    if (response.ok) $("model-name").textContent = (await response.json()).data[0].id;
  } catch { /* the name is cosmetic */ }
}

document.addEventListener("DOMContentLoaded", () => {
  const key = sessionStorage.getItem("chatforge-api-key");
  if (key) $("api-key").value = key;
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem("chatforge-api-key", $("api-key").value.trim());
    loadModelName();
  });
  $("temperature").addEventListener("input", () => { $("temperature-value").textContent = $("temperature").value; });
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("input").value.trim();
    if (!text || controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => controller?.abort());
  $("new-chat").addEventListener("click", newChat);
  loadModelName();
  $("input").focus();
});
