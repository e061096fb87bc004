"""The training job: configs, ``kfrob train`` / ``kfrob compare`` end to end on a tiny
config, checkpoints and resumption, Ctrl-C, TensorBoard tags, the figure and the JSON."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

pytest.importorskip("yaml")
pytest.importorskip("pydantic")
pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kfrob.job.cli import main
from kfrob.job.config import load_config, parse_yaml
from kfrob.job.training import CHECKPOINT, load_data, train

ROOT = Path(__file__).resolve().parents[1]
# 256 training images in batches of 64: 4 steps an epoch
TINY = [
    "data.train_size=256",
    "data.test_size=128",
    "training.batch_size=64",
    "training.epochs=2",
    "training.eval_every=2",
    "logging.log_every=2",
    "optimizers.kfrob.inverse_update_freq=3",
]


@pytest.fixture(scope="module")
def tiny_data():
    return load_data(load_config(None, TINY).data)


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- configs -------------------------------------------------------------------------------


def test_defaults_are_the_embedded_mlp_comparison() -> None:
    config = load_config()
    assert config.workload == "mlp" and config.data.source == "embedded"
    assert list(config.optimizers) == ["kfrob", "sgd", "adamw"]


def test_mlp_config_is_the_default_spelled_out() -> None:
    assert load_config(ROOT / "configs" / "mlp.yaml") == load_config()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates_and_trains(path: Path, tmp_path: Path) -> None:
    if path.name.startswith("lightning"):
        pytest.skip("a LightningCLI config, validated by its own test")
    small = ["data.source=embedded", "data.train_size=64", "data.test_size=64"]
    if load_config(path).workload == "transformer":  # text: a few KB of the stdlib
        small = ["data.train_bytes=20000", "data.val_bytes=5000", "data.val_windows=8"]
    config = load_config(path, [*small, "training.max_steps=2"])
    for name in config.optimizers:
        result = train(config, name, tmp_path / name, progress=False)
        held_out = "val" if config.workload == "transformer" else "test"
        assert result.steps == 2 and result.final[f"{held_out}_loss"] is not None
        has_accuracy = config.workload in ("mlp", "cnn")
        assert (result.final.get("test_accuracy") is not None) == has_accuracy


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("training:\n  epoch: 3\n", "unknown key 'training.epoch'; did you mean 'epochs'"),
        ("trainng:\n  epochs: 3\n", "unknown key 'trainng'; did you mean 'training'"),
        ("training:\n  batch_size: 0\n", "training.batch_size: Input should be greater"),
        ("training:\n  batch_size: many\n", "training.batch_size: Input should be a valid int"),
        ("data:\n  source: web\n", "data.source"),
        ("workload: resnet\n", "unknown workload 'resnet'"),
        ("optimizers:\n  kfrob: {lrr: 0.1}\n", "optimizers.kfrob: unknown argument 'lrr'; did you"),
        ("optimizers:\n  kfrob: {momentum: 0.9}\n", "missing required argument 'lr'"),
        ("optimizers:\n  rmsprop: {lr: 0.1}\n", "unknown optimizer 'rmsprop'"),
        (
            "optimizers:\n  kfrob: {lr: 0.1, adaptive_damping: true}\n",
            "optimizers.kfrob: adaptive_damping is not available in the training job",
        ),
        ("workload: autoencoder\n", "'test_accuracy' needs a classifier"),
        ("training:\n  device: gpu0\n", "training.device: not a torch device"),
        ("- a list\n", "expected a mapping"),
    ],
)
def test_bad_configs_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        load_config(write_config(tmp_path / "c.yaml", text))


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    text = "training:\n  epochs: -1\n  seed: x\nlogging:\n  histogram: true\n"
    with pytest.raises(ValueError) as info:
        load_config(write_config(tmp_path / "c.yaml", text))
    assert all(k in str(info.value) for k in ("training.epochs", "training.seed", "histogram"))


def test_overrides_apply_on_top_of_file_and_defaults(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", "training:\n  epochs: 3\n")
    config = load_config(path, ["optimizers.kfrob.lr=1e-3", "training.target=null"])
    assert config.training.epochs == 3 and config.training.target is None
    assert config.optimizers["kfrob"] == {"lr": 0.001}  # a float, not the string "1e-3"
    assert set(config.optimizers) == {"kfrob", "sgd", "adamw"}
    with pytest.raises(ValueError, match=r"expected dotted\.key=value"):
        load_config(None, ["training.epochs"])


def test_overrides_may_be_spelled_as_options(tmp_path: Path, capsys) -> None:
    from kfrob.job.cli import _dotted_options

    argv = ["train", "--training.epochs", "3", "--optimizers.kfrob.lr=1e-2", "--logdir", "x"]
    assert _dotted_options(argv) == [
        "train",
        "training.epochs=3",
        "optimizers.kfrob.lr=1e-2",
        "--logdir",
        "x",
    ]
    # the same errors as key=value: the key is named
    assert main(["train", "--logdir", str(tmp_path), "--training.epoch", "3"]) == 2
    assert "unknown key 'training.epoch'; did you mean 'epochs'?" in capsys.readouterr().err


def test_yaml_reads_exponent_numbers_as_floats() -> None:
    assert parse_yaml("a: 1e-3\nb: 2E5\nc: 3\nd: '1e-3'") == {
        "a": 1e-3,
        "b": 2e5,
        "c": 3,
        "d": "1e-3",
    }


def test_bad_hyperparameter_fails_before_training(tmp_path: Path, capsys) -> None:
    code = main(["train", "--logdir", str(tmp_path), "optimizers.kfrob.damping=-1"])
    assert code == 2
    assert "optimizers.kfrob: invalid damping=-1" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was started
    code = main(["compare", "--logdir", str(tmp_path), "optimizers.sgd.lr=-1"])
    assert code == 2 and "optimizers.sgd" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["train", "--logdir", str(tmp_path), "--device", "cuda"]) == 2
    assert "no CUDA device is available" in capsys.readouterr().err


# --- training, checkpoints, resumption -------------------------------------------------------


def final_parameters(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / CHECKPOINT, weights_only=True)["model"]


@pytest.mark.parametrize(("optimizer", "stop"), [("kfrob", 3), ("sgd", 3), ("sgd", 4)])
def test_resume_takes_exactly_the_uninterrupted_steps(
    tmp_path: Path, tiny_data, optimizer: str, stop: int
) -> None:
    config = load_config(None, [*TINY, "optimizers.sgd.momentum=0.9"])
    straight = train(config, optimizer, tmp_path / "a", progress=False, data=tiny_data)
    # stop mid-epoch (step 3 of 4 per epoch) or at the epoch's end, then resume with the
    # step limit lifted
    limit = f"training.max_steps={stop}"
    first = load_config(None, [*TINY, "optimizers.sgd.momentum=0.9", limit])
    stopped = train(first, optimizer, tmp_path / "b", progress=False, data=tiny_data)
    assert stopped.steps == stop
    resumed = train(config, optimizer, tmp_path / "b", resume=True, progress=False, data=tiny_data)
    assert resumed.steps == straight.steps == 8
    a, b = final_parameters(tmp_path / "a"), final_parameters(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.final["test_loss"] == straight.final["test_loss"]
    assert resumed.final["train_loss"] == straight.final["train_loss"]


class StopAfter:
    """Stands in for the Ctrl-C handler: "interrupted" from the ``checks``-th check on."""

    def __init__(self, checks: int) -> None:
        self.left = checks

    @contextmanager
    def installed(self) -> Iterator[StopAfter]:
        yield self

    @property
    def requested(self) -> bool:
        self.left -= 1
        return self.left < 0


@pytest.mark.parametrize("how", ["path", "latest"])
def test_resume_remembers_the_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, how: str
) -> None:
    # the config says 2 epochs (8 steps); the run was started with 3 (12 steps) and sgd
    monkeypatch.setattr("kfrob.job.training.Interrupt", lambda: StopAfter(5))
    args = ["train", "--logdir", str(tmp_path), "--no-progress", "--optimizer", "sgd"]
    assert main([*args, *TINY, "training.epochs=3", "optimizers.sgd.lr=0.02"]) == 130
    run_dir = tmp_path / "mlp-sgd" / "version_0"
    err = capsys.readouterr().err
    assert f"--resume {run_dir}" in err
    saved = torch.load(run_dir / CHECKPOINT, weights_only=True)
    assert saved["step"] == 5
    assert load_config(run_dir / "config.yaml").training.epochs == 3
    monkeypatch.undo()
    if how == "path":  # exactly the printed hint: no config, no overrides, no --optimizer
        assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    else:
        assert main(["train", "--logdir", str(tmp_path), "--optimizer", "sgd", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "sgd: resumed at step 5 of 12" in out
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == 12
    assert load_config(run_dir / "config.yaml").optimizers["sgd"]["lr"] == 0.02
    # overrides on the resuming command line apply on top, and are remembered in turn
    more = ["train", "--resume", str(run_dir), "--no-progress", "training.epochs=4"]
    assert main(more) == 0
    assert "resumed at step 12 of 16" in capsys.readouterr().out
    assert load_config(run_dir / "config.yaml").training.epochs == 4
    # ... but not a change that would make it another run
    assert main(["train", "--resume", str(run_dir), "optimizers.sgd.lr=0.5"]) == 2
    assert "optimizers.sgd.lr (0.02 -> 0.5)" in capsys.readouterr().err
    assert load_config(run_dir / "config.yaml").optimizers["sgd"]["lr"] == 0.02


def test_compare_resume_remembers_overrides_and_optimizers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setattr("kfrob.job.training.Interrupt", lambda: StopAfter(3))
    args = ["compare", "--logdir", str(tmp_path), "--no-progress", *TINY]
    assert main([*args, "--optimizers", "sgd,adamw", "training.epochs=3"]) == 130
    run_dir = tmp_path / "compare-mlp" / "version_0"
    assert f"--resume {run_dir}" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["compare", "--resume", str(run_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "sgd: resumed at step 3 of 12" in out and "| adamw |" in out and "| kfrob |" not in out
    report = json.loads((run_dir / "comparison.json").read_text())
    assert {name: run["steps"] for name, run in report["runs"].items()} == {"sgd": 12, "adamw": 12}


def test_resume_of_a_missing_run_directory_is_an_error(tmp_path: Path, capsys) -> None:
    assert main(["compare", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no run directory" in capsys.readouterr().err


def test_resume_refuses_a_changed_config(tmp_path: Path, tiny_data) -> None:
    config = load_config(None, [*TINY, "training.max_steps=2"])
    train(config, "sgd", tmp_path, progress=False, data=tiny_data)
    changed = load_config(None, [*TINY, "optimizers.sgd.lr=0.5"])
    with pytest.raises(ValueError, match=r"optimizers\.sgd\.lr"):
        train(changed, "sgd", tmp_path, resume=True, progress=False, data=tiny_data)
    with pytest.raises(FileExistsError, match="--resume"):
        train(config, "sgd", tmp_path, progress=False, data=tiny_data)


def test_same_initial_model_and_batches_for_every_optimizer(tmp_path: Path, tiny_data) -> None:
    # learning rate 0: the parameters never move, so equal histories mean equal
    # initialisation and equal batches
    config = load_config(None, [*TINY, "optimizers={sgd: {lr: 0.0}, adam: {lr: 0.0}}"])
    runs = [
        train(config, name, tmp_path / name, progress=False, data=tiny_data)
        for name in ("sgd", "adam")
    ]
    strip = [[{k: v for k, v in e.items() if k != "seconds"} for e in r.history] for r in runs]
    assert strip[0] == strip[1] and len(strip[0]) >= 4


@pytest.mark.parametrize("optimizer", ["kfrob", "adamw"])
def test_warm_up_does_not_change_the_run(tmp_path: Path, tiny_data, optimizer: str) -> None:
    runs = []
    for warmup in (0, 5):
        config = load_config(None, [*TINY, f"training.warmup_steps={warmup}"])
        run_dir = tmp_path / str(warmup)
        runs.append(train(config, optimizer, run_dir, progress=False, data=tiny_data))
    a, b = final_parameters(tmp_path / "0"), final_parameters(tmp_path / "5")
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = [[{k: v for k, v in e.items() if k != "seconds"} for e in r.history] for r in runs]
    assert strip[0] == strip[1]


def test_comparison_says_how_the_time_was_taken(tmp_path: Path, tiny_data) -> None:
    from kfrob.job.compare import compare

    config = load_config(None, [*TINY, "training.warmup_steps=3"])
    compare(config, ["sgd"], tmp_path, progress=False)
    text = (tmp_path / "comparison.md").read_text()
    assert "after 3 untimed warm-up steps of each optimizer" in text
    assert "excludes evaluation (every 2 steps)" in text
    report = json.loads((tmp_path / "comparison.json").read_text())
    assert report["timing"] in text


def test_tensorboard_event_file_has_the_tags(tmp_path: Path, tiny_data) -> None:
    config = load_config(None, TINY)
    train(config, "kfrob", tmp_path, progress=False, data=tiny_data)
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ("train/loss", "train/accuracy", "train/lr", "train/step_time"):
        assert tag in tags["scalars"]
    assert {"test/loss", "test/accuracy"} <= set(tags["scalars"])
    layers = ("fc1", "fc2", "fc3")  # the Linear layers of the MLP, by name
    for layer in layers:
        for quantity in ("update_norm", "update_norm_metric", "damping", "cond_A", "cond_G"):
            assert f"kfrob/{layer}/{quantity}" in tags["scalars"]
        for side in ("A", "G"):
            assert f"eigenvalues/{layer}/{side}" in tags["histograms"]
    assert "kfrob/kl_clip_factor" in tags["scalars"]
    # a histogram at each inverse refresh: steps 1, 4, 7 (every 3 steps)
    assert [e.step for e in events.Histograms("eigenvalues/fc1/A")] == [1, 4, 7]
    assert "_hparams_/experiment" in events.PluginTagToContent("hparams")
    assert "hparam/test_accuracy" in tags["scalars"]


def test_result_json_and_target(tmp_path: Path, tiny_data) -> None:
    config = load_config(None, [*TINY, "training.target={metric: train_loss, value: 100.0}"])
    result = train(config, "adamw", tmp_path, progress=False, data=tiny_data)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["steps"] == 8 and saved["target_step"] == 2  # reached at the first evaluation
    assert [e["step"] for e in saved["history"]] == [2, 4, 6, 8]
    assert saved["history"][-1]["test_accuracy"] == result.final["test_accuracy"]


# --- the command line --------------------------------------------------------------------------


def test_cli_compare_writes_table_figure_and_json(tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path / "tiny.yaml", "workload: mlp\ntraining:\n  seed: 3\n")
    out = tmp_path / "out"
    args = ["compare", "--config", str(config), "--logdir", str(tmp_path / "runs")]
    code = main([*args, "--optimizers", "kfrob,sgd", "--out", str(out), "--no-progress", *TINY])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| kfrob |" in printed and "| sgd |" in printed and "steps to test_accuracy" in printed
    report = json.loads((out / "comparison.json").read_text())
    assert set(report["runs"]) == {"kfrob", "sgd"}
    assert report["runs"]["kfrob"]["steps"] == report["runs"]["sgd"]["steps"] == 8
    png = (out / "comparison.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.image

    assert matplotlib.image.imread(out / "comparison.png").shape[0] > 300
    assert (out / "comparison.md").read_text().startswith("| optimizer |")
    assert f"`kfrob compare --config {config} " in (out / "comparison.md").read_text()
    assert report["command"].startswith("kfrob compare --config")
    # a second comparison gets a new run directory; --resume finds the finished one
    assert main([*args, "--optimizers", "sgd", "--no-progress", *TINY]) == 0
    runs = sorted(p.name for p in (tmp_path / "runs" / "compare-mlp").iterdir())
    assert runs == ["version_0", "version_1"]
    assert main([*args, "--optimizers", "sgd", "--resume", "--no-progress", *TINY]) == 0


def test_python_dash_m_kfrob_is_the_command() -> None:
    run = [sys.executable, "-m", "kfrob"]
    done = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("usage: kfrob ")
    assert "example:" in done.stdout and "train" in done.stdout and "compare" in done.stdout
    done = subprocess.run([*run, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("kfrob 0.")
    done = subprocess.run([*run, "train", "--bogus"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "unrecognized arguments: --bogus" in done.stderr


@pytest.mark.parametrize("command", ["train", "compare"])
def test_help_shows_defaults_and_an_example(
    command: str, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # no line breaks inside the phrases looked for
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "(default: runs)" in text and "(default: cpu)" in text
    assert f"example:\n  kfrob {command} " in text
    assert "dotted.key=value" in text


def test_ctrl_c_leaves_a_usable_checkpoint(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "kfrob.job.cli", "train", "--optimizer", "kfrob"]
    command += ["--logdir", str(tmp_path), "--no-progress", *TINY, "training.epochs=1000"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert process.stdout is not None
    assert "training on" in process.stdout.readline().decode()  # the handler is installed
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err.decode()
    assert "--resume" in err.decode()
    run_dir = tmp_path / "mlp-kfrob" / "version_0"
    saved = torch.load(run_dir / CHECKPOINT, weights_only=True)
    assert 0 < saved["step"] < 1000 * 4
    resume = [*command, "--resume", str(run_dir), f"training.max_steps={saved['step'] + 2}"]
    done = subprocess.run(resume, capture_output=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    assert torch.load(run_dir / CHECKPOINT, weights_only=True)["step"] == saved["step"] + 2


def test_full_data_is_downloaded_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kfrob.job.config import DataConfig
    from tests.test_data import fake_dataset

    monkeypatch.delenv("KFROB_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr("kfrob.data.SYSTEM_DIR", tmp_path / "nowhere")
    fetched = []

    def download(destination: Path | None = None) -> Path:  # stands in for the network
        cache = destination or tmp_path / "kfrob" / "fashion-mnist"
        cache.mkdir(parents=True)
        fake_dataset(cache)
        fetched.append(cache)
        return cache

    monkeypatch.setattr("kfrob.job.datasets.download_fashion_mnist", download)
    with pytest.raises(FileNotFoundError, match="--download"):
        load_data(DataConfig(source="full"))
    assert "embedded" in load_data(DataConfig(source="auto")).source
    assert not fetched
    data = load_data(DataConfig(source="full", download=True))
    assert fetched and str(fetched[0]) in data.source and len(data.x_train) == 6
    # a directory named explicitly is where a download goes
    mine = tmp_path / "mine"
    data = load_data(DataConfig(source="full", dir=str(mine), download=True))
    assert fetched[-1] == mine and str(mine) in data.source


@pytest.mark.parametrize("how", ["--data-dir", "data.dir", "KFROB_DATA"])
def test_explicit_data_dir_that_is_missing_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, how: str
) -> None:
    from tests.test_data import fake_dataset

    # a complete copy elsewhere on the search path must not be used instead
    monkeypatch.delenv("KFROB_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = tmp_path / "kfrob" / "fashion-mnist"
    cache.mkdir(parents=True)
    fake_dataset(cache)
    missing = tmp_path / "nonexistent"
    args = ["compare", "--logdir", str(tmp_path / "runs"), "--no-progress", *TINY]
    if how == "--data-dir":
        args += ["--data-dir", str(missing)]
    elif how == "data.dir":
        args += ["data.source=auto", f"data.dir={missing}"]
    else:
        monkeypatch.setenv("KFROB_DATA", str(missing))
        args += ["data.source=full"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{missing} (from " in err and "does not exist" in err
    assert "train-images-idx3-ubyte.gz" in err
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_data_dir_with_the_embedded_source_is_a_config_error() -> None:
    with pytest.raises(ValueError, match=r"data\.dir is set but data\.source is 'embedded'"):
        load_config(None, ["data.dir=/somewhere"])
    assert load_config(None, ["data.source=auto", "data.dir=/somewhere"]).data.dir


def test_batch_order_covers_each_epoch_and_resumes_anywhere() -> None:
    from kfrob.job.training import BatchOrder

    straight = BatchOrder(10, 4, seed=3)  # 3 steps an epoch, the last one short
    batches = [straight.indices(step) for step in range(9)]
    for epoch in range(3):
        seen = torch.cat(batches[3 * epoch : 3 * epoch + 3])
        assert sorted(seen.tolist()) == list(range(10))
    assert not torch.equal(batches[0], batches[3])  # a new permutation each epoch
    for stop in range(9):  # save after `stop` steps, resume in a fresh object
        first = BatchOrder(10, 4, seed=3)
        for step in range(stop):
            first.indices(step)
        resumed = BatchOrder(10, 4, seed=3)
        resumed.load_state_dict(first.state_dict())
        for step in range(stop, 9):
            assert torch.equal(resumed.indices(step), batches[step]), (stop, step)


# --- regularization ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["regularization.kind=lasso"], "regularization.kind: Input should be 'none'"),
        (["regularization.weight=-1"], "regularization.weight: Input should be greater"),
        (["regularization.layers=[fc1, conv9]"], r"regularization.layers: \['conv9'\] are not"),
        (["regularization.kind=metric_frobenius"], "optimizers \\['sgd', 'adamw'\\] do not"),
        (["regularization.every=0"], "regularization.every"),
    ],
)
def test_bad_regularization_names_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize("kind", ["nuclear_frobenius", "metric_frobenius", "hessian_trace"])
def test_regularization_trains_and_logs_the_penalty(tmp_path: Path, tiny_data, kind: str) -> None:
    """The penalty enters the loss that is differentiated (the run differs from the
    unregularized one), and TensorBoard gets its value and its share of the loss."""
    base = [*TINY, "training.max_steps=4", "optimizers={kfrob: {lr: 0.1}}"]
    regularized = [*base, f"regularization.kind={kind}", "regularization.weight=0.5",
                   "regularization.layers=[fc1, fc2]", "regularization.every=2"]  # fmt: skip
    plain = train(load_config(None, base), "kfrob", tmp_path / "plain", progress=False,
                  data=tiny_data)  # fmt: skip
    result = train(load_config(None, regularized), "kfrob", tmp_path / "reg", progress=False,
                   data=tiny_data)  # fmt: skip
    assert result.final["train_loss"] != plain.final["train_loss"]
    events = EventAccumulator(str(tmp_path / "reg"), size_guidance={"scalars": 0})
    events.Reload()
    share = [e.value for e in events.Scalars("train/penalty_share")]
    # (kfrob's factors, and with them the metric penalty, are zero before its first step)
    assert share and all(0 <= v < 1 for v in share) and share[-1] > 0
    assert events.Scalars("train/penalty")[-1].value > 0


def test_kfrob_train_takes_the_regularization_section(tmp_path: Path, capsys) -> None:
    args = ["train", "--logdir", str(tmp_path), "--optimizer", "kfrob", "--no-progress"]
    reg = ["regularization.kind=nuclear", "regularization.weight=0.01", "training.max_steps=2"]
    assert main([*args, *TINY, *reg]) == 0
    saved = (next(tmp_path.rglob("config.yaml"))).read_text()
    assert "kind: nuclear" in saved  # the run remembers it, for --resume
    assert main([*args, *TINY, "regularization.kind=nuclear", "regularization.layers=[x]"]) == 2
    assert "regularization.layers: ['x'] are not layers" in capsys.readouterr().err
