"""A run folder damaged by hand, met as a user meets it: `arena play --resume` (and `arena export`) on a real run
of the tiny model. Each damage is refused in one line, or named as damaged with the run carried on from the last
good checkpoint; nothing already written is cut or rewritten, and non-finite weights never reach a checkpoint or
an exported model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from arena.cli import main
from arena.runstore import read_jsonl
from tiny import FAST_PROMPTS, play_prompts

ADAPTER = "adapter/adapter_model.safetensors"


@pytest.fixture(scope="module")
def played(tiny_model_dir, tmp_path_factory) -> Path:
    """A finished 3-iteration run, checkpointed at every iteration; each test damages a copy of it."""
    return play_prompts(tiny_model_dir, tmp_path_factory.mktemp("played") / "run", 3)


@pytest.fixture()
def run(played, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(played, copy)
    return copy


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def resume(capsys, run: Path, *more: str) -> tuple[int, str, str]:
    rc = main(["play", "prompts", "--resume", str(run), *more])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_refused(capsys, run: Path, *words: str, more: tuple[str, ...] = ("run.iterations=4",)) -> None:
    before = snapshot(run)
    rc, _, err = resume(capsys, run, *more)
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, err
    assert snapshot(run) == before  # nothing cut, rewritten or deleted


def test_deleted_checkpoints_are_refused(run, capsys):
    shutil.rmtree(run / "checkpoints")
    assert_refused(capsys, run, "metrics.jsonl records iterations up to 3", "checkpoint 2 was written")


def test_every_meta_json_deleted_is_refused(run, capsys):
    for meta in run.glob("checkpoints/*/meta.json"):
        meta.unlink()
    assert_refused(capsys, run, "every checkpoint is damaged", "meta.json (missing)")


@pytest.mark.parametrize("name", ["metrics.jsonl", "samples.jsonl"])
def test_a_deleted_record_file_is_refused(run, capsys, name):
    (run / name).unlink()
    assert_refused(capsys, run, f"{name}: missing, but its checkpoint recorded")


@pytest.mark.parametrize("damage_newest", [False, True])
def test_a_deleted_metrics_file_is_found_before_samples_are_cut(run, capsys, damage_newest):
    """samples.jsonl holds a crashed round's records past the checkpoint, metrics.jsonl is gone: the refusal comes
    before samples.jsonl is cut back (and, past a damaged checkpoint, before anything is set aside)."""
    with (run / "samples.jsonl").open("a") as f:
        f.write(json.dumps({"iteration": 4, "text": "written after the last checkpoint"}) + "\n")
    (run / "metrics.jsonl").unlink()
    if damage_newest:
        (run / "checkpoints/000003/meta.json").unlink()
    assert_refused(capsys, run, "metrics.jsonl: missing, but its checkpoint recorded", more=("run.iterations=5",))


def test_a_shortened_record_file_is_refused(run, capsys):
    data = (run / "metrics.jsonl").read_bytes()
    (run / "metrics.jsonl").write_bytes(data[:len(data) // 2])
    assert_refused(capsys, run, "metrics.jsonl: shorter than its checkpoint recorded", "Nothing was changed")


@pytest.mark.parametrize("edit", ["game.dataset", "run.seed"])
def test_a_hand_edited_config_is_held_to_the_checkpoint(run, capsys, tmp_path, edit):
    from omegaconf import OmegaConf

    config = OmegaConf.load(run / "config.yaml")
    if edit == "game.dataset":
        data = tmp_path / "data.jsonl"
        data.write_text("".join(json.dumps({"prompt": f"p{i}", "answer": "1"}) + "\n" for i in range(6)))
        config.game.dataset = str(data)
    else:
        config.run.seed = 7
    (run / "config.yaml").write_text(OmegaConf.to_yaml(config))
    assert_refused(capsys, run, f"{edit}: cannot change on --resume", "checkpoint 3 was made with the former")


def test_fewer_iterations_than_played_are_refused(run, capsys):
    assert_refused(capsys, run, "run.iterations: 1, but the run has already played 3", more=("run.iterations=1",))


def test_a_damaged_newest_checkpoint_is_named_and_its_records_kept(run, capsys):
    """The newest meta.json deleted: named, set aside, the run carried on from checkpoint 2; the records of
    iteration 3 it cut are kept in checkpoints/.rewound-000002/, and the replayed iteration is the same round."""
    samples, metrics = (run / "samples.jsonl").read_bytes(), (run / "metrics.jsonl").read_bytes()
    (run / "checkpoints/000003/meta.json").unlink()
    rc, out, err = resume(capsys, run)
    assert rc == 0 and "000003/meta.json: damaged checkpoint (missing); using the previous one" in err, err
    kept = run / "checkpoints/.rewound-000002"
    cut = (kept / "samples.jsonl").read_bytes()
    assert samples.endswith(cut) and [r["iteration"] for r in read_jsonl(kept / "samples.jsonl")] == [3] * 4
    assert metrics.endswith((kept / "metrics.jsonl").read_bytes())
    assert (run / "checkpoints/.damaged-000003" / ADAPTER).is_file()
    replayed = [r for r in read_jsonl(run / "samples.jsonl") if r["iteration"] == 3]
    assert [r["completion_ids"] for r in replayed] == [r["completion_ids"] for r in read_jsonl(kept / "samples.jsonl")]
    assert [r["iteration"] for r in read_jsonl(run / "metrics.jsonl")] == [0, 1, 2, 3]


def poison_adapter(checkpoint: Path) -> None:
    """NaN weights of the same names and shapes, and a meta.json without checksums (as older ones are): only
    reading the values can tell."""
    weights = load_file(checkpoint / ADAPTER)
    save_file({k: torch.full_like(v, float("nan")) for k, v in weights.items()}, checkpoint / ADAPTER)
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta.pop("sha256")
    meta["files"] = {name: (checkpoint / name).stat().st_size for name in meta["files"]}
    (checkpoint / "meta.json").write_text(json.dumps(meta))


def test_changed_adapter_bytes_are_found_by_checksum(run, capsys):
    path = run / "checkpoints/000003" / ADAPTER
    data = bytearray(path.read_bytes())
    data[-8:] = b"\x00\x00\xc0\x7f" * 2  # two float32 NaNs over the last weights, same size
    path.write_bytes(bytes(data))
    rc, _, err = resume(capsys, run)
    assert rc == 0 and f"{ADAPTER}: damaged checkpoint (its bytes changed since it was written" in err, err


def test_a_nan_adapter_is_damaged_on_resume_and_refused_by_export(run, capsys, tmp_path):
    poison_adapter(run / "checkpoints/000003")
    out = tmp_path / "model"
    assert main(["export", str(run), str(out)]) == 2
    err = capsys.readouterr().err
    assert "its weights hold NaN or infinite values" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    rc, _, err = resume(capsys, run)
    assert rc == 0 and "adapter: damaged checkpoint (its weights hold NaN or infinite values)" in err, err


def test_a_step_that_makes_weights_non_finite_raises_before_any_checkpoint(fresh_policy):
    """The guard behind every AdamW step: a weight pushed past float32's range by the step (lr within its bounds,
    the weight already near the top) raises, so the loop stops before that iteration's checkpoint."""
    from arena.errors import ArenaError
    from arena.interfaces import Env
    from arena.plugins.optimizers.grpo import GRPO, GRPOOptions

    opt = GRPO(GRPOOptions(lr=1.0), Env(config=None, registry=None, policy=fresh_policy))
    params = fresh_policy.trainable_parameters()
    with torch.no_grad():
        params[0].fill_(torch.finfo(torch.float32).max)
    for p in params:
        p.grad = torch.full_like(p, -1.0)  # Adam's first step adds lr to every weight
    opt.torch_optimizer.param_groups[0]["lr"] = 3e37  # its first step is lr / (1 - beta1): 3e38 up from max
    with pytest.raises(ArenaError, match="the update made the weights NaN or infinite"):
        opt.update()


def test_a_run_with_a_non_finite_step_leaves_no_checkpoint_of_it(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Through the loop: AdamW's real steps, the second then overflowing its first weight (as an lr too high for
    the weights would): the run stops with one line naming it, no checkpoint holds the step, checkpoint 1 and
    the records up to iteration 1 stay."""
    real_step = torch.optim.AdamW.step
    steps = []

    def overflowing_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        steps.append(1)
        if len(steps) == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    run = tmp_path / "run"
    rc = main(["play", "prompts", f"model.path={tiny_model_dir}", f"run.dir={run}", "run.iterations=2",
               "model.dtype=float32", "optimizer.beta=0", *FAST_PROMPTS,
               "judge=self_reward"])  # scores that differ: advantages, a step
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("arena: error: iteration 2: the update made the weights NaN or "
                                                   "infinite")
    assert [p.name for p in run.glob("checkpoints/0*")] == ["000001"]
    assert [r["iteration"] for r in read_jsonl(run / "metrics.jsonl")] == [0, 1]
