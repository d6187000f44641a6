"""Text-classification data for federated runs: load labelled text, then federate it over clients.

`load_labelled_text` turns a spec ("tweets", "bbc", a .csv/.jsonl file, "hf:NAME[:CONFIG]") into raw text with
integer labels, and `load_instructions` into prompt/response records for causal-LM instruction tuning;
`load_evals` reads OpenAI Evals registry tasks and `load_benchmark` MMLU, GSM8K, TruthfulQA and BBH from the
cached data archives (`archives`, fetched by scripts/setup.sh); `federate` holds out the global test set and
partitions the rest (iid, dirichlet, pathological; by label, or by an attribute with `split_by`, where "one"
value per client is a fourth) into per-client train/test shards, as DESIGN.md's evaluation protocol says.
Tokenisation happens elsewhere.
Front end: imports nothing from aggregation, adapters or federation.
"""

from .archives import data_dir, wheel_path
from .benchmarks import BENCHMARKS, load_benchmark
from .evals_registry import list_tasks, load_evals
from .instructions import InstructionData, load_instructions
from .partition import PARTITIONS, SPLIT_PARTITIONS, ClientData, FederatedData, federate, split_fields
from .sources import DataError, LabelledText, load_labelled_text

__all__ = ["load_labelled_text", "LabelledText", "federate", "FederatedData", "ClientData", "DataError", "PARTITIONS",
           "load_instructions", "InstructionData", "SPLIT_PARTITIONS", "split_fields", "load_evals", "list_tasks",
           "load_benchmark", "BENCHMARKS", "data_dir", "wheel_path"]
