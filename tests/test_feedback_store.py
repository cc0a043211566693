"""The feedback store: schema versions, tokens, concurrent labelers on SQLite, agreement on a hand-made set."""
import multiprocessing
import sqlite3
import threading

import pytest
from sqlalchemy import text

from chatforge import ChatforgeError
from chatforge.feedback.agreement import agreement
from chatforge.feedback.store import FeedbackStore, hash_token

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def queue(store, n, k=4, labels=1):
    items = [([{"role": "user", "content": f"question {i}"}], [f"answer {i}.{j}" for j in range(k)]) for i in range(n)]
    store.add_tasks("ranking", items, source="test", labels_wanted=labels)


def test_fresh_database_is_stamped_and_a_later_migration_runs_once(tmp_path):
    db = tmp_path / "f.db"
    store = FeedbackStore.open(db)
    assert store.version == 1
    store.close()
    runs = []

    def add_note_column(conn):
        runs.append(1)
        conn.execute(text("ALTER TABLE tasks ADD COLUMN note VARCHAR(100)"))

    upgraded = FeedbackStore.open(db, migrations={2: add_note_column})
    assert upgraded.version == 2 and runs == [1]
    with upgraded.engine.connect() as conn:
        assert "note" in [row[1] for row in conn.execute(text("PRAGMA table_info(tasks)"))]
    upgraded.close()
    FeedbackStore.open(db, migrations={2: add_note_column}).close()
    assert runs == [1]  # not run again
    with pytest.raises(ChatforgeError, match="schema version 2 is newer"):
        FeedbackStore.open(db)  # this chatforge knows only version 1


def test_a_foreign_database_is_refused(tmp_path):
    db = tmp_path / "other.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE tasks (id INTEGER PRIMARY KEY)")
    with pytest.raises(ChatforgeError, match="no schema_version"):
        FeedbackStore.open(db)


def test_tokens_are_stored_only_as_hashes_and_revocation_refuses_them(tmp_path):
    store = FeedbackStore.open(tmp_path / "f.db")
    token = store.add_labeler("alice")
    admin = store.add_labeler("boss", "admin")
    assert store.authenticate(token).name == "alice" and store.authenticate(admin).role == "admin"
    assert store.authenticate(token + "x") is None
    with store.engine.connect() as conn:
        stored = [row[0] for row in conn.execute(text("SELECT token_hash FROM labelers"))]
    assert hash_token(token) in stored and token not in stored
    store.close()
    assert not any(token.encode() in f.read_bytes() for f in tmp_path.iterdir())  # the db and any WAL left
    store = FeedbackStore.open(tmp_path / "f.db")
    store.revoke("alice")
    assert store.authenticate(token) is None
    with pytest.raises(ChatforgeError, match="exists already"):
        store.add_labeler("alice")
    with pytest.raises(ChatforgeError, match="labeler name"):
        store.add_labeler("no spaces")
    with pytest.raises(ChatforgeError, match="no labeler named"):
        store.revoke("nobody")


def test_same_task_queued_twice_is_one_task_and_progress_counts(tmp_path):
    store = FeedbackStore.open(tmp_path / "f.db")
    queue(store, 3)
    queue(store, 3)
    alice = store.authenticate(store.add_labeler("alice"))
    assert store.progress(alice.id)["ranking"] == {"done": 0, "todo": 3}
    task = store.next_task(alice.id, "ranking")
    store.submit(alice.id, task.id, {"ranking": [[0], [1, 2], [3]], "unsafe": []})
    assert store.progress(alice.id)["ranking"] == {"done": 1, "todo": 2}
    assert store.next_task(alice.id, "ranking").id != task.id


def _label_all(db, token, barrier=None):
    """Label every open ranking task (run in a thread or a process)."""
    store = FeedbackStore.open(db)
    labeler = store.authenticate(token)
    if barrier is not None:
        barrier.wait()
    done = 0
    while (task := store.next_task(labeler.id, "ranking")) is not None:
        store.submit(labeler.id, task.id, {"ranking": [[0], [1], [2], [3]], "unsafe": []})
        done += 1
    store.close()
    return done


def _count_rows(store):
    with store.engine.connect() as conn:
        total = conn.execute(text("SELECT COUNT(*) FROM submissions")).scalar_one()
        distinct = conn.execute(text("SELECT COUNT(*) FROM (SELECT DISTINCT task_id, labeler_id FROM submissions) d")
                                ).scalar_one()
    return total, distinct


def test_labelers_in_threads_never_lose_or_duplicate_a_record(tmp_path):
    db = tmp_path / "f.db"
    store = FeedbackStore.open(db)
    queue(store, 30, labels=3)
    tokens = [store.add_labeler(f"labeler{i}") for i in range(6)]
    barrier = threading.Barrier(len(tokens))
    results = [0] * len(tokens)

    def work(i):
        results[i] = _label_all(db, tokens[i], barrier)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(tokens))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total, distinct = _count_rows(store)
    assert total == distinct == sum(results)
    assert 90 <= total <= 30 * 6  # every task got its 3 labels (a race may add a fourth, never lose one)
    labels = [task.id for _, task, _ in store.submissions(kind="ranking")]
    assert min(labels.count(task_id) for task_id in set(labels)) >= 3 and len(set(labels)) == 30


def test_labelers_in_processes_never_lose_or_duplicate_a_record(tmp_path):
    db = tmp_path / "f.db"
    store = FeedbackStore.open(db)
    queue(store, 20, labels=2)
    tokens = [store.add_labeler(f"labeler{i}") for i in range(3)]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(len(tokens)) as pool:
        results = pool.starmap(_label_all, [(str(db), t) for t in tokens])
    total, distinct = _count_rows(store)
    assert total == distinct == sum(results) and total >= 40


def test_the_same_label_sent_twice_at_once_is_stored_once(tmp_path):
    store = FeedbackStore.open(tmp_path / "f.db")
    queue(store, 1)
    alice = store.authenticate(store.add_labeler("alice"))
    task = store.next_task(alice.id, "ranking")
    payload = {"ranking": [[1], [0], [2, 3]], "unsafe": [2]}
    barrier = threading.Barrier(4)
    created = []

    def send():
        barrier.wait()
        created.append(store.submit(alice.id, task.id, payload)[1])

    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(created) == [False, False, False, True]
    assert _count_rows(store) == (1, 1)


def test_agreement_on_a_hand_made_set():
    rankings = [
        (1, "a", [[0], [1], [2]]), (1, "b", [[0], [2], [1]]),           # pairs 01 02 agree, 12 disagrees: 2/3
        (2, "a", [[0, 1], [2]]), (2, "b", [[1], [0], [2]]),             # 01 tied by a (left out); 02 12 agree: 2/2
        (3, "a", [[0], [1]]), (3, "b", [[1], [0]]), (3, "c", [[0], [1]]),  # ab no, ac yes, bc no: 1/3
        (4, "a", [[0], [1]]),                                           # one labeler: not counted
    ]
    result = agreement(rankings)
    assert result["agreement"] == pytest.approx(5 / 8)
    assert (result["tasks"], result["labeler_pairs"], result["compared_pairs"], result["tied_pairs"]) == (3, 5, 8, 1)
    assert result["per_labeler"]["a"] == {"agreement": pytest.approx(5 / 7), "compared_pairs": 7}
    assert result["per_labeler"]["b"] == {"agreement": pytest.approx(4 / 7), "compared_pairs": 7}
    assert result["per_labeler"]["c"] == {"agreement": pytest.approx(1 / 2), "compared_pairs": 2}
    assert result["ci_low"] <= 5 / 8 <= result["ci_high"]
    everyone_agrees = agreement([(1, "a", [[0], [1], [2]]), (1, "b", [[0], [1], [2]])])
    assert everyone_agrees["agreement"] == 1.0
    assert agreement([(1, "a", [[0], [1]])])["agreement"] is None
