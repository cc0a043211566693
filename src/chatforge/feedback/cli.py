"""`chatforge label` serves the labeling app; `chatforge feedback ...` administers the store.

    chatforge feedback add-labeler alice --db runs/demo/feedback.db           prints alice's token (once)
    chatforge feedback add-labeler boss --admin --db runs/demo/feedback.db
    chatforge feedback add-tasks --db ... --kind ranking --policy runs/demo/sft --prompts world/prompts/reward.jsonl
    chatforge label runs/demo/sft --db runs/demo/feedback.db --port 8300      then open http://127.0.0.1:8300/label/
    chatforge feedback export --db ... --kind comparisons --out comparisons.jsonl
    chatforge feedback round --run runs/demo --world world                   retrain on the feedback (rounds.py)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from chatforge import ChatforgeError
from chatforge.feedback.rounds import register_round
from chatforge.feedback.store import FeedbackStore


def default_db(checkpoint: str | None) -> str:
    """The run directory's feedback.db: runs/<run>/<stage> -> runs/<run>/feedback.db."""
    if not checkpoint:
        raise ChatforgeError("--db is required (a SQLite file or a postgresql:// URL)")
    return str(Path(checkpoint).resolve().parent / "feedback.db")


def open_store(args: argparse.Namespace) -> FeedbackStore:
    return FeedbackStore.open(args.db or default_db(getattr(args, "checkpoint", None)))


def label_command(args: argparse.Namespace) -> None:
    import uvicorn

    from chatforge.feedback.api import label_app
    store = open_store(args)
    sampler = None
    if args.checkpoint:
        from chatforge.feedback.tasks import EngineSampler
        from chatforge.infer.engine import Engine
        sampler = EngineSampler(Engine.load(args.checkpoint, device=args.device), args.max_new_tokens,
                                args.temperature, seed=args.seed)
    if not store.labelers():
        print(f"label: no labelers yet: create one with `chatforge feedback add-labeler NAME --db {args.db or ''}`",
              file=sys.stderr)
    print(f"label: {store.engine.url.render_as_string()} (schema v{store.version}); "
          f"{'suggestions from ' + args.checkpoint if sampler else 'no model: no suggestions or regenerate'}; "
          f"open http://{args.host}:{args.port}/label/", file=sys.stderr, flush=True)
    uvicorn.run(label_app(store, sampler), host=args.host, port=args.port, log_level="warning")


def add_labeler_command(args: argparse.Namespace) -> None:
    token = open_store(args).add_labeler(args.name, "admin" if args.admin else "labeler")
    print(f"{'admin' if args.admin else 'labeler'} {args.name} created; their token (shown only now):",
          file=sys.stderr)
    print(token)


def revoke_command(args: argparse.Namespace) -> None:
    open_store(args).revoke(args.name)
    print(f"revoked {args.name}: their token is refused from now on", file=sys.stderr)


def labelers_command(args: argparse.Namespace) -> None:
    rows = open_store(args).counts()
    print(f"{'name':<20} {'role':<8} {'ranking':>8} {'demos':>6} {'chat':>5}")
    for r in rows:
        print(f"{r['name']:<20} {r['role']:<8} {r['ranking']:>8} {r['demonstration']:>6} {r['chat']:>5}"
              f"{'  (revoked)' if r['revoked'] else ''}")


def add_tasks_command(args: argparse.Namespace) -> None:
    from chatforge.feedback.tasks import add_tasks
    add_tasks(open_store(args), args.kind, args.prompts, args.answers, args.policy, args.min_answers,
              args.max_answers, args.limit, args.labels_per_task, args.max_new_tokens, args.temperature, args.seed,
              args.device)


def export_command(args: argparse.Namespace) -> None:
    from chatforge.feedback.export import export
    written, skipped = export(open_store(args), args.kind, args.out, args.after)
    left_out = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in skipped.items() if n)
    print(f"feedback export: {written} {args.kind} records -> {args.out}"
          f"{f' (left out: {left_out})' if left_out else ''}", file=sys.stderr)


def agreement_command(args: argparse.Namespace) -> None:
    from chatforge.feedback.agreement import agreement
    rows = open_store(args).submissions(kind="ranking")
    result = agreement([(task.id, name, sub.payload["ranking"]) for sub, task, name in rows])
    print(json.dumps(result, indent=2))


def simulate_command(args: argparse.Namespace) -> None:
    from chatforge.feedback.simulate import simulate
    simulate(args.server, args.token, args.n, args.labeler, args.disagreement, args.seed, args.kind)


def _db(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--db", required=required, help="SQLite file (created if missing) or postgresql:// URL")


def register(sub: argparse._SubParsersAction) -> None:
    lab = sub.add_parser("label", help="serve the labeling pages (rank answers, write demonstrations, chat feedback)")
    lab.add_argument("checkpoint", nargs="?", help="the model that writes suggestions and regenerated answers")
    _db(lab, required=False)
    lab.add_argument("--host", default="127.0.0.1")
    lab.add_argument("--port", type=int, default=8300)
    lab.add_argument("--max-new-tokens", type=int, default=96)
    lab.add_argument("--temperature", type=float, default=1.0)
    lab.add_argument("--seed", type=int, default=0)
    lab.add_argument("--device")
    lab.set_defaults(func=label_command)

    fb = sub.add_parser("feedback", help="human feedback: labelers, tasks, export, simulated labelers, RLHF rounds",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fsub = fb.add_subparsers(dest="feedback_command", required=True, metavar="ACTION")
    p = fsub.add_parser("add-labeler", help="create a labeler (or --admin) and print their token")
    p.add_argument("name")
    p.add_argument("--admin", action="store_true", help="may see everyone's counts, agreement, and export")
    _db(p)
    p.set_defaults(func=add_labeler_command)

    p = fsub.add_parser("revoke", help="refuse a labeler's token from now on (their labels stay)")
    p.add_argument("name")
    _db(p)
    p.set_defaults(func=revoke_command)

    p = fsub.add_parser("labelers", help="labelers and their submission counts")
    _db(p)
    p.set_defaults(func=labelers_command)

    p = fsub.add_parser("add-tasks", help="queue ranking or demonstration tasks from a prompt set")
    _db(p)
    p.add_argument("--kind", choices=("ranking", "demonstration"), default="ranking")
    p.add_argument("--prompts", default="", help="JSONL of {\"messages\"|\"prompt\"}")
    p.add_argument("--answers", default="", help="JSONL of {\"messages\", \"answers\": [...]} to rank as they are")
    p.add_argument("--policy", default="", help="the checkpoint that samples answers or suggestions")
    p.add_argument("--min-answers", type=int, default=4, help="K is drawn per prompt from [min, max] (4..9)")
    p.add_argument("--max-answers", type=int, default=9, help="also: suggestions per demonstration task")
    p.add_argument("--labels-per-task", type=int, default=1, help="labelers per task (2+ measures agreement)")
    p.add_argument("--limit", type=int, default=0, help="only the first N prompts")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device")
    p.set_defaults(func=add_tasks_command)

    p = fsub.add_parser("export", help="write the labels as the JSONL that SFT or the reward model reads")
    _db(p)
    p.add_argument("--kind", required=True, choices=("sft", "comparisons"))
    p.add_argument("--out", required=True)
    p.add_argument("--after", type=int, default=0, help="only submissions with a larger id")
    p.set_defaults(func=export_command)

    p = fsub.add_parser("agreement", help="inter-labeler agreement on tasks ranked by several labelers")
    _db(p)
    p.set_defaults(func=agreement_command)

    p = fsub.add_parser("simulate", help="the tiny world's gold labeler labels through the HTTP API")
    p.add_argument("--server", required=True, help="the labeling server, e.g. http://127.0.0.1:8300")
    p.add_argument("--token", required=True, help="a labeler token (chatforge feedback add-labeler)")
    p.add_argument("--labeler", default="gold", choices=("gold",))
    p.add_argument("--n", type=int, required=True, help="tasks to label")
    p.add_argument("--kind", choices=("ranking", "demonstration"), default="ranking")
    p.add_argument("--disagreement", type=float, default=0.25, help="share of pairs ordered wrongly")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=simulate_command)

    register_round(fsub)
