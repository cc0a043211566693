"use strict";

function summary(sub) {
  if (sub.kind === "ranking") {
    const n = sub.payload.ranking.flat().length;
    return `${n} answers ranked in ${sub.payload.ranking.length} groups` +
      (sub.payload.unsafe.length ? `, ${sub.payload.unsafe.length} flagged unsafe` : "");
  }
  if (sub.kind === "demonstration") return `${sub.payload.messages.length} turns`;
  return sub.payload.preferred !== undefined ? `preferred answer ${sub.payload.preferred + 1}` : "thumbs";
}

async function showHome() {
  let me;
  try { me = await api("GET", "/me"); } catch (e) { status(e.message, true); showSignIn(); return; }
  document.getElementById("signin").hidden = true;
  document.getElementById("home").hidden = false;
  document.getElementById("who").textContent = `${me.name} (${me.role})`;
  document.getElementById("go-admin").hidden = me.role !== "admin";
  const body = document.querySelector("#progress-table tbody");
  body.replaceChildren(...Object.entries(me.progress).map(([kind, p]) =>
    el("tr", {}, el("td", {}, kind), el("td", {}, String(p.done)), el("td", {}, kind === "chat" ? "-" : String(p.todo)))));
  const mine = await api("GET", "/submissions");
  document.getElementById("mine").replaceChildren(...mine.submissions.map((sub) => {
    const prompt = sub.messages.filter((m) => m.role === "user").map((m) => m.content)[0] || "";
    const page = sub.kind === "ranking" ? "rank.html" : sub.kind === "demonstration" ? "write.html" : null;
    return el("li", {}, `${sub.kind} #${sub.id}: `, el("q", {}, prompt.slice(0, 80)), " " + summary(sub) + " ",
      page ? el("a", { href: `${page}?submission=${sub.id}` }, "change") : null);
  }));
  document.getElementById("signout").addEventListener("click", signOut);
}

function showSignIn() {
  document.getElementById("home").hidden = true;
  document.getElementById("signin").hidden = false;
  document.getElementById("token-input").focus();
}

document.getElementById("signin").addEventListener("submit", async (event) => {
  event.preventDefault();
  localStorage.setItem(TOKEN_KEY, document.getElementById("token-input").value.trim());
  status("");
  await showHome();
});

if (token()) showHome(); else showSignIn();
