"""What a study pays for running as a Ray Job: cluster start and stop on one machine, and the
time from `submit` to a finished job whose entrypoint does nothing, with the project shipped in
py_modules, without and with the pip dependencies. Printed as a table. Run by hand:

    python benchmarks/cluster_latency.py               # 2 workers, both job kinds
    python benchmarks/cluster_latency.py --skip-pip    # leave out the pip environment (minutes)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from defectforge.cluster import jobs
from defectforge.cluster.local import LocalCluster, LocalClusterConfig, free_port

NOOP = "python -c 'import defectforge.trainables.study'"


def timed(action) -> tuple[float, object]:
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


def job_seconds(client, package: Path, pip: bool) -> tuple[float, str]:
    runtime_env = {"py_modules": [str(package)], "env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}}
    if pip:
        runtime_env["pip"] = {"packages": jobs.requirements(), "pip_check": False}

    def run() -> str:
        job = client.submit_job(entrypoint=NOOP, runtime_env=runtime_env)
        return jobs.wait_for(client, job, timeout_s=1800)

    return timed(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-pip", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cluster = LocalCluster(Path(tmp) / "cluster")
        seconds, state = timed(
            lambda: cluster.up(LocalClusterConfig(workers=args.workers, dashboard_port=free_port()))
        )
        rows.append((f"cluster up, head + {args.workers} workers", seconds, "ok"))
        try:
            client = jobs.jobs_client(state["dashboard_url"])
            seconds, wheel = timed(lambda: jobs.build_wheel(Path(tmp) / "wheel"))
            rows.append(("build the project wheel", seconds, wheel.name))
            package = jobs.unpacked_package(wheel, Path(tmp) / "package")
            for pip in (False,) if args.skip_pip else (False, True):
                seconds, status = job_seconds(client, package, pip)
                label = "job with pip dependencies" if pip else "job, py_modules only"
                rows.append((f"{label}: submit to end", seconds, status))
        finally:
            seconds, stopped = timed(cluster.down)
            rows.append(("cluster down", seconds, f"{len(stopped)} nodes"))
    print(f"\n| {'step':<45} | {'seconds':>8} | result |")
    print(f"|{'-' * 47}|{'-' * 10}|--------|")
    for step, seconds, result in rows:
        print(f"| {step:<45} | {seconds:>8.1f} | {result} |")


if __name__ == "__main__":
    main()
