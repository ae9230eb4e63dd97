"""Spec-Bench-format prompts: JSONL records `{question_id, category, turns[, reference]}`.

The default file is `../shared/data/spec_bench/question.jsonl` beside the repository (never copied into
it); without it, the upstream Spec-Bench file is fetched once from `SPEC_BENCH_URL` and cached.

**Splits.** The last `CALIB_PER_CATEGORY` (2) questions of each category, in file order, are the `calib`
split: whatever is fitted or tuned (draft trees, thresholds) is fitted on them and only on them. The rest
is the `eval` split, which every evaluation reads by default. `task.split`: `eval` | `calib` | `all`; when
it is null, the Spec-Bench file is read as `eval` and a prompt file named with `task.path` is used whole.

Files are read with `datasets`; `task.path=hf://owner/name` loads a hub dataset instead (when the hub is
reachable or the dataset is in the local cache), its columns mapped by `task.fields` (conf/task/dolly_creative.yaml:
the paper's Dolly creative-writing prompts for Figure 2).
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_SPEC_BENCH = REPO_ROOT.parent / "shared" / "data" / "spec_bench" / "question.jsonl"
SPEC_BENCH_URL = "https://raw.githubusercontent.com/hemingkx/Spec-Bench/main/data/spec_bench/question.jsonl"

# Spec-Bench's 6 tasks and their 13 categories
TASKS = {
    "mt_bench": ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"],
    "translation": ["translation"],
    "summarization": ["summarization"],
    "qa": ["qa"],
    "math_reasoning": ["math_reasoning"],
    "rag": ["rag"],
}
CATEGORY_TASK = {c: t for t, cs in TASKS.items() for c in cs}
CALIB_PER_CATEGORY = 2  # the last questions of each category: the calibration split
SPLITS = ("eval", "calib", "all")
HUB_PREFIX = "hf://"


class DataError(ValueError):
    """A prompt file is missing or malformed; the message names the file (and line)."""


@dataclass
class Question:
    question_id: int | str
    category: str
    turns: list[str]

    @property
    def task(self) -> str:
        return CATEGORY_TASK.get(self.category, self.category)


def resolve_path(path: str | None, cache_dir: str = "~/.cache/mtp") -> Path:
    """A local path, a URL (fetched once into `cache_dir`), or None for the default Spec-Bench file."""
    if path is None:
        if SHARED_SPEC_BENCH.is_file():
            return SHARED_SPEC_BENCH
        path = SPEC_BENCH_URL
    if str(path).startswith(("http://", "https://")):
        local = Path(os.path.expanduser(cache_dir)) / "data" / Path(str(path)).name
        if not local.is_file():
            local.parent.mkdir(parents=True, exist_ok=True)
            try:
                tmp = local.with_suffix(f".tmp{os.getpid()}")
                urllib.request.urlretrieve(str(path), tmp)
                os.replace(tmp, local)
            except OSError as e:
                raise DataError(
                    f"cannot fetch {path} ({e}); put the file on disk and pass task.path=/path/to/question.jsonl"
                ) from e
        return local
    p = Path(os.path.expanduser(str(path)))
    if not p.is_absolute():
        p = REPO_ROOT / p
    if not p.is_file():
        raise DataError(f"prompt file not found: {p} (task.path)")
    return p


def _json_lines(path: Path) -> list[tuple[int, object]]:
    """(line number, parsed record) of every non-blank line; a line that is not JSON is named."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                try:
                    out.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from e
    return out


def _question(rec, where) -> Question:
    """A record as a Question; a malformed one is refused naming `where()` (its file and line, or row)."""
    missing = [k for k in ("question_id", "category", "turns") if rec.get(k) is None] if isinstance(rec, dict) else 0
    if missing != []:
        raise DataError(f"{where()}: expected an object with question_id, category, turns; missing {missing}")
    turns = rec["turns"]
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise DataError(f"{where()}: 'turns' must be a non-empty list of non-empty strings")
    return Question(rec["question_id"], str(rec["category"]), turns)


def read_questions(path: Path) -> list[Question]:
    """The questions of a JSONL prompt file, read with `datasets` (its JSON builder). A file it cannot type
    (a question id that is a number on one line and text on another) is read line by line instead; a
    malformed record is named by file and line either way (blank lines are not rows, so the line is counted
    from the file only when one is refused)."""
    try:
        import datasets  # a declared dependency; an image without it (the GPU study's machine) reads line by line

        rows = list(datasets.load_dataset("json", data_files=str(path), split="train", keep_in_memory=True))
        lines = None
    except Exception:  # noqa: BLE001 - datasets raises many kinds; the line reader names the culprit or reads it
        numbered = _json_lines(path)
        rows, lines = [rec for _, rec in numbered], [n for n, _ in numbered]

    def line(i: int) -> int:
        return (lines or [n for n, _ in _json_lines(path)])[i]

    out = [_question(rec, lambda i=i: f"{path}:{line(i)}") for i, rec in enumerate(rows)]
    if not out:
        raise DataError(f"{path}: no questions")
    return out


def read_hub_questions(name: str, fields: dict, split: str = "train") -> list[Question]:
    """A hub dataset (`task.path=hf://owner/name`, e.g. Dolly for Figure 2) as questions: `fields` maps
    question_id / category / turns to its columns (a text column becomes a one-turn list; a null
    question_id numbers the rows). Needs the hub, or the dataset in the local `datasets` cache."""
    import datasets

    from mtp.models import hub_endpoint, hub_reachable

    offline, was_offline = not hub_reachable(), datasets.config.HF_HUB_OFFLINE
    try:
        datasets.config.HF_HUB_OFFLINE = was_offline or offline  # unreachable: the local cache only, no retries
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001
        why = (f"the hub ({hub_endpoint()}) is unreachable and the dataset is not in the local datasets cache"
               if offline else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        raise DataError(f"task.path=hf://{name}: cannot load it ({why}). Download it where the hub is reachable, or "
                        f"export it as JSONL of question_id, category, turns and pass task.path=/path/to/file.jsonl") from e
    finally:
        datasets.config.HF_HUB_OFFLINE = was_offline
    unknown = sorted(c for c in fields.values() if c is not None and c not in ds.column_names)
    if unknown:
        raise DataError(f"task.fields names columns {unknown} that hf://{name} lacks (it has {ds.column_names})")
    out = []
    for i, row in enumerate(ds):
        turns = row[fields["turns"]]
        rec = {"question_id": row[fields["question_id"]] if fields.get("question_id") else i,
               "category": row[fields["category"]] if fields.get("category") else name,
               "turns": [turns] if isinstance(turns, str) else turns}
        out.append(_question(rec, lambda i=i: f"hf://{name} row {i}"))
    return out


def split_of(cfg) -> str:
    """The split a task reads: `task.split`, else `eval` for the Spec-Bench file and `all` for a file of
    the user's (`task.path`)."""
    split = cfg.get("split") or ("eval" if cfg.get("path") is None else "all")
    if split not in SPLITS:
        raise DataError(f"task.split={split!r}: expected one of {list(SPLITS)}")
    return split


def select_split(questions: list[Question], split: str) -> list[Question]:
    """`calib`: the last CALIB_PER_CATEGORY questions of each category (file order); `eval`: the others."""
    if split == "all":
        return questions
    by_cat: dict[str, list[int]] = defaultdict(list)
    for i, q in enumerate(questions):
        by_cat[q.category].append(i)
    calib = {i for idx in by_cat.values() for i in idx[-CALIB_PER_CATEGORY:]}
    return [q for i, q in enumerate(questions) if (i in calib) == (split == "calib")]


def _task_file(cfg) -> list[Question]:
    """Every question of the task's prompt file (or hub dataset: `task.path=hf://owner/name`)."""
    path = cfg.get("path")
    if str(path).startswith(HUB_PREFIX):
        fields = dict(cfg.get("fields") or {"question_id": "question_id", "category": "category", "turns": "turns"})
        return read_hub_questions(str(path).removeprefix(HUB_PREFIX), fields, cfg.get("hub_split") or "train")
    return read_questions(resolve_path(path, cfg.get("cache_dir", "~/.cache/mtp")))


def warmup_question(cfg) -> Question:
    """The question every job of this prompt file warms up on: the first of its calib split (whatever the
    task's own split and filters), so that no evaluated prompt is seen before it is evaluated."""
    return select_split(_task_file(cfg), "calib")[0]


def load_questions(cfg) -> list[Question]:
    """Questions of `cfg.path` in the task's split (`split_of`), restricted to `cfg.categories`, then
    `cfg.per_category`, `cfg.per_task` (the first N of each category / task, in file order), then
    `cfg.limit`; each cut to its first `cfg.turns` turns."""
    split = split_of(cfg)
    questions = select_split(_task_file(cfg), split)
    if not questions:
        raise DataError(f"task.split={split}: no questions in that split of the prompt file")
    categories = cfg.get("categories")
    if categories:
        known = {q.category for q in questions}
        unknown = sorted(set(categories) - known)
        if unknown:
            raise DataError(f"task.categories {unknown} not in the file (it has {sorted(known)})")
        questions = [q for q in questions if q.category in set(categories)]
    for key, group in (("per_category", lambda q: q.category), ("per_task", lambda q: q.task)):
        if cfg.get(key):
            seen: dict[str, int] = defaultdict(int)
            kept = []
            for q in questions:
                if seen[group(q)] < cfg[key]:
                    seen[group(q)] += 1
                    kept.append(q)
            questions = kept
    if cfg.get("limit"):
        questions = questions[: cfg.limit]
    if cfg.get("turns"):
        questions = [replace(q, turns=q.turns[: cfg.turns]) for q in questions]
    return questions
