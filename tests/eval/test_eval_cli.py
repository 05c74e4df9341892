"""turbo-eval end to end: run, resume, report, bench and torchrun, on a tiny DINOv2 and real data."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("mlxtend")
pytest.importorskip("skimage")

from turbo_eval.cli import main  # noqa: E402
from turbo_eval.tasks import TASK_KINDS  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory) -> Path:
    import torch

    torch.manual_seed(0)
    config = transformers.Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=7,
        image_size=56,
    )
    model = transformers.Dinov2Model(config).eval()
    with torch.no_grad():  # sharper attention than the default init, so ranks differ
        for name, param in model.named_parameters():
            if name.endswith("weight") and param.dim() == 2:
                param.mul_(4.0)
    path = tmp_path_factory.mktemp("models") / "tiny-dinov2"
    model.save_pretrained(path)
    return path


def write_suite(folder: Path, model: Path) -> Path:
    suite = folder / "suite.toml"
    suite.write_text(
        textwrap.dedent(f"""\
        [suite]
        name = "tiny"
        batch_size = 8
        alpha = [1.0]
        semantic_scale = 30.0
        throughput_batch = 4
        throughput_repeats = 2

        [[models]]
        name = "{model}"
        resolution = 56
        r = [6]

        [[tasks]]
        kind = "knn"
        model = "{model}"
        dataset = "mnist"
        train_per_class = 3
        test_per_class = 2
        k = 3

        [[tasks]]
        kind = "fidelity"
        model = "{model}"
        max_images = 3
    """)
    )
    return suite


def cell_files(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}


def test_run_writes_every_cell_table_and_plot(tiny_dinov2, tmp_path, capsys):
    suite = write_suite(tmp_path, tiny_dinov2)
    out = tmp_path / "results"
    assert main(["run", str(suite), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "### " in printed and "Turbo α=1" in printed  # noqa: RUF001

    run = json.loads((out / "run.json").read_text())
    env = run["environment"]
    assert env["seed"] == 0 and env["torch_threads"] >= 1 and env["packages"]["torch"]
    assert {"git_commit", "cpu", "python"} <= set(env)
    assert run["suite"]["models"][0]["r"] == [6]

    rows = json.loads((out / "table.json").read_text())
    # 2 tasks x (baseline + redundancy + semantics + turbo)
    assert len(rows) == 8 and len(cell_files(out)) == 8
    assert {r["method"] for r in rows} == {"baseline", "redundancy", "semantics", "turbo"}
    for row in rows:
        if row["method"] == "baseline":
            assert row["delta"] == 0.0 and row["flops_ratio"] == pytest.approx(1.0)
        else:
            assert row["flops_ratio"] > 1.05  # r=6 of 64 patches per block, 2 blocks
            assert row["speedup"] > 0
    fidelity = {r["method"]: r["value"] for r in rows if r["task"] == "fidelity"}
    assert fidelity["baseline"] == pytest.approx(1.0, abs=1e-5)
    assert all(0.0 < v <= 1.0 + 1e-6 for v in fidelity.values())
    assert (out / "table.csv").read_text().count("\n") == 9

    # every cell keeps its per-item results; their mean is the headline metric
    cells = {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}
    for cell in cells.values():
        scores = cell["items"][cell["item_score"]]
        assert len(scores) == (20 if cell["task"] == "knn" else 3)  # 10 classes x 2; 3 photos
        assert sum(scores) / len(scores) == pytest.approx(cell["metrics"][cell["metric"]])
    knn = next(c for c in cells.values() if c["task"] == "knn" and c["method"] == "turbo")
    assert set(knn["items"]) == {"correct", "score"}
    assert all(0.0 <= v <= 1.0 for v in knn["items"]["score"])
    # the intervals: around the paired mean, vs ToMe for Turbo and semantics-only only
    for row in rows:
        if row["method"] == "baseline":
            assert row["delta_low"] is None and row["vs_tome"] is None
            continue
        assert row["delta_low"] <= row["delta"] + 1e-12 <= row["delta_high"] + 2e-12
        assert row["n_items"] == (20 if row["task"] == "knn" else 3)
        assert (row["vs_tome"] is None) == (row["method"] == "redundancy")
    # speed: one interleaved group per r, with the baseline in it
    speed = json.loads(next((out / "speed").glob("*knn*.json")).read_text())
    assert set(speed["timing"]["groups"]) == {"6"}
    assert len(speed["timing"]["groups"]["6"]["methods"]) == 4
    table = (out / "table.md").read_text()
    assert "Δ vs ToMe same r (pts)" in table and "paired items" in table
    from PIL import Image

    with Image.open(out / "pareto.png") as image:
        assert image.size[0] > 400


def test_results_are_deterministic_for_a_seed(tiny_dinov2, tmp_path):
    suite = write_suite(tmp_path, tiny_dinov2)
    metrics = []
    for name in ("a", "b"):
        main(["run", str(suite), "--out", str(tmp_path / name), "--no-progress"])
        metrics.append(
            {
                p.name: json.loads(p.read_text())["metrics"]
                for p in (tmp_path / name / "cells").glob("*.json")
            }
        )
    assert metrics[0] == metrics[1]


def test_interrupted_run_resumes_without_recomputing(tiny_dinov2, tmp_path, monkeypatch):
    suite = write_suite(tmp_path, tiny_dinov2)
    out = tmp_path / "results"
    fidelity = TASK_KINDS["fidelity"]
    original = fidelity.evaluate
    calls = {"n": 0}

    def flaky(self, progress):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the user pressed Ctrl-C during the third fidelity cell
        return original(self, progress)

    monkeypatch.setattr(fidelity, "evaluate", flaky)
    with pytest.raises(KeyboardInterrupt):
        main(["run", str(suite), "--out", str(out), "--no-progress"])
    done = cell_files(out)
    assert len(done) == 4 + 2  # all kNN cells, two fidelity cells

    monkeypatch.setattr(fidelity, "evaluate", original)
    evaluated = []
    knn = TASK_KINDS["knn"]
    knn_original = knn.evaluate
    monkeypatch.setattr(
        knn, "evaluate", lambda self, p: evaluated.append(1) or knn_original(self, p)
    )
    assert main(["run", str(suite), "--out", str(out), "--no-progress"]) == 0
    after = cell_files(out)
    assert len(after) == 8 and not evaluated  # kNN cells were all done: none recomputed
    assert all(after[name] == stamp for name, stamp in done.items())


def test_resume_refuses_a_different_suite(tiny_dinov2, tmp_path):
    suite = write_suite(tmp_path, tiny_dinov2)
    out = tmp_path / "results"
    main(["run", str(suite), "--out", str(out), "--no-progress"])
    suite.write_text(suite.read_text().replace("r = [6]", "r = [5]"))
    with pytest.raises(RuntimeError, match="different suite"):
        main(["run", str(suite), "--out", str(out), "--no-progress"])


def test_invalid_suite_reports_lines_before_loading(tmp_path, capsys):
    suite = tmp_path / "bad.toml"
    suite.write_text(
        '[suite]\nmethods = ["tome9"]\n[[models]]\nname = "x"\n'
        '[[tasks]]\nkind = "knn"\nmodel = "y"\n'
    )
    assert main(["run", str(suite), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "bad.toml:2: suite.methods" in err and "bad.toml:7: tasks[0].model" in err
    assert err.startswith("turbo-eval run: argument suite:")
    assert not (tmp_path / "o").exists()


def test_report_combines_runs(tiny_dinov2, tmp_path):
    suite = write_suite(tmp_path, tiny_dinov2)
    main(["run", str(suite), "--out", str(tmp_path / "one"), "--no-progress"])
    main(["run", str(suite), "--out", str(tmp_path / "two"), "--no-progress"])
    assert (
        main(
            [
                "report",
                str(tmp_path / "one"),
                str(tmp_path / "two"),
                "--out",
                str(tmp_path / "combined"),
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "combined" / "table.json").read_text())
    assert len(rows) == 16 and {Path(r["run"]).name for r in rows} == {"one", "two"}
    assert (tmp_path / "combined" / "table.md").read_text().count("### ") == 4


def test_bench_reports_flops_memory_and_throughput(tiny_dinov2, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "bench",
                str(tiny_dinov2),
                "--r",
                "0,8",
                "--batch",
                "2",
                "--repeats",
                "1",
                "--resolution",
                "56",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    figures = json.loads(out.read_text())
    configs = figures["configs"]
    assert set(configs) == {
        "unpatched",
        "turbo r=0",
        "redundancy r=0",
        "turbo r=8",
        "redundancy r=8",
    }
    assert configs["turbo r=0"]["flops_ratio"] == pytest.approx(1.0)
    assert configs["turbo r=8"]["flops_ratio"] > 1.1  # 2 blocks: 65 -> 57 -> 49 tokens
    assert configs["turbo r=8"]["tokens_after_last_block"] == 65 - 16
    assert configs["turbo r=8"]["peak_memory_bytes"] < configs["unpatched"]["peak_memory_bytes"]
    assert set(figures["turbo_over_redundancy"]) == {"r=0", "r=8"}
    assert all(ratio > 0 for ratio in figures["turbo_over_redundancy"].values())
    assert len(configs["turbo r=8"]["seconds"]) == 1  # one interleaved round
    assert "| turbo r=8 |" in capsys.readouterr().out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_equals_single_process(tiny_dinov2, tmp_path):
    suite = write_suite(tmp_path, tiny_dinov2)
    single, double = tmp_path / "single", tmp_path / "double"
    main(["run", str(suite), "--out", str(single), "--no-progress"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        "-m",
        "turbo_eval",
        "run",
        str(suite),
        "--out",
        str(double),
        "--no-progress",
    ]
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for path in (single / "cells").glob("*.json"):
        mine = json.loads(path.read_text())["metrics"]
        theirs = json.loads((double / "cells" / path.name).read_text())["metrics"]
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert theirs[key] == pytest.approx(mine[key], abs=1e-6), (path.name, key)
    assert (double / "table.md").is_file()


# --------------------------------------------------------------- hardening (issue 19)
def write_small_suite(
    folder: Path, model: Path, model_extra: str = "", name: str = "small"
) -> Path:
    """One fidelity task, baseline and Turbo at one r: the quickest real run."""
    suite = folder / "small.toml"
    suite.write_text(
        textwrap.dedent(f"""\
        [suite]
        name = "{name}"
        methods = ["baseline", "turbo"]
        alpha = [1.0]
        throughput_batch = 2
        throughput_repeats = 1

        [[models]]
        name = "{model}"
        resolution = 56
        r = [6]
        {model_extra}

        [[tasks]]
        kind = "fidelity"
        model = "{model}"
        max_images = 3
    """)
    )
    return suite


def test_overwrite_refuses_a_folder_turbo_eval_did_not_create(tiny_dinov2, tmp_path, capsys):
    suite = write_small_suite(tmp_path, tiny_dinov2)
    mine = tmp_path / "my-documents"
    (mine / "sub").mkdir(parents=True)
    (mine / "thesis.tex").write_text("years of work")
    (mine / "sub" / "data.csv").write_text("1,2")
    assert main(["run", str(suite), "--out", str(mine), "--overwrite", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and str(mine) in err and "not a results folder" in err, err
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert (mine / "sub" / "data.csv").is_file()
    assert sorted(p.name for p in mine.iterdir()) == ["sub", "thesis.tex"]  # nothing added


def test_overwrite_refuses_a_results_folder_holding_foreign_files(tiny_dinov2, tmp_path, capsys):
    suite = write_small_suite(tmp_path, tiny_dinov2)
    out = tmp_path / "results"
    assert main(["run", str(suite), "--out", str(out), "--no-progress"]) == 0
    (out / "notes.txt").write_text("mine")
    (out / "cells" / "keep.txt").write_text("mine too")
    capsys.readouterr()
    assert main(["run", str(suite), "--out", str(out), "--overwrite", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "notes.txt" in err and "keep.txt" in err, err
    assert (out / "notes.txt").is_file() and len(cell_files(out)) == 2


def test_overwrite_removes_a_results_folder_and_says_what(tiny_dinov2, tmp_path, capsys):
    suite = write_small_suite(tmp_path, tiny_dinov2)
    out = tmp_path / "results"
    assert main(["run", str(suite), "--out", str(out), "--no-progress"]) == 0
    before = cell_files(out)
    capsys.readouterr()
    assert main(["run", str(suite), "--out", str(out), "--overwrite", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"removed {out}" in printed and "2 cells" in printed and "run.json" in printed, printed
    after = cell_files(out)
    assert after.keys() == before.keys()
    assert all(after[name] > stamp for name, stamp in before.items())  # recomputed


def test_results_store_writes_nothing_outside_its_folder(tmp_path):
    from turbo_eval.results import ResultStore

    store = ResultStore(tmp_path / "out")
    for key in ("../../escape", "/tmp/escape", "a/../../../escape"):
        with pytest.raises(ValueError, match="not a plain file name in the results folder"):
            store.write_cell(key, {"x": 1})
    with pytest.raises(ValueError, match="not a plain file name in the results folder"):
        store.write_speed("m", "../../../escape", {"x": 1})
    assert not (tmp_path / "escape.json").exists()
    assert not list(tmp_path.rglob("escape*"))


def test_trust_remote_code_needs_the_command_line_flag(tiny_dinov2, tmp_path, capsys):
    suite = write_small_suite(tmp_path, tiny_dinov2, "trust_remote_code = true")
    out = tmp_path / "o"
    assert main(["run", str(suite), "--validate-only"]) == 0
    printed = capsys.readouterr().out
    assert "trust_remote_code" in printed and str(tiny_dinov2) in printed, printed
    assert "--trust-remote-code" in printed
    assert main(["run", str(suite), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "trust_remote_code" in err and "--trust-remote-code" in err and str(tiny_dinov2) in err
    assert not out.exists()
    assert main(["run", str(suite), "--validate-only", "--trust-remote-code"]) == 0


def test_quick_with_a_suite_file_is_refused(tiny_dinov2, tmp_path, capsys):
    suite = write_small_suite(tmp_path, tiny_dinov2)
    out = tmp_path / "o"
    assert main(["run", str(suite), "--quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--quick" in err and "suite file" in err, err
    assert not out.exists()


def test_resume_does_not_depend_on_how_the_suite_path_is_spelled(
    tiny_dinov2, tmp_path, monkeypatch
):
    suite = write_small_suite(tmp_path, tiny_dinov2)
    out = tmp_path / "results"
    assert main(["run", str(suite), "--out", str(out), "--no-progress"]) == 0
    done = cell_files(out)
    monkeypatch.chdir(tmp_path)
    assert main(["run", "small.toml", "--out", "results", "--no-progress"]) == 0
    assert cell_files(out) == done  # resumed: nothing recomputed


def test_random_weights_are_created_under_the_suite_seed():
    import torch

    from turbo_eval.models import load_model

    states = []
    for noise in (1, 2):
        torch.manual_seed(noise)  # whatever the global generator holds before
        module = load_model("test_vit", 32, {}, seed=7).module
        states.append({k: v.clone() for k, v in module.state_dict().items()})
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    other = load_model("test_vit", 32, {}, seed=8).module.state_dict()
    assert not all(torch.equal(states[0][k], other[k]) for k in states[0])


def test_random_weight_runs_repeat_whatever_the_generator_held(tmp_path):
    import torch

    suite = tmp_path / "timm.toml"
    suite.write_text(
        textwrap.dedent("""\
        [suite]
        name = "timm-random"
        methods = ["baseline"]
        throughput_batch = 2
        throughput_repeats = 1

        [[models]]
        name = "test_vit"
        resolution = 32
        r = [1]

        [[tasks]]
        kind = "fidelity"
        model = "test_vit"
        max_images = 2
    """)
    )
    runs = []
    for noise in (1, 2):
        torch.manual_seed(noise)  # what the generator holds when the run starts
        out = tmp_path / f"run{noise}"
        assert main(["run", str(suite), "--out", str(out), "--no-progress"]) == 0
        runs.append(json.loads((out / "run.json").read_text())["weights"]["test_vit"])
    assert runs[0] == runs[1]


def test_resume_with_different_weights_is_refused(tiny_dinov2, tmp_path):
    import shutil

    import torch

    model = tmp_path / "model"
    shutil.copytree(tiny_dinov2, model)
    suite = write_small_suite(tmp_path, model)
    out = tmp_path / "results"
    assert main(["run", str(suite), "--out", str(out), "--no-progress"]) == 0
    checksums = json.loads((out / "run.json").read_text())["weights"]
    assert set(checksums) == {str(model)} and checksums[str(model)]
    # new weights in the same folder, one cell left to compute
    changed = transformers.Dinov2Model.from_pretrained(model)
    with torch.no_grad():
        next(changed.parameters()).add_(0.1)
    changed.save_pretrained(model)
    next((out / "cells").glob("*turbo*.json")).unlink()
    with pytest.raises(RuntimeError, match="weights") as caught:
        main(["run", str(suite), "--out", str(out), "--no-progress"])
    assert str(model) in str(caught.value) and checksums[str(model)] in str(caught.value)
    assert len(cell_files(out)) == 1  # nothing computed on the other network


def test_corrupt_cells_and_speed_files_are_named_and_recomputed(tiny_dinov2, tmp_path, capsys):
    suite = write_small_suite(tmp_path, tiny_dinov2)
    out = tmp_path / "results"
    assert main(["run", str(suite), "--out", str(out), "--no-progress"]) == 0
    turbo = next((out / "cells").glob("*turbo*.json"))
    baseline = next((out / "cells").glob("*baseline*.json"))
    speed = next((out / "speed").glob("*.json"))
    turbo.write_text(turbo.read_text()[:40])  # truncated
    baseline.write_text("{}")  # empty object
    speed.write_text("")
    capsys.readouterr()
    assert main(["run", str(suite), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for path in (turbo, baseline, speed):
        assert f"{path}" in printed and "recomputing" in printed, printed
        assert json.loads(path.read_text())  # whole again
    assert json.loads(baseline.read_text())["method"] == "baseline"


def test_corrupt_run_metadata_is_refused_with_its_path(tiny_dinov2, tmp_path):
    suite = write_small_suite(tmp_path, tiny_dinov2)
    out = tmp_path / "results"
    assert main(["run", str(suite), "--out", str(out), "--no-progress"]) == 0
    run = out / "run.json"
    for broken in (run.read_text()[:30], "", "[1, 2]"):
        run.write_text(broken)
        with pytest.raises(ValueError, match=r"run\.json") as caught:
            main(["run", str(suite), "--out", str(out), "--no-progress"])
        assert str(run) in str(caught.value)


def test_a_cell_whose_items_do_not_match_its_baseline_is_refused(tiny_dinov2, tmp_path, capsys):
    suite = write_small_suite(tmp_path, tiny_dinov2)
    out = tmp_path / "results"
    assert main(["run", str(suite), "--out", str(out), "--no-progress"]) == 0
    turbo = next((out / "cells").glob("*turbo*.json"))
    cell = json.loads(turbo.read_text())
    cell["items"] = {column: values[:2] for column, values in cell["items"].items()}
    turbo.write_text(json.dumps(cell))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["report", str(out)])
    err = capsys.readouterr().err
    assert turbo.name in err and "2 items" in err and "3" in err and "baseline" in err, err


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("alpha = [1.0]", "alpha = [inf]"), "suite.alpha: must be a finite number >= 0"),
        (
            ("resolution = 56\n", "resolution = 56\nmin_tokens = -3\n"),
            "models[0].min_tokens: min_tokens must be an int >= 0, got -3",
        ),
    ],
)
def test_validate_only_refuses_settings_that_would_crash_mid_run(
    tiny_dinov2, tmp_path, capsys, edit, message
):
    suite = write_small_suite(tmp_path, tiny_dinov2)
    suite.write_text(suite.read_text().replace(*edit))
    assert main(["run", str(suite), "--validate-only"]) == 2
    assert message in capsys.readouterr().err


def test_clear_takes_a_crashed_write_leftover_but_not_a_lookalike(tmp_path):
    from turbo_eval.results import NotAResultsFolderError, ResultStore

    store = ResultStore(tmp_path / "out")
    store.write_run({"suite": {}})
    store.write_cell("m__t__baseline__r0", {"x": 1})
    (store.root / "tmpk3j_x9q1.tmp").write_text("{")  # what a killed atomic write leaves
    (store.root / "cells" / "tmp0a1b2c3d.tmp").write_text("{")
    (store.root / "cells" / "notes.tmp").write_text("mine")
    with pytest.raises(NotAResultsFolderError, match=r"notes\.tmp"):
        store.clear()
    (store.root / "cells" / "notes.tmp").unlink()
    said = store.clear()
    assert "1 cells" in said and "run.json" in said, said
    assert not store.root.exists() and tmp_path.exists()


def test_methods_lists_every_method_with_its_stages_and_families(capsys):
    from turbo_adapters.method_support import method_support

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("  ")]
    listed = {(r[0], r[1]) for r in rows if len(r) > 2}
    for row in method_support():
        assert (row.method, row.stage) in listed, (row.method, row.stage)
    cdpruner = next(
        line for line in out.splitlines() if line.split()[:2] == ["cdpruner", "connector"]
    )
    assert "qwen-vl" in cdpruner and "hf-vit" not in cdpruner
    todo = next(line for line in out.splitlines() if line.split()[:2] == ["todo", "denoiser"])
    assert "sd3" in todo and "flux" in todo  # ToDo on joint attention too
    for name in ("turbo-cross", "tomesd", "toma"):  # the suites' vocabulary too
        assert any(r and r[0] == name for r in rows), name
