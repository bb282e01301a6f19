"""`make loadtest`: run locust headless against a running server and summarize the run.

    python loadtest/run.py --host http://127.0.0.1:30000 --users 4 --spawn-rate 2 --duration 60s --workload mixed
    python loadtest/run.py --workload long-context --duration 30s --label tq4 --long-prompt-tokens 2048

Writes into the results dir (default loadtest/results/<time>-<workload>/): report.html (locust's report),
locust_stats.json (locust's totals per request name), requests.jsonl and run.json (one line per request, the run's
settings; from the locustfile), summary.json and summary.txt (loadtest/summarize.py), and prints the summary.
Flags this script does not know go to locust and the locustfile (--prompt-tokens, --output-tokens, --api, ...:
see `locust -f loadtest/locustfile.py --help`). The API key travels to locust in its environment, not its arguments.

Exit status: locust's (1 when any request failed), 2 on bad input.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from loopback import is_loopback
from summarize import format_summary, summarize_dir

HERE = Path(__file__).resolve().parent
LOCUSTFILE = HERE / "locustfile.py"
RESULTS = HERE / "results"
DEFAULT_HOST = "http://127.0.0.1:30000"  # tq_serve's default --port
# As in the locustfile, which checks them again.
WORKLOADS = ("chat", "shared-prefix", "long-context", "mixed", "sessions")


def locust_command(args: argparse.Namespace, out: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "locust",
        "--locustfile",
        str(LOCUSTFILE),
        "--headless",
        "--only-summary",
        "--host",
        args.host,
        "--users",
        str(args.users),
        "--spawn-rate",
        str(args.spawn_rate),
        "--run-time",
        args.duration,
        "--stop-timeout",
        args.stop_timeout,
        "--html",
        str(out / "report.html"),
        "--json-file",
        str(out / "locust_stats"),  # locust appends .json
        "--workload",
        args.workload,
        "--results-dir",
        str(out),
        *(["--allow-remote"] if args.allow_remote else []),
        *extra,
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python loadtest/run.py",
        # Unknown flags pass through to locust: no prefix matching, or --api would be taken for --api-key.
        allow_abbrev=False,
        description=__doc__.split("\n\n")[0],
        epilog="Other flags (--prompt-tokens, --output-tokens, --api, --max-requests, ...) go to the locustfile: "
        "see `locust -f loadtest/locustfile.py --help`.",
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"server base URL (default {DEFAULT_HOST})")
    parser.add_argument("--users", type=int, default=4, help="concurrent streaming clients")
    parser.add_argument("--spawn-rate", type=float, default=2.0, help="users started per second")
    parser.add_argument("--duration", default="60s", help="run time, e.g. 30s, 5m (locust --run-time)")
    parser.add_argument("--workload", default="mixed", choices=WORKLOADS, help="request profile (default: mixed)")
    parser.add_argument("--out", type=Path, help="results dir (default: loadtest/results/<time>-<workload>)")
    parser.add_argument("--label", default="", help="name of the run in summaries, e.g. tq4 or bf16")
    parser.add_argument("--api-key", default=os.environ.get("LOCUST_API_KEY", ""), help="bearer token (or env)")
    parser.add_argument("--stop-timeout", default="30s", help="time in-flight requests get to finish at the end")
    parser.add_argument("--allow-remote", action="store_true", help="allow a host that is not a loopback address")
    args, extra = parser.parse_known_args(argv)
    if "://" not in args.host:
        args.host = f"http://{args.host}"
    if not (args.allow_remote or is_loopback(args.host)):
        parser.error(f"refusing host {args.host}: not a loopback address (pass --allow-remote to load it)")
    out = args.out or RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}-{args.workload}"
    out.mkdir(parents=True, exist_ok=True)
    env = os.environ | ({"LOCUST_API_KEY": args.api_key} if args.api_key else {})
    code = subprocess.run(locust_command(args, out, extra), env=env).returncode
    if not (out / "run.json").is_file():
        print(f"loadtest: locust exited with {code} before the test ran; nothing to summarize", file=sys.stderr)
        return code or 1
    print(format_summary(summarize_dir(out, args.label or out.name)))
    print(f"results: {out}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
