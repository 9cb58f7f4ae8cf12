"""consolidated_state_dict on real checkpoints: a DeepSpeed expert-parallel MoE run (torchrun, ep_size=2, ZeRO-2)
consolidates, without a process group, into the native layout and gives the embeddings the DeepSpeed engine gives
after loading the same checkpoint itself; a native bf16 ZeRO-2 run gives exactly zero_to_fp32's fp32 master
weights; unreadable checkpoints fail in one line naming the path."""
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

from mmpt.config import MoEConfig, config_from_dict
from mmpt.data.tokenizer import tokenize
from mmpt.model import build_for_run
from mmpt.model.moe import DeepSpeedMoE, NativeMoE, copy_native_to_deepspeed
from mmpt.train.checkpoint import checkpoint_dir
from mmpt.train.consolidate import consolidated_state_dict, native_moe_layout
from tests.distributed import run_distributed
from tests.test_e2e import train

TOK = "clip-bpe-8k"  # the demo config's tokenizer

CAPTIONS = ["a digit", "the number seven written by hand", "three", "a handwritten zero on white paper"]


def _config(run_dir: Path, backend: str):
    cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    cfg.model.moe.backend = backend
    return cfg


def _inputs(seed: int) -> dict:
    """Every modality, different per rank (rank 1's tokens reach rank 0's experts); texts of different lengths
    so padding masks take part in routing."""
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(2, 3, 32, 32, generator=g), "video": torch.randn(2, 8, 3, 32, 32, generator=g),
            "audio": torch.randn(2, 1, 98, 128, generator=g),
            "text": tokenize(CAPTIONS[2 * seed:2 * seed + 2], 16, TOK)}


def _reference_rank(rank: int, world: int, run_dir: Path):
    """The DeepSpeed-backend model as DeepSpeed itself loads the checkpoint (experts from this rank's files)."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    from mmpt.train.engine import TrainModule, build_engine

    deepspeed.init_distributed(dist_backend="gloo")
    cfg = _config(run_dir, "deepspeed")
    engine = build_engine(TrainModule(build_for_run(cfg), cfg.loss), cfg, world)
    path, _ = engine.load_checkpoint(str(checkpoint_dir(run_dir)), load_module_only=True)
    assert path is not None
    engine.eval()
    inputs = _inputs(rank)
    with torch.no_grad():
        return inputs, {m: engine.module.model.encode(m, x)["emb"] for m, x in inputs.items()}


@pytest.mark.slow
def test_deepspeed_expert_parallel_run_consolidates_to_the_native_layout(demo_data, tmp_path):
    out = tmp_path / "ds"
    # Dropless routing (the demo's drop_tokens: false): both backends then route every token alike at eval.
    train(demo_data, out, 4, "deepspeed.zero_stage=2", "model.moe.backend=deepspeed", "model.moe.ep_size=2",
          "model.moe.drop_tokens=false")
    step = out / "checkpoints" / "step0000004"
    # One file per MoE layer and global expert, written by the rank holding it; mp_rank_00 has no experts.
    assert sorted(p.name for p in step.glob("layer_*")) == [
        f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" for layer in range(2) for e in range(4)]

    state = consolidated_state_dict(out / "checkpoints")
    assert not dist.is_initialized()
    assert state["trunk.blocks.1.ffn.w1"].shape == (4, 32, 128) and state["trunk.blocks.1.ffn.b2"].shape == (4, 32)
    expert3 = torch.load(step / "layer_1_expert_3_mp_rank_00_model_states.pt", weights_only=True)
    prefix = "model.trunk.blocks.1.ffn.moe.deepspeed_moe.experts.deepspeed_experts.3"
    assert torch.equal(state["trunk.blocks.1.ffn.w2"][3], expert3[f"{prefix}.fc2.weight"].t())
    model = build_for_run(_config(out, "native"))
    model.load_state_dict(state, strict=True)
    model.eval()

    results = run_distributed(_reference_rank, 2, out)
    for inputs, reference in results:
        with torch.no_grad():
            for modality, x in inputs.items():
                emb = model.encode(modality, x)["emb"]
                torch.testing.assert_close(emb, reference[modality], rtol=1e-5, atol=1e-6, msg=modality)
    # The comparison sees expert order: rank 0's expert 0 swapped with rank 1's expert 2 changes the embeddings.
    swap = [2, 1, 0, 3]
    model.load_state_dict({k: v[swap] if k.endswith((".ffn.w1", ".ffn.b1", ".ffn.w2", ".ffn.b2")) else v
                           for k, v in state.items()}, strict=True)
    with torch.no_grad():
        assert any(not torch.allclose(model.encode(m, x)["emb"], reference[m], rtol=1e-3, atol=1e-4)
                   for inputs, reference in results for m, x in inputs.items())


@pytest.mark.slow
def test_native_bf16_zero2_run_consolidates_to_the_fp32_master_weights(demo_data, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    out = tmp_path / "bf16"
    train(demo_data, out, 4, "deepspeed.zero_stage=2", "deepspeed.bf16=true")
    state = consolidated_state_dict(out / "checkpoints")
    reference = {k.removeprefix("model."): v for k, v in
                 get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints")).items()}
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) and state[k].dtype == torch.float32 for k in state)
    module = torch.load(out / "checkpoints/step0000004/mp_rank_00_model_states.pt", weights_only=False)["module"]
    w = "model.trunk.blocks.1.ffn.w1"
    assert module[w].dtype == torch.bfloat16 and not torch.equal(module[w].float(), state[w[len("model."):]])
    build_for_run(_config(out, "native")).load_state_dict(state, strict=True)


def test_native_layout_inverts_copy_native_to_deepspeed():
    cfg = MoEConfig(num_experts=4, backend="deepspeed")
    native, ds = NativeMoE(cfg, 16, 32), DeepSpeedMoE(cfg, 16, 32)
    copy_native_to_deepspeed(native, ds)
    state = native_moe_layout({f"ffn.{k}": v for k, v in ds.state_dict().items()})
    assert state.keys() == {f"ffn.{k}" for k in native.state_dict()}
    assert all(torch.equal(state[f"ffn.{k}"], v) for k, v in native.state_dict().items())
    partial = {f"ffn.{k}": v for k, v in ds.state_dict().items() if ".experts.deepspeed_experts.2." not in k}
    with pytest.raises(ValueError, match=r"ffn: experts missing from the checkpoint \(2\.fc1\.weight"):
        native_moe_layout(partial)


def test_unreadable_checkpoints_fail_in_one_line_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        consolidated_state_dict(tmp_path)
    step = tmp_path / "step0000001"
    step.mkdir()
    (tmp_path / "latest").write_text("step0000001")
    with pytest.raises(FileNotFoundError, match=f"{step}/mp_rank_00_model_states.pt: missing"):
        consolidated_state_dict(tmp_path)
    (step / "mp_rank_00_model_states.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"{step}/mp_rank_00_model_states.pt: not a readable") as err:
        consolidated_state_dict(tmp_path)
    assert "\n" not in str(err.value)
    torch.save({"module": {}}, step / "mp_rank_00_model_states.pt")  # some other torch file
    with pytest.raises(ValueError, match="not a DeepSpeed model-states file"):
        consolidated_state_dict(tmp_path)
