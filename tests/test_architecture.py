"""The layout DESIGN.md asks for: the bundle format and input validation are neutral modules (nnpartials/), used by
both sides; exporter/ (writing) and runtime/ (serving) never import each other."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _imports(folder):
    """(file, imported module) for every import in the .py files of ``folder``, function-level ones included."""
    out = []
    for name in sorted(os.listdir(os.path.join(ROOT, folder))):
        if not name.endswith(".py"):
            continue
        path = os.path.join(ROOT, folder, name)
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                out += [(name, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against the package the folder is mapped to
                    pkg = {"exporter": "nnpartials.exporter", "runtime": "nnpartials.runtime"}.get(folder, folder)
                    out.append((name, f"{pkg}.{node.module or ''}"))
                else:
                    out.append((name, node.module or ""))
    return out


def test_exporter_does_not_import_runtime():
    bad = [(f, m) for f, m in _imports("exporter") if m.startswith("nnpartials.runtime")]
    assert not bad, bad


def test_runtime_does_not_import_exporter():
    bad = [(f, m) for f, m in _imports("runtime") if m.startswith("nnpartials.exporter")]
    assert not bad, bad


def test_the_format_and_validation_live_in_neutral_modules():
    import nnpartials.bundle
    import nnpartials.exporter.bundle as writer
    import nnpartials.validate

    assert writer.load_bundle is nnpartials.bundle.load_bundle  # one loader, re-exported by the writer
    assert callable(nnpartials.validate.as_batch)
    assert not os.path.exists(os.path.join(ROOT, "runtime", "validate.py"))
