"""Copy engines: the protocol (base) and the built-in engines, each a plugin."""
from .base import (PENDING, Capabilities, Completion, CopyJob, Engine, copy_descriptors,
                   create_engine, folio_mc_copy, parse_spec, run_engine)

__all__ = ["PENDING", "Capabilities", "Completion", "CopyJob", "Engine", "copy_descriptors",
           "create_engine", "folio_mc_copy", "parse_spec", "run_engine"]
