"""Ray's token authentication from this machine's side: the token Ray would use (generated
where there is none, and kept private), the environment that turns it on, and the header that
sends it to a dashboard."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from defectforge.core.errors import ClusterError


def auth_environment() -> dict[str, str]:
    """This process's environment with token authentication on. Without a token anywhere Ray
    looks, one is generated into Ray's default file (as `ray get-auth-token --generate` does;
    its output, the token, is discarded, never shown), private to this user from the start."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "NO_ALBUMENTATIONS_UPDATE": "1"}
    env.pop("RAY_ADDRESS", None)
    if not read_token(env):
        subprocess.run(
            [ray_executable(), "get-auth-token", "--generate"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            check=False,
            umask=0o077,  # Ray writes the file with the default umask: 0644 in a 0755 folder
        )
        if not read_token(env):
            raise ClusterError(
                f"no Ray auth token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or create "
                f"{default_token_path()} with `ray get-auth-token --generate`"
            )
    return env


def default_token_path() -> Path:
    return Path.home() / ".ray" / "auth_token"


def read_token(env: dict[str, str]) -> str:
    """The token Ray would use, in Ray's order: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, the default
    file; "" if none. The default file is made private first, whoever wrote it."""
    if env.get("RAY_AUTH_TOKEN"):
        return env["RAY_AUTH_TOKEN"].strip()
    path = Path(env["RAY_AUTH_TOKEN_PATH"]) if env.get("RAY_AUTH_TOKEN_PATH") else None
    path = path or default_token_path()
    if not path.is_file():
        return ""
    if path == default_token_path():
        secure_token_file(path)
    return path.read_text().strip()


def secure_token_file(path: Path) -> None:
    """Make the token file 0600 and its folder 0700 if either is open to others: Ray (`ray
    get-auth-token --generate`, a first `ray.init()`) writes it 0644 in a 0755 folder, and anyone
    who can read it can submit jobs, that is run code, on the cluster."""
    for target, mode in ((path.parent, 0o700), (path, 0o600)):
        if stat.S_IMODE(target.stat().st_mode) & 0o077:
            try:
                target.chmod(mode)
            except PermissionError:
                raise ClusterError(
                    f"{target}: readable by other users and not ours to change; "
                    f"`chmod {mode:o} {target}` as its owner"
                ) from None


def ray_executable() -> str:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else shutil.which("ray") or "ray"


def auth_headers(token_file: str | None = None) -> dict[str, str]:
    """The Authorization header for this machine's Ray token (never printed); ``token_file``
    (--token-file), when given, is the one read, and must hold a token."""
    env = dict(os.environ)
    if token_file:
        path = Path(token_file).expanduser()
        if not path.is_file():
            problem = "is a folder, not a file" if path.is_dir() else "no such file"
            raise ClusterError(f"--token-file {path}: {problem}; give the cluster's token file")
        env.pop("RAY_AUTH_TOKEN", None)  # the file asked for wins over the environment
        env["RAY_AUTH_TOKEN_PATH"] = str(path)
        if not read_token(env):
            raise ClusterError(
                f"--token-file {path}: the file is empty; copy the cluster's token into it"
            )
    token = read_token(env)
    return {"Authorization": f"Bearer {token}"} if token else {}
