"""training_commit names the code that trained a checkpoint, not the checkout at export time."""

from __future__ import annotations

from training.provenance import git_commit, note_code_version, training_commit_fields


def test_a_resume_under_the_same_commit_adds_nothing_and_new_code_adds_its_first_step() -> None:
    history = note_code_version([], 0, "aaa")
    assert history == [{"commit": "aaa", "from_step": 0}]
    assert note_code_version(history, 400, "aaa") == history
    assert note_code_version(history, 400, "bbb") == [{"commit": "aaa", "from_step": 0},
                                                      {"commit": "bbb", "from_step": 400}]


def test_fields_name_the_recorded_commits_and_the_export_commit_apart() -> None:
    now = git_commit()
    one = training_commit_fields({"code_commits": [{"commit": "aaa", "from_step": 0}]})
    assert one == {"training_commit": "aaa", "export_commit": now}

    two = training_commit_fields({"code_commits": [{"commit": "aaa", "from_step": 0},
                                                   {"commit": "bbb", "from_step": 400}]})
    assert two["training_commit"] == "aaa (steps 0-399) + bbb (steps 400-)"
    assert [c["commit"] for c in two["training_commits"]] == ["aaa", "bbb"]

    # A checkpoint from before commits were recorded: the export-time commit, labelled as such.
    old = training_commit_fields({"step": 10})
    assert old["training_commit"].startswith(now) and "at export" in old["training_commit"]
