"""The CAFT vs next-token report: means, spreads and paired differences from finished evaluations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def experiment():
    return load_script("experiments/caft_vs_ntp.py")


def write_result(work_dir: Path, run: str, eval_task: str, values: dict) -> None:
    folder = work_dir / "gsm8k" / run / "eval" / eval_task
    folder.mkdir(parents=True)
    (folder / "eval_results.json").write_text(json.dumps({"num_examples": 10, **values}))


def test_report_three_modes(experiment, tmp_path):
    losses = {"default": (1.0, 1.2), "caft": (0.9, 1.3), "caft-second": (0.8, 1.0)}
    for mode, per_seed in losses.items():
        for seed, loss in enumerate(per_seed):
            write_result(tmp_path / "work", f"{mode}-seed{seed}", "loss", {"loss": loss})
    write_result(tmp_path / "work", "base", "loss", {"loss": 2.0})

    code = experiment.main([
        "--tasks", "gsm8k", "--work-dir", str(tmp_path / "work"), "--docs", str(tmp_path / "docs"), "--report-only",
        "--second-heads", "distilled/heads", "--second-heads-label", "CAFT LoRA, distilled heads",
    ])

    report = (tmp_path / "docs" / "results.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| held-out answer loss"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert code == 0
    assert cells[2] == "2.0000"
    assert cells[3] == "1.1000 ± 0.1414"
    assert cells[4] == "1.1000 ± 0.2828"
    assert cells[5] == "0.9000 ± 0.1414"
    assert cells[6] == "+0.00000 ± 0.14142"
    assert cells[7] == "-0.20000 ± 0.00000"
    assert cells[8] == "0, 1"
    assert "seed 0: 1.0000 / 0.9000 / 0.8000" in report
    assert (tmp_path / "docs" / "img" / "caft_vs_ntp_gsm8k.png").is_file()


def test_report_keeps_other_text(experiment, tmp_path):
    write_result(tmp_path / "work", "default-seed0", "loss", {"loss": 1.5})
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "results.md").write_text("# Results\n\nEarlier notes.\n\n## CAFT vs next-token\n\nIntro.\n\n## Later section\n\nKept.\n")

    experiment.main(["--tasks", "gsm8k", "--work-dir", str(tmp_path / "work"), "--docs", str(docs), "--report-only"])
    experiment.main(["--tasks", "gsm8k", "--work-dir", str(tmp_path / "work"), "--docs", str(docs), "--report-only"])

    report = (docs / "results.md").read_text()
    assert report.count("<!-- caft_vs_ntp gsm8k start -->") == 1
    assert report.index("Intro.") < report.index("<!-- caft_vs_ntp gsm8k start -->") < report.index("## Later section")
    assert "Earlier notes." in report
    assert report.rstrip().endswith("Kept.")
    assert "seed 0: 1.5000 / -" in report
