"""A refused ``--resume`` changes nothing, and the same ``--resume`` succeeds after the repair it names.

Each case damages a copy of the finished two-epoch run the way a mistake or a probe would, runs
``switchnorm train --resume``, and checks: exit 2, one line naming the file, every file's bytes
and mtime as before. Then it makes the repair the line asks for (each step of it refused the same
way until the last) and resumes again, which must end with the run's own metrics and arrays.
"""

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from checkpoint_files import final_arrays, snapshot

from switchnorm.train.cli import main

Step = tuple[Callable[[Path], None], str]  # (what is done to the workspace, the refusal it meets)


def _move(source: str, target: str) -> Callable[[Path], None]:
    return lambda ws: shutil.move(ws / source, ws / target)


def _edit(name: str, change: Callable[[str], str]) -> Callable[[Path], None]:
    def edit(ws: Path) -> None:
        path = ws / "tiny" / name
        path.write_text(change(path.read_text()))

    return edit


def _keep_copy(name: str) -> Callable[[Path], None]:
    return lambda ws: shutil.copy2(ws / "tiny" / name, ws / "outside" / Path(name).name)


def _restore(name: str) -> Callable[[Path], None]:
    return lambda ws: shutil.copy2(ws / "outside" / Path(name).name, ws / "tiny" / name)


def _metrics(change: Callable[[list[dict]], None]) -> Callable[[str], str]:
    def edit(text: str) -> str:
        records = [json.loads(line) for line in text.splitlines()]
        change(records)
        return "".join(json.dumps(r) + "\n" for r in records)

    return edit


def _drop_key(key: str) -> Callable[[str], str]:
    return lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != key})


def _unlink(name: str) -> Callable[[Path], None]:
    return lambda ws: (ws / "tiny" / name).unlink()


def _replace_checkpoints_with_a_file(ws: Path) -> None:
    shutil.move(ws / "tiny" / "checkpoints", ws / "outside" / "checkpoints")
    (ws / "tiny" / "checkpoints").write_text("not a folder")


def _put_checkpoints_back(ws: Path) -> None:
    (ws / "tiny" / "checkpoints").unlink()
    shutil.move(ws / "outside" / "checkpoints", ws / "tiny" / "checkpoints")


def _copy_checkpoint(source: str, target: str) -> Callable[[Path], None]:
    return lambda ws: shutil.copytree(
        ws / "tiny" / "checkpoints" / source, ws / "tiny" / "checkpoints" / target
    )


def _set_step(records: list[dict]) -> None:
    for number, record in enumerate(records, 1):
        record["step"] = number


def _drop_test_accuracy(records: list[dict]) -> None:
    del records[-1]["test_accuracy"]


def _nested(depth: int = 100_000) -> str:
    return "[" * depth + "]" * depth


CASES: dict[str, tuple[Callable[[Path], None] | None, list[Step]]] = {
    # name: (a copy kept before the damage, [(damage or repair, the refusal it meets), ...])
    "the newest checkpoint's metadata deleted": (
        None,
        [
            (_unlink("checkpoints/16/meta/metadata"), "16 has no readable meta/metadata"),
            (_move("tiny/checkpoints/16", "outside/16"), "summary.json says the run is complete"),
            (_unlink("summary.json"), ""),  # epoch 2 is trained again
        ],
    ),
    "a stray step folder": (
        None,
        [(lambda ws: (ws / "tiny" / "checkpoints" / "24").mkdir(), "24 has no readable meta/metadata")]
        + [(lambda ws: (ws / "tiny" / "checkpoints" / "24").rmdir(), "")],
    ),
    "a checkpoint copied under another step": (
        None,
        [(_copy_checkpoint("8", "12"), "does not describe switchnorm's checkpoint 12")]
        + [(lambda ws: shutil.rmtree(ws / "tiny" / "checkpoints" / "12"), "")],
    ),
    "checkpoints replaced by a file": (
        None,
        [(_replace_checkpoints_with_a_file, "checkpoints is not a directory"), (_put_checkpoints_back, "")],
    ),
    "every checkpoint deleted": (
        None,
        [
            (_move("tiny/checkpoints", "outside/checkpoints"), "checkpoints/8 is missing"),
            (_move("outside/checkpoints", "tiny/checkpoints"), ""),
        ],
    ),
    "the steps of metrics.jsonl edited": (
        _keep_copy("metrics.jsonl"),
        [(_edit("metrics.jsonl", _metrics(_set_step)), "line 1 puts epoch 1 at step 1, not 8")]
        + [(_restore("metrics.jsonl"), "")],
    ),
    "the last record without its test accuracy": (
        _keep_copy("metrics.jsonl"),
        [(_edit("metrics.jsonl", _metrics(_drop_test_accuracy)), "line 2 (epoch 2) has no test_accuracy")]
        + [(_restore("metrics.jsonl"), "")],
    ),
    "the seed deleted from config.json": (
        _keep_copy("config.json"),
        [(_edit("config.json", _drop_key("seed")), "seed is missing"), (_restore("config.json"), "")],
    ),
    "eval_every deleted from config.json": (
        _keep_copy("config.json"),
        [(_edit("config.json", _drop_key("eval_every")), "eval_every is missing")]
        + [(_restore("config.json"), "")],
    ),
    "a summary of another status": (
        None,
        [(_edit("summary.json", lambda t: json.dumps({"status": "paused"})), "has status 'paused'")]
        + [(_unlink("summary.json"), "")],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_refused_resume_changes_nothing_and_succeeds_after_the_repair(case, run, workspace, capsys):
    keep, steps = CASES[case]
    if keep is not None:
        keep(workspace)
    tiny = workspace / "tiny"
    for action, refusal in steps:
        action(workspace)
        if not refusal:
            break
        before = snapshot(workspace)
        assert main(["train", "--out", str(tiny), "--resume", "--quiet"]) == 2, refusal
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("switchnorm: error: ") and refusal in err, err
        assert snapshot(workspace) == before
    assert main(["train", "--out", str(tiny), "--resume", "--quiet"]) == 0, capsys.readouterr().err
    assert (tiny / "metrics.jsonl").read_text() == (run / "metrics.jsonl").read_text()
    expected, got = final_arrays(run, 16), final_arrays(tiny, 16)
    assert all((expected[k] == got[k]).all() for k in expected) and expected.keys() == got.keys()


NESTED = {  # every JSON file a run holds, nested deeper than Python's parser goes
    "config.json": "not valid JSON: nested too deeply",
    "metrics.jsonl": "line 1 is damaged (not valid JSON)",
    "summary.json": "summary.json is damaged (nested too deeply)",
    "checkpoints/16/meta/metadata": "no readable meta/metadata (nested too deeply)",
}


NESTED_CASES = [  # plot reads neither the summary nor (in a run of "layer" weights) a checkpoint
    (name, command) for name in NESTED for command in ("resume", "inspect", "plot")
    if command != "plot" or name in ("config.json", "metrics.jsonl")
]  # fmt: skip


@pytest.mark.parametrize(("name", "command"), NESTED_CASES)
def test_json_nested_too_deeply_is_refused_with_one_line(name, command, workspace, capsys):
    tiny = workspace / "tiny"
    (tiny / name).write_text(_nested() + ("\n" if name.endswith(".jsonl") else ""))
    args = {"resume": ["train", "--out", str(tiny), "--resume"], "inspect": ["inspect", str(tiny)]}
    before = snapshot(workspace)
    assert main(args.get(command, ["plot", str(tiny)])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and NESTED[name] in err, err
    assert snapshot(workspace) == before


def test_what_a_kill_left_is_removed_with_a_note_and_the_run_resumes(run, workspace, capsys):
    tiny = workspace / "tiny"
    shutil.rmtree(tiny / "checkpoints" / "16")
    (tiny / "summary.json").unlink()
    leftovers = [
        ".summary.json.123.0123abcd.tmp",
        "checkpoints/16.orbax-checkpoint-tmp",
        "checkpoints/8.switchnorm-deleting",
    ]
    (tiny / leftovers[0]).write_text("half")
    for folder in leftovers[1:]:
        (tiny / folder).mkdir()
        (tiny / folder / "part").write_bytes(b"\0" * 8)
    assert main(["train", "--out", str(tiny), "--resume", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "removed what a kill left unfinished: checkpoints/16.orbax" in out
    assert "dropped 1 metrics.jsonl line(s)" in out
    assert not any((tiny / name).exists() for name in leftovers)
    assert sorted(p.name for p in tiny.iterdir()) == sorted(p.name for p in run.iterdir())
    assert (tiny / "metrics.jsonl").read_text() == (run / "metrics.jsonl").read_text()
