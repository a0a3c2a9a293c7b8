"""The docs cannot rot silently: every module says what it owns, and docs/ARCHITECTURE.md
names only files that exist and a layer table the imports obey.

- every ``.py`` file under ``distgrad/``, ``workers/``, ``scheduler/`` and ``bench/`` opens
  with a module docstring;
- every path written in backticks in ``docs/ARCHITECTURE.md`` (outside code blocks)
  exists: ``a/b.py`` from the repository root, a bare ``b.py`` somewhere in the tree;
- the layer table of its section 2 places every module, and every module-level import
  points to the importer's own layer or a lower one (the graph is the one
  ``tests/test_import_layers.py`` builds).
"""
import ast
import os
import re

from test_import_layers import PACKAGES, ROOT, discover, import_graph  # noqa: E402  (tests/ is on sys.path)

DOC = os.path.join(ROOT, "docs", "ARCHITECTURE.md")
DOCSTRING_FOLDERS = ("distgrad", "workers", "scheduler", "bench")
SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", "node_modules", "build", "dist"}
PATH_TOKEN = re.compile(r"`([\w.\-/]+)`")
FILE_SUFFIXES = (".py", ".md", ".toml", ".yaml", ".yml", ".json", ".cfg", ".txt")


def _py_files(folders):
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, folder)):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
            for f in sorted(filenames):
                if f.endswith(".py"):
                    yield os.path.join(dirpath, f)


def _doc_text():
    with open(DOC) as f:
        return f.read()


def _prose(text):
    """The text with its fenced code blocks blanked (their backticks are code, not paths);
    line numbers stay those of the file."""
    return re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), text,
                  flags=re.S | re.M)


def path_tokens(text):
    """Backticked tokens of ``text`` that name a file or folder: ``[(token, line)]``."""
    out = []
    for n, line in enumerate(_prose(text).splitlines(), 1):
        for tok in PATH_TOKEN.findall(line):
            if "/" in tok or tok.endswith(FILE_SUFFIXES):
                out.append((tok, n))
    return out


def _tree_names():
    names = set()
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")]
        names.update(filenames)
    return names


def module_of(path):
    """``(module name, is_folder)`` for a path such as ``workers/worker.py`` or ``distgrad/ops/``."""
    top, _, rest = path.partition("/")
    base = PACKAGES[top]
    folder = path.endswith("/")
    parts = [p for p in rest.strip("/").split("/") if p]
    if not folder:
        parts[-1] = parts[-1][:-3]
        if parts[-1] == "__init__":
            parts.pop()
    return ".".join([base] + parts), folder


def layer_table(text):
    """``[(layer number, [module or package prefix, is_folder])]`` from the table of section 2."""
    section = text.split("## 2. Import layers", 1)[-1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        m = re.match(r"\|\s*(\d+)\s*\|", line)
        if m:
            paths = [t for t in PATH_TOKEN.findall(line) if "/" in t and t.split("/")[0] in PACKAGES]
            rows.append((int(m.group(1)), [module_of(p) for p in paths]))
    return rows


def layer_of(module, rows):
    """The layer of ``module``: its own file's row, else the row of its nearest folder."""
    best = None
    for layer, entries in rows:
        for name, folder in entries:
            hit = module.startswith(name + ".") or module == name if folder else module == name
            if hit:
                rank = (0 if folder else 1, len(name))
                if best is None or rank > best[0]:
                    best = (rank, layer)
    return None if best is None else best[1]


def test_every_module_has_a_docstring():
    missing = []
    for path in _py_files(DOCSTRING_FOLDERS):
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        if not (ast.get_docstring(tree) or "").strip():
            missing.append(os.path.relpath(path, ROOT))
    assert not missing, ("modules without a docstring (open each with a sentence saying what "
                         "the file owns):\n  " + "\n  ".join(missing))


def test_paths_in_the_architecture_page_exist():
    tokens = path_tokens(_doc_text())
    assert len(tokens) > 50, "the scan found almost no paths: it no longer reads the page"
    names = _tree_names()
    stale = []
    for tok, line in tokens:
        if "/" in tok:
            full = os.path.join(ROOT, tok)
            ok = os.path.isdir(full) if tok.endswith("/") else os.path.exists(full)
        else:
            ok = tok in names
        if not ok:
            stale.append(f"docs/ARCHITECTURE.md:{line}: `{tok}`")
    assert not stale, "paths the architecture page names that do not exist:\n  " + "\n  ".join(stale)


def test_the_layer_table_places_every_module_and_the_imports_point_down():
    rows = layer_table(_doc_text())
    assert len(rows) >= 5, "no layer table found in section 2 of docs/ARCHITECTURE.md"
    modules = discover()
    listed = {name for _, entries in rows for name, _ in entries}
    unknown = sorted(n for n in listed if n not in modules
                     and not any(m.startswith(n + ".") for m in modules))
    assert not unknown, f"the layer table names modules that do not exist: {unknown}"
    unplaced = sorted(m for m in modules if layer_of(m, rows) is None)
    assert not unplaced, ("modules in no row of the layer table of docs/ARCHITECTURE.md (add "
                          f"each to the row of the lowest layer it may live in): {unplaced}")
    graph = import_graph(modules)
    upward = [f"{a} (layer {layer_of(a, rows)}, {os.path.relpath(modules[a], ROOT)}:{line}) "
              f"imports {b} (layer {layer_of(b, rows)})"
              for a in sorted(graph) for b, line in sorted(graph[a].items())
              if layer_of(b, rows) > layer_of(a, rows)]
    assert not upward, ("imports that point up the layer table of docs/ARCHITECTURE.md (move the "
                        "module, pass the higher layer in as a hook, or fix the table):\n  "
                        + "\n  ".join(upward))


def test_the_table_reader_reads_rows_folders_and_exceptions():
    text = ("## 2. Import layers\n\n| # | layer | files |\n|---|---|---|\n"
            "| 1 | base | `distgrad/storage.py` |\n"
            "| 2 | lib | `distgrad/nn/` (but `parallel.py`) |\n"
            "| 3 | top | `distgrad/nn/parallel.py`, `workers/` |\n\n## 3. Next\n| 9 | x | `distgrad/a.py` |\n")
    rows = layer_table(text)
    assert [layer for layer, _ in rows] == [1, 2, 3]
    assert layer_of("distgrad.storage", rows) == 1
    assert layer_of("distgrad.nn.module", rows) == 2
    assert layer_of("distgrad.nn", rows) == 2
    assert layer_of("distgrad.nn.parallel", rows) == 3
    assert layer_of("distgrad.workers.collective.shm", rows) == 3
    assert layer_of("distgrad.tensor", rows) is None
    assert [t for t, _ in path_tokens("`a/b.py` and `x.py`\n```\n`c/d.py`\n```\n`dg.init`")] == \
        ["a/b.py", "x.py"]
