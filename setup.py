"""Everything about the package is in pyproject.toml; this file only adds the compiled hot modules (see
src/tidegate/compiled.py). They are optional: without Cython or a C compiler, or with TIDEGATE_PURE_PYTHON=1,
tidegate installs and runs as pure Python."""

import os
import runpy

from setuptools import Extension, setup


def hot_extensions() -> list:
    if os.environ.get("TIDEGATE_PURE_PYTHON") == "1":
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        return []
    modules = runpy.run_path(os.path.join("src", "tidegate", "compiled.py"))["MODULES"]
    extensions = [Extension(name, [os.path.join("src", *name.split(".")) + ".py"], optional=True)
                  for name in modules]
    # annotation_typing off: annotations stay documentation, as in CPython. With it on, Cython checks them
    # at run time and strictly (a tuple subclass is refused where `tuple` is written, a float becomes a C
    # double), so compiled and pure Python would behave differently.
    return cythonize(extensions, compiler_directives={"language_level": "3", "annotation_typing": False},
                     quiet=True,
                     nthreads=os.cpu_count() or 1)


setup(ext_modules=hot_extensions(), options={"build_ext": {"parallel": os.cpu_count() or 1}})
