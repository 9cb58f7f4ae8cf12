"""mmpt bench imp-scale (the GPU command of docs/gpu.md) at tiny widths on CPU: the same path, every figure."""
import json
import sys

import pytest

from tests.conftest import run


@pytest.mark.slow
def test_bench_imp_scale_reports_step_time_mfu_and_moe_over_dense(demo_data, tmp_path):
    out = tmp_path / "scale.json"
    proc = run([sys.executable, "-m", "mmpt.cli", "bench", "imp-scale", "--cpu-smoke", "--data", str(demo_data),
                "--workdir", str(tmp_path / "runs"), "--out", str(out), "--peak-tflops", "0.05"], timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads(proc.stdout)  # stdout is the one JSON object; the trainings' logs went to stderr
    assert result == json.loads(out.read_text())
    for name in ("imp_b16", "imp_moe_b16"):
        r = result["configs"][name]
        assert r["s_per_step"] > 0 and r["samples_per_s"] > 0 and 0 < r["mfu"] and 0 <= r["loader_wait_share"] <= 1
        assert r["mfu"] == pytest.approx(r["model_tflops_per_s"] / 0.05) and r["mfu_probe"] > 0
        assert {"image", "text"} <= set(r["tokens_per_s"])
    assert result["moe_over_dense"] == (result["configs"]["imp_moe_b16"]["s_per_step"]
                                        / result["configs"]["imp_b16"]["s_per_step"])
