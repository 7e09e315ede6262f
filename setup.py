"""The one compiled part: malaria_cells._pngloops, the PNG pixel loops of ``kernels``.

Optional: where it cannot be built (no C compiler), the package installs without it and
decodes with libpng (same pixels, slower). Everything else is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("malaria_cells._pngloops", ["src/malaria_cells/_pngloops.c"],
                             extra_compile_args=["-O3"], optional=True)])
