"""Shared ending of the GPU benchmarks: write the JSON result, print the table, fail on failed checks."""
import json
import os
import sys


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
