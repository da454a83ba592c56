"""The README's example runs and prints what its comments say; the package docstring's
doctest passes."""
import contextlib
import doctest
import io
import pathlib
import re

import copyengine

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_prints_what_it_says():
    text = README.read_text()
    code = re.search(r"## A short example\s+```python\n(.*?)```", text, re.S).group(1)
    expected = [line.split("#", 1)[1].split(":")[0].strip()
                for line in code.splitlines() if line.strip().startswith("print(")]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    assert out.getvalue().splitlines() == expected


def test_package_docstring_doctest():
    assert doctest.testmod(copyengine).failed == 0
