"""A small, deterministic, multi-domain corpus built from files every Python install has.

Domains (one JSONL file each, records ``{"text", "source", "domain"}``):
    code   long documents: standard-library packages (``email``, ``asyncio``...) treated as code
           repositories and concatenated per package with path headers (``long_documents``).
    books  long prose: the Python reference topics (``pydoc_data.topics``) bound into volumes, and
           "textbooks" made of every docstring of a standard-library module, in source order.
    web    short documents: single class/function docstrings, as web/QA-style snippets.

Everything comes from the running interpreter's standard library, iterated in sorted order with no
randomness, so the same Python version gives the same bytes on any machine.
"""

from __future__ import annotations

import ast
import logging
import os
import sysconfig
from collections.abc import Iterator

from megatron_longctx.data.long_documents import (
    FILE_HEADER,
    classify_file,
    iter_repo_files,
    write_jsonl,
)

logger = logging.getLogger(__name__)

CODE_PACKAGES = tuple(
    (
        "asyncio concurrent email http importlib json logging multiprocessing sqlite3 unittest "
        "urllib xml xmlrpc zoneinfo tomllib wsgiref ctypes collections re dbm"
    ).split()
)
TEXTBOOK_MODULES = tuple(
    (
        "argparse typing dataclasses pathlib functools inspect subprocess threading decimal "
        "fractions statistics tarfile zipfile shutil datetime enum contextlib textwrap string"
    ).split()
)
WEB_MODULES = tuple(
    (
        "os random heapq bisect itertools csv difflib pprint socket ssl tempfile glob fnmatch "
        "base64 hashlib hmac secrets uuid calendar copy pickle shlex timeit trace tokenize "
        "traceback warnings weakref codecs locale gettext getopt queue sched selectors smtplib "
        "ftplib imaplib poplib mailbox mimetypes ipaddress configparser plistlib gzip bz2 lzma "
        "zipimport"
    ).split()
)
DEFAULT_BYTES = {"code": 2_000_000, "books": 1_200_000, "web": 600_000}


def _stdlib() -> str:
    return sysconfig.get_paths()["stdlib"]


def iter_code_documents(budget: int, max_repo_bytes: int = 400_000) -> Iterator[dict]:
    """Standard-library packages as repositories, up to ``budget`` characters in all."""
    used = 0
    for name in CODE_PACKAGES:
        repo = os.path.join(_stdlib(), name)
        if not os.path.isdir(repo) or used >= budget:
            continue
        parts, size = [], 0
        for path in iter_repo_files(repo):
            if not path.endswith(".py") or "/test" in path.replace(os.sep, "/")[len(repo) :]:
                continue
            text, _ = classify_file(path, 1 << 20)
            if text is None:
                continue
            rel = os.path.relpath(path, repo).replace(os.sep, "/")
            parts.append(FILE_HEADER.format(path=f"{name}/{rel}") + text)
            size += len(parts[-1])
            if size >= max_repo_bytes:
                break
        if parts:
            used += size
            yield {"text": "\n".join(parts), "source": f"stdlib/{name}", "domain": "code"}


def _docstrings(module: str) -> Iterator[tuple[str, str]]:
    """``(qualified name, docstring)`` for the module and its classes/functions, in source order."""
    path = os.path.join(_stdlib(), module + ".py")
    if not os.path.isfile(path):
        path = os.path.join(_stdlib(), module, "__init__.py")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    doc = ast.get_docstring(tree)
    if doc:
        yield module, doc
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and not node.name.startswith("_"):
                yield f"{module}.{node.name}", doc


def iter_book_documents(budget: int, volume_chars: int = 120_000) -> Iterator[dict]:
    """Reference-manual volumes, then per-module docstring textbooks, up to ``budget``
    characters."""
    from pydoc_data.topics import topics

    used, volume, number = 0, [], 1
    for name in sorted(topics):
        volume.append(f"{name}\n{'=' * len(name)}\n\n{topics[name].strip()}\n")
        if sum(map(len, volume)) >= volume_chars:
            text = "\n\n".join(volume)
            used += len(text)
            yield {"text": text, "source": f"python-reference/volume-{number}", "domain": "books"}
            volume, number = [], number + 1
            if used >= budget:
                return
    for module in TEXTBOOK_MODULES:
        chapters = [f"{qualname}\n\n{doc}\n" for qualname, doc in _docstrings(module)]
        if len(chapters) < 3:
            continue
        text = f"The {module} module\n\n" + "\n\n".join(chapters)
        used += len(text)
        yield {"text": text, "source": f"textbook/{module}", "domain": "books"}
        if used >= budget:
            return


def iter_web_documents(budget: int, min_chars: int = 120, max_chars: int = 4000) -> Iterator[dict]:
    """Single docstrings as short QA/web-style documents, up to ``budget`` characters."""
    used = 0
    for module in WEB_MODULES:
        for qualname, doc in _docstrings(module):
            if not min_chars <= len(doc) <= max_chars:
                continue
            text = f"Q: What does {qualname} do in Python?\n\nA: {doc}\n"
            used += len(text)
            yield {"text": text, "source": f"docstring/{qualname}", "domain": "web"}
            if used >= budget:
                return


def make_sample_corpus(output_dir: str, scale: float = 1.0) -> dict[str, dict]:
    """Writes ``code.jsonl``, ``books.jsonl`` and ``web.jsonl`` into ``output_dir``.

    Args:
        output_dir: created if missing; existing domain files are replaced atomically.
        scale: multiplies each domain's character budget (1.0 gives ~3.5 MB in all).

    Returns:
        Per domain: ``{"path", "documents", "bytes"}``.
    """
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    builders = {
        "code": iter_code_documents,
        "books": iter_book_documents,
        "web": iter_web_documents,
    }
    report = {}
    for domain, build in builders.items():
        path = os.path.join(output_dir, f"{domain}.jsonl")
        count = write_jsonl(build(int(DEFAULT_BYTES[domain] * scale)), path)
        report[domain] = {"path": path, "documents": count, "bytes": os.path.getsize(path)}
        logger.info("%s: %d documents, %d bytes", domain, count, report[domain]["bytes"])
    return report
