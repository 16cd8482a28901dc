"""Print the project's requirements from pyproject.toml, one a line, for pip install -r.

The images install dependencies without installing the project itself (the source lives in /app, so a
bind mount of the checkout replaces it), and each image wants a different part: the server image has no
Gradio, the page's image has no torch, and no production image has debugpy.

    python docker/requirements.py --without gradio debugpy            # the server image
    python docker/requirements.py --only debugpy                      # the debug image adds this
    python docker/requirements.py --extra dev                         # the dev container: everything

Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    """PEP 503 normalisation: Foo_Bar.baz and foo-bar-baz are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = _NAME.match(requirement)
    if not match:
        raise ValueError(f"cannot read a package name in {requirement!r}")
    return canonical(match.group(1))


def select(
    pyproject: Path = PYPROJECT,
    extras: Iterable[str] = (),
    without: Iterable[str] = (),
    only: Iterable[str] = (),
) -> list[str]:
    """The project's dependencies plus the named extras, less `without`; only `only` when it is given."""
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise ValueError(f"pyproject.toml has no extra {extra!r} (it has: {', '.join(optional)})")
        requirements += optional[extra]
    dropped = {canonical(name) for name in without}
    kept = {canonical(name) for name in only}
    chosen = [r for r in requirements if requirement_name(r) not in dropped]
    if kept:
        chosen = [r for r in chosen if requirement_name(r) in kept]
        missing = kept - {requirement_name(r) for r in chosen}
        if missing:
            raise ValueError(f"not among the project's requirements: {', '.join(sorted(missing))}")
    return list(dict.fromkeys(chosen))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extra", nargs="*", default=[], help="optional-dependency groups to add (e.g. dev)")
    parser.add_argument("--without", nargs="*", default=[], help="package names to leave out")
    parser.add_argument("--only", nargs="*", default=[], help="print only these package names")
    parser.add_argument("--pyproject", type=Path, default=PYPROJECT)
    args = parser.parse_args(argv)
    try:
        lines = select(args.pyproject, args.extra, args.without, args.only)
    except (ValueError, OSError, KeyError) as exc:
        sys.stderr.write(f"requirements.py: {exc}\n")
        return 2
    sys.stdout.write("".join(line + "\n" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
