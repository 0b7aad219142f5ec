"""The build: tidegate is pure Python, and the modules every request runs through are also compiled with mypyc
(typed Python to C) when they can be: they take about 40 % less CPU per request (benchmarks/request_path.py).

When mypyc or a C compiler is missing, or TIDEGATE_PURE_PYTHON=1 is set, the same modules run as Python: the
compiled ones are optional extensions. Everything else (project data, dependencies) is in pyproject.toml.
"""

import runpy
import sys

from setuptools import setup

# The request path of HTTP/1.1 (parsing, routing, balancing, writing, metrics and the access log): the list
# is kept in the package, which also decides at run time whether the compiled copies can be used.
COMPILED = runpy.run_path("src/tidegate/compiled.py")
HOT_MODULES = ["src/" + name.replace(".", "/") + ".py" for name in COMPILED["HOT_MODULES"]]


def compiled_modules() -> list:
    if COMPILED["pure_python_requested"]():
        return []
    try:
        from mypyc.build import mypycify

        extensions = mypycify(["--ignore-missing-imports", "--follow-imports=silent", *HOT_MODULES],
                              opt_level="3")
    except (Exception, SystemExit) as exc:  # mypyc missing, or it refused the code: run as Python
        print(f"tidegate: not compiling the hot modules ({exc!r}); they run as Python", file=sys.stderr)
        return []
    for extension in extensions:
        extension.optional = True  # no C compiler: the Python modules stay in use
    return extensions


setup(ext_modules=compiled_modules())
