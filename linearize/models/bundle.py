"""The copy of linearize's attention code an exported folder carries, so that it loads with transformers alone.

transformers' remote code copies into its module cache the modeling file and the files named by `from .name import`
lines, flat: packages do not travel. So an export writes the modules `models/hf.py` needs as flat files
`linearize_<path>.py` (`attention/hybrid.py` -> `linearize_attention_hybrid.py`), and the modeling file rebuilds
the package from them inside the module cache and imports it from there (`import_bundle`). Rebuilding the package,
rather than rewriting the copies into flat modules, keeps what the code does exactly: relative imports, a package
that lists its own folder to find its attention kinds, lazy imports.

Which modules: `models/hf.py` and everything its imports reach, found with `ast` (imports inside functions
included); a package whose `__init__` is reached brings all of its modules, since it may discover them at run time.
Packages whose `__init__` is not reached get an empty one, so training, evaluation and CLI code stay out.

The copies differ from the sources in two ways that do not change what they do: relative imports are written
`from . name` (transformers would read `from .name` as a file beside the modeling file), and imports of packages
other than torch and transformers (Triton) sit in `try` blocks, which transformers' import check skips: loading
from the Hub checks every file, and would otherwise ask for Triton where the code never imports it.

This module uses the standard library only: the modeling file imports its flat copy to rebuild the package.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import sys
import tempfile
from pathlib import Path

MODELING_FILE = "modeling_linearize.py"
PREFIX = "linearize_"
# The module every export starts from, relative to the package folder; it defines the Linearized* classes.
ROOT_MODULE = "models/hf.py"
# Where the bundle's own flat copy sits: the modeling file imports it to rebuild the package.
SELF = "models/bundle.py"
# Imported where transformers is: everything else (Triton) goes in a `try` so the Hub import check passes.
NEEDED_EVERYWHERE = {"torch", "transformers"}
# Training, evaluation, data and command-line code is never carried, even where a carried module reaches it
# through a lazy import (recipe validation asks the training registries; loading a model never validates a recipe).
NEVER_CARRIED = ("train/", "eval/", "data/", "cli.py", "hub.py", "card.py")
# transformers' reading of relative imports (dynamic_module_utils.get_relative_imports), matched against each copy.
_HF_RELATIVE = (re.compile(r"^\s*import\s+\.(\S+)\s*$", re.M), re.compile(r"^\s*from\s+\.(\S+)\s+import", re.M))
_RELATIVE_FROM = re.compile(rb"^from\s+(\.+)\s*")


def flat_name(rel: str) -> str:
    """File name of a package module's copy: `attention/hybrid.py` -> `linearize_attention_hybrid.py`."""
    parts = Path(rel).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return PREFIX + "_".join(parts) + ".py"


def _module_file(root: Path, parts: tuple[str, ...]) -> str | None:
    """Path (relative to `root`) of the module or package named by `parts`, None when there is none."""
    base = root.joinpath(*parts)
    if parts and base.with_suffix(".py").is_file():
        return base.with_suffix(".py").relative_to(root).as_posix()
    if (base / "__init__.py").is_file():
        return (base / "__init__.py").relative_to(root).as_posix()
    return None


def _imports(root: Path, rel: str, tree: ast.AST, package: str) -> set[str]:
    """Files of the package that the module at `rel` imports, anywhere in its code."""
    # A module's own package: its folder, whether it is that folder's `__init__` or another file in it.
    base = Path(rel).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bad = [a.name for a in node.names if a.name.split(".")[0] == package]
        elif isinstance(node, ast.ImportFrom):
            bad = [node.module] if node.level == 0 and (node.module or "").split(".")[0] == package else []
        else:
            continue
        if bad:
            raise ValueError(f"{rel}:{node.lineno} imports {bad[0]} by its absolute name: use a relative import")
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        up = node.level - 1
        if up > len(base):
            raise ValueError(f"{rel}:{node.lineno}: relative import beyond the package")
        target = base[: len(base) - up] + tuple(node.module.split(".") if node.module else ())
        where = "/".join(target)
        if (where + "/").startswith(NEVER_CARRIED) or where + ".py" in NEVER_CARRIED:
            continue
        for alias in node.names:
            sub = _module_file(root, (*target, alias.name))
            if sub is not None:
                found.add(sub)
            else:
                # A name defined by the module (or package __init__) itself.
                own = _module_file(root, target)
                if own is None:
                    raise ValueError(f"{rel}:{node.lineno}: cannot find {'.'.join(target) or package}")
                found.add(own)
    return found


def _package_members(root: Path, rel: str) -> set[str]:
    """Every module and subpackage of the package whose `__init__` is `rel`."""
    folder = (root / rel).parent
    found = {p.relative_to(root).as_posix() for p in folder.glob("*.py") if p.name != "__init__.py"}
    found |= {
        (p / "__init__.py").relative_to(root).as_posix() for p in folder.iterdir() if (p / "__init__.py").is_file()
    }
    return found


def collect(root: Path, start: str = ROOT_MODULE) -> list[str]:
    """Paths (relative to the package folder `root`) of the modules the export carries, sorted."""
    package = root.name
    todo, seen = [start, SELF], set()
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        seen.add(rel)
        tree = ast.parse((root / rel).read_bytes(), filename=rel)
        todo.extend(_imports(root, rel, tree, package) - seen)
        if rel.endswith("__init__.py"):
            todo.extend(_package_members(root, rel) - seen)
    return sorted(seen)


def _wrap_in_try(source: bytes, start: int, end: int) -> bytes:
    """The statement at `source[start:end]` inside `try: ... except ImportError: raise` (same indentation)."""
    line_start = source.rfind(b"\n", 0, start) + 1
    indent = source[line_start:start]
    if indent.strip():
        raise ValueError(f"cannot wrap an import that does not start its line: {source[line_start:end]!r}")
    body = source[start:end].replace(b"\n", b"\n    ")
    return b"try:\n" + indent + b"    " + body + b"\n" + indent + b"except ImportError:\n" + indent + b"    raise"


def _edits(tree: ast.AST) -> list[tuple[ast.stmt, str]]:
    """(import statement, how to change it) for every import the copy changes; imports already in a `try` stay."""
    stdlib = sys.stdlib_module_names
    edits = []

    def visit(node, in_try):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ImportFrom) and (child.level > 1 or child.level == 1 and child.module):
                edits.append((child, "space"))
            elif isinstance(child, (ast.Import, ast.ImportFrom)) and not in_try:
                names = [a.name for a in child.names] if isinstance(child, ast.Import) else [child.module or ""]
                tops = {name.split(".")[0] for name in names}
                if getattr(child, "level", 0) == 0 and tops - stdlib - NEEDED_EVERYWHERE:
                    edits.append((child, "try"))
            visit(child, in_try or isinstance(child, ast.Try))

    visit(tree, False)
    return edits


def _spaced(found: re.Match) -> bytes:
    # `from ..x import` -> `from .. x import`, `from .. import` -> `from . . import`: the same import to Python,
    # not a file name to transformers.
    dots = found[1]
    if found.string[found.end() :].startswith(b"import"):
        dots = b" ".join(dots[i : i + 1] for i in range(len(dots)))
    return b"from " + dots + b" "


def rewrite(source: bytes, rel: str = "<module>") -> bytes:
    """The copy of a module's source (see the module docstring for what changes and why)."""
    tree = ast.parse(source, filename=rel)
    starts = [0]
    for line in source.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    out = source
    # From the end, so that earlier offsets (ast's are in bytes of the line) stay valid.
    for node, how in sorted(_edits(tree), key=lambda e: (e[0].lineno, e[0].col_offset), reverse=True):
        start = starts[node.lineno - 1] + node.col_offset
        end = starts[node.end_lineno - 1] + node.end_col_offset
        if how == "space":
            new = _RELATIVE_FROM.sub(_spaced, out[start:end], count=1)
        else:
            new = _wrap_in_try(out, start, end)
        out = out[:start] + new + out[end:]
    for pattern in _HF_RELATIVE:
        found = pattern.search(out.decode())
        if found:
            raise ValueError(f"{rel}: transformers would read {found[0].strip()!r} as a file to fetch; reword it")
    return out


def bundle_files(root: Path) -> dict[str, tuple[str, bytes]]:
    """`{flat file name: (path in the package, copied source)}` for the export of the package at `root`."""
    files = {}
    for rel in collect(root):
        name = flat_name(rel)
        if name in files:
            raise ValueError(f"{rel} and {files[name][0]} would both be copied as {name}")
        files[name] = (rel, rewrite((root / rel).read_bytes(), rel))
    return files


_MODELING = '''"""Loads a model converted by linearize: `trust_remote_code=True` runs this file.

The attention code travels with the model: the `{prefix}*.py` files beside this one are a copy of the parts of
linearize it needs (attention kinds, generation cache, the PyTorch path and the Triton kernels, used where Triton
and a GPU are), so transformers alone loads it. A process that has already imported linearize uses its classes.
"""

import sys

# Each file of the copy and its place in the package `import_bundle` rebuilds from them in transformers' cache.
FILES = {{
{files}
}}

# transformers' import check skips try blocks: linearize is used only where the process already has it.
try:
    if "linearize" not in sys.modules:
        raise ImportError("linearize is not imported")
    from linearize.models.hf import {config}, {model}
except ImportError:
    {import_bundle}

    _hf = import_bundle(__package__, FILES, "{root}")
    {config}, {model} = _hf.{config}, _hf.{model}

__all__ = ["{config}", "{model}"]

# transformers fetches and copies the files named by `from .name import` lines: this block, which never runs,
# names every file of the copy.
if False:
{manifest}
'''


def write_code(folder: str | Path, config_name: str, model_name: str) -> list[str]:
    """Write the modeling file and the copy of the package it loads into `folder`; returns the file names."""
    root = Path(__file__).resolve().parents[1]
    files = bundle_files(root)
    folder = Path(folder)
    for name, (_, data) in files.items():
        (folder / name).write_bytes(data)
    modeling = _MODELING.format(
        prefix=PREFIX,
        files="\n".join(f"    {name!r}: {rel!r}," for name, (rel, _) in files.items()),
        config=config_name,
        model=model_name,
        # Spelled out here, where transformers (reading this file's copy) would take it for a file to fetch.
        import_bundle=f"from .{flat_name(SELF).removesuffix('.py')} import import_bundle",
        root=ROOT_MODULE.removesuffix(".py").replace("/", "."),
        manifest="\n".join(f"    from .{name.removesuffix('.py')} import *  # noqa: F403" for name in files),
    )
    (folder / MODELING_FILE).write_text(modeling)
    return [MODELING_FILE, *files]


def code_files(folder: str | Path) -> list[str]:
    """The folder's modeling file and the files of the copy it loads (what a model repo needs), sorted."""
    modeling = Path(folder) / MODELING_FILE
    if not modeling.is_file():
        return []
    text = modeling.read_text(errors="replace")
    return sorted({MODELING_FILE} | {f"{name}.py" for pattern in _HF_RELATIVE for name in pattern.findall(text)})


def code_problem(folder: str | Path) -> str | None:
    """What keeps the folder's modeling file from loading with transformers alone, as a phrase; None when nothing.

    A modeling file written before folders carried their own code loads the linearize package itself, which
    transformers would tell users to install.
    """
    folder = Path(folder)
    needed = code_files(folder)
    if not needed:
        return f"has no {MODELING_FILE}"
    if flat_name(SELF) not in needed:
        return f"has a {MODELING_FILE} that needs the linearize package installed (an older export)"
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        more = f" and {len(missing) - 2} more" if len(missing) > 2 else ""
        return f"lacks {', '.join(missing[:2])}{more}, which {MODELING_FILE} loads"
    return None


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.is_file() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # Another process may be rebuilding the same package: each file appears whole or not at all.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        # mkstemp makes 0600; the copy should be readable as a plain write would make it (0666 less the umask).
        mask = os.umask(0o022)
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def import_bundle(package: str, files: dict[str, str], module: str, name: str = "linearize"):
    """Rebuild the package from the flat copies beside this file and import `module` from it.

    Args:
        package: the module-cache package the copies sit in (the modeling file's `__package__`).
        files: `{flat file name: path in the package}` (the modeling file's `FILES`).
        module: dotted name of the module to import, inside the package (`models.hf`).
        name: the rebuilt package's name, a subpackage of `package`.

    Returns:
        The imported module.
    """
    here = Path(__file__).resolve().parent
    target = here / name
    for flat, rel in files.items():
        _write_if_changed(target / rel, (here / flat).read_bytes())
    # Folders whose `__init__` is not part of the copy are plain packages.
    for folder in {(target / rel).parent for rel in files} | {target}:
        while folder != here and not (folder / "__init__.py").is_file():
            _write_if_changed(folder / "__init__.py", b"")
            folder = folder.parent
    importlib.invalidate_caches()
    return importlib.import_module(f"{package}.{name}.{module}")
