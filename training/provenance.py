"""Which code produced a checkpoint: git commits recorded while training, read back when exporting.

A manifest's ``training_commit`` must name the code that *trained* the weights. Stamping the commit at export time
(as exporters did before) names whatever the checkout holds then, which after a long or resumed run is often a
later commit. So a trainer records the commit each time it starts or resumes (a run that resumes under new code
gets a second entry, with the step it continued from), and the exporter reports that history beside its own commit.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Mapping, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]


def git_commit(repo_dir: Path | str = REPO_ROOT, include_untracked: bool = True) -> str:
    """HEAD sha, suffixed with "-dirty" when the working tree has changes; "uncommitted" outside git.

    Untracked files count as changes by default: an uncommitted config passed on the command line changes what is
    trained. Reports that write into the tree itself pass include_untracked=False."""
    untracked = [] if include_untracked else ["--untracked-files=no"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", *untracked], cwd=repo_dir, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "uncommitted"
    return f"{sha}-dirty" if dirty else sha


def note_code_version(history: Sequence[Mapping[str, Any]], step: int, commit: str) -> list[dict[str, Any]]:
    """``history`` extended by ``{commit, from_step}`` when training (re)starts at ``step`` under another commit
    than the last entry's; unchanged when it resumes under the same one."""
    entries = [dict(entry) for entry in history]
    if not entries or entries[-1]["commit"] != commit:
        entries.append({"commit": commit, "from_step": int(step)})
    return entries


def training_commit_fields(checkpoint: Mapping[str, Any], repo_dir: Path | str = REPO_ROOT) -> dict[str, Any]:
    """Manifest provenance fields: ``training_commit`` from the checkpoint's recorded history, ``export_commit``
    from the checkout now.

    One commit trained the run: its sha. Several (a run resumed under new code): each with the step it took over
    from, e.g. ``"abc… (steps 0-4999) + def… (steps 5000-)"``, and the list under ``training_commits``. A checkpoint
    written before commits were recorded has no history: then the export-time commit is the best available and
    ``training_commit`` says so."""
    export_commit = git_commit(repo_dir)
    history = list(checkpoint.get("code_commits") or [])
    if not history:
        return {"training_commit": f"{export_commit} (at export; the checkpoint records none)",
                "export_commit": export_commit}
    if len(history) == 1:
        return {"training_commit": history[0]["commit"], "export_commit": export_commit}
    spans = []
    for entry, following in zip(history, [*history[1:], None]):
        end = f"{following['from_step'] - 1}" if following else ""
        spans.append(f"{entry['commit']} (steps {entry['from_step']}-{end})")
    return {"training_commit": " + ".join(spans), "training_commits": history, "export_commit": export_commit}
