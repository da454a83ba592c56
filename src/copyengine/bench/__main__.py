"""``python -m copyengine.bench``: the bench without the ``copyengine`` command."""
import sys

from .cli import main

sys.exit(main(sys.argv[1:]))
