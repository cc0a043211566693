"""The labeling API end to end against SQLite and a real PostgreSQL server the test starts: rank with ties,
write a two-turn demonstration, chat feedback, export in the trainable formats; auth, bad input, a killed
server, concurrent labelers over HTTP, and the simulated labeler."""
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from chatforge import ChatforgeError
from chatforge.cli import main
from chatforge.data.chat import read_conversations
from chatforge.data.preferences import read_comparisons
from chatforge.feedback.api import MAX_BODY, label_app
from chatforge.feedback.export import export
from chatforge.feedback.simulate import Client
from chatforge.feedback.store import FeedbackStore

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
ANSWERS = ["The capital of France is Paris.", "Paris.", "It is Lyon.", "<script>alert('x')</script> Marseille"]
DEMO_PROMPT = [{"role": "user", "content": "Name a large animal."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> str | None:
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    return str(Path(found).resolve().parent) if found else None


@pytest.fixture(scope="module")
def postgres_server():
    """A throwaway PostgreSQL cluster on a free port (run as the postgres user when the test runs as root)."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql; `make system-deps` does it)")
    root = Path(tempfile.mkdtemp(prefix="chatforge-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, timeout=120)  # noqa: E731
    try:
        run(f"{bindir}/initdb", "-D", str(root / "data"), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        run(f"{bindir}/pg_ctl", "-D", str(root / "data"), "-l", str(root / "log"), "-w", "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    except subprocess.CalledProcessError as e:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"could not start PostgreSQL: {e.stderr.decode()[-300:]}")
    yield f"postgresql://postgres@127.0.0.1:{port}"
    run(f"{bindir}/pg_ctl", "-D", str(root / "data"), "-m", "immediate", "stop")
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    """A fresh, empty feedback database of each kind."""
    if request.param == "sqlite":
        yield str(tmp_path / "feedback.db")
        return
    import psycopg
    server = request.getfixturevalue("postgres_server")
    name = f"t_{os.getpid()}_{abs(hash(request.node.name)) % 10**8}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    yield f"{server}/{name}"


def fake_sampler(messages, n):
    return [f"suggestion {i} for {messages[-1]['content']}" for i in range(n)]


@pytest.fixture
def world(db):
    """A store with one ranking task (4 answers), one demonstration task, two labelers and an admin."""
    store = FeedbackStore.open(db)
    store.add_tasks("ranking", [(PROMPT, ANSWERS)], source="test")
    store.add_tasks("demonstration", [(DEMO_PROMPT, ["An elephant."])], source="test")
    tokens = {name: store.add_labeler(name) for name in ("alice", "bob")}
    tokens["boss"] = store.add_labeler("boss", "admin")
    client = TestClient(label_app(store, fake_sampler))
    yield store, client, tokens
    client.close()
    store.close()


def auth(token):
    return {"Authorization": f"Bearer {token}"}


def test_rank_write_chat_and_export_exactly_those_records(world, tmp_path):
    store, client, tokens = world
    alice = auth(tokens["alice"])
    me = client.get("/label/api/me", headers=alice).json()
    assert me["name"] == "alice" and me["progress"]["ranking"] == {"done": 0, "todo": 1}

    task = client.get("/label/api/tasks/next?kind=ranking", headers=alice).json()["task"]
    assert sorted(a["text"] for a in task["answers"]) == sorted(ANSWERS)
    ranking = {"task_id": task["id"], "ranking": [[0], [1, 2], [3]], "unsafe": [3]}  # a tie between 1 and 2
    first = client.post("/label/api/submissions", json=ranking, headers=alice)
    assert first.status_code == 201, first.text
    again = client.post("/label/api/submissions", json=ranking, headers=alice)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]  # a retry stores nothing new
    changed = client.post("/label/api/submissions", json={**ranking, "ranking": [[1], [0, 2], [3]]}, headers=alice)
    assert changed.status_code == 409 and "PUT" in changed.json()["detail"]

    demo_task = client.get("/label/api/tasks/next?kind=demonstration", headers=alice).json()["task"]
    assert demo_task["suggestions"] == ["An elephant."]
    two_turns = DEMO_PROMPT + [{"role": "assistant", "content": "An elephant."},
                               {"role": "user", "content": "A smaller one?"},
                               {"role": "assistant", "content": "A horse."}]
    demo = client.post("/label/api/submissions", json={"task_id": demo_task["id"], "messages": two_turns},
                       headers=alice)
    assert demo.status_code == 201, demo.text
    own = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]
    free = client.post("/label/api/submissions", json={"messages": own, "client_key": "draft-1"}, headers=alice)
    assert free.status_code == 201
    assert client.post("/label/api/submissions", json={"messages": own, "client_key": "draft-1"},
                       headers=alice).json()["id"] == free.json()["id"]
    edited = [own[0], {"role": "assistant", "content": "Hello!"}]
    assert client.post("/label/api/submissions", json={"messages": edited, "client_key": "draft-1"},
                       headers=alice).status_code == 409

    chat = [{"role": "user", "content": "Tell me a fact."}]
    compare = {"messages": chat, "answers": ["Cats meow.", "Dogs bark."], "preferred": 1, "client_key": "c1"}
    assert client.post("/label/api/chat/feedback", json=compare, headers=alice).status_code == 201
    thumbs = {"messages": chat, "answers": ["Cows moo.", "Cows bark."], "ratings": [1, -1], "client_key": "c2"}
    assert client.post("/label/api/chat/feedback", json=thumbs, headers=alice).status_code == 201
    lone = {"messages": chat, "answers": ["Fish swim."], "ratings": [1], "client_key": "c3"}
    assert client.post("/label/api/chat/feedback", json=lone, headers=alice).status_code == 201
    progress = client.get("/label/api/me", headers=alice).json()["progress"]
    assert progress["ranking"] == {"done": 1, "todo": 0} and progress["demonstration"]["done"] == 2
    assert len(client.get("/label/api/submissions", headers=alice).json()["submissions"]) == 6

    sft_path, cmp_path = tmp_path / "sft.jsonl", tmp_path / "comparisons.jsonl"
    assert export(store, "sft", sft_path) == (2, {})
    assert export(store, "comparisons", cmp_path) == (3, {"all_tied": 0, "unpaired_chat": 1})
    assert [json.loads(line) for line in sft_path.read_text().splitlines()] == [{"messages": two_turns},
                                                                                {"messages": own}]
    records = [json.loads(line) for line in cmp_path.read_text().splitlines()]
    assert records == [
        {"messages": PROMPT, "responses": [ANSWERS[0], [ANSWERS[1], ANSWERS[2]], ANSWERS[3]], "task": task["id"],
         "unsafe": [ANSWERS[3]]},
        {"messages": chat, "chosen": "Dogs bark.", "rejected": "Cats meow."},
        {"messages": chat, "chosen": "Cows moo.", "rejected": "Cows bark."},
    ]
    comparisons = read_comparisons(cmp_path)  # the reward model's reader takes them as they are
    assert comparisons[0].tiers == [[ANSWERS[0]], [ANSWERS[1], ANSWERS[2]], [ANSWERS[3]]]
    assert len(comparisons[0].pairs()) == 5  # 6 pairs minus the tied one
    assert [c.messages for c in read_conversations(sft_path)] == [two_turns, own]

    over_http = client.get("/label/api/admin/export?kind=comparisons", headers=auth(tokens["boss"]))
    assert over_http.status_code == 200 and over_http.text == cmp_path.read_text()
    assert over_http.headers["X-Records"] == "3"


def test_tokens_roles_and_ownership(world):
    store, client, tokens = world
    alice, bob, boss = (auth(tokens[n]) for n in ("alice", "bob", "boss"))
    assert client.get("/label/api/me").status_code == 401
    assert client.get("/label/api/me", headers=auth("cfl_not-a-token")).status_code == 401
    task = client.get("/label/api/tasks/next?kind=ranking", headers=alice).json()["task"]
    sub = client.post("/label/api/submissions", json={"task_id": task["id"], "ranking": [[0, 1, 2, 3]]},
                      headers=alice).json()
    assert client.get(f"/label/api/submissions/{sub['id']}", headers=alice).status_code == 200
    assert client.get(f"/label/api/submissions/{sub['id']}", headers=bob).status_code == 403
    put = client.put(f"/label/api/submissions/{sub['id']}", json={"ranking": [[0], [1], [2], [3]]}, headers=bob)
    assert put.status_code == 403
    assert client.get("/label/api/submissions", headers=bob).json()["submissions"] == []
    changed = client.put(f"/label/api/submissions/{sub['id']}", json={"ranking": [[3], [2], [1], [0]]}, headers=alice)
    assert changed.status_code == 200 and changed.json()["payload"]["ranking"] == [[3], [2], [1], [0]]
    assert client.get("/label/api/submissions/999", headers=alice).status_code == 404
    for path in ("/label/api/admin/labelers", "/label/api/admin/agreement", "/label/api/admin/export?kind=sft"):
        assert client.get(path, headers=alice).status_code == 403
        assert client.get(path).status_code == 401
        assert client.get(path, headers=boss).status_code == 200
    counts = {r["name"]: r for r in client.get("/label/api/admin/labelers", headers=boss).json()["labelers"]}
    assert counts["alice"]["ranking"] == 1 and counts["bob"]["ranking"] == 0
    store.revoke("alice")
    assert client.get("/label/api/me", headers=alice).status_code == 401
    private = client.post("/label/api/chat/feedback", headers=bob, json={
        "messages": PROMPT, "answers": ["a", "b"], "preferred": 0, "client_key": "k"}).json()
    assert client.get(f"/label/api/tasks/{private['task_id']}", headers=auth(tokens["boss"])).status_code == 403


def test_bad_input_is_400_with_a_clear_message(world):
    store, client, tokens = world
    alice = auth(tokens["alice"])
    task = client.get("/label/api/tasks/next?kind=ranking", headers=alice).json()["task"]
    demo = client.get("/label/api/tasks/next?kind=demonstration", headers=alice).json()["task"]

    def post(body, path="/label/api/submissions"):
        response = client.post(path, json=body, headers=alice)
        assert response.status_code == 400, response.text
        return response.json()["detail"]

    tid = task["id"]
    assert "missing [3]" in post({"task_id": tid, "ranking": [[0], [1], [2]]})
    assert "ranked twice [1]" in post({"task_id": tid, "ranking": [[0], [1], [1, 2], [3]]})
    assert "unknown answers [7]" in post({"task_id": tid, "ranking": [[0], [1], [2], [3], [7]]})
    assert "unsafe" in post({"task_id": tid, "ranking": [[0], [1], [2], [3]], "unsafe": [9]})
    assert "send 'ranking'" in post({"task_id": tid})
    assert "is a ranking" in post({"task_id": tid, "messages": PROMPT})
    empty = DEMO_PROMPT + [{"role": "assistant", "content": "   "}]
    assert "messages[1].content: empty" in post({"task_id": demo["id"], "messages": empty})
    assert "needs the conversation" in post({"task_id": demo["id"], "messages": []})
    other_prompt = [{"role": "user", "content": "Something else"}, {"role": "assistant", "content": "ok"}]
    assert "must begin with task" in post({"task_id": demo["id"], "messages": other_prompt})
    assert "must end with an assistant turn" in post({"task_id": demo["id"], "messages": DEMO_PROMPT})
    assert "client_key" in post({"messages": other_prompt})
    assert "expected user" in post({"messages": [{"role": "assistant", "content": "hi"}], "client_key": "x"})
    assert "String should have at most" in post({"messages": [{"role": "user", "content": "x" * 20_001},
                                                              {"role": "assistant", "content": "y"}],
                                                 "client_key": "x"})
    assert "Extra inputs" in post({"task_id": tid, "ranking": [[0, 1, 2, 3]], "rankng": []})
    assert "not valid JSON" in client.post("/label/api/submissions", content=b"{", headers={
        **alice, "Content-Type": "application/json"}).json()["detail"]
    huge = client.post("/label/api/submissions", content=b" " * (MAX_BODY + 1),
                       headers={**alice, "Content-Type": "application/json"})
    assert huge.status_code == 400 and "larger than the limit" in huge.json()["detail"]
    chat = {"messages": PROMPT, "answers": ["a", "a"], "preferred": 0, "client_key": "k"}
    assert "appears twice" in post(chat, "/label/api/chat/feedback")
    assert "either 'ratings'" in post({**chat, "answers": ["a", "b"], "ratings": [1, 0]}, "/label/api/chat/feedback")
    assert "one per answer" in post({**chat, "answers": ["a", "b"], "preferred": None, "ratings": [1]},
                                    "/label/api/chat/feedback")
    assert store.submissions() == []  # nothing was stored by any of these


def test_agreement_of_several_labelers_through_the_api(tmp_path):
    store = FeedbackStore.open(tmp_path / "f.db")
    store.add_tasks("ranking", [([{"role": "user", "content": f"q{i}"}], [f"a{i}", f"b{i}", f"c{i}"])
                                for i in range(2)], labels_wanted=3)
    tokens = {n: store.add_labeler(n) for n in "abc"}
    admin = store.add_labeler("boss", "admin")
    client = TestClient(label_app(store))
    labels = {"a": [[[0], [1], [2]], [[0, 1], [2]]], "b": [[[0], [2], [1]], [[1], [0], [2]]],
              "c": [[[0], [1], [2]], None]}
    for name, rankings in labels.items():
        for task_id, ranking in zip((1, 2), rankings):
            if ranking is not None:
                response = client.post("/label/api/submissions", json={"task_id": task_id, "ranking": ranking},
                                       headers=auth(tokens[name]))
                assert response.status_code == 201
    result = client.get("/label/api/admin/agreement", headers=auth(admin)).json()
    # task 1: a-b 2/3, a-c 3/3, b-c 2/3; task 2: a-b 2/2 with one pair tied by a
    assert result["agreement"] == pytest.approx(9 / 11)
    assert (result["tasks"], result["compared_pairs"], result["tied_pairs"]) == (2, 11, 1)
    assert result["per_labeler"]["c"] == {"agreement": pytest.approx(5 / 6), "compared_pairs": 6}


def _wait_for(url: str, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read().decode()[-500:]}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer in {seconds}s")


def test_killed_server_keeps_every_acknowledged_label_from_concurrent_labelers(tmp_path):
    db = tmp_path / "feedback.db"
    store = FeedbackStore.open(db)
    store.add_tasks("ranking", [([{"role": "user", "content": f"What is {i} + {i}?"}],
                                 [f"It is {2 * i}.", f"It is {2 * i + 1}.", f"{2 * i}", "I cannot help with that."])
                                for i in range(12)], labels_wanted=2)
    tokens = [store.add_labeler(f"l{i}") for i in range(3)]
    store.close()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "chatforge.cli", "label", "--db", str(db), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    acknowledged: list[int] = []
    try:
        _wait_for(url + "/health", server)

        def label(token):
            client = Client(url, token)
            for _ in range(4):
                task = client.call("GET", "/label/api/tasks/next?kind=ranking")["task"]
                reply = client.call("POST", "/label/api/submissions", {"task_id": task["id"], "ranking": [
                    [a["index"]] for a in task["answers"]]})
                acknowledged.append(reply["id"])

        threads = [threading.Thread(target=label, args=(t,)) for t in tokens]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with pytest.raises(ChatforgeError, match="401 unknown or revoked token"):
            Client(url, "cfl_wrong").call("GET", "/label/api/me")
        # the simulated labeler drives the same API, then the server dies without any chance to flush
        assert main(["feedback", "simulate", "--server", url, "--token", tokens[0], "--n", "3",
                     "--disagreement", "0"]) == 0
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()
    assert len(acknowledged) == 12 == len(set(acknowledged))
    store = FeedbackStore.open(db)
    rows = store.submissions()
    assert len(rows) == 15 and set(acknowledged) <= {sub.id for sub, _, _ in rows}
    assert len({(sub.task_id, sub.labeler_id) for sub, _, _ in rows}) == 15
    simulated = [sub for sub, _, name in rows if name == "l0"][4:]
    for sub in simulated:  # the gold labeler ranks "It is 2i." above the wrong sum and flags nothing
        task = store.task(sub.task_id)
        assert task.answers[sub.payload["ranking"][0][0]] in (task.answers[0], task.answers[2])
        assert sub.payload["unsafe"] == []


def test_simulated_labeler_reports_an_unreachable_server():
    with pytest.raises(ChatforgeError, match="cannot reach the labeling server"):
        Client(f"http://127.0.0.1:{free_port()}", "x", timeout=2).call("GET", "/label/api/me")
