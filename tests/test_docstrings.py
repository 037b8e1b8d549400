"""Every docstring example in the package runs and prints what it shows.

The examples are found, not listed: any module under ``switchnorm/`` whose
source holds a ``>>>`` line is collected, so an example added to a new or
renamed module is tested without touching this file.
"""

import doctest
import importlib
import importlib.util
import pkgutil
from pathlib import Path

import pytest

import switchnorm


def modules_with_examples() -> list[str]:
    names = [switchnorm.__name__]
    names += [m.name for m in pkgutil.walk_packages(switchnorm.__path__, prefix="switchnorm.")]
    found = []
    for name in names:
        origin = importlib.util.find_spec(name).origin
        if origin and origin.endswith(".py") and ">>>" in Path(origin).read_text():
            found.append(name)
    return found


MODULES = modules_with_examples()


def test_the_examples_are_found():
    assert {"switchnorm", "switchnorm.nnx", "switchnorm.linen"} <= set(MODULES), MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    examples = 0
    for test in doctest.DocTestFinder().find(module, name):
        examples += len(test.examples)
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert examples > 0, f"{name} has '>>>' in its source but no example was found"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


# Public names whose docstrings lack a ``>>>`` example for now, each with whose code it is.
# Empty it as they gain one; a name added to __all__ without an example fails the test below.
NO_EXAMPLE_YET: set[str] = set()
"""Public names allowed no example: none; a name added here must say why."""


def public_names() -> list[str]:
    """Every class and function of ``switchnorm.__all__`` and ``switchnorm.linen.__all__``, and
    every function of ``switchnorm.train.__all__``, as "module.name"."""
    import inspect

    import switchnorm.linen
    import switchnorm.train

    names = []
    for module, kinds in (
        (switchnorm, (inspect.isclass, inspect.isfunction)),
        (switchnorm.linen, (inspect.isclass, inspect.isfunction)),
        (switchnorm.train, (inspect.isfunction,)),
    ):
        for name in module.__all__:
            if any(kind(getattr(module, name)) for kind in kinds):
                names.append(f"{module.__name__}.{name}")
    return names


@pytest.mark.parametrize("qualified", public_names())
def test_every_public_name_has_a_docstring_with_an_example(qualified):
    import inspect

    module, name = qualified.rsplit(".", 1)
    doc = inspect.getdoc(getattr(importlib.import_module(module), name)) or ""
    if qualified in NO_EXAMPLE_YET:
        assert ">>>" not in doc, f"{qualified} has an example now: remove it from NO_EXAMPLE_YET"
        return
    assert doc, f"{qualified} has no docstring"
    assert ">>>" in doc, f"{qualified}'s docstring has no '>>>' example (the doctests run every one)"
