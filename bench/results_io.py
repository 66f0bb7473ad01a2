"""Write benchmark rows into bench/results/: one JSON file per run plus rows appended to a
markdown table per benchmark name, each stamped with the device, versions, date and command.

    from results_io import write_result          # from a script in bench/
    write_result("kernels", rows, {"note": "..."})

A row is a flat dict of numbers and strings; rows of one call may have different keys (the
markdown table takes the union, in first-seen order).
"""

from __future__ import annotations

import argparse
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


def add_output_flags(ap: argparse.ArgumentParser, write_help: str, exact_file: bool = True) -> None:
    """The flags that say where a benchmark's rows go: --write (`write_help`: when it writes without
    a GPU) and --out-dir; with `exact_file`, also --no-write and --json FILE."""
    if exact_file:
        ap.add_argument("--no-write", action="store_true", help="print only; do not write bench/results/")
    ap.add_argument("--write", action="store_true", help=write_help)
    ap.add_argument("--out-dir", default=None, help="results directory (default bench/results)")
    if exact_file:
        ap.add_argument("--json", default=None, metavar="FILE",
                        help="write the results to exactly FILE, no markdown (`results_io.py import` names it "
                             "and rebuilds the markdown); implies --write")


def announce(script: str, argv: list[str]) -> str:
    """Print the command that reproduces this run of bench/`script` with `argv`, and return it."""
    command = command_line([f"bench/{script}", *argv])
    print(f"reproduce: {command}")
    return command


def print_markdown(md: str, out: Path | None) -> None:
    """A table script's output: the markdown on stdout and, with --out, in that file too."""
    print(md)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(md + "\n")


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

    def __init__(self, name: str, meta_extra: dict | None = None, out_dir: str | Path | None = None,
                 json_path: str | Path | None = None):
        """json_path: write exactly this file and no markdown (a lent GPU returns few files;
        `import` names the file and rebuilds the markdown from it); else out_dir/<name>-<date>-<device>.json
        plus out_dir/<name>.md."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"benchmark name {name!r} must use letters, digits, '_', '.', '-' only")
        self.name = name
        self.meta_extra = dict(meta_extra or {})
        self.meta = environment()
        self.meta.update(self.meta_extra)
        self.meta["complete"] = False
        self.md_path: Path | None
        if json_path is not None:
            self.json_path = Path(json_path)
            self.out = self.json_path.parent
            self.out.mkdir(parents=True, exist_ok=True)
            self.md_path = None
        else:
            self.out = Path(out_dir) if out_dir is not None else RESULTS_DIR
            self.out.mkdir(parents=True, exist_ok=True)
            self.json_path = _free_name(self.out / canonical_name(name, self.meta))
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

    def close(self) -> tuple[Path, Path | None]:
        """Mark the run complete and append its markdown section; returns (json, markdown or None)."""
        if not self.closed:
            self.closed = True
            self.meta["complete"] = True
            self._write()
            if self.md_path is not None:
                _append_markdown(self.md_path, self.name,
                                 markdown_section(self.meta, self.rows, self.meta_extra))
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


def _stamp(meta: dict[str, Any]) -> str:
    return str(meta.get("date") or "undated").replace(":", "").replace("-", "").replace("+0000", "Z")


def canonical_name(name: str, meta: dict[str, Any]) -> str:
    """<name>-<UTC date-time>-<device>.json: the name a run's file has in results/."""
    return f"{name}-{_stamp(meta)}-{_slug(device_label(meta))}.json"


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
        f"## {device} — {meta.get('date')}{partial}",
        "",
        f"torch {meta.get('torch')}, triton {meta.get('triton')}, CUDA {meta.get('cuda')}, "
        f"commit {meta.get('git_commit')}",
        "",
        f"`{meta.get('command')}`",
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


# bench/gpu_check.sh returns these files from a lent GPU (at most 8 come back) and `import` reads
# them: each JSON's benchmark name, None for the logs and tables kept as they are.
GPU_CHECK = "gpu_check"
GPU_CHECK_FILES: dict[str, str | None] = {
    "env.json": GPU_CHECK, "kernels.json": "kernels", "train_step.json": "train_step",
    "learn.json": "learn_check", "diffmae_step.json": "train_step", "tests.log": None, "profile.md": None,
    "gpu_check.log": None,
}
# What a results file written without results_io (bench/learn_check.py) may lack and takes from
# its gpu_check run's env.json.
_FILLED_FROM_ENV = ("date", "git_commit", "gpu", "gpu_memory_gib", "gpu_count", "cpu", "cpu_threads",
                    "torch", "cuda", "triton", "python", "platform")


def load_results(path: str | Path, names: dict[str, str | None] | None = None,
                 env_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """A results file as {"name", "meta", "rows"}.

    A file in results_io's shape comes as it is. In a gpu_check folder (`names`: file name ->
    benchmark name, `env_meta`: its env.json's meta), a file another script wrote in its own
    shape (a list of row dicts, or a dict with "rows" and perhaps "meta") gets its benchmark name
    from `names` and the environment keys it lacks from `env_meta`, listed in
    meta["environment_from_env_json"]. Anything else raises ValueError naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if isinstance(data, dict) and {"name", "meta", "rows"} <= set(data):
        return data
    rows = data if isinstance(data, list) else data.get("rows") if isinstance(data, dict) else None
    name = (names or {}).get(path.name)
    if isinstance(data, dict) and isinstance(data.get("name"), str):
        name = data["name"]
    if not name or not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: not a results file (it needs name, meta and rows)")
    meta: dict[str, Any] = {}
    if isinstance(data, dict):
        meta.update({k: v for k, v in data.items() if k not in ("name", "meta", "rows")})
        if isinstance(data.get("meta"), dict):
            meta.update(data["meta"])
    env_meta = env_meta or {}
    taken = [k for k in _FILLED_FROM_ENV if k not in meta and k in env_meta]
    meta.update({k: env_meta[k] for k in taken})
    if "command" not in meta:
        meta["command"] = f"{env_meta.get('command')} (its {name} stage)"
        taken.append("command")
    if taken:
        meta["environment_from_env_json"] = ", ".join(taken)
    return {"name": name, "meta": meta, "rows": rows}


def gpu_check_manifest(src: str | Path) -> tuple[dict[str, str | None] | None, dict[str, Any] | None]:
    """(file name -> benchmark name, env meta) of a folder bench/gpu_check.sh wrote; (None, None)
    for any other folder."""
    env = Path(src) / "env.json"
    try:
        data = json.loads(env.read_text())
    except (OSError, ValueError):
        return None, None
    if not isinstance(data, dict) or data.get("name") != GPU_CHECK or not isinstance(data.get("meta"), dict):
        return None, None
    files = data["meta"].get("files")
    return (dict(files) if isinstance(files, dict) else dict(GPU_CHECK_FILES)), data["meta"]


def import_results(src: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Copy result JSON files written elsewhere (a lent GPU machine's $OUT) into results/ and
    append each new run's markdown section, rebuilt from its JSON. A file already present with the
    same content is skipped, so importing twice changes nothing; a different run that happens to
    have the same name gets a -2 suffix. A file not named <name>-... (gpu_check's fixed names) is
    stored as <name>-<date>-<device>.json. From a gpu_check folder the other files (logs, the
    profile table, its summary) are copied as they are into results/gpu_check-<date>-<device>/.
    Returns the files added."""
    src = Path(src)
    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    names, env_meta = gpu_check_manifest(src)
    added = []
    for path in sorted(src.glob("*.json")):
        data = load_results(path, names, env_meta)
        raw = path.read_text()
        text = raw if json.loads(raw) == data else json.dumps(data, indent=2, default=str) + "\n"
        base = path.name if path.name.startswith(f"{data['name']}-") else canonical_name(data["name"], data["meta"])
        if any(p.read_text() == text for p in _same_named(out / base)):
            continue  # imported before
        dest = _free_name(out / base)
        dest.write_text(text)
        meta = data["meta"]
        # A script's own markdown (learn_check keeps its table in the JSON) is not a setting.
        extra = {k: v for k, v in meta.items() if k not in ENVIRONMENT_KEYS and k != "markdown"}
        _append_markdown(out / f"{data['name']}.md", data["name"], markdown_section(meta, data["rows"], extra))
        added.append(dest)
    if names is not None:
        others = sorted(p for p in src.iterdir() if p.is_file() and p.suffix != ".json")
        folder = out / canonical_name(GPU_CHECK, env_meta or {})[: -len(".json")]
        for p in others:
            dest = folder / p.name
            if dest.exists() and dest.read_bytes() == p.read_bytes():
                continue
            folder.mkdir(exist_ok=True)
            dest = _free_name(dest)
            dest.write_bytes(p.read_bytes())
            added.append(dest)
    return added


# The gpu_check stage records ----------------------------------------------------------------------


def _nvidia_smi() -> dict[str, Any]:
    """Driver version and GPU as nvidia-smi reports them (None where it is absent)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return {"driver": None}
    line = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) < 3:
        return {"driver": None}
    return {"driver": parts[1], "nvidia_smi_gpu": parts[0], "nvidia_smi_memory": parts[2]}


def _data_manifest(data_dir: str | None) -> dict[str, Any] | None:
    """What the learning stage reads: the prepare step's manifest if there is one, else the shards."""
    if not data_dir:
        return None
    d = Path(data_dir)
    manifest = d / "SOURCE.txt"
    info: dict[str, Any] = {"dir": str(data_dir)}
    if manifest.exists():
        info["manifest"] = manifest.read_text().splitlines()
    else:
        info["shards"] = [f"{p.name} {p.stat().st_size}" for p in sorted(d.glob("*.tar*"))]
    return info


def gpu_check_env(out: str | Path, command: str, mode: str, data_dir: str | None = None) -> Path:
    """Start a gpu_check run's env.json: environment, driver, the command, the data it reads;
    rows (one per stage) are added by gpu_check_stage."""
    meta = {"command": command, "mode": mode, **_nvidia_smi(), "data": _data_manifest(data_dir),
            "files": GPU_CHECK_FILES}
    return ResultsFile(GPU_CHECK, meta, json_path=out).json_path


def pytest_counts(log: str | Path) -> dict[str, Any]:
    """passed / failed / ... counts and the failed test ids from a pytest log (a run cut short
    counts the per-test lines of -v output instead of the summary it never printed)."""
    try:
        text = Path(log).read_text(errors="replace")
    except OSError:
        return {}
    words = ("passed", "failed", "errors", "error", "skipped", "deselected", "xfailed", "xpassed")
    counts: dict[str, Any] = {}
    for line in text.splitlines()[::-1]:
        found = re.findall(r"(\d+) (" + "|".join(words) + r")\b", line)
        if found and re.search(r" in [\d.]+s", line):
            for n, w in found:
                counts["errors" if w == "error" else w] = int(n)
            break
    if not counts:  # no summary line: count the -v lines
        for w in ("PASSED", "FAILED", "ERROR", "SKIPPED"):
            n = len(re.findall(rf"::\S+ {w}\b", text))
            if n:
                counts[w.lower() if w != "ERROR" else "errors"] = n
        counts["summary"] = "none (cut short)"
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)
    if failed:
        counts["failed_tests"] = "; ".join(failed[:12]) + (f"; ... {len(failed) - 12} more" if len(failed) > 12 else "")
    return counts


def _stage_status(rc: int, limit_s: float | None) -> str:
    if rc == 0:
        return "ok"
    if rc in (124, 137):  # timeout(1): the limit's signal, then KILL after the grace period
        return f"timed out at its {limit_s:g} s limit" if limit_s else "timed out"
    return f"failed (exit {rc})"


def gpu_check_stage(env: str | Path, stage: str, rc: int | None, seconds: float, limit_s: float | None = None,
                    log: str | None = None, file: str | None = None, status: str | None = None,
                    note: str | None = None, done: bool = False) -> dict[str, Any]:
    """Record one stage of a gpu_check run as a row of its env.json (replacing an earlier row of
    the same stage); `status` overrides the one the exit code gives (a stage skipped, say)."""
    env = Path(env)
    try:
        data = json.loads(env.read_text())
    except (OSError, ValueError):  # the env stage itself failed: keep the later stages' rows
        data = {"name": GPU_CHECK, "meta": {"complete": False, "files": GPU_CHECK_FILES,
                                            "note": "the env stage wrote no env.json"}, "rows": []}
    row: dict[str, Any] = {"stage": stage}
    if stage:
        row.update(status=status or _stage_status(rc if rc is not None else 1, limit_s),
                   seconds=round(seconds, 1), limit_s=limit_s)
        if log:
            row.update(pytest_counts(env.parent / log))
        if file:
            row["file"] = file
            names, env_meta = gpu_check_manifest(env.parent)
            try:
                rows = load_results(env.parent / file, names, env_meta)["rows"]
                row["rows"] = len(rows)
                row["rows_ok"] = sum(r.get("status", "ok") == "ok" for r in rows)
            except (OSError, ValueError) as e:
                row["rows"] = 0
                row["note"] = f"{file}: {str(e).splitlines()[0][:160]}"
        if note:
            row["note"] = f"{row['note']}; {note}" if row.get("note") else note
        data["rows"] = [r for r in data["rows"] if r.get("stage") != stage] + [row]
    if done:
        data["meta"]["complete"] = True
    tmp = env.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(env)
    return row


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="bench/results helpers")
    sub = ap.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="copy result JSON files from SRC into bench/results/ (+ markdown)")
    imp.add_argument("src", help="folder holding <name>-<date>-<device>.json files, or what gpu_check.sh returned")
    imp.add_argument("--out-dir", default=None, help="results folder (default bench/results)")
    env = sub.add_parser("gpu-env", help="(bench/gpu_check.sh) start a run's env.json")
    env.add_argument("out")
    env.add_argument("--command", required=True, help="the gpu_check command as typed")
    env.add_argument("--mode", required=True, choices=("gpu", "rehearse"))
    env.add_argument("--data-dir", default=None)
    st = sub.add_parser("gpu-stage", help="(bench/gpu_check.sh) record one stage in env.json")
    st.add_argument("env")
    st.add_argument("--stage", default="")
    st.add_argument("--rc", type=int, default=None)
    st.add_argument("--seconds", type=float, default=0.0)
    st.add_argument("--limit-s", type=float, default=None)
    st.add_argument("--log", default=None, help="a pytest log beside env.json to count")
    st.add_argument("--file", default=None, help="the results file beside env.json the stage wrote")
    st.add_argument("--status", default=None)
    st.add_argument("--note", default=None)
    st.add_argument("--done", action="store_true", help="mark the run complete")
    args = ap.parse_args(argv)
    if args.cmd == "gpu-env":
        print(f"wrote {gpu_check_env(args.out, args.command, args.mode, args.data_dir)}")
        return 0
    if args.cmd == "gpu-stage":
        row = gpu_check_stage(args.env, args.stage, args.rc, args.seconds, args.limit_s, args.log, args.file,
                              args.status, args.note, args.done)
        if args.stage:
            print("recorded " + ", ".join(f"{k}={v}" for k, v in row.items()))
        return 0
    try:
        added = import_results(args.src, args.out_dir)
    except (OSError, ValueError) as e:
        print(f"results_io import: {e}", file=sys.stderr)
        return 1
    for p in added:
        print(f"added {p}")
    print(f"{len(added)} new file(s) in {args.out_dir or RESULTS_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
