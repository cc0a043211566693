"use strict";

const pct = (x) => (x === null ? "n/a" : (100 * x).toFixed(1) + "%");

async function load() {
  const { labelers } = await api("GET", "/admin/labelers");
  document.querySelector("#labelers tbody").replaceChildren(...labelers.map((l) => el("tr", {},
    el("td", {}, l.name), el("td", {}, l.role), el("td", {}, String(l.ranking)), el("td", {}, String(l.demonstration)),
    el("td", {}, String(l.chat)), el("td", {}, l.revoked ? "revoked" : ""))));
  const a = await api("GET", "/admin/agreement");
  document.getElementById("agreement").textContent = a.agreement === null
    ? "No task has been ranked by two or more labelers yet."
    : `${pct(a.agreement)} (95% interval ${pct(a.ci_low)} to ${pct(a.ci_high)}) over ${a.compared_pairs} answer pairs ` +
      `of ${a.tasks} tasks; ${a.tied_pairs} pairs tied by one of the two labelers were left out.`;
  document.querySelector("#per-labeler tbody").replaceChildren(...Object.entries(a.per_labeler).map(([name, v]) =>
    el("tr", {}, el("td", {}, name), el("td", {}, pct(v.agreement)), el("td", {}, String(v.compared_pairs)))));
}

async function download(kind) {
  const response = await fetch(`/label/api/admin/export?kind=${kind}`, { headers: { "Authorization": "Bearer " + token() } });
  if (!response.ok) { status(`export failed: ${response.status}`, true); return; }
  const blob = await response.blob();
  const link = el("a", { href: URL.createObjectURL(blob), download: `${kind}.jsonl` });
  document.body.append(link);
  link.click();
  link.remove();
  status(`${response.headers.get("X-Records")} ${kind} records exported.`);
}

document.getElementById("export-sft").addEventListener("click", () => download("sft"));
document.getElementById("export-comparisons").addEventListener("click", () => download("comparisons"));
signedIn().then((me) => {
  if (!me) return;
  if (me.role !== "admin") { status("This page needs an admin token.", true); return; }
  return load();
}).catch((e) => status(e.message, true));
