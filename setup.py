"""Build the Cython hot core.

setuptools stays the build backend because the only compiled parts are a few
self-contained Cython modules with no external C libraries: ``cythonize`` plus
setuptools is the shortest path that works on a bare Debian box with gcc, and
editable installs (``pip install -e .``) rebuild the extensions in place.

In place means into the source tree that running processes import from (tests, rigs, other
tools in a second terminal): each compiled module is written beside its final name and
renamed over it, so a process that has the old one loaded keeps a whole file and one that
imports meanwhile gets a whole file, old or new, never a half-written one.
"""

import os
import shutil
import tempfile

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as _build_ext


class build_ext(_build_ext):
    """``build_ext`` that puts compiled extensions into place by rename (see above)."""

    def copy_file(
        self, infile: str, outfile: str, *args: object, **kwargs: object
    ) -> tuple[str, int]:
        if self.dry_run:
            return super().copy_file(infile, outfile, *args, **kwargs)
        if os.path.isdir(outfile):
            outfile = os.path.join(outfile, os.path.basename(infile))
        fd, tmp = tempfile.mkstemp(
            dir=os.path.dirname(outfile) or ".", prefix=f".{os.path.basename(outfile)}.",
            suffix=".tmp",
        )
        os.close(fd)
        try:
            shutil.copyfile(infile, tmp)
            shutil.copymode(infile, tmp)
            os.replace(tmp, outfile)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return outfile, 1


extensions = [
    Extension("firmware.core._crypto1", ["firmware/core/_crypto1.pyx"]),
    Extension("firmware.core._framing", ["firmware/core/_framing.pyx"]),
]

setup(
    cmdclass={"build_ext": build_ext},
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
