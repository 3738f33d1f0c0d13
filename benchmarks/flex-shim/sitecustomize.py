"""Import nsaflex from a source checkout that is not installed (the lent GPU
machine): ``PYTHONPATH=.:benchmarks/flex-shim``. Maps ``nsaflex.patterns``,
``nsaflex.cli`` and ``nsaflex.codegen`` to the top-level folders, as the
installed package does (see pyproject's package-dir)."""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FOLDERS = {"nsaflex.patterns": "patterns", "nsaflex.cli": "cli", "nsaflex.codegen": "codegen"}


class _CheckoutFinder:
    def find_spec(self, name, path=None, target=None):
        for prefix, folder in FOLDERS.items():
            if name == prefix or name.startswith(prefix + "."):
                rest = name[len(prefix) + 1:]
                base = os.path.join(ROOT, folder, *rest.split(".")) if rest else os.path.join(ROOT, folder)
                if os.path.isdir(base):
                    return importlib.util.spec_from_file_location(
                        name, os.path.join(base, "__init__.py"), submodule_search_locations=[base])
                if os.path.isfile(base + ".py"):
                    return importlib.util.spec_from_file_location(name, base + ".py")
        return None


sys.meta_path.insert(0, _CheckoutFinder())
