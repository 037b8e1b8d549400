"""Every bad input ends in one line ``switchnorm: error: ...``, exit status 2, and nothing changed.

A table of cases: every flag's bad values, every ``config.json`` setting's bad
types and ranges (through ``--resume``, ``inspect`` and ``plot``), damaged
files of each kind a run directory holds, and ``--out`` paths that a mistake
or a hostile file would craft. Each case snapshots the whole workspace
(bytes, mtimes, links) before and after.
"""

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from checkpoint_files import TINY, snapshot

from switchnorm.train.cli import main
from switchnorm.train.config import LATER_SETTINGS, TrainConfig

BASE = ["train", "--dataset", "synthetic", "--epochs", "1", "--quiet"]

# -- flags --------------------------------------------------------------------------------------

FLAG_VALUES: dict[str, list[tuple[str, str]]] = {
    "--dataset": [("cifar", "unknown dataset"), ("", "unknown dataset"), ("MNIST1D", "unknown dataset")],
    "--model": [("vgg", "unknown model"), ("", "unknown model"), ("resnet", "unknown model")],
    "--norm": [
        ("wn", "unknown norm"),
        ("SN", "unknown norm"),
        ("", "unknown norm"),
        ("bn,ln", "unknown norm"),
    ],
    "--optimizer": [("lion", "unknown optimizer"), ("SGD", "unknown optimizer"), ("", "unknown optimizer")],
    "--dtype": [("int8", "unknown dtype"), ("float64", "unknown dtype"), ("float16", "unknown dtype")],
    "--epochs": [
        ("0", "positive integer"),
        ("-3", "positive integer"),
        ("1.5", "expected an integer"),
        ("x", "expected an integer"),
        ("", "expected an integer"),
        ("1e3", "expected an integer"),
        ("100001", "at most"),
        ("99999999999999999999", "at most"),
    ],
    "--batch-size": [
        ("0", "positive integer"),
        ("-1", "positive integer"),
        ("2.5", "expected an integer"),
        ("x", "expected an integer"),
        ("100000", "larger than"),
        (str(2**21), "at most"),
    ],
    "--lr": [
        ("0", "positive number"),
        ("-0.1", "positive number"),
        ("fast", "expected a number"),
        ("", "expected a number"),
        ("nan", "positive number"),
        ("inf", "positive number"),
        ("-inf", "positive number"),
        ("1e400", "positive number"),
        ("1e300", "at most 3.4e+38"),
    ],
    "--momentum": [
        ("1.5", ">= 0 and < 1"),
        ("1", ">= 0 and < 1"),
        ("-0.1", ">= 0 and < 1"),
        ("nan", ">= 0 and < 1"),
        ("inf", ">= 0 and < 1"),
        ("x", "expected a number"),
    ],
    "--weight-decay": [
        ("-1e-4", "between 0 and 1"),
        ("2", "between 0 and 1"),
        ("nan", "between 0 and 1"),
        ("inf", "between 0 and 1"),
        ("x", "expected a number"),
    ],
    "--warmup-epochs": [
        ("-1", "between 0 and 1"),
        ("5", "between 0 and 1"),  # more warmup than the run's one epoch
        ("nan", "between 0 and 1"),
        ("inf", "between 0 and 1"),
        ("x", "expected a number"),
    ],
    "--eval-every": [
        ("0", "positive integer"),
        ("-1", "positive integer"),
        ("1.5", "expected an integer"),
        ("x", "expected an integer"),
    ],
    "--seed": [
        ("-1", "integer >= 0"),
        (str(2**32), "at most"),
        (str(2**63), "at most"),
        (str(2**64 + 5), "at most"),
        ("1.5", "expected an integer"),
        ("x", "expected an integer"),
        ("", "expected an integer"),
    ],
    "--mixing-lr-scale": [
        ("0", "positive number"),
        ("-0.1", "positive number"),
        ("nan", "positive number"),
        ("inf", "positive number"),
        ("1e400", "positive number"),
        ("1e300", "at most 3.4e+38"),  # float32 would make it inf (with warnings), not an error
        ("x", "expected a number"),
        ("", "expected a number"),
    ],
    "--mixing-clip": [
        ("1e39", "at most 3.4e+38"),
        ("0", "positive number"),
        ("-1", "positive number"),
        ("nan", "positive number"),
        ("inf", "positive number"),
        ("x", "expected a number"),
    ],
    "--devices": [("0", "from 1 to"), ("-1", "from 1 to"), ("x", "from 1 to"), ("5000", "from 1 to")],
    "--num-processes": [("x", "expected an integer"), ("0", "num_processes")],
    "--process-id": [("x", "expected an integer"), ("-1", "coordinator_address")],
}
FLAG_CASES = {
    f"{flag}={value}": ([f"{flag}={value}"], message)
    for flag, bad in FLAG_VALUES.items()
    for value, message in bad
}
FLAG_CASES |= {
    "gn on the mlp": (["--norm", "gn"], "spatial"),
    "in on the mlp": (["--norm", "in"], "spatial"),
    "gn on the mlp of digits": (["--dataset", "digits", "--model", "mlp", "--norm", "gn"], "spatial"),
    "resnet2d on features": (["--model", "resnet2d"], "rank"),
    "resnet1d on features": (["--model", "resnet1d"], "rank"),
    "unknown flag": (["--colour", "red"], "unrecognized"),
    "flag without its value": (["--epochs"], "expected one argument"),
    "stray argument": (["extra"], "unrecognized"),
    "resume and overwrite": (["--resume", "--overwrite"], "contradict"),
    "resume without out": (["--resume"], "needs --out"),
    "process id beyond the processes": (
        ["--process-id", "5", "--num-processes", "2", "--coordinator-address", "localhost:1"],
        "process_id must be in 0..1",
    ),
}


def _assert_refused(args: list[str], message: str, workspace: Path, capsys) -> None:
    before = snapshot(workspace)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("switchnorm: error: "), err
    assert message in err, err
    assert snapshot(workspace) == before


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_bad_flags_exit_2_with_one_line_and_write_nothing(case, workspace, capsys):
    flags, message = FLAG_CASES[case]
    out = workspace / "new"
    args = [*BASE, "--out", str(out), *flags] if flags[0] != "--resume" or len(flags) > 1 else [*BASE, *flags]
    _assert_refused(args, message, workspace, capsys)
    assert not out.exists()


def test_the_commands_themselves_refuse_bad_words(capsys):
    for args, message in (([], "required"), (["fit"], "invalid choice"), (["inspect"], "required")):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


# -- config.json --------------------------------------------------------------------------------

CONFIG_VALUES: dict[str, list[tuple[object, str]]] = {
    "dataset": [(5, "unknown dataset"), ("cifar", "unknown dataset"), (None, "dataset is null")],
    "model": [("vgg", "unknown model"), (3, "unknown model"), (None, "model is null")],
    "norm": [("wn", "unknown norm"), (["sn"], "unknown norm"), ("gn", "spatial")],
    "optimizer": [("lion", "unknown optimizer")],
    "dtype": [("int8", "unknown dtype")],
    "epochs": [("2", "must be an integer"), (0, "positive integer"), (2.5, "integer"), (True, "integer")],
    "batch_size": [("64", "must be an integer"), (0, "positive integer"), (10**9, "at most")],
    "learning_rate": [("0.01", "positive number"), (-1, "positive number"), (0, "positive number")],
    "momentum": [(1.5, "< 1"), ("x", "< 1")],
    "weight_decay": [(-1, "between 0 and 1"), (None, "weight_decay is null")],
    "warmup_epochs": [(-1, "between 0 and 2"), (100, "between 0 and 2")],
    "eval_every": [(0, "positive integer"), ("5", "must be an integer")],
    "seed": [(-1, "integer >= 0"), (2**64, "at most"), (1.5, "must be an integer")],
    "mixing_lr_scale": [(0, "positive number"), (-1, "positive number"), ("0.1", "positive number")],
    "mixing_clip": [(0, "positive number"), (-1e-3, "positive number"), (True, "positive number")],
    "input_shape": [
        ([10**9], "at most"),
        ("8", "list of 1 to 4"),
        ([], "list of 1 to 4"),
        ([8, -1], "positive integer"),
        ([1, 1, 1, 1, 1], "list of 1 to 4"),
        ([8.5], "must be an integer"),
        ([4096, 4096], "values per example"),
    ],
    "num_classes": [
        (10**9, "at most"),
        (-4, "integer >= 2"),
        (0, "integer >= 2"),
        ("4", "must be an integer"),
    ],
    "steps_per_epoch": [(0, "positive integer"), (10**12, "at most"), ("8", "must be an integer")],
}
CONFIG_CASES: dict[str, Callable[[dict], object]] = {}
for _field, _bad in CONFIG_VALUES.items():
    for _value, _message in _bad:
        CONFIG_CASES[f"{_field}={_value!r}"] = (lambda c, f=_field, v=_value: {**c, f: v}, _message)
for _field in sorted(set(json.loads(TrainConfig().to_json())) - set(LATER_SETTINGS)):
    CONFIG_CASES[f"{_field} missing"] = (
        lambda c, f=_field: {k: v for k, v in c.items() if k != f},
        f"{_field} is missing",
    )
CONFIG_CASES |= {
    "unknown setting": (lambda c: {**c, "colour": "red"}, "not a setting"),
    "missing setting": (
        lambda c: {k: v for k, v in c.items() if k != "num_classes"},
        "num_classes is missing",
    ),
    "a list": (lambda c: [c], "must be a JSON object"),
    "a number": (lambda c: 5, "must be a JSON object"),
    "steps beyond the int32 counter": (lambda c: {**c, "epochs": 100_000, "steps_per_epoch": 10**5}, "steps"),
}
RAW_CONFIGS = {
    "not JSON": ("{", "not valid JSON"),
    "empty": ("", "not valid JSON"),
    "bare NaN": ('{"learning_rate": NaN}', "not valid JSON"),
    "bytes": ("\udcff", "unreadable"),
}
COMMANDS = {
    "resume": lambda tiny: ["train", "--out", str(tiny), "--resume"],
    "inspect": lambda tiny: ["inspect", str(tiny)],
    "plot": lambda tiny: ["plot", str(tiny)],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_values_are_refused_before_anything_is_built(case, command, workspace, capsys):
    change, message = CONFIG_CASES[case]
    file = workspace / "tiny" / "config.json"
    file.write_text(json.dumps(change(json.loads(file.read_text()))))
    _assert_refused(COMMANDS[command](workspace / "tiny"), message, workspace, capsys)


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("case", list(RAW_CONFIGS))
def test_config_that_is_not_json_is_refused(case, command, workspace, capsys):
    text, message = RAW_CONFIGS[case]
    (workspace / "tiny" / "config.json").write_bytes(text.encode(errors="surrogateescape"))
    _assert_refused(COMMANDS[command](workspace / "tiny"), message, workspace, capsys)


def test_config_of_other_data_is_refused_on_resume(workspace, capsys):
    file = workspace / "tiny" / "config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "input_shape": [9]}))
    _assert_refused(COMMANDS["resume"](workspace / "tiny"), "do not match", workspace, capsys)


# -- damaged files ------------------------------------------------------------------------------


def _metrics_line(line: str, where: int = 0) -> Callable[[Path], None]:
    def damage(tiny: Path) -> None:
        lines = (tiny / "metrics.jsonl").read_text().splitlines()
        lines[where] = line
        (tiny / "metrics.jsonl").write_text("\n".join(lines) + "\n")

    return damage


def _write(name: str, text: str) -> Callable[[Path], None]:
    return lambda tiny: (tiny / name).write_text(text)


def _damage_checkpoint(how: str) -> Callable[[Path], None]:
    def damage(tiny: Path) -> None:
        step_dir = tiny / "checkpoints" / "16"
        biggest = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        size = biggest.stat().st_size
        data = biggest.read_bytes()[: size // 2] if how == "truncated" else (b"\0garbage" * size)[:size]
        biggest.write_bytes(data)

    return damage


def _alter_digest(tiny: Path) -> None:
    """What a changed value that orbax still reads looks like: one array's SHA-256 disagrees."""
    meta_file = tiny / "checkpoints" / "16" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    name = sorted(meta["sha256"])[0]
    meta["sha256"][name] = "0" * 64
    meta_file.write_text(json.dumps(meta))


METRICS_DAMAGE = {
    "a number line": (_metrics_line("5"), "line 1 is damaged"),
    "a junk line": (_metrics_line("xyz"), "line 1 is damaged"),
    "a record without step": (_metrics_line('{"epoch": 1}'), "line 1 is damaged"),
    "a null line": (_metrics_line("null"), "line 1 is damaged"),
    "an empty line": (_metrics_line(""), "line 1 is damaged"),
    "a bare NaN": (_metrics_line('{"epoch": 1, "step": 8, "train_loss": NaN}'), "line 1 is damaged"),
    "a string step": (_metrics_line('{"epoch": 1, "step": "8"}'), "line 1 is damaged"),
    "interleaved epochs": (_metrics_line('{"epoch": 1, "step": 8}', 1), "line 2 is damaged"),
    "weights of the wrong shape": (
        _metrics_line('{"epoch": 1, "step": 8, "weights": {"norms/0": {"mean": [0.5, 0.5]}}}'),
        "line 1 is damaged ('weights' is not a JSON object of layer",
    ),
    "weights of other layers than the line before": (
        _metrics_line(
            '{"epoch": 2, "step": 16, "weights": {"other": {"mean": {"bn": 1}, "var": {"bn": 1}}}}', 1
        ),
        "line 2 is damaged (its weights have other layers",
    ),
    "a complete junk last line": (_metrics_line("{}", 1), "line 2 is damaged"),
}
FILE_DAMAGE = {
    **{f"metrics: {k}": v for k, v in METRICS_DAMAGE.items()},
    "truncated checkpoint": (_damage_checkpoint("truncated"), "16 is damaged"),
    "corrupted checkpoint": (_damage_checkpoint("garbage"), "16 is damaged"),
    "altered array": (_alter_digest, "does not hold the bytes saved"),
    "unreadable checkpoint meta": (_write("checkpoints/16/meta/metadata", "{"), "no readable meta/metadata"),
    "checkpoint meta not an object": (_write("checkpoints/16/meta/metadata", "[1]"), "not a JSON object"),
    "checkpoint meta of another step": (
        _write("checkpoints/16/meta/metadata", '{"step": 8, "epoch": 1, "sha256": {}}'),
        "does not describe switchnorm's checkpoint 16",
    ),
}


DAMAGE_CASES = [(case, command) for case in FILE_DAMAGE for command in COMMANDS]
DAMAGE_CASES = [(case, c) for case, c in DAMAGE_CASES if c != "plot" or case.startswith("metrics")]


@pytest.mark.parametrize(("case", "command"), DAMAGE_CASES)
def test_damaged_files_are_refused_with_their_name(case, command, workspace, capsys):
    damage, message = FILE_DAMAGE[case]
    damage(workspace / "tiny")
    _assert_refused(COMMANDS[command](workspace / "tiny"), message, workspace, capsys)


SUMMARY_DAMAGE = {"not JSON": "{", "a list": "[]", "bare NaN": "NaN", "empty": ""}


@pytest.mark.parametrize("command", ["resume", "inspect"])
@pytest.mark.parametrize("case", list(SUMMARY_DAMAGE))
def test_a_damaged_summary_is_refused(case, command, workspace, capsys):
    (workspace / "tiny" / "summary.json").write_text(SUMMARY_DAMAGE[case])
    _assert_refused(COMMANDS[command](workspace / "tiny"), "summary.json is damaged", workspace, capsys)


def test_metrics_cut_shorter_than_the_checkpoint_are_refused(workspace, capsys):
    file = workspace / "tiny" / "metrics.jsonl"
    file.write_text(file.read_text().splitlines()[0] + "\n")
    _assert_refused(COMMANDS["resume"](workspace / "tiny"), "fewer than the 2 epochs", workspace, capsys)


# -- run directories and --out ------------------------------------------------------------------


def _users_folder(ws: Path) -> Path:
    """What `--overwrite` once deleted: a user's folder that merely holds a config.json."""
    (ws / "mine" / "src").mkdir(parents=True)
    (ws / "mine" / "src" / "model.py").write_text("print('my work')")
    (ws / "mine" / "notes.txt").write_text("keep me")
    (ws / "mine" / "config.json").write_text("{}")
    return ws / "mine"


def _old_run(ws: Path) -> Path:
    (ws / "tiny" / ".switchnorm-run").unlink()
    return ws / "tiny"


def _link(ws: Path, name: str, target: Path) -> Path:
    (ws / "tiny" / name).unlink(missing_ok=True) if not (ws / "tiny" / name).is_dir() else shutil.rmtree(
        ws / "tiny" / name
    )
    (ws / "tiny" / name).symlink_to(target)
    return ws / "tiny"


LINKED_ENTRIES = ("metrics.jsonl", "checkpoints", ".lock", "summary.json", "config.json", "tensorboard")


def _run_case(case: str, ws: Path) -> tuple[list[str], str]:
    tiny = str(ws / "tiny")
    fresh = ["train", *TINY, "--out"]
    resume = ["train", "--resume", "--out"]
    if case == "resume of an empty directory":
        (ws / "empty").mkdir()
        return [*resume, str(ws / "empty")], "holds no run"
    if case == "resume of a missing directory":
        return [*resume, str(ws / "missing")], "not a directory"
    if case == "out is an existing run":
        return [*fresh, tiny], "already holds a run"
    if case == "out is a folder of other files, with --overwrite":
        (ws / "mine").mkdir()
        (ws / "mine" / "notes.txt").write_text("keep me")
        return [*fresh, str(ws / "mine"), "--overwrite"], "not a run directory"
    if case == "out is a user's folder holding a config.json, with --overwrite":
        return [*fresh, str(_users_folder(ws)), "--overwrite"], "no .switchnorm-run marker"
    if case == "out is a run made without the marker, with --overwrite":
        return [*fresh, str(_old_run(ws)), "--overwrite"], "no .switchnorm-run marker"
    if case == "out is a file":
        (ws / "file").write_text("x")
        return [*fresh, str(ws / "file")], "not a directory"
    if case == "out below a regular file":
        (ws / "file").write_text("x")
        return [*fresh, str(ws / "file" / "run")], "is a file, not a directory"
    if case == "out under /proc":
        return [*fresh, "/proc/switchnorm-test/run"], "cannot create"
    if case == "out is a symlink":
        (ws / "link").symlink_to(ws / "outside")
        return [*fresh, str(ws / "link")], "symbolic link"
    if case == "resume of a symlink to a run":
        (ws / "link").symlink_to(ws / "tiny")
        return [*resume, str(ws / "link")], "symbolic link"
    for name in LINKED_ENTRIES:
        if case == f"resume with {name} a symlink":
            target = ws / "outside" / ("precious.txt" if name not in ("checkpoints", "tensorboard") else "")
            return [*resume, str(_link(ws, name, target))], "symbolic link"
    raise AssertionError(case)


RUN_CASES = [
    "resume of an empty directory",
    "resume of a missing directory",
    "out is an existing run",
    "out is a folder of other files, with --overwrite",
    "out is a user's folder holding a config.json, with --overwrite",
    "out is a run made without the marker, with --overwrite",
    "out is a file",
    "out below a regular file",
    "out under /proc",
    "out is a symlink",
    "resume of a symlink to a run",
    *[f"resume with {n} a symlink" for n in LINKED_ENTRIES],
]


@pytest.mark.parametrize("case", RUN_CASES)
def test_bad_run_directories_exit_2_and_touch_nothing(case, workspace, capsys):
    args, message = _run_case(case, workspace)
    _assert_refused(args, message, workspace, capsys)


RESUME_DIFFERENCES = {
    "--epochs": "5",
    "--lr": "0.5",
    "--seed": "3",
    "--norm": "bn",
    "--batch-size": "32",
    "--optimizer": "sgd",
    "--weight-decay": "0.001",
    "--mixing-lr-scale": "0.1",
    "--mixing-clip": "1",
}


@pytest.mark.parametrize("flag", list(RESUME_DIFFERENCES))
def test_resume_with_a_different_setting_is_refused(flag, workspace, capsys):
    args = ["train", "--out", str(workspace / "tiny"), "--resume", flag, RESUME_DIFFERENCES[flag]]
    _assert_refused(args, "differs from the run's", workspace, capsys)


@pytest.mark.parametrize("flags", [["--seed=-1"], ["--lr=nan"], ["--momentum=2"]], ids=str)
def test_resume_with_an_out_of_range_flag_names_the_range(flags, workspace, capsys):
    args = ["train", "--out", str(workspace / "tiny"), "--resume", *flags]
    before = snapshot(workspace)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "must be" in err and "differs" not in err, err
    assert snapshot(workspace) == before


def _read_only_folder(where: Path) -> Path:
    """A folder no one may write in: a read-only tmpfs as root, else chmod 555."""
    where.mkdir()
    if os.geteuid() == 0:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(where)], capture_output=True
        )
        if done.returncode != 0:
            pytest.skip("root, and no read-only mount possible: permissions do not bind root")
    else:
        where.chmod(0o555)
    return where


def test_out_in_a_folder_nobody_may_write_is_refused(tmp_path, capsys):
    locked = _read_only_folder(tmp_path / "locked")
    try:
        assert main([*BASE, "--out", str(locked / "run")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "no permission to write" in err, err
        assert list(locked.iterdir()) == []
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(locked)], check=False)
        else:
            locked.chmod(0o755)


def test_a_config_json_without_the_later_settings_reads_as_a_run_made_before_them(workspace, capsys):
    from switchnorm.train.rundir import RunDir

    file = workspace / "tiny" / "config.json"
    config = json.loads(file.read_text())
    assert all(config[key] == value for key, value in LATER_SETTINGS.items())
    file.write_text(json.dumps({k: v for k, v in config.items() if k not in LATER_SETTINGS}))
    loaded = RunDir(workspace / "tiny").read_config()
    assert {key: getattr(loaded, key) for key in LATER_SETTINGS} == LATER_SETTINGS
    assert main(["train", "--out", str(workspace / "tiny"), "--resume"]) == 0
    assert "the run is complete" in capsys.readouterr().out
