"""Builds the API reference of `fedjax_pfl` with pdoc: `python docs/build_api.py OUT_DIR`.

Every module of the package gets a page (pdoc alone follows a package's
`__all__`, which leaves out modules such as `fedjax_pfl.core.execution`), the
index lists them all, and docstrings are read as Google style. Any warning
pdoc emits (an annotation it cannot resolve, a module it cannot import, ...)
is printed and fails the build (exit status 1). `make docs` runs it.
"""

from __future__ import annotations

import pkgutil
import shutil
import sys
import warnings
from pathlib import Path

import pdoc
import pdoc.extract
import pdoc.render

import fedjax_pfl

TEMPLATES = Path(__file__).resolve().parent / "pdoc"


def module_specs() -> list[str]:
    """`fedjax_pfl`, then every module that pdoc's walk of it (by `__all__`) leaves out."""
    every = ["fedjax_pfl"] + [m.name for m in pkgutil.walk_packages(fedjax_pfl.__path__,
                                                                    "fedjax_pfl.")]
    walked = set(pdoc.extract.walk_specs(["fedjax_pfl"]))
    return ["fedjax_pfl"] + sorted(set(every) - walked)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python docs/build_api.py OUT_DIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    if out.exists():
        shutil.rmtree(out)
    pdoc.render.configure(docformat="google", template_directory=TEMPLATES,
                          footer_text=f"fedjax_pfl {fedjax_pfl.__version__}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(*module_specs(), output_directory=out)
    for w in caught:
        print(f"pdoc warning: {w.message} ({w.filename}:{w.lineno})", file=sys.stderr)
    if caught:
        print(f"docs: {len(caught)} warning(s); fix them (warnings fail the build).",
              file=sys.stderr)
        return 1
    print(f"docs: API reference in {out}/index.html ({len(list(out.rglob('*.html')))} pages)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
