"""Plots from loss_log.csv: what each panel draws, the `caft plot` command and a missing matplotlib."""

from __future__ import annotations

import logging
import math
import sys
from types import SimpleNamespace

import pytest

from caft.cli import main
from caft.plots import draw_figures, plot_run, plot_run_safely, read_loss_log, series
from caft.trainer import CAFTSaveLogging

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_log(run_dir, num_heads: int = 2) -> None:
    """Write loss_log.csv through the real logging callback: eval before, 3 train steps, eval at 2, final summary."""
    callback = CAFTSaveLogging()
    args = SimpleNamespace(output_dir=str(run_dir))

    def log(step, logs):
        state = SimpleNamespace(is_world_process_zero=True, global_step=step, epoch=step / 3)
        callback.on_log(args, state, None, logs=logs)

    def eval_logs(scale):
        logs = {"eval_loss": 2.0 * scale, "eval_real_eval_loss": 9.0 * scale, "eval_runtime": 1.5,
                "eval_loss_by_head": [2.0 * scale] * (num_heads + 1)}
        for k in range(num_heads + 1):
            logs[f"eval_loss_head_{k}"] = (2.0 + k) * scale
            logs[f"eval_acc_head_{k}"] = 0.5 / (k + 1)
        return logs

    log(0, eval_logs(1.0))
    for step in (1, 2, 3):
        logs = {"loss": 3.0 - step * 0.5, "grad_norm": 1.0, "learning_rate": 1e-4}
        for k in range(num_heads + 1):
            logs[f"loss_head_{k}"] = 3.0 + k - step * 0.1
            logs[f"acc_head_{k}"] = 0.1 * step / (k + 1)
        log(step, logs)
        if step == 2:
            log(step, eval_logs(0.9))
    log(3, {"train_runtime": 12.0, "train_loss": 2.0, "train_samples_per_second": 1.0})


def lines_by_label(axis) -> dict[str, tuple[list, list]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axis.get_lines()}


def test_panels_draw_logged_values(tmp_path):
    write_log(tmp_path, num_heads=2)
    rows = read_loss_log(tmp_path / "loss_log.csv")
    figures = draw_figures(rows, "run")
    assert sorted(figures) == ["head_accuracy.png", "head_loss.png", "loss.png"]

    loss_panels = [axis for axis in figures["loss.png"].axes if axis.get_visible()]
    assert len(loss_panels) == 2  # total loss, real_eval_loss
    total = lines_by_label(loss_panels[0])
    assert total["train"] == ([1.0, 2.0, 3.0], [2.5, 2.0, 1.5])
    assert total["eval"][0] == [0.0, 2.0]
    assert total["eval"][1] == pytest.approx([2.0, 1.8])
    assert lines_by_label(loss_panels[1])["eval"][1] == pytest.approx([9.0, 8.1])

    head_panels = [axis for axis in figures["head_loss.png"].axes if axis.get_visible()]
    assert [axis.get_title() for axis in head_panels] == ["head 0", "head 1", "head 2"]
    head_2 = lines_by_label(head_panels[2])
    assert head_2["train"][1] == pytest.approx([4.9, 4.8, 4.7])
    assert head_2["eval"][1] == pytest.approx([4.0, 3.6])
    accuracy_panels = [axis for axis in figures["head_accuracy.png"].axes if axis.get_visible()]
    assert lines_by_label(accuracy_panels[1])["train"][1] == pytest.approx([0.05, 0.1, 0.15])


def test_series_skips_summary_and_nan(tmp_path):
    write_log(tmp_path)
    rows = read_loss_log(tmp_path / "loss_log.csv")
    rows.append({"split": "train", "step": 4.0, "loss": math.nan})
    steps, values = series(rows, "train", "loss")
    assert steps == [1.0, 2.0, 3.0]
    assert all(math.isfinite(value) for value in values)


def test_plot_command_writes_pngs(tmp_path, capsys):
    write_log(tmp_path)
    (tmp_path / "heads_pretraining").mkdir()
    write_log(tmp_path / "heads_pretraining", num_heads=1)
    assert main(["plot", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    expected = [tmp_path / name for name in ("loss.png", "head_loss.png", "head_accuracy.png")]
    expected += [tmp_path / "heads_pretraining" / name for name in ("loss.png", "head_loss.png", "head_accuracy.png")]
    assert printed == [str(path) for path in expected]
    for path in expected:
        assert path.read_bytes()[:8] == PNG_MAGIC


def test_plot_command_missing_log(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "loss_log.csv not found" in capsys.readouterr().err


def test_bad_value_names_line_and_column(tmp_path):
    (tmp_path / "loss_log.csv").write_text("step,epoch,split,loss\n1,0.5,train,abc\n")
    with pytest.raises(ValueError, match=r"line 2: invalid value 'abc' in column loss"):
        plot_run(tmp_path)


def test_missing_matplotlib_is_clear(tmp_path, capsys, monkeypatch, caplog):
    write_log(tmp_path)
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)

    assert main(["plot", str(tmp_path)]) == 2
    assert "pip install 'caft[plots]'" in capsys.readouterr().err
    with caplog.at_level(logging.WARNING, logger="caft.plots"):
        assert plot_run_safely(tmp_path) == []
    assert "pip install 'caft[plots]'" in caplog.text
    assert not list(tmp_path.glob("*.png"))
