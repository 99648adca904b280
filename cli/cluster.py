"""``defectforge cluster`` (a one-machine multi-node cluster), ``submit`` and ``jobs``."""

from __future__ import annotations

import contextlib
import logging
import os

from defectforge.cli.options import add_options, given, local_path
from defectforge.cluster.local import LocalClusterConfig
from defectforge.trainables import VERBOSE_ENV

COMMANDS = {
    "cluster": "a multi-node Ray cluster on this machine (development, tests)",
    "submit": "submit a study to a Ray cluster as a Ray Job",
    "jobs": "list, inspect and stop Ray Jobs",
}
DEFAULT_CLUSTER_STATE = "runs/cluster"


def build(name: str, parser) -> None:
    {"cluster": _build_cluster, "submit": _build_submit, "jobs": _build_jobs}[name](parser)


def _build_cluster(parser) -> None:
    cluster = parser.add_subparsers(dest="cluster_command", required=True)
    up = cluster.add_parser("up", help="start a head and N worker nodes, token auth on")
    add_options(up, LocalClusterConfig)
    for name, text in (
        ("down", "stop the nodes `cluster up` started (recorded pids only)"),
        ("status", "the recorded nodes and whether they run"),
    ):
        cluster.add_parser(name, help=text)
    for sub in cluster.choices.values():
        sub.add_argument(
            "--state",
            default=DEFAULT_CLUSTER_STATE,
            help=f"cluster state folder (default: {DEFAULT_CLUSTER_STATE})",
        )


def _build_submit(submit) -> None:
    submit.add_argument("spec", type=local_path, help="study spec YAML")
    submit.add_argument("--address", required=True, help="dashboard URL, http://HOST:8265")
    submit.add_argument("--name", help="study folder name (default: spec name)")
    submit.add_argument(
        "--wheel", type=local_path, help="a prebuilt defectforge wheel (default: build one)"
    )
    submit.add_argument(
        "--no-pip", action="store_true", help="the cluster's image has the dependencies"
    )
    submit.add_argument("--wait", action="store_true", help="return when the job ends")
    submit.add_argument("--follow", action="store_true", help="stream the job's logs")
    _add_token_file(submit)


def _add_token_file(parser) -> None:
    parser.add_argument(
        "--token-file", type=local_path, help="Ray auth token file (default: Ray's lookup)"
    )


def _build_jobs(parser) -> None:
    jobs = parser.add_subparsers(dest="jobs_command", required=True)
    jobs.add_parser("list", help="jobs on the cluster, newest first")
    for name, text in (
        ("status", "one job's status"),
        ("logs", "one job's logs"),
        ("stop", "stop a running job"),
    ):
        jobs.add_parser(name, help=text).add_argument("job_id")
    jobs.choices["logs"].add_argument("--follow", action="store_true")
    for sub in jobs.choices.values():
        _add_token_file(sub)
        sub.add_argument("--address", required=True, help="dashboard URL, http://HOST:8265")


def run(args) -> int | None:
    return {"cluster": run_cluster, "submit": run_submit, "jobs": run_jobs}[args.command](args)


def run_cluster(args) -> None:
    from defectforge.cluster.local import LocalCluster

    cluster = LocalCluster(args.state)
    if args.cluster_command == "up":
        state = cluster.up(LocalClusterConfig(**given(args, LocalClusterConfig)))
        workers = len(state["nodes"]) - 1
        print(
            f"cluster up: head + {workers} workers at {state['address']}; dashboard and "
            f"Jobs API {state['dashboard_url']} (token auth); "
            f"`defectforge cluster down --state {args.state}` stops it"
        )
    elif args.cluster_command == "down":
        stopped = cluster.down()
        print(f"stopped {', '.join(stopped)}" if stopped else "no cluster recorded here")
    else:
        state = cluster.state()
        if state is None:
            print(f"no cluster recorded in {args.state}")
            return
        running = {node.role for node in cluster.running()}
        print(f"{state['address']}  dashboard {state['dashboard_url']}")
        for node in state["nodes"]:
            alive = "running" if node["role"] in running else "stopped"
            print(f"  {node['role']:<10} pid {node['pid']:<8} {alive}  log {node['log']}")


@contextlib.contextmanager
def _jobs_api_errors(address: str):
    """The Jobs SDK raises RuntimeError for HTTP failures (refused token, unknown job): shown as
    one line naming the cluster."""
    from ray.exceptions import RayError

    from defectforge.core.errors import ClusterError

    try:
        yield
    except (RuntimeError, RayError, ConnectionError) as err:
        first = next((line for line in str(err).splitlines() if line.strip()), repr(err))
        raise ClusterError(f"{address}: {first}") from None


def run_submit(args) -> int:
    from defectforge.cluster import jobs
    from defectforge.core.outputs import check_name

    text = jobs.shipped_spec(args.spec)  # a bad spec is refused before anything connects
    if args.name is not None:
        check_name(args.name, "--name")
    if not os.environ.get(VERBOSE_ENV):  # the Jobs SDK's upload lines (INFO) stay quiet
        for name in ("ray", "ray.dashboard.modules.dashboard_sdk"):
            logging.getLogger(name).setLevel(logging.WARNING)
    with _jobs_api_errors(args.address):
        client = jobs.jobs_client(args.address, args.token_file)
        job_id = jobs.submit_study(client, text, args.name, args.wheel, not args.no_pip)
    print(f"submitted {job_id}; watch it at {jobs.job_url(args.address, job_id)}", flush=True)
    if not (args.wait or args.follow):
        return 0
    status = jobs.follow(client, job_id) if args.follow else jobs.wait_for(client, job_id)
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def run_jobs(args) -> int:
    from defectforge.cluster import jobs

    with _jobs_api_errors(args.address):
        client = jobs.jobs_client(args.address, args.token_file)
        if args.jobs_command == "list":
            for row in jobs.job_rows(client):
                print(f"{row['id']:<44} {row['status']:<10} {row['started']:<26} {row['study']}")
        elif args.jobs_command == "status":
            print(client.get_job_status(args.job_id).value)
            where = jobs.job_progress(client.get_job_logs(args.job_id))
            if where:
                print(where)
        elif args.jobs_command == "logs":
            if args.follow:
                jobs.follow(client, args.job_id)
            else:
                print(client.get_job_logs(args.job_id), end="")
        else:
            stopped = client.stop_job(args.job_id)
            print(
                f"stop requested for {args.job_id}" if stopped else f"{args.job_id} is not running"
            )
    return 0


def interrupted_hint(args) -> str:
    if args.command == "cluster" and args.cluster_command == "up":
        return f"`defectforge cluster down --state {args.state}` stops what started"
    return "a submitted job keeps running on the cluster; `defectforge jobs list` shows it"
