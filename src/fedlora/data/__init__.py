"""Text-classification data for federated runs: load labelled text, then federate it over clients.

`load_labelled_text` turns a spec ("tweets", "bbc", a .csv/.jsonl file, "hf:NAME[:CONFIG]") into raw text with
integer labels, and `load_instructions` into prompt/response records for causal-LM instruction tuning;
`federate` holds out the global test set and partitions the rest (iid, dirichlet, pathological) into per-client
train/test shards, as DESIGN.md's evaluation protocol says. Tokenisation happens elsewhere.
Front end: imports nothing from aggregation, adapters or federation.
"""

from .instructions import InstructionData, load_instructions
from .partition import PARTITIONS, ClientData, FederatedData, federate
from .sources import DataError, LabelledText, load_labelled_text

__all__ = ["load_labelled_text", "LabelledText", "federate", "FederatedData", "ClientData", "DataError", "PARTITIONS",
           "load_instructions", "InstructionData"]
