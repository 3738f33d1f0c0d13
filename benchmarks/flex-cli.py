"""Run the ``nsaflex`` command line from a source checkout that is not installed
(the lent GPU machine): ``PYTHONPATH=.:benchmarks/flex-shim python benchmarks/flex-cli.py bench ...``."""
import sys

sys.argv[0] = "nsaflex"
from nsaflex.cli.main import main  # noqa: E402

main()
