"""Shared by the GPU benchmarks: recording a failed cell, and the ending (write the JSON result,
print the table, exit 1 on failed checks)."""
import json
import os
import sys
import traceback


class CheckFailed(AssertionError):
    """A kernel's output (or state) disagrees with the reference; args: (message, detail dict)."""


def record_failure(row: dict, name: str, exc: BaseException, label: str, failures: list, fail_fast: bool,
                   tb_limit: int = 6) -> None:
    """Note ``exc`` of kernel ``name`` in ``row["failures"]`` and ``failures`` (``label`` names the
    cell), print it, and re-raise with ``fail_fast``."""
    detail = exc.args[1] if isinstance(exc, CheckFailed) and len(exc.args) > 1 else None
    msg = f"{label} {name}: {type(exc).__name__}: {exc.args[0] if exc.args else exc}"
    row.setdefault("failures", {})[name] = dict(
        error=msg, detail=detail,
        traceback=None if isinstance(exc, CheckFailed) else traceback.format_exc(limit=tb_limit))
    failures.append(msg)
    print("FAIL " + msg, file=sys.stderr, flush=True)
    if fail_fast:
        raise exc


def finish(res: dict, bench: str, out: str | None, sweep: bool, failures: list, print_table) -> None:
    out = out or f"perf/results/{bench}{'_sweep' if sweep else ''}_{res['env']['gpu'].replace(' ', '_')}.json"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print_table(res)
    print(f"wrote {out} ({res['wall_s']:.0f} s)")
    if failures:
        print(f"\n{len(failures)} CHECK(S) FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        sys.exit(1)
