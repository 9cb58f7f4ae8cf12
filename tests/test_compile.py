"""train.compile: compiled steps give eager's losses. Here ZeRO-2 on one process, the demo's image-text step
(open_clip's BPE, the caption loss) for 20 steps, eager and compiled engines from the same weights on the same
batches, with a dense trunk and with MoE; tests/test_recovery.py runs the compiled ZeRO-3 case on 2 ranks with three
tasks, GradCache and DropToken against its straight eager run; tests/test_bench.py checks ZeRO-0's through
`mmpt bench step`."""
import json
import sys

from tests.conftest import run

# Each step's loss on both engines (bench.step.compile_comparison: two engines from the same weights, their steps
# interleaved on the same batches) and, with MoE, each engine's router logits, caught at mmpt.model.moe.route: the
# routing runs eagerly inside the compiled engine too, so the patched global sees both, in step order.
SCRIPT = """
import contextlib, json, sys
import mmpt.model.moe as moe
from mmpt.bench.step import SHAPES, compile_comparison, make_batches
from mmpt.distributed import init_distributed
init_distributed()
caught = []
route = moe.route
moe.route = lambda logits, *a, **k: caught.append(logits.detach().tolist()) or route(logits, *a, **k)
batches = make_batches(SHAPES["demo"], 8, 20)
out = {}
for trunk in ("dense", "moe"):
    caught.clear()
    with contextlib.redirect_stdout(None):
        result = compile_comparison(SHAPES["demo"], 8, batches, 0, 2, trunk)
    calls = len(caught) // (2 * len(batches))  # router calls a step: the same on every step and engine
    assert len(caught) == 2 * len(batches) * calls, (trunk, len(caught))
    logits = [caught[i * calls:(i + 1) * calls] for i in range(2 * len(batches))]
    out[trunk] = [[{"loss": loss, "logits": logits[2 * n + side]} for side, loss in enumerate(pair)]
                  for n, pair in enumerate(zip(result["losses"]["eager"], result["losses"]["compiled"]))]
print(json.dumps(out))
"""


def first_routing_difference(steps: list) -> tuple[int, list]:
    """The first step whose top-1 experts differ between the engines (len(steps) if none), and the eager router's
    top-1 minus top-2 logit of each token routed differently there."""
    import torch

    for i, (eager, compiled) in enumerate(steps):
        gaps = []
        for a, b in zip(eager["logits"], compiled["logits"], strict=True):
            a, b = torch.tensor(a), torch.tensor(b)
            differ = a.argmax(-1) != b.argmax(-1)
            top2 = a[differ].topk(2, dim=-1).values
            gaps += (top2[:, 0] - top2[:, 1]).tolist()
        if gaps:
            return i, gaps
    return len(steps), []


def test_compiled_steps_give_eagers_losses_under_zero_2():
    """Dense: every one of the 20 losses within 1e-5. MoE: the same bound on every step before the engines first
    route a token to different experts, and that token a tie to within 1e-5 in the eager router's logits. The fused
    kernels round differently (router logits ~1e-6 apart), so a near-tie can flip, and from that step on the two
    runs are different runs: measured on one machine, a token whose top-2 logits were 2.4e-7 apart flipped at step 7
    (loss 4.7e-4 apart), where another machine ran all 20 steps without a flip."""
    proc = run([sys.executable, "-c", SCRIPT], env={"OMP_NUM_THREADS": "2"}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    dense = [abs(e["loss"] - c["loss"]) for e, c in result["dense"]]
    assert len(dense) == 20 and max(dense) <= 1e-5, dense
    assert all(not e["logits"] for e, _ in result["dense"])
    flip, gaps = first_routing_difference(result["moe"])
    assert all(gap <= 1e-5 for gap in gaps), gaps
    same_routing = [abs(e["loss"] - c["loss"]) for e, c in result["moe"][:flip]]
    assert same_routing and max(same_routing) <= 1e-5, (flip, same_routing)


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
