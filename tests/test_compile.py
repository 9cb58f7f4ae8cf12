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


def test_moe_routing_stays_eager_in_a_compiled_engine():
    """compile_engine (through compile_blocks, on the engine's module) marks each NativeMoE layer's forward as
    torch.compiler.disable'd (its per-expert splits depend on the data); the mark is made there, not by a
    decorator at import, so that `import mmpt` does not import torch._dynamo."""
    from mmpt.config import load_config
    from mmpt.model import build_for_run
    from mmpt.model.moe import NativeMoE
    from mmpt.train.engine import compile_blocks

    cfg = load_config("demo", ["model.width=32", "model.depth=2", "model.heads=2", "model.embed_dim=32"])
    model = build_for_run(cfg)
    layers = [m for m in model.modules() if isinstance(m, NativeMoE)]
    assert layers and not any(hasattr(m.forward, "_torchdynamo_disable") for m in layers)
    compile_blocks(model)
    assert all(getattr(m.forward, "_torchdynamo_disable", False) for m in layers)


def test_the_cli_starts_without_torch_dynamo():
    """torch._dynamo is 1.4 s of import: `mmpt` commands that do not compile (every config error, every eval)
    start without it."""
    proc = run([sys.executable, "-c", "import sys, mmpt.cli; print('torch._dynamo' in sys.modules)"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"
