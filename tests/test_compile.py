"""train.compile: compiled steps give eager's losses. Here ZeRO-2 on one process, the demo's image-text
step (MoE, open_clip's BPE, the caption loss) for 20 steps, eager and compiled engines from the same weights on the
same batches; tests/test_recovery.py runs the compiled ZeRO-3 case on 2 ranks with three tasks, GradCache and
DropToken against its straight eager run; tests/test_bench.py checks ZeRO-0's through `mmpt bench step`."""
import json
import sys

from tests.conftest import run

SCRIPT = """
import json, sys, contextlib
from mmpt.bench.step import SHAPES, compile_comparison, make_batches
from mmpt.distributed import init_distributed
init_distributed()
batches = make_batches(SHAPES["demo"], 8, 21)
with contextlib.redirect_stdout(None):
    result = compile_comparison(SHAPES["demo"], 8, batches, 1, 2)
print(json.dumps(result))
"""


def test_compiled_steps_give_eagers_losses_under_zero_2():
    proc = run([sys.executable, "-c", SCRIPT], env={"OMP_NUM_THREADS": "2"}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["steps"] == 20 and "ZeRO-2" in result["how"]
    assert result["max_loss_difference"] <= 1e-5, result
