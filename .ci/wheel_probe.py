"""Checks run by .ci/wheel_check inside its fresh virtual environment, with the venv's
python, from a directory outside the source tree (so ``import kvloom`` finds the
installed wheel, never the checkout). Standard library only: the venv holds kvloom's
own dependencies, nothing else but pytest.

    python wheel_probe.py imports                         # every module, all installed
    python wheel_probe.py imports --block triton pytest   # as if these were absent
    python wheel_probe.py serve WORK_DIR                  # kvloom serve answers a request

Each prints a line or two and exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.abc
import importlib.metadata
import importlib.util
import json
import pkgutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path

READY_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0


def check_installed_copy() -> None:
    """Fail unless kvloom is imported from this venv's site-packages, installed from a
    wheel (not an editable install, not a checkout on sys.path)."""
    import kvloom

    site_packages = Path(sysconfig.get_paths()["purelib"]).resolve()
    location = Path(kvloom.__file__).resolve()
    if site_packages not in location.parents:
        sys.exit(f"kvloom imported from {location}, not from {site_packages}")
    direct_url = importlib.metadata.distribution("kvloom").read_text("direct_url.json")
    if direct_url and json.loads(direct_url).get("dir_info", {}).get("editable"):
        sys.exit("kvloom is an editable install")


class _Blocker(importlib.abc.MetaPathFinder):
    """Makes ``import X`` raise ModuleNotFoundError for the blocked top-level names."""

    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(self, fullname, path, target=None):
        if fullname.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked by the check)",
                                      name=fullname)
        return None


def module_level_imports(source: str) -> set[str]:
    """Top-level package names a module imports when it is imported (imports inside
    functions and classes are lazy and do not count)."""
    names: set[str] = set()

    def visit(nodes) -> None:
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if isinstance(node, ast.Import):
                names.update(alias.name.partition(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.partition(".")[0])
            else:
                visit(ast.iter_child_nodes(node))

    visit(ast.parse(source).body)
    return names


def run_imports(blocked: set[str]) -> int:
    """Import every module of the installed package. With ``blocked``, a module may fail
    only if its own source imports a blocked package at module level (a Triton kernel
    file, a pytest test module); any other failure breaks the lazy-import convention."""
    if blocked:
        sys.meta_path.insert(0, _Blocker(blocked))
    check_installed_copy()
    import kvloom

    imported, excused, failures = [], [], []
    walk_errors: list[str] = []
    for info in pkgutil.walk_packages(kvloom.__path__, "kvloom.", onerror=walk_errors.append):
        try:
            importlib.import_module(info.name)
            imported.append(info.name)
        except Exception as exc:  # report every module, not just the first
            missing = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
            spec = importlib.util.find_spec(info.name)
            own = module_level_imports(Path(spec.origin).read_text()) if spec else set()
            if missing and missing.partition(".")[0] in blocked & own:
                excused.append(f"{info.name} (imports {missing.partition('.')[0]})")
            else:
                failures.append(f"{info.name}: {''.join(traceback.format_exception_only(exc))}")
    failures += [f"{name}: could not be walked" for name in walk_errors]
    label = f" with {', '.join(sorted(blocked))} absent" if blocked else ""
    print(f"imported {len(imported)} modules{label}")
    for line in excused:
        print(f"  needs its optional dependency: {line}")
    for line in failures:
        print(f"  FAILED {line.rstrip()}")
    return 1 if failures else 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_json(url: str, body: dict | None = None, timeout: float = 120.0) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def wait_until_ready(server: subprocess.Popen, base_url: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"kvloom serve exited with {server.returncode} before ready")
        try:
            http_json(f"{base_url}/ready", timeout=5)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise RuntimeError(f"kvloom serve not ready after {READY_TIMEOUT_S:.0f}s")


def exercise_server(base_url: str, kvloom_bin: Path) -> None:
    """One completion with text, then `kvloom bench serve` (its HTTP client is a
    dependency of the package too)."""
    models = http_json(f"{base_url}/v1/models")["data"]
    if [card["id"] for card in models] != ["tiny"]:
        raise RuntimeError(f"/v1/models lists {models}")
    reply = http_json(f"{base_url}/v1/completions",
                      {"model": "tiny", "prompt": "Hello, my name is", "max_tokens": 8,
                       "temperature": 0, "ignore_eos": True})
    text = reply["choices"][0]["text"]
    if not isinstance(text, str) or not text or reply["usage"]["completion_tokens"] != 8:
        raise RuntimeError(f"unexpected completion: {reply}")
    print(f"completion: {text!r}")
    subprocess.run([str(kvloom_bin), "bench", "serve", "--base-url", base_url,
                    "--model", "tiny", "--num-prompts", "4", "--input-len", "8",
                    "--output-len", "4", "--max-token-id", "300"],
                   check=True, timeout=300, stdout=subprocess.DEVNULL)
    print("kvloom bench serve: 4 requests completed")


def stop_server(server: subprocess.Popen) -> int:
    """SIGTERM, as a process manager stops it; the drain ends in exit status 0."""
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
            return -1
    return server.returncode


def run_serve(work_dir: Path) -> int:
    """Write a tiny random checkpoint, serve it, answer one request, stop the server."""
    check_installed_copy()
    from kvloom.testing.checkpoints import make_tiny_qwen2

    checkpoint = make_tiny_qwen2(work_dir / "tiny-qwen2")
    kvloom_bin = Path(sys.executable).parent / "kvloom"
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = work_dir / "serve.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [str(kvloom_bin), "serve", str(checkpoint), "--port", str(port),
             "--served-model-name", "tiny", "--drain-timeout", "5"],
            stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until_ready(server, base_url)
            exercise_server(base_url, kvloom_bin)
        except Exception as exc:
            stop_server(server)
            print(f"FAILED: {exc}\n--- kvloom serve log (tail) ---\n"
                  f"{log_path.read_text()[-4000:]}")
            return 1
        status = stop_server(server)
    if status != 0:
        print(f"FAILED: kvloom serve exited with {status} after SIGTERM\n"
              f"{log_path.read_text()[-4000:]}")
        return 1
    print("kvloom serve: ready, answered, stopped cleanly")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    imports = commands.add_parser("imports")
    imports.add_argument("--block", nargs="*", default=[])
    serve = commands.add_parser("serve")
    serve.add_argument("work_dir", type=Path)
    args = parser.parse_args()
    if args.command == "imports":
        return run_imports(set(args.block))
    return run_serve(args.work_dir)


if __name__ == "__main__":
    sys.exit(main())
