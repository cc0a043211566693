// Shared by every labeling page. All text from labelers or models is put in the page with textContent.
"use strict";

const TOKEN_KEY = "chatforge-label-token";

function token() { return localStorage.getItem(TOKEN_KEY); }

function signOut() { localStorage.removeItem(TOKEN_KEY); location.href = "/label/"; }

async function api(method, path, body) {
  const response = await fetch("/label/api" + path, {
    method,
    headers: { "Authorization": "Bearer " + (token() || ""), "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = text; }
  if (!response.ok) {
    const message = (data && (data.detail || (data.error && data.error.message))) || response.statusText;
    const error = new Error(typeof message === "string" ? message : JSON.stringify(message));
    error.status = response.status;
    if (response.status === 401 && !location.pathname.endsWith("/label/")) { signOut(); }
    throw error;
  }
  return data;
}

// el("p", {class: "x"}, "text", child, ...): strings become text nodes, never HTML.
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== false && value !== null && value !== undefined) node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

function status(message, isError) {
  const box = document.getElementById("status");
  box.textContent = message;
  box.className = isError ? "status error" : "status";
}

function showProgress(progress) {
  document.getElementById("progress").textContent = `done ${progress.done} / to do ${progress.todo}`;
}

function conversationView(messages) {
  return el("ol", { class: "conversation" }, ...messages.map((m) =>
    el("li", { class: "turn " + m.role }, el("span", { class: "role" }, m.role), el("div", { class: "text" }, m.content))));
}

// Drafts live in localStorage under the labeler's name, so a reload (or a crash) never loses work.
function draftKey(me, what) { return `chatforge-draft:${me.name}:${what}`; }
function loadDraft(me, what) {
  try { return JSON.parse(localStorage.getItem(draftKey(me, what)) || "null"); } catch (e) { return null; }
}
function saveDraft(me, what, value) { localStorage.setItem(draftKey(me, what), JSON.stringify(value)); }
function clearDraft(me, what) { localStorage.removeItem(draftKey(me, what)); }

function newKey() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  return Date.now().toString(36) + Math.random().toString(36).slice(2);
}

async function signedIn() {
  if (!token()) { location.href = "/label/"; return null; }
  const me = await api("GET", "/me");
  const who = document.getElementById("who");
  if (who) who.textContent = `${me.name} (${me.role})`;
  const out = document.getElementById("signout");
  if (out) out.addEventListener("click", signOut);
  return me;
}
