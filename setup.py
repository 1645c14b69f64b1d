"""Build the Cython hot core.

setuptools stays the build backend because the only compiled parts are a few
self-contained Cython modules with no external C libraries: ``cythonize`` plus
setuptools is the shortest path that works on a bare Debian box with gcc, and
editable installs (``pip install -e .``) rebuild the extensions in place.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension("firmware.core._crypto1", ["firmware/core/_crypto1.pyx"]),
    Extension("firmware.core._framing", ["firmware/core/_framing.pyx"]),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
        },
    ),
)
