"""Spec-Bench-format loading: the shared file, subsets, and malformed input named by file and line."""

import json

import pytest
from omegaconf import OmegaConf

from mtp.data import SHARED_SPEC_BENCH, TASKS, DataError, load_questions, read_questions

from .conftest import compose_cfg


@pytest.mark.skipif(not SHARED_SPEC_BENCH.is_file(), reason="shared Spec-Bench copy not beside the repo")
def test_spec_bench_tasks_and_subsets():
    qs = load_questions(compose_cfg(["task=spec_bench"]).task)  # the eval split: all but the last 2 of each category
    assert len(qs) == 480 - 2 * 13 and {q.task for q in qs} == set(TASKS)
    assert len(load_questions(compose_cfg(["task=spec_bench", "task.split=all"]).task)) == 480
    mini = load_questions(compose_cfg([]).task)  # the default job's subset
    assert len(mini) == 6 and {q.task for q in mini} == set(TASKS)
    per_cat = load_questions(compose_cfg(["task=spec_bench", "task.per_category=1"]).task)
    assert len(per_cat) == 13 and len({q.category for q in per_cat}) == 13
    mt = load_questions(compose_cfg(["task=mt_bench", "task.per_category=2"]).task)
    assert len(mt) == 16 and all(len(q.turns) == 2 for q in mt)
    assert len(load_questions(compose_cfg(["task=qa", "task.limit=5"]).task)) == 5


def _task(path, **kw):
    return OmegaConf.create({"name": "x", "path": str(path), "categories": None, "per_category": None,
                             "per_task": None, "limit": None} | kw)


def test_any_jsonl_in_the_format(tmp_path):
    p = tmp_path / "mine.jsonl"
    p.write_text("\n".join(json.dumps({"question_id": i, "category": "c", "turns": [f"q{i}"]}) for i in range(3)))
    assert [q.turns for q in load_questions(_task(p))] == [["q0"], ["q1"], ["q2"]]


@pytest.mark.parametrize("line,message", [
    ("{not json", r"bad\.jsonl:2: not valid JSON"),
    ('{"question_id": 1, "turns": ["a"]}', r"bad\.jsonl:2: .*missing \['category'\]"),
    ('{"question_id": 1, "category": "c", "turns": []}', r"bad\.jsonl:2: 'turns' must be"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"question_id": 0, "category": "c", "turns": ["ok"]}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=message):
        read_questions(p)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="prompt file not found"):
        load_questions(_task(tmp_path / "nope.jsonl"))


def test_turns_keeps_the_first_turns(tmp_path):
    from omegaconf import OmegaConf

    from mtp.data import load_questions

    path = tmp_path / "q.jsonl"
    path.write_text('{"question_id": 1, "category": "writing", "turns": ["a", "b"]}\n'
                    '{"question_id": 2, "category": "qa", "turns": ["c"]}\n')
    both = load_questions(OmegaConf.create({"path": str(path)}))
    first = load_questions(OmegaConf.create({"path": str(path), "turns": 1}))
    assert [q.turns for q in both] == [["a", "b"], ["c"]] and [q.turns for q in first] == [["a"], ["c"]]


@pytest.mark.skipif(not SHARED_SPEC_BENCH.is_file(), reason="shared Spec-Bench copy not beside the repo")
def test_calib_and_eval_share_no_question():
    """Fitting reads calib, evaluation eval: the last 2 questions of each category against the rest."""
    def ids(split, *more):
        return [q.question_id for q in load_questions(compose_cfg(["task=spec_bench", f"task.split={split}", *more]).task)]

    calib, evaluation, whole = ids("calib"), ids("eval"), ids("all")
    assert len(calib) == 26 and not set(calib) & set(evaluation) and sorted(calib + evaluation) == sorted(whole)
    assert ids("calib", "task.per_category=1") == [q for q in calib[::2]]  # each category's first calib question
    for task in TASKS:  # every task config reads eval unless told otherwise
        assert not set(ids("eval", f"task={task}")) & set(calib)
        assert set(q.question_id for q in load_questions(compose_cfg([f"task={task}"]).task)) <= set(evaluation)


def test_a_file_of_ones_own_is_read_whole_unless_a_split_is_given(tmp_path):
    p = tmp_path / "mine.jsonl"
    p.write_text("\n".join(json.dumps({"question_id": i, "category": "c" if i < 4 else "d", "turns": [f"q{i}"]})
                           for i in range(7)))
    assert [q.question_id for q in load_questions(_task(p))] == list(range(7))
    assert [q.question_id for q in load_questions(_task(p, split="calib"))] == [2, 3, 5, 6]
    assert [q.question_id for q in load_questions(_task(p, split="eval"))] == [0, 1, 4]
    with pytest.raises(DataError, match="task.split='test': expected one of"):
        load_questions(_task(p, split="test"))


@pytest.mark.skipif(not SHARED_SPEC_BENCH.is_file(), reason="shared Spec-Bench copy not beside the repo")
def test_jobs_warm_up_on_a_calib_question():
    """The warm-up prompt is never an evaluated one: the first calib question, whatever the task."""
    from mtp.data import warmup_question

    calib = {q.question_id for q in load_questions(compose_cfg(["task=spec_bench", "task.split=calib"]).task)}
    for task in ["spec_bench_mini", "spec_bench", *TASKS]:
        assert warmup_question(compose_cfg([f"task={task}"]).task).question_id in calib


def test_a_dataset_with_other_columns_maps_through_fields(tmp_path):
    """A hub-style dataset (here a local folder `datasets` loads the same way) whose columns are named otherwise:
    task.fields maps them, a text column becomes one turn, a null question_id numbers the rows."""
    d = tmp_path / "dolly"
    d.mkdir()
    rows = [{"instruction": "Write a poem.", "category": "creative_writing"}, {"instruction": "Name a fish.", "category": "qa"},
            {"instruction": "Tell a story.", "category": "creative_writing"}]
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = _task(f"hf://{d}", split="all", fields={"question_id": None, "category": "category", "turns": "instruction"},
                categories=["creative_writing"])
    qs = load_questions(cfg)
    assert [(q.question_id, q.category, q.turns) for q in qs] == [(0, "creative_writing", ["Write a poem."]),
                                                                   (2, "creative_writing", ["Tell a story."])]
    with pytest.raises(DataError, match=r"task.fields names columns \['prompt'\]"):
        load_questions(_task(f"hf://{d}", split="all", fields={"question_id": None, "category": None, "turns": "prompt"}))


def test_a_hub_dataset_without_the_hub_says_what_to_do(monkeypatch):
    import mtp.models

    monkeypatch.setattr(mtp.models, "hub_reachable", lambda timeout=3.0: False)
    cfg = compose_cfg(["task=dolly_creative"]).task
    with pytest.raises(DataError, match=r"hf://databricks/databricks-dolly-15k: cannot load it \(the hub .* is unreachable"):
        load_questions(cfg)
