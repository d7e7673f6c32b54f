"""Trackers as people use them: project, entity and run name; one W&B run and one TensorBoard folder
per training run however often it resumes; captioned samples; evaluate.py's scores in the run.

W&B runs offline here (conftest sets WANDB_MODE=offline): what it would upload is read back from
its run files (tests/support.py: wandb_offline_runs)."""
from __future__ import annotations

import argparse
import json
import logging
import shutil

import pytest
import torch

import train_unet
import train_vae
from modules.config.cli import run_cli
from modules.run.tracking import SampleGrid, TrackerRecord, _captioned_images, log_sweep, tracker_record
from support import wandb_offline_runs

TINY = ["--config", "tiny", "train.log_every=1", "train.val_every=2", "train.image_log_every=2", "scale_samples=8"]


def vae_run(data, out, *extra):
    train_vae.main([*TINY, "--data", str(data), "--output-dir", str(out), *extra])


def record_of(out) -> dict:
    return json.loads((out / "tracker.json").read_text())


@pytest.fixture(scope="module")
def wandb_vae_run(shapes_dir, tmp_path_factory):
    """A stage-1 run of 2 steps that reported to W&B: project from $WANDB_PROJECT, entity and name from the
    flags (copy it before resuming)."""
    out = tmp_path_factory.mktemp("trackers") / "vae"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_PROJECT", "from-env")
        env.delenv("WANDB_RUN_ID", raising=False)
        vae_run(shapes_dir, out, "--report-to", "wandb", "--max-steps", "2", "train.checkpoint_every=2",
                "--tracker-entity", "my-team", "--tracker-run-name", "first try")
    wandb_offline_runs(out)         # waits for wandb's service to finish the run's file before it is copied
    return out


def test_a_resumed_run_continues_its_wandb_run_and_its_steps(wandb_vae_run, shapes_dir, tmp_path, caplog):
    run = tmp_path / "vae"
    shutil.copytree(wandb_vae_run, run)
    first = record_of(run)
    assert first["project"] == "from-env" and first["entity"] == "my-team" and first["run_name"] == "first try"
    assert first["exported_step"] == 2 and len(first["wandb_id"]) == 8
    with caplog.at_level(logging.WARNING):
        vae_run(shapes_dir, run, "--report-to", "wandb", "--resume", "latest", "--max-steps", "4",
                "--tracker-project", "elsewhere", "--tracker-run-name", "second try")
    assert "this run reports to project 'from-env'" in caplog.text
    before, after = wandb_offline_runs(run)
    assert before["id"] == after["id"] == first["wandb_id"]
    assert before["project"] == after["project"] == "from-env" and after["entity"] == "my-team"
    assert (before["name"], after["name"]) == ("first try", "second try")
    assert [row["_step"] for row in before["history"]] == [1, 2]
    assert [row["_step"] for row in after["history"]] == [3, 4]          # the steps after the checkpoint
    assert record_of(run) == {**first, "run_name": "second try", "exported_step": 4}


def test_a_damaged_tracker_record_reports_to_a_new_wandb_run(wandb_vae_run, shapes_dir, tmp_path, caplog):
    run = tmp_path / "vae"
    shutil.copytree(wandb_vae_run, run)
    old_id = record_of(run)["wandb_id"]
    (run / "tracker.json").write_text('{"report_to": "wandb", "project": "from-env", "wandb_id": "a/b"')
    with caplog.at_level(logging.WARNING):
        vae_run(shapes_dir, run, "--report-to", "wandb", "--resume", "latest", "--max-steps", "3")
    assert "tracker.json: invalid JSON" in caplog.text and "reports to a new tracker run" in caplog.text
    resumed = wandb_offline_runs(run)[-1]
    assert resumed["id"] == record_of(run)["wandb_id"] != old_id
    assert [row["_step"] for row in resumed["history"]] == [3]           # training went on from its checkpoint


def test_wandb_refusing_the_kept_run_is_one_line(wandb_vae_run, shapes_dir, tmp_path, monkeypatch, capsys):
    import wandb
    run = tmp_path / "vae"
    shutil.copytree(wandb_vae_run, run)
    calls = []

    def refuse(**kwargs):
        calls.append(kwargs)
        raise wandb.errors.CommError("run was previously created and deleted")
    monkeypatch.setattr(wandb, "init", refuse)
    with pytest.raises(SystemExit) as exit_code:
        run_cli(train_vae.main, [*TINY, "--data", str(shapes_dir), "--output-dir", str(run), "--report-to", "wandb",
                                 "--resume", "latest", "--max-steps", "3"])
    assert exit_code.value.code == 2
    err = capsys.readouterr().err
    assert "W&B could not start run" in err and "remove" in err and "tracker.json" in err and "Traceback" not in err
    kept = record_of(run)
    assert calls == [{"project": "from-env", "dir": str(run), "name": "first try", "id": kept["wandb_id"],
                      "resume": "allow", "entity": "my-team"}]


def test_a_resumed_run_continues_its_tensorboard_folder(shapes_dir, tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path / "vae"
    vae_run(shapes_dir, run, "--report-to", "tensorboard", "--max-steps", "2", "train.checkpoint_every=2",
            "--tracker-project", "my-project")
    with caplog.at_level(logging.WARNING):
        vae_run(shapes_dir, run, "--report-to", "tensorboard", "--resume", "latest", "--max-steps", "4",
                "--tracker-project", "another")
    assert "this run reports to project 'my-project'" in caplog.text
    assert [p.name for p in (run / "logs").iterdir()] == ["my-project"]
    events = EventAccumulator(str(run / "logs" / "my-project"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss_l1")] == [1, 2, 3, 4]


@pytest.mark.parametrize("words, variables, named", [
    (["--tracker-project", "team/project"], {}, "--tracker-project 'team/project'"),
    (["--tracker-project", ".."], {}, "--tracker-project '..'"),
    (["--tracker-entity", "a:b"], {}, "--tracker-entity 'a:b'"),
    (["--tracker-run-name", "x" * 200], {}, "--tracker-run-name 'xxx"),
    ([], {"WANDB_PROJECT": "p" * 129}, "$WANDB_PROJECT 'ppp"),
    ([], {"WANDB_RUN_ID": "run#1"}, "$WANDB_RUN_ID 'run#1'")])
def test_names_a_tracker_would_refuse_are_refused_at_start_up(shapes_dir, tmp_path, capsys, monkeypatch, words,
                                                              variables, named):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit):
        run_cli(train_vae.main, [*TINY, "--data", str(shapes_dir), "--output-dir", str(tmp_path / "run"),
                                 "--report-to", "wandb", *words])
    err = capsys.readouterr().err
    assert err.startswith(f"error: {named}") and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_the_first_start_takes_a_sweep_agents_run_id_and_a_resume_keeps_the_record(tmp_path, monkeypatch):
    args = argparse.Namespace(report_to="wandb", tracker_project=None, tracker_entity=None, tracker_run_name=None,
                              resume=None)
    monkeypatch.setenv("WANDB_RUN_ID", "agent-run-7")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    first = tracker_record(tmp_path, args, "ldm-unet")
    assert first == TrackerRecord("wandb", "ldm-unet", tmp_path.name, None, "agent-run-7")
    monkeypatch.delenv("WANDB_RUN_ID")
    fresh = tracker_record(tmp_path, args, "ldm-unet")                   # not a resume: a new W&B run
    assert fresh.wandb_id not in (None, "agent-run-7") and len(fresh.wandb_id) == 8
    args.resume = "latest"
    assert tracker_record(tmp_path, args, "ldm-unet") == fresh
    assert json.loads((tmp_path / "tracker.json").read_text())["wandb_id"] == fresh.wandb_id


def test_sample_grids_reach_wandb_one_image_per_sample_with_its_class(shapes_dir, tiny_vae_run, tmp_path):
    out = tmp_path / "unet"
    train_unet.main(["--config", "tiny", "--data", str(shapes_dir), "--vae", str(tiny_vae_run), "--output-dir",
                     str(out), "--report-to", "wandb", "--max-steps", "2", "cond.type=class",
                     "train.checkpoint_every=2", "train.image_log_every=2", "sample.num_images=4", "sample.steps=1,2"])
    (run,) = wandb_offline_runs(out)
    row = next(r for r in run["history"] if "samples/rows_1_2_steps/each/captions" in r)
    classes = ["circle (class 0)", "square (class 1)", "triangle (class 2)", "circle (class 0)"]
    assert row["samples/rows_1_2_steps/each/captions"] == [f"{c} | {s}" for s in ("1 step", "2 steps")
                                                          for c in classes]
    assert row["samples/rows_1_2_steps/each/count"] == 8                  # the grid's images, no more
    assert row["samples/rows_1_2_steps/_type"] == "image-file"            # and the grid itself
    assert "triangle (class 2)" in row["samples/rows_1_2_steps/caption"]


def test_text_model_samples_reach_wandb_with_their_prompts(shapes_dir, tiny_vae_run, tmp_path):
    pytest.importorskip("transformers")
    from scripts.tiny_clip import write_tiny_clip
    out = tmp_path / "unet"
    train_unet.main(["--config", "tiny", "--data", str(shapes_dir), "--vae", str(tiny_vae_run), "--output-dir",
                     str(out), "--report-to", "wandb", "--max-steps", "1", "cond.type=text",
                     f"cond.text_encoder={write_tiny_clip(tmp_path / 'clip')}", "train.image_log_every=1",
                     "sample.num_images=3", "sample.steps=2"])
    (run,) = wandb_offline_runs(out)
    prompts = [json.loads(line)["text"] for line in (shapes_dir / "metadata.jsonl").read_text().splitlines()[:3]]
    (captions,) = [r["samples/rows_2_steps/each/captions"] for r in run["history"]
                   if "samples/rows_2_steps/each/captions" in r]
    assert captions == [f"{prompt} | 2 steps" for prompt in prompts]


def test_each_sample_carries_its_caption_and_its_mask_condition():
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    masks = torch.zeros(2, 1, 4, 4)
    masks[0, :, :2] = 1
    masks[1, :, :, 3:] = 1
    shown = list(SampleGrid([images, -images], ["1 step", "4 steps"], ["mask 0", "mask 1"], masks).each())
    assert [caption for _, caption, _ in shown] == ["mask 0 | 1 step", "mask 1 | 1 step", "mask 0 | 4 steps",
                                                    "mask 1 | 4 steps"]
    expected = masks.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)[:, 0].numpy()   # nearest, 4 -> 8 px
    for i, (pixels, _, mask) in enumerate(shown):
        assert pixels.shape == (8, 8, 3) and (mask == expected[i % 2]).all()
    assert (shown[3][0] == ((-images[1].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).all()
    assert len(_captioned_images(SampleGrid([images], ["1 step"], ["", "b"]))) == 2


def test_a_sweep_reaches_the_runs_tensorboard_at_its_export_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path / "run"
    run.mkdir()
    (run / "tracker.json").write_text(json.dumps({"report_to": "tensorboard", "project": "p", "run_name": "r",
                                                  "exported_step": 1200}))
    rows = [{"key": "k", "steps": n, "cfg_scale": 1.0, "num_samples": 64, "fid": 40.0 / n, "reference": "ref.npz",
             "source_size": [32, 32]} for n in (1, 4)]
    log_sweep(run, rows, tmp_path / "no_plot.png")
    events = EventAccumulator(str(run / "logs" / "p"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("eval/fid_steps_4_cfg_1")] == [(1200, 10.0)]
    assert "| steps | cfg_scale | num_samples | fid |" in events.Tensors("eval/sweep/text_summary")[0] \
        .tensor_proto.string_val[0].decode()
