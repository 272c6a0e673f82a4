"""A full disk (a small tmpfs filled up) or a read-only one at each place a run writes: one
``WriteError`` (or ``CheckpointError``) naming the path and the space left, no partial file or
folder left behind."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hpt_megatron.config import load_config
from hpt_megatron.data.sample import RolloutBatch, Sample
from hpt_megatron.disk import WriteError
from hpt_megatron.models.provider import load_hf_config
from hpt_megatron.orchestration.exits import exit_code
from hpt_megatron.orchestration.loop import record_batch
from hpt_megatron.orchestration.metrics import MetricsLogger
from hpt_megatron.orchestration.run_dir import prepare_run_dir
from hpt_megatron.rollout.weight_sync import disk as disk_module
from hpt_megatron.rollout.weight_sync.disk import DiskPusher
from hpt_megatron.trainer import run as run_module
from hpt_megatron.trainer.checkpoint_files import CheckpointError
from hpt_megatron.trainer.checkpoint_write import PendingSave, begin_save
from hpt_megatron.trainer.run import Trainer
from tests.helpers.tmpfs import fill, tmpfs

TINY = str(Path(__file__).resolve().parents[3] / "examples" / "tiny_cpu.yaml")
DRIVER = SimpleNamespace(is_driver=True, world_size=1)


@pytest.fixture
def full_disk(tmp_path: Path):
    with tmpfs(tmp_path / "disk", "1m") as disk:
        fill(disk)
        yield disk


def _says_full(err: pytest.ExceptionInfo, path: Path) -> None:
    text = str(err.value)
    assert f"to {path}:" in text and "No space left on device" in text, text
    assert "the disk is full (no space left on device:" in text and "bytes free)" in text, text
    assert exit_code(err.value) == 1


def test_metrics_jsonl_on_a_full_disk(full_disk: Path):
    with pytest.raises(WriteError) as err:
        logger = MetricsLogger(full_disk, enabled=True, tensorboard=False, progress_bar=False)
        for step in range(1, 200):  # the first lines may fit in what the filesystem had left
            logger.log(step, {"loss": 1.0, "reward/mean": 0.5})
    _says_full(err, full_disk / "metrics.jsonl")
    assert str(err.value).startswith("cannot write the metrics to ")


def test_tensorboard_on_a_full_disk(full_disk: Path):
    with pytest.raises(WriteError) as err:
        logger = MetricsLogger(full_disk, enabled=True, jsonl=False, progress_bar=False)
        for step in range(1, 200):
            logger.log(step, {f"m/{i}": float(i) for i in range(50)})
        logger.close()
    _says_full(err, full_disk / "tensorboard")


def test_recorded_rollouts_on_a_full_disk_leave_no_partial_file(full_disk: Path):
    sample = Sample(prompt_id="p", group_id=0, prompt_ids=[1] * 50, response_ids=[2] * 50)
    batch = RolloutBatch([sample] * 200, 3, {})
    with pytest.raises(WriteError) as err:
        record_batch(batch, full_disk / "rollouts", 3)
    _says_full(err, full_disk / "rollouts" / "step_000003.jsonl")
    assert not (full_disk / "rollouts" / "step_000003.jsonl").exists()


def test_a_read_only_output_directory_is_one_clear_error(tmp_path: Path):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        cfg = load_config(TINY, [f"run.output_dir={ro / 'run'}"])
        hf = load_hf_config(dict(cfg.model.inline))
        with pytest.raises(WriteError, match="Read-only file system") as err:
            prepare_run_dir(cfg, DRIVER, hf, ro / "run")  # type: ignore[arg-type]
        text = str(err.value)
        assert text.startswith(f"cannot write the resolved config to {ro / 'run' / 'config.yaml'}")
        assert text.endswith("; 1 MiB free on that disk"), text  # not called full
        assert exit_code(err.value) == 1


def test_the_weight_sync_folder_on_a_full_disk_is_removed(full_disk: Path, monkeypatch):
    hf = load_hf_config(dict(load_config(TINY).model.inline))

    def shards(modules, hf, folder: Path, ctx, bucket_bytes: int) -> list[str]:
        (folder / "model-rank0.safetensors").write_bytes(b"\0" * (2 << 20))
        return ["model-rank0.safetensors"]

    monkeypatch.setattr(disk_module, "write_rank_shards", shards)
    chunk = torch.nn.Linear(2, 2)
    pusher = DiskPusher(full_disk / "sync", [chunk], hf, DRIVER)  # type: ignore[arg-type]
    with pytest.raises(WriteError) as err:
        pusher.push(4, None)
    _says_full(err, full_disk / "sync" / "v4.tmp")
    assert not list((full_disk / "sync").iterdir())


def test_the_hf_export_on_a_full_disk_is_removed(full_disk: Path, monkeypatch):
    def save(modules, hf, out: Path, ctx, torch_dtype: str) -> None:
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"\0" * (2 << 20))

    monkeypatch.setattr(run_module, "save_hf_folder", save)
    chunk = SimpleNamespace(config=SimpleNamespace(params_dtype=torch.float32))
    trainer = SimpleNamespace(
        cfg=SimpleNamespace(run=SimpleNamespace(run_dir=str(full_disk))),
        policy=SimpleNamespace(model_chunks=[chunk]),
        hf=None,
        ctx=DRIVER,
        tokenizer=None,
        update=SimpleNamespace(critic=None),
    )
    with pytest.raises(WriteError) as err:
        Trainer.export(trainer)  # type: ignore[arg-type]
    _says_full(err, full_disk / "hf")
    assert "the partial hf was removed" in str(err.value)
    assert not (full_disk / "hf").exists()


def test_a_checkpoint_on_a_read_only_disk_and_an_abandoned_save(tmp_path: Path):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        with pytest.raises(CheckpointError, match="Read-only file system") as err:
            begin_save(ro / "step_000001", [torch.nn.Linear(2, 2)])
        assert "step_000001.tmp" in str(err.value) and exit_code(err.value) == 1
    tmp = tmp_path / "step_000002.tmp"
    tmp.mkdir()
    (tmp / "__0_0.distcp").write_text("partial")
    PendingSave(tmp, tmp_path / "step_000002", None, {}, None).abandon()
    assert not tmp.exists()
