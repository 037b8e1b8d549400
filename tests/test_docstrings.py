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
