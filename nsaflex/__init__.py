"""nsaflex: a compiler for Native Sparse Attention patterns.

pattern (DSL) -> validated spec -> plan (lowering) -> backend kernels ->
runtime callable -> adapters / CLI.
"""

from nsaflex.errors import BackendUnavailable, InputError, NsaflexError, PatternError
from nsaflex.gates import GateNetwork
from nsaflex.inspect import AttentionInfo
from nsaflex.layer import SparseAttentionLayer
from nsaflex.loader import dump_pattern, load_pattern, loads_pattern, pattern_from_dict
from nsaflex.plan import Plan, PlanOptions, make_plan
from nsaflex.runtime import CompiledAttention, compile
from nsaflex.spec import (
    Budget,
    Compression,
    Gate,
    Hybrid,
    LayerOverride,
    Model,
    Pattern,
    Selection,
    Window,
)

__version__ = "0.1.0"

__all__ = [
    "AttentionInfo",
    "BackendUnavailable",
    "CompiledAttention",
    "Plan",
    "PlanOptions",
    "compile",
    "make_plan",
    "Budget",
    "Compression",
    "Gate",
    "GateNetwork",
    "Hybrid",
    "InputError",
    "LayerOverride",
    "Model",
    "NsaflexError",
    "Pattern",
    "PatternError",
    "Selection",
    "SparseAttentionLayer",
    "Window",
    "dump_pattern",
    "load_pattern",
    "loads_pattern",
    "pattern_from_dict",
]
