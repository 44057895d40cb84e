"""`tokenreduce bench`: each op against its plain-PyTorch reference, timed in the same run.

* `cases`: the `Case` of each op (target and quick shapes), the correctness check, inputs;
* `peers`: the strong plain-torch peers of each op (Gram greedy, compiled references, SDPA);
* `runner`: one case's paired measurement (`measure_case`) and the run over the cases (`run`);
* `report`: Rich table, memory lines, the printed summary, JSON.

The harness (paired timing, threads, the warm allocator, peak memory, environment) is
`tokenreduce.measure`, shared with `tokenreduce profile`; ``pytest bench`` runs the same cases.
"""
from .cases import CASE_BUILDERS, CASE_VARIANTS, Case, cases, check_outputs, make_input_sets  # noqa: F401
from .peers import Peer  # noqa: F401
from .runner import measure_case, run  # noqa: F401
