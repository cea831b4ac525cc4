"""The code layout README states: every module in its table, imports only downward, no circle, no private names.

README's "Code layout" table lists snapjax's modules from the entry points (top) to the foundations (bottom); a
module may import modules of its own row or of rows below it. The import graph is read from the sources (ast),
independently of the table, so a new module or a new import that breaks the order fails here.
"""
import ast
import os
import re
import tempfile

from helpers import ROOT

PACKAGE = os.path.join(ROOT, "snapjax")


def _modules() -> dict[str, str]:
  """{dotted module name: path} of every module of the snapjax package."""
  out = {}
  for dirpath, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
        out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, f)
  return out


def _imports(path: str, modules: set[str]) -> tuple[set[str], list[str]]:
  """(snapjax modules this file imports, private names it takes from other snapjax modules)."""
  tree = ast.parse(open(path).read())
  deps, private, aliases = set(), [], {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name.split(".")[0] == "snapjax":
          deps.add(a.name)
          aliases[a.asname or a.name] = a.name
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "snapjax":
      for a in node.names:
        full = f"{node.module}.{a.name}"
        if full in modules:  # from snapjax import workdir: a module.
          deps.add(full)
          aliases[a.asname or a.name] = full
        else:
          deps.add(node.module)
          if a.name.startswith("_") and not a.name.startswith("__"):
            private.append(f"from {node.module} import {a.name}")
  for node in ast.walk(tree):  # module._name, where module is a snapjax module imported here.
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
        and node.attr.startswith("_") and not node.attr.startswith("__")):
      private.append(f"{aliases[node.value.id]}.{node.attr}")
  return deps, private


def _graph() -> tuple[dict[str, set[str]], dict[str, list[str]]]:
  modules = _modules()
  graph, private = {}, {}
  for name, path in modules.items():
    deps, priv = _imports(path, set(modules))
    graph[name] = {d for d in deps if d != name and d in modules}
    private[name] = priv
  return graph, private


def _layout_rows() -> list[list[str]]:
  """README's Code layout table: each row's modules, as dotted names, top row first."""
  text = open(os.path.join(ROOT, "README.md")).read()
  section = text.split("### Code layout", 1)[1].split("\n#", 1)[0]
  rows = []
  for line in section.splitlines():
    if not line.startswith("| `"):
      continue
    cell = line.split("|")[1]
    names = []
    for path in re.findall(r"`([^`]+)`", cell):
      path = path.rstrip("/")
      name = ("snapjax/" + path).removesuffix(".py").removesuffix("/__init__").replace("/", ".")
      names.append(name)
    rows.append(names)
  return rows


def _row_of(module: str, rows: list[list[str]]) -> int | None:
  """The row of a module: its own, or that of the package (models/) that holds it."""
  for i, names in enumerate(rows):
    for n in names:
      if module == n or module.startswith(n + ".") and n != "snapjax":
        return i
  return None


def test_every_module_is_in_the_readme_layout():
  rows = _layout_rows()
  assert len(rows) >= 10, rows
  missing = sorted(m for m in _modules() if _row_of(m, rows) is None)
  assert not missing, f"modules missing from README's Code layout table: {missing}"


def test_modules_import_only_their_own_row_or_rows_below():
  rows = _layout_rows()
  graph, _ = _graph()
  upward = sorted(f"{m} (row {_row_of(m, rows) + 1}) imports {d} (row {_row_of(d, rows) + 1})"
                  for m, deps in graph.items() for d in deps
                  if _row_of(m, rows) is not None and _row_of(d, rows) is not None
                  and _row_of(d, rows) < _row_of(m, rows))
  assert not upward, upward


def test_imports_form_no_circle():
  graph, _ = _graph()
  state, path = {}, []

  def visit(m):
    state[m] = "open"
    path.append(m)
    for d in sorted(graph[m]):
      if state.get(d) == "open":
        raise AssertionError("import circle: " + " -> ".join(path[path.index(d):] + [d]))
      if d not in state:
        visit(d)
    path.pop()
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m)


def test_no_module_takes_a_private_name_of_another():
  _, private = _graph()
  bad = {m: p for m, p in private.items() if p}
  assert not bad, bad


def test_the_checks_see_what_they_check():
  """The graph reader finds known edges and a private-name use, so the tests above cannot pass vacuously."""
  graph, _ = _graph()
  assert "snapjax.train.base" in graph["snapjax.train.loop"] and "snapjax.errors" in graph["snapjax.checkpoints"]
  assert "snapjax.train_step" in graph["snapjax.members"]
  with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
    f.write("from snapjax import ensemble\nfrom snapjax.ensemble import _x\nensemble._y(1)\n")
  try:
    deps, priv = _imports(f.name, set(_modules()))
  finally:
    os.remove(f.name)
  assert deps == {"snapjax.ensemble"} and priv == ["from snapjax.ensemble import _x", "snapjax.ensemble._y"], priv
