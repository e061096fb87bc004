"""The transformer workload: the byte corpus and its split, the byte windows, the GPT, and
``kfrob train`` / ``kfrob compare`` on a tiny config. Nothing is downloaded: the corpus is
the interpreter's standard library or a temporary folder of text files."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("yaml")
pytest.importorskip("pydantic")
pytest.importorskip("tensorboard")

from kfrob.job.cli import main
from kfrob.job.config import load_config
from kfrob.job.datasets import TextDataset, load_data
from kfrob.job.training import CHECKPOINT, train
from kfrob.job.transformer import transformer
from kfrob.text import corpus_files, in_validation, load_corpus, stdlib_dir, windows

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "transformer.yaml"
TINY_MODEL = ["model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.context=16"]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 small text files in two folders, and a hidden one that is not read."""
    root = tmp_path_factory.mktemp("text")
    for i in range(40):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(exist_ok=True)
        lines = "".join(f"def f_{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(20))
        (folder / f"file{i:02d}.txt").write_text(lines)
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret.txt").write_text("never read")
    return root


def tiny(text_dir: Path, *extra: str) -> list[str]:
    """Overrides for configs/transformer.yaml: the tiny model on ``text_dir``, 4 steps."""
    return [
        "data.source=files", f"data.dir={text_dir}", "data.val_windows=8", *TINY_MODEL,
        "training.batch_size=4", "training.max_steps=4", "training.max_seconds=null",
        "training.eval_every=2", "training.warmup_steps=0", "logging.log_every=2", *extra,
    ]  # fmt: skip


# --- the corpus ----------------------------------------------------------------------------


def test_split_is_by_file_deterministic_and_skips_hidden_files(text_dir: Path) -> None:
    first, second = load_corpus(text_dir), load_corpus(text_dir)
    assert first.train_files == second.train_files and first.val_files == second.val_files
    assert torch.equal(first.train, second.train) and torch.equal(first.val, second.val)
    assert not set(first.train_files) & set(first.val_files)
    everything = sorted(first.train_files + first.val_files)
    assert everything == corpus_files(text_dir) and len(everything) == 40
    assert first.val_files  # never an empty split
    # the bytes are the files' bytes, in reading order
    expected = b"".join((text_dir / f).read_bytes() for f in first.train_files)
    assert bytes(first.train.tolist()) == expected


def test_caps_cut_each_split(text_dir: Path) -> None:
    corpus = load_corpus(text_dir, train_bytes=1000, val_bytes=300)
    assert (len(corpus.train), len(corpus.val)) == (1000, 300)
    assert corpus.train_files == load_corpus(text_dir).train_files[: len(corpus.train_files)]


def test_stdlib_split_holds_out_a_stable_few_percent_of_files() -> None:
    files = corpus_files(stdlib_dir(), "*.py")
    held_out = [f for f in files if in_validation(f)]
    assert files and all(f.endswith(".py") and "site-packages" not in f for f in files)
    assert 0.04 < len(held_out) / len(files) < 0.12
    corpus = load_corpus(train_bytes=20_000, val_bytes=5_000)
    assert (len(corpus.train), len(corpus.val)) == (20_000, 5_000)
    assert not set(corpus.train_files) & set(corpus.val_files)
    assert set(corpus.val_files) <= set(held_out)
    assert "standard library" in corpus.source


def test_a_folder_with_one_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "only.txt").write_text("x" * 100)
    with pytest.raises(ValueError, match="at least two"):
        load_corpus(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(tmp_path / "missing")


# --- batches -------------------------------------------------------------------------------


def test_batches_are_byte_windows_with_targets_shifted_by_one(text_dir: Path) -> None:
    config = load_config(CONFIG, tiny(text_dir))
    data = load_data(config.data, config.model.context)
    assert isinstance(data, TextDataset) and str(text_dir) in data.source
    order = data.order(batch_size=4, seed=0)
    starts = order.indices(3)
    x, y = data.batch(starts)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    for row, start in zip(x, starts.tolist(), strict=True):
        assert row.tolist() == data.train[start : start + 16].tolist()
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y[:, -1], data.train[starts + 16].long())
    # the same seed draws the same windows, from any step on (nothing to restore on resume)
    again = data.order(batch_size=4, seed=0)
    assert torch.equal(again.indices(3), starts) and torch.equal(again.indices(0), order.indices(0))
    assert not torch.equal(data.order(4, seed=1).indices(3), starts)
    # validation: fixed windows, shifted the same way
    assert data.x_val.shape == data.y_val.shape and data.x_val.shape[1] == 16
    assert torch.equal(data.x_val[:, 1:], data.y_val[:, :-1])


def test_windows_reach_the_last_byte() -> None:
    stream = torch.arange(10, dtype=torch.uint8)
    x, y = windows(stream, torch.tensor([0, 6]), 3)
    assert x.tolist() == [[0, 1, 2], [6, 7, 8]] and y.tolist() == [[1, 2, 3], [7, 8, 9]]


# --- the model -----------------------------------------------------------------------------


def test_output_shape_layer_names_and_initial_loss() -> None:
    torch.manual_seed(0)
    model = transformer(d_model=32, n_layers=2, n_heads=4, context=24)
    idx = torch.randint(256, (3, 24))
    logits = model(idx)
    assert logits.shape == (3, 24, 256)
    loss = F.cross_entropy(logits.reshape(-1, 256), torch.randint(256, (3 * 24,)))
    assert abs(loss.item() - math.log(256)) < 0.05
    names = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    assert {"blocks.0.attn.qkv", "blocks.1.attn.proj", "blocks.0.mlp.fc", "head"} <= names
    with pytest.raises(ValueError, match="context is 24"):
        model(torch.zeros(1, 25, dtype=torch.long))


def test_attention_is_causal() -> None:
    torch.manual_seed(0)
    model = transformer(d_model=32, n_layers=2, n_heads=4, context=16).eval()
    idx = torch.randint(256, (2, 16))
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 256
    before, after = model(idx), model(changed)
    assert torch.equal(before[:, :9], after[:, :9])  # earlier positions cannot see byte 9
    assert not torch.allclose(before[:, 9:], after[:, 9:])


def test_tied_head_shares_the_token_embedding() -> None:
    model = transformer(d_model=16, n_layers=1, n_heads=2, context=8, tied=True)
    assert model.head.weight is model.tokens.weight
    assert transformer(d_model=16, n_layers=1, n_heads=2, context=8).head.weight.shape == (256, 16)


# --- the job -------------------------------------------------------------------------------


def test_tiny_config_trains_end_to_end_and_resumes_identically(
    tmp_path: Path, text_dir: Path
) -> None:
    target = "training.target={metric: val_loss, value: 100.0}"
    config = load_config(CONFIG, tiny(text_dir, target))
    result = train(config, "kfrob", tmp_path / "straight", progress=False)
    saved = json.loads((tmp_path / "straight" / "result.json").read_text())
    assert saved["steps"] == 4 and [e["step"] for e in saved["history"]] == [2, 4]
    assert set(saved["final"]) == {"train_loss", "val_loss", "seconds"}
    assert saved["final"]["val_loss"] == result.final["val_loss"] < math.log(256) + 0.1
    assert saved["target_step"] == 2  # reached at the first evaluation
    assert "test_loss" not in saved["history"][0]
    # two steps, then resumed to four: the same windows, losses and model
    half = load_config(CONFIG, tiny(text_dir, target, "training.max_steps=2"))
    train(half, "kfrob", tmp_path / "resumed", progress=False)
    again = train(config, "kfrob", tmp_path / "resumed", resume=True, progress=False)
    assert [e["val_loss"] for e in again.history] == [e["val_loss"] for e in result.history]
    straight = torch.load(tmp_path / "straight" / CHECKPOINT, weights_only=True)["model"]
    resumed = torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=True)["model"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_time_budget_stops_after_the_step_that_crosses_it(tmp_path: Path, text_dir: Path) -> None:
    budget = ["training.max_steps=null", "training.max_seconds=1e-6"]
    config = load_config(CONFIG, tiny(text_dir, *budget))
    result = train(config, "adamw", tmp_path, progress=False)
    assert result.steps == 1 and [e["step"] for e in result.history] == [1]
    assert (tmp_path / CHECKPOINT).is_file()


def test_cli_compare_with_data_dir_writes_the_table(
    tmp_path: Path, text_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = [o for o in tiny(text_dir) if not o.startswith(("data.source", "data.dir"))]
    args = ["compare", "--config", str(CONFIG), "--no-progress"]
    args += ["--logdir", str(tmp_path), "--optimizers", "kfrob,adamw", "--data-dir", str(text_dir)]
    assert main([*args, *overrides]) == 0
    out = capsys.readouterr().out
    assert "| val loss (nats/byte) |" in out and "steps to val_loss ≤" in out
    run_dir = tmp_path / "compare-transformer" / "version_0"
    assert (run_dir / "comparison.png").is_file()
    report = json.loads((run_dir / "comparison.json").read_text())
    assert report["config"]["data"]["source"] == "files"  # --data-dir switched it
    assert all("val_loss" in run["final"] for run in report["runs"].values())


# --- the config ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["workload=transformer", "data.source=stdlib"],
            "'test_accuracy' is not measured on text; workload 'transformer' reports "
            "'train_loss' or 'val_loss'",
        ),
        (
            ["training.target={metric: val_loss, value: 2.0}"],
            "'val_loss' is not measured on images; workload 'mlp' reports",
        ),
        (["workload=transformer"], "data.source: 'embedded' is not a source of text"),
        (["data.source=stdlib"], "data.source: 'stdlib' is not a source of images"),
        (["model.d_model=32"], "model: not used by workload 'mlp'"),
        (["data.train_bytes=1000"], "data.train_bytes: not used by workload 'mlp'"),
        (["model.d_model=30", "model.n_heads=4"], "must be a multiple of model.n_heads"),
        (
            [
                "workload=transformer",
                "data.source=stdlib",
                "training.target=null",
                "regularization.kind=geometric_complexity",
            ],
            "'geometric_complexity' is not available for workload 'transformer': it differentiates",
        ),
    ],
)
def test_config_rejects_what_does_not_fit_the_workload(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_transformer_config_defaults_and_errors(tmp_path: Path) -> None:
    config = load_config(CONFIG)
    assert config.data.source == "stdlib" and config.training.target.metric == "val_loss"
    assert list(config.optimizers) == ["kfrob", "kfrob-sgd", "sgd", "adamw"]
    bare = tmp_path / "bare.yaml"  # the source follows the workload when left out
    bare.write_text("workload: transformer\ntraining:\n  target: null\n")
    assert load_config(bare).data.source == "stdlib"
    problems = {
        "data.dir=/somewhere": "set data.source to 'files'",
        "data.source=files": "reads the files under data.dir; set data.dir",
        "data.train_size=10": "data.train_size: not used by workload 'transformer'",
    }
    for override, message in problems.items():
        with pytest.raises(ValueError, match=message):
            load_config(CONFIG, [override])


def test_example_runs(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import runpy

    threads = torch.get_num_threads()
    argv = ["transformer", "--steps", "4", "--eval-every", "2", "--train-bytes", "20000"]
    monkeypatch.setattr(sys, "argv", argv)
    try:
        runpy.run_path(str(ROOT / "examples" / "transformer.py"), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    assert "step 4: validation" in capsys.readouterr().out
