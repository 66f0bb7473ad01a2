"""Write benchmark rows into bench/results/: one JSON file per run plus rows appended to a
markdown table per benchmark name, each stamped with the device, versions, date and command.

    from results_io import write_result          # from a script in bench/
    write_result("kernels", rows, {"note": "..."})

A row is a flat dict of numbers and strings; rows of one call may have different keys (the
markdown table takes the union, in first-seen order).
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def failure_status(e: BaseException) -> str:
    """A benchmark row's status for a case that raised: 'OOM', or 'failed: Type: first line'."""
    text = str(e).strip()
    if type(e).__name__ == "OutOfMemoryError" or "out of memory" in text.lower():
        return "OOM"
    return f"failed: {type(e).__name__}: {(text.splitlines() or [''])[0][:200]}"


def command_line(argv: list[str] | None = None) -> str:
    """The command that reproduces this run, as typed from the repository root.

    `argv` is the script path followed by its arguments (default: sys.argv), for scripts whose
    main() was called with explicit arguments (a test, another script); pass the result as
    meta_extra["command"] to write_result so the file records it.
    """
    root = Path(__file__).resolve().parent.parent
    # A venv inside the repository shows as .venv/bin/python; any other interpreter by name.
    exe = _relative(sys.executable, root, fallback=Path(sys.executable).name)
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0].endswith(".py"):
        argv[0] = _relative(os.path.abspath(argv[0]), root, fallback=argv[0])
    return " ".join(shlex.quote(a) for a in [exe, *argv])


def _relative(path: str, root: Path, fallback: str) -> str:
    try:
        rel = os.path.relpath(path, root)
    except ValueError:  # another drive on Windows
        return fallback
    return fallback if rel.startswith("..") else rel


def _git_commit() -> str | None:
    # A lent GPU machine gets a copy of the working tree without .git: the session script passes
    # the commit the copy was made from.
    if os.environ.get("LDAE_GIT_COMMIT"):
        return os.environ["LDAE_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment() -> dict[str, Any]:
    """Device name, library versions, date (UTC) and command line of this process."""
    meta: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git_commit(),
    }
    try:
        import torch

        meta["torch"] = torch.__version__
        meta["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            meta["gpu"] = torch.cuda.get_device_name()
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            meta["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
            meta["gpu_count"] = torch.cuda.device_count()
        else:
            meta["gpu"] = None
            meta["cpu"] = platform.processor() or platform.machine()
            meta["cpu_threads"] = torch.get_num_threads()
    except ImportError:
        meta["torch"] = None
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    meta["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0")
    return meta


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", s).strip("-").lower() or "unknown"


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v).replace("|", "\\|").replace("\n", " ")


class ResultsFile:
    """One benchmark run's results file, rewritten as rows arrive.

    A run cut short (a 10-minute limit on a lent GPU, an exception in a late case) keeps every row
    measured so far: the JSON is rewritten atomically after each `add`, with meta["complete"]
    false until `close`, which also appends the markdown section. Use as a context manager.
    """

    def __init__(self, name: str, meta_extra: dict | None = None, out_dir: str | Path | None = None):
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"benchmark name {name!r} must use letters, digits, '_', '.', '-' only")
        self.name = name
        self.out = Path(out_dir) if out_dir is not None else RESULTS_DIR
        self.out.mkdir(parents=True, exist_ok=True)
        self.meta_extra = dict(meta_extra or {})
        self.meta = environment()
        self.meta.update(self.meta_extra)
        self.meta["complete"] = False
        device = device_label(self.meta)
        stamp = self.meta["date"].replace(":", "").replace("-", "").replace("+0000", "Z")
        self.json_path = _free_name(self.out / f"{name}-{stamp}-{_slug(device)}.json")
        self.md_path = self.out / f"{name}.md"
        self.rows: list[dict] = []
        self.closed = False
        self._write()  # claims the file name at once

    def _write(self) -> None:
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"name": self.name, "meta": self.meta, "rows": self.rows}, indent=2,
                                  default=str) + "\n")
        tmp.replace(self.json_path)

    def add(self, rows: list[dict]) -> None:
        self.rows.extend(dict(r) for r in rows)
        self._write()

    def set_rows(self, rows: list[dict]) -> None:
        """Replace the rows (e.g. once later rows change earlier ones' ratios) and rewrite."""
        self.rows = [dict(r) for r in rows]
        self._write()

    def close(self) -> tuple[Path, Path]:
        """Mark the run complete and append its markdown section; returns (json, markdown)."""
        if not self.closed:
            self.closed = True
            self.meta["complete"] = True
            self._write()
            _append_markdown(self.md_path, self.name, markdown_section(self.meta, self.rows, self.meta_extra))
        return self.json_path, self.md_path

    def __enter__(self) -> ResultsFile:
        return self

    def __exit__(self, exc_type, *exc: Any) -> None:
        # An exception leaves the JSON as last written (complete: false) and no markdown.
        if exc_type is None:
            self.close()


def write_result(name: str, rows: list[dict], meta_extra: dict | None = None,
                 out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Save `rows` of benchmark `name`; returns (json_path, markdown_path).

    JSON: results/<name>-<UTC date-time>-<device>.json with {"name", "meta", "rows"}.
    Markdown: results/<name>.md gets a section per run (heading with device, date, versions and
    command, then a table of the rows), appended so past runs stay beside new ones.
    """
    f = ResultsFile(name, meta_extra, out_dir)
    f.add(rows)
    return f.close()


def _twins(path: Path) -> Iterator[Path]:
    """path, then path with -2, -3, ... before the suffix: the names one run's file may take."""
    yield path
    n = 2
    while True:
        yield path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1


def _free_name(path: Path) -> Path:
    """The first of path's twins that does not exist (runs of the same second keep apart)."""
    return next(p for p in _twins(path) if not p.exists())


def _same_named(path: Path) -> list[Path]:
    """path's twins that exist."""
    return list(itertools.takewhile(Path.exists, _twins(path)))


def device_label(meta: dict[str, Any]) -> str:
    return meta.get("gpu") or f"cpu-{meta.get('cpu') or 'unknown'}"


def markdown_section(meta: dict[str, Any], rows: list[dict], meta_extra: dict | None = None) -> str:
    """One run as markdown: heading (device, date), versions, command, the settings, the table."""
    device = device_label(meta)
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    partial = "" if meta.get("complete", True) else " (incomplete: the run stopped early)"
    lines = [
        f"## {device} — {meta['date']}{partial}",
        "",
        f"torch {meta.get('torch')}, triton {meta.get('triton')}, CUDA {meta.get('cuda')}, "
        f"commit {meta.get('git_commit')}",
        "",
        f"`{meta['command']}`",
        "",
    ]
    for k, v in (meta_extra or {}).items():
        if k != "command":
            lines.append(f"- {k}: {_cell(v)}")
    if meta_extra:
        lines.append("")
    if cols:
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        for r in rows:
            lines.append("| " + " | ".join(_cell(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n\n"


def _append_markdown(md_path: Path, name: str, section: str) -> None:
    new = not md_path.exists()
    with md_path.open("a") as f:
        if new:
            f.write(f"# {name}\n\nOne section per run, newest last. JSON twins beside this file.\n\n")
        f.write(section)


# Keys environment() may set; the rest of a results file's meta came from the script itself.
ENVIRONMENT_KEYS = ("date", "command", "python", "platform", "git_commit", "torch", "cuda", "gpu",
                    "gpu_memory_gib", "gpu_count", "cpu", "cpu_threads", "triton", "triton_interpret",
                    "complete")


def import_results(src: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Copy result JSON files written elsewhere (a lent GPU machine's $OUT) into results/ and
    append each new run's markdown section, rebuilt from its JSON. A file already present with the
    same content is skipped, so importing twice changes nothing; a different run that happens to
    have the same name gets a -2 suffix. Returns the JSON files added."""
    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    added = []
    for path in sorted(Path(src).glob("*.json")):
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not {"name", "meta", "rows"} <= set(data):
            raise ValueError(f"{path}: not a results file (it needs name, meta and rows)")
        text = path.read_text()
        if any(p.read_text() == text for p in _same_named(out / path.name)):
            continue  # imported before
        dest = _free_name(out / path.name)
        dest.write_text(text)
        meta = data["meta"]
        extra = {k: v for k, v in meta.items() if k not in ENVIRONMENT_KEYS}
        _append_markdown(out / f"{data['name']}.md", data["name"], markdown_section(meta, data["rows"], extra))
        added.append(dest)
    return added


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="bench/results helpers")
    sub = ap.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="copy result JSON files from SRC into bench/results/ (+ markdown)")
    imp.add_argument("src", help="folder holding <name>-<date>-<device>.json files")
    imp.add_argument("--out-dir", default=None, help="results folder (default bench/results)")
    args = ap.parse_args(argv)
    added = import_results(args.src, args.out_dir)
    for p in added:
        print(f"added {p}")
    print(f"{len(added)} new result file(s) in {args.out_dir or RESULTS_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
