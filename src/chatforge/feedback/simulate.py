"""A simulated labeler: the tiny world's gold labeler works through the labeling API as a person would.

    chatforge feedback simulate --server http://127.0.0.1:8300 --labeler gold --n 200 --token cfl_...

It asks the same endpoints as the pages for the next task, ranks its answers with the gold labeler (which
orders a `disagreement` share of pairs wrongly, as people disagree: InstructGPT's labelers agreed ~73%),
flags answers that comply with a harmful request as unsafe, and submits. For a demonstration task it
submits the suggestion the gold labeler scores best (it cannot write one of its own).
"""
from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import Any

from chatforge import ChatforgeError

LABELERS = ("gold",)


class Client:
    """JSON over HTTP with the labeler's token (the standard library: no extra dependency)."""

    def __init__(self, server: str, token: str, timeout: float = 60.0) -> None:
        self.server, self.token, self.timeout = server.rstrip("/"), token, timeout

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.server + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            try:
                parsed = json.loads(detail)
                detail = parsed.get("detail") or parsed.get("error", {}).get("message") or detail
            except (json.JSONDecodeError, AttributeError):
                pass
            raise ChatforgeError(f"{method} {self.server}{path}: {e.code} {detail}") from None
        except urllib.error.URLError as e:
            raise ChatforgeError(f"{self.server}: cannot reach the labeling server ({e.reason})") from None


def gold_label(labeler: Any, task: dict[str, Any]) -> dict[str, Any]:
    """The submission the gold labeler makes for a task as the API shows it."""
    from chatforge.data.world.labeler import is_refusal
    messages = task["messages"]
    if task["kind"] == "ranking":
        indices = [a["index"] for a in task["answers"]]
        texts = [a["text"] for a in task["answers"]]
        tiers = labeler.rank(messages, texts)
        harmful = labeler.read_task(messages).kind == "harmful"
        unsafe = sorted(indices[i] for i, t in enumerate(texts) if harmful and not is_refusal(t))
        return {"task_id": task["id"], "ranking": [[indices[i] for i in tier] for tier in tiers], "unsafe": unsafe}
    best = max(task["suggestions"], key=lambda s: labeler.score(messages, s).total)
    return {"task_id": task["id"], "messages": messages + [{"role": "assistant", "content": best}]}


def simulate(server: str, token: str, n: int, labeler: str = "gold", disagreement: float = 0.25, seed: int = 0,
             kind: str = "ranking") -> dict[str, Any]:
    """Label up to `n` tasks of `kind`; returns {"submitted", "remaining", "labeler"}."""
    from chatforge.data.world.labeler import GoldLabeler
    if labeler not in LABELERS:
        raise ChatforgeError(f"--labeler: expected one of {', '.join(LABELERS)}, got {labeler!r}")
    if kind not in ("ranking", "demonstration"):
        raise ChatforgeError(f"--kind: expected ranking or demonstration, got {kind!r}")
    if n < 1:
        raise ChatforgeError(f"--n must be >= 1, got {n}")
    client = Client(server, token)
    me = client.call("GET", "/label/api/me")
    gold = GoldLabeler(disagreement=disagreement, seed=seed)
    submitted = 0
    progress = me["progress"][kind]
    while submitted < n:
        reply = client.call("GET", f"/label/api/tasks/next?kind={kind}")
        task, progress = reply["task"], reply["progress"]
        if task is None:
            break
        if kind == "demonstration" and not task["suggestions"]:
            print(f"simulate: task {task['id']} has no suggestions to choose from; the simulated labeler cannot "
                  "write demonstrations of its own", file=sys.stderr)
            break
        client.call("POST", "/label/api/submissions", gold_label(gold, task))
        submitted += 1
        progress = {"done": progress["done"] + 1, "todo": progress["todo"] - 1}
    print(f"simulate: {me['name']} ({labeler} labeler, disagreement {disagreement:g}) submitted {submitted} {kind} "
          f"labels to {server}; {progress['todo']} still to do", file=sys.stderr)
    return {"labeler": me["name"], "submitted": submitted, "remaining": progress["todo"]}
