#!/usr/bin/env python3
"""Submit a distgrad job to a Ray cluster, wait for it, print its logs.

The Python twin of ``ray job submit``: it talks to the cluster's job server
(the Ray dashboard, port 8265) through ``ray.job_submission.JobSubmissionClient``
with a runtime environment, follows the job until it ends or ``--timeout``
passes, prints the driver's logs, and exits 0 only when the job SUCCEEDED.

The cluster runs with token authentication (``RAY_AUTH_MODE=token``), so the
request must carry the cluster's token. It is read, in this order, from
``--token-file``, ``$RAY_AUTH_TOKEN``, the file named by ``$RAY_AUTH_TOKEN_PATH``
or ``~/.ray/auth_token`` (where ``ray get-auth-token --generate`` puts it).
It is never taken on the command line, where ``ps`` and shell history would
show it, and it is never printed. It is sent only over https, or over plain
http to a loopback address (an SSH tunnel or ``kubectl port-forward``): a
bearer token in cleartext across a network could be read and replayed.
``RAY_AUTH_*`` variables are refused in every env var source (``--env`` and
``--runtime-env-json``'s ``env_vars``): the job's runtime env is stored in the
cluster's job metadata, where a token must not end up.

Examples::

    # The demo, on a cluster whose dashboard is forwarded to localhost:8265
    # (``ray dashboard deploy/cluster.yaml`` or ``kubectl port-forward``):
    export RAY_AUTH_TOKEN_PATH=~/.ray/auth_token
    python deploy/submit_job.py --address http://127.0.0.1:8265

    # Ship the local checkout with the job instead of using the installed one:
    python deploy/submit_job.py --working-dir . -- \\
        python -m distgrad.cli demo --address auto --workers 4 --steps 200

Exit status: 0 SUCCEEDED; 1 FAILED or STOPPED; 2 bad arguments, no token, or
the cluster could not be reached or refused the token; 3 timed out (the job is
stopped first).
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shlex
import sys
import time
import urllib.parse

DEFAULT_ENTRYPOINT = ["distgrad", "demo", "--address", "auto"]
# Never upload these with a working_dir: VCS data, virtualenvs, caches, builds.
DEFAULT_EXCLUDES = [
    ".git",
    ".ci-venv",
    ".venv",
    "**/__pycache__",
    "**/*.pyc",
    ".pytest_cache",
    ".hypothesis",
    "*.egg-info",
    "/build",
    "/dist",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT = 0, 1, 2, 3


class SubmitError(Exception):
    """A problem that ends the script with EXIT_USAGE and a one-line message."""


def read_token(token_file: str | None = None) -> str | None:
    """Return the cluster token from the usual places, or None.

    Order: ``token_file``, ``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH``,
    ``~/.ray/auth_token`` (the same order Ray itself uses, after the explicit
    file). Surrounding whitespace is stripped, as Ray does.

    >>> os.environ["RAY_AUTH_TOKEN"] = "abc"; read_token()
    'abc'
    """
    if token_file:
        return _read_token_file(token_file, "--token-file")
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        # Ray treats an unreadable RAY_AUTH_TOKEN_PATH as fatal; so do we.
        return _read_token_file(path, "$RAY_AUTH_TOKEN_PATH")
    default = os.path.expanduser(os.path.join("~", ".ray", "auth_token"))
    if os.path.isfile(default):
        return _read_token_file(default, "~/.ray/auth_token")
    return None


def _read_token_file(path: str, what: str) -> str:
    try:
        with open(os.path.expanduser(path)) as f:
            token = f.read().strip()
    except OSError as e:
        raise SubmitError(f"cannot read the token file given by {what}: {e}") from None
    if not token:
        raise SubmitError(f"the token file given by {what} is empty")
    return token


def parse_env(pairs: list[str]) -> dict[str, str]:
    """Turn ``["A=1", "B=x=y"]`` into ``{"A": "1", "B": "x=y"}``.

    >>> parse_env(["A=1", "B=x=y"])
    {'A': '1', 'B': 'x=y'}
    """
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SubmitError(f"--env expects KEY=VALUE, got {pair!r}")
        env[key] = value
    check_env_vars(env, "--env")
    return env


def check_env_vars(env: dict, source: str) -> None:
    """Refuse ``RAY_AUTH_*`` (any case) in env vars bound for the job's runtime env.

    The job inherits the cluster's own auth settings; a token put into the runtime env
    would be stored in the job's metadata, readable by anyone who can list jobs.

    >>> check_env_vars({"A": "1"}, "--env")
    """
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                            for k, v in env.items()):
        raise SubmitError(f"{source}: env_vars must map names to string values")
    for key in env:
        if key.upper().startswith("RAY_AUTH_"):
            raise SubmitError(f"{source} {key}: auth settings must not travel in the runtime env")


def check_address(address: str) -> str:
    """Refuse a job server address the token must not be sent to: https anywhere, plain
    http only to a loopback host (127.0.0.0/8, ::1, localhost).

    >>> check_address("http://127.0.0.1:8265")
    'http://127.0.0.1:8265'
    """
    url = urllib.parse.urlsplit(address)
    host = (url.hostname or "").lower()
    if url.scheme == "https" and host:
        return address
    if url.scheme == "http" and host:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if loopback:
            return address
        raise SubmitError(
            f"--address {address}: refusing to send the cluster token in cleartext to a "
            "non-loopback host; use https, or forward the dashboard to this machine "
            "(`ray dashboard deploy/cluster.yaml` or `kubectl port-forward`) and use "
            "http://127.0.0.1:8265")
    raise SubmitError(f"--address {address!r}: expected an http(s):// URL of the job server "
                      "(the dashboard, port 8265)")


def build_runtime_env(args: argparse.Namespace) -> dict:
    """The runtime_env dict for the job, from the command-line options."""
    runtime_env: dict = {}
    if args.runtime_env_json:
        try:
            runtime_env = json.loads(args.runtime_env_json)
        except json.JSONDecodeError as e:
            raise SubmitError(f"--runtime-env-json is not JSON: {e}") from None
        if not isinstance(runtime_env, dict):
            raise SubmitError("--runtime-env-json must be a JSON object")
    if args.working_dir:
        if not os.path.isdir(args.working_dir) and "://" not in args.working_dir:
            raise SubmitError(f"--working-dir {args.working_dir!r} is not a directory")
        runtime_env["working_dir"] = args.working_dir
        runtime_env["excludes"] = list(runtime_env.get("excludes", [])) + DEFAULT_EXCLUDES + args.exclude
    elif args.exclude:
        raise SubmitError("--exclude only makes sense with --working-dir")
    if args.pip:
        runtime_env["pip"] = list(runtime_env.get("pip", [])) + args.pip
    check_env_vars(runtime_env.get("env_vars", {}), "--runtime-env-json env_vars")
    env = parse_env(args.env)
    if env:
        runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **env}
    return runtime_env


def default_address() -> str:
    """The job server URL from the environment, as ``ray job submit`` finds it.

    ``$RAY_ADDRESS`` only counts when it is an http(s) URL: it may also hold a
    GCS address (host:6379) or ``auto``, which the job server does not answer.
    """
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_DASHBOARD_ADDRESS"):
        if os.environ.get(var):
            return os.environ[var]
    addr = os.environ.get("RAY_ADDRESS", "")
    if addr.startswith(("http://", "https://")):
        return addr
    return "http://127.0.0.1:8265"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Submit a distgrad job (by default `distgrad demo --address auto`) "
        "to a Ray cluster with token authentication, wait for it and print its logs.",
        epilog="Put the entrypoint after `--`, e.g. `-- distgrad demo --address auto --steps 200`.",
    )
    p.add_argument(
        "--address",
        default=default_address(),
        help="the cluster's job server (dashboard) URL; default $RAY_API_SERVER_ADDRESS, "
        "$RAY_DASHBOARD_ADDRESS, an http(s) $RAY_ADDRESS, or http://127.0.0.1:8265",
    )
    p.add_argument("--working-dir", help="local directory (or remote zip URI) shipped with the job as its working_dir")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="extra gitignore-style pattern left out of --working-dir (repeatable)")
    p.add_argument("--pip", action="append", default=[], metavar="REQUIREMENT",
                   help="pip requirement installed into the job's runtime env (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job (repeatable)")
    p.add_argument("--runtime-env-json", help="a full runtime_env as JSON; the options above are merged into it")
    p.add_argument("--submission-id", help="job submission id (default: generated by Ray)")
    p.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the driver")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds to wait for the job to end; it is stopped after that (default 900)")
    p.add_argument("--connect-timeout", type=float, default=60.0,
                   help="seconds to keep retrying while the job server is not up yet (default 60)")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between status checks (default 1)")
    p.add_argument("--token-file", help="file holding the cluster token (else $RAY_AUTH_TOKEN, "
                   "$RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)")
    p.add_argument("--no-wait", action="store_true", help="submit and print the submission id, do not wait")
    p.add_argument("--quiet", action="store_true", help="print the logs only at the end, not as they come")
    p.add_argument("entrypoint", nargs=argparse.REMAINDER,
                   help="the command the job runs (default: distgrad demo --address auto)")
    return p


def connect(address: str, token: str, timeout: float):
    """A JobSubmissionClient for ``address``, retrying until the server answers; the token
    goes only to an address :func:`check_address` accepts."""
    check_address(address)
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"}
    deadline = time.monotonic() + timeout
    while True:
        try:
            return JobSubmissionClient(address, headers=headers)
        except Exception as e:  # connection refused, 5xx while starting, auth errors
            text = str(e)
            if any(s in text for s in ("401", "403", "nauthorized", "orbidden", "uthentication")):
                raise SubmitError(f"the cluster at {address} refused the token: {text.splitlines()[0]}") from None
            if time.monotonic() >= deadline:
                raise SubmitError(f"cannot reach the Ray job server at {address}: {text.splitlines()[0] if text else e!r}") from None
            time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    entrypoint = list(args.entrypoint)
    if entrypoint and entrypoint[0] == "--":
        entrypoint = entrypoint[1:]
    if not entrypoint:
        entrypoint = list(DEFAULT_ENTRYPOINT)
    # One string for Ray; a single argument is taken as an already-quoted command.
    entrypoint_str = entrypoint[0] if len(entrypoint) == 1 else shlex.join(entrypoint)

    try:
        runtime_env = build_runtime_env(args)
        token = read_token(args.token_file)
        if token is None:
            raise SubmitError(
                "no Ray auth token found: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, pass --token-file, "
                "or run `ray get-auth-token` (see deploy/README.md)"
            )
        client = connect(args.address, token, args.connect_timeout)
        kwargs = {}
        if args.submission_id:
            kwargs["submission_id"] = args.submission_id
        if args.entrypoint_num_cpus is not None:
            kwargs["entrypoint_num_cpus"] = args.entrypoint_num_cpus
        job_id = client.submit_job(entrypoint=entrypoint_str, runtime_env=runtime_env or None, **kwargs)
    except SubmitError as e:
        print(f"submit_job: error: {e}", file=sys.stderr)
        return EXIT_USAGE

    print(f"submit_job: submitted {job_id} to {args.address}: {entrypoint_str}", file=sys.stderr, flush=True)
    if args.no_wait:
        print(job_id)
        return EXIT_OK
    return wait_and_report(client, job_id, args)


def wait_and_report(client, job_id: str, args: argparse.Namespace) -> int:
    """Follow ``job_id`` until it ends or times out; print logs; map status to an exit code."""
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + args.timeout
    printed = 0
    status = None
    timed_out = False
    while True:
        status = client.get_job_status(job_id)
        if not args.quiet:
            printed = _print_new_logs(client, job_id, printed)
        if status.is_terminal():
            break
        if time.monotonic() >= deadline:
            timed_out = True
            print(f"submit_job: {job_id} still {status.value} after {args.timeout:g}s; stopping it",
                  file=sys.stderr, flush=True)
            try:
                client.stop_job(job_id)
            except Exception as e:  # report, but the timeout is what matters
                print(f"submit_job: stop_job failed: {e}", file=sys.stderr)
            break
        time.sleep(args.poll)

    _print_new_logs(client, job_id, 0 if args.quiet else printed)
    info = client.get_job_info(job_id)
    print(f"submit_job: {job_id} {info.status.value}" + (f": {info.message}" if info.message else ""),
          file=sys.stderr, flush=True)
    if timed_out:
        return EXIT_TIMEOUT
    return EXIT_OK if info.status == JobStatus.SUCCEEDED else EXIT_FAILED


def _print_new_logs(client, job_id: str, already: int) -> int:
    try:
        logs = client.get_job_logs(job_id)
    except Exception:  # logs are best effort while the job starts
        return already
    if len(logs) > already:
        sys.stdout.write(logs[already:])
        sys.stdout.flush()
    return max(already, len(logs))


if __name__ == "__main__":
    sys.exit(main())
