"""One shape for every model file (../shared/DESIGN.md, README "The shape of a model file"):
the mathematics first and free of common.py, then the networks, the configuration, data and
pictures, and the same run code under the same names at the end. Read from the source, so a
new model file is held to it the moment it exists."""
import ast
import inspect

import pytest

from conftest import MODEL_FILES, ROOT

BANNERS = ("# Networks", "# Configuration", "# Data and pictures", "# Run code")
RUN_CODE = (  # name, parameters (with defaults), in this order at the end of every file
    ("build", "(cfg, info)"),
    ("train", "(cfg)"),
    ("evaluate", "(cfg)"),
    ("draw_samples", "(cfg)"),
    ("load", "(path, device='cpu')"),
    ("main", "(argv=None)"),
)


def _source(model):
    text = (ROOT / f"{model}.py").read_text()
    return text, ast.parse(text)


def _banner_lines(text):
    lines = [line.rstrip() for line in text.splitlines()]
    found = {}
    for i, line in enumerate(lines, start=1):
        if line in BANNERS and lines[i - 2].startswith("# ----") and lines[i].startswith("# ----"):
            found.setdefault(line, i)
    return found


def _top_level(tree):
    """(name, line) of every top-level def, class and assignment."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            yield node.name, node.lineno
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                if isinstance(t, ast.Name):
                    yield t.id, node.lineno


@pytest.mark.parametrize("model", MODEL_FILES)
def test_sections_come_in_the_one_order(model):
    text, tree = _source(model)
    banners = _banner_lines(text)
    assert tuple(banners) == BANNERS, f"{model}.py: section banners {list(banners)}, expected {list(BANNERS)}"
    lines = dict(_top_level(tree))
    first_math = min(line for name, line in _top_level(tree))
    assert first_math < banners["# Networks"], f"{model}.py: no mathematics before the networks"
    for name in ("Config", "PRESETS", "check_config"):
        assert banners["# Configuration"] < lines[name] < banners["# Data and pictures"], \
            f"{model}.py: {name} is not in the Configuration section"
    assert banners["# Run code"] < lines["MODEL"] < lines["build"], f"{model}.py: MODEL opens the run code"
    order = [lines[name] for name, _ in RUN_CODE]
    assert order == sorted(order) and order[0] > banners["# Run code"], \
        f"{model}.py: the run code is not {', '.join(n for n, _ in RUN_CODE)} in this order"
    last = tree.body[-1]
    assert (isinstance(last, ast.If) and ast.unparse(last.test) == "__name__ == '__main__'"
            and ast.unparse(last.body[0]) == "main()"), f'{model}.py does not end with if __name__ == "__main__": main()'


@pytest.mark.parametrize("model", MODEL_FILES)
def test_run_code_has_the_same_names_and_signatures(model):
    import importlib
    module = importlib.import_module(model)
    assert module.MODEL == model
    for name, signature in RUN_CODE:
        assert str(inspect.signature(getattr(module, name))) == signature, f"{model}.{name}{signature}"
    assert str(inspect.signature(module.check_config)) == "(cfg)"
    assert isinstance(module.PRESETS, dict)


@pytest.mark.parametrize("model", MODEL_FILES)
def test_the_mathematics_uses_nothing_from_common(model):
    """Static half of the check (the dynamic half is each test file's
    test_mathematics_runs_without_common): no name imported from common.py is used before the
    Configuration section, so the mathematics and the networks can be copied without it."""
    text, tree = _source(model)
    end = _banner_lines(text)["# Configuration"]
    imported = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and node.module == "common" for a in node.names} | {"common"}
    used = sorted({(n.id, n.lineno) for node in tree.body if getattr(node, "lineno", 0) < end
                   and not isinstance(node, (ast.Import, ast.ImportFrom))
                   for n in ast.walk(node) if isinstance(n, ast.Name) and n.id in imported})
    assert not used, f"{model}.py uses common.py in its mathematics: " + ", ".join(f"{n} (line {l})" for n, l in used)


@pytest.mark.parametrize("model", MODEL_FILES)
def test_each_test_file_runs_the_mathematics_without_common(model):
    tree = ast.parse((ROOT / "tests" / f"test_{model}.py").read_text())
    tests = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    test = tests.get("test_mathematics_runs_without_common")
    assert test is not None and "without_common" in [a.arg for a in test.args.args], \
        f"tests/test_{model}.py has no test_mathematics_runs_without_common(without_common)"


@pytest.mark.parametrize("model", MODEL_FILES)
def test_model_files_read_the_data_description_not_dataset_names(model):
    """Branches go by the data's description (info.kind, info.levels, ...), never by a
    dataset's name, and the 2D box comes from the description, not a literal."""
    text, tree = _source(model)
    names = ("digits", "digits-binary", "mnist", "fashion-mnist", "cifar10", "shakespeare", "8gaussians",
             "checkerboard", "rings", "moons", "2spirals", "pinwheel", "swissroll")
    presets_end = _banner_lines(text)["# Data and pictures"]
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and node.lineno > presets_end:
            consts = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant)]
            assert not set(consts) & set(names), f"{model}.py:{node.lineno} branches on a dataset's name"
    assert 'meta["kind"]' not in text and "lim=4.0" not in text
