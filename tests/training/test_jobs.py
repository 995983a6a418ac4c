"""labkit.training.jobs: configs and flags, the job runner, checkpoints, the loop and the denoising pieces;
and `labkit train WHAT --help` for every job."""

import argparse
import json
import os
import signal

import numpy as np
import pytest
import torch

from labkit.cli import main
from labkit.shapes import data
from labkit.training import TRAINERS, jobs
from labkit.training.shapes import PRESETS as SHAPES_PRESETS
from labkit.training.shapes import ShapesConfig
from labkit.training.student import PRESETS as STUDENT_PRESETS
from labkit.training.student import StudentConfig


@pytest.mark.parametrize("job", ["shapes", "classifier", "vae", "student", "qat", "vpred"])
def test_every_job_has_its_help(job, capsys):
    assert job in TRAINERS
    with pytest.raises(SystemExit) as exit_info:
        main(["train", job, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--preset", "--out", "--device", "--seed", "--steps", "--minutes", "--export", "--fresh"):
        assert flag in out, (job, flag)


def test_train_lists_its_jobs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(job in out for job in TRAINERS)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "nonsense"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def _parse(config, presets, argv):
    parser = argparse.ArgumentParser()
    jobs.add_config_arguments(parser, config, presets, types={"layers_per_block": jobs.ints})
    return jobs.config_from_args(config, presets, parser.parse_args(argv))


def test_flags_override_the_preset_and_the_rest_stays():
    cfg = _parse(ShapesConfig, SHAPES_PRESETS, ["--preset", "tiny", "--steps", "7", "--no-progress"])
    assert cfg.steps == 7 and cfg.progress is False
    assert (
        cfg.bank_size == SHAPES_PRESETS["tiny"]["bank_size"] and cfg.model.text_hidden == 16
    )  # the preset's
    assert cfg.rescale_zero_snr is False and cfg.vae_from is None  # the defaults
    cfg = _parse(ShapesConfig, SHAPES_PRESETS, ["--rescale-zero-snr", "--vae-from", "shapes"])
    assert cfg.rescale_zero_snr is True and cfg.vae_from == "shapes" and cfg.steps == 8000
    json.dumps(cfg.to_dict())  # recorded in checkpoints and exports


def test_a_list_flag_and_a_bad_one():
    cfg = _parse(StudentConfig, STUDENT_PRESETS, ["--layers-per-block", "0,1,0"])
    assert cfg.layers_per_block == (0, 1, 0) and cfg.to_dict()["layers_per_block"] == [0, 1, 0]
    with pytest.raises(SystemExit):
        _parse(StudentConfig, STUDENT_PRESETS, ["--layers-per-block", "0,x"])


def test_run_job_prints_the_summary_and_clears_checkpoints_on_fresh(tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "old.json").write_text("{}")
    args = argparse.Namespace(threads=None, fresh=True)
    assert jobs.run_job(args, tmp_path, lambda: {"steps": 3}) == 0
    assert json.loads(capsys.readouterr().out) == {"steps": 3}
    assert not (tmp_path / "checkpoints").exists()


def test_sigterm_interrupts_the_job_like_ctrl_c(tmp_path, capsys):
    before = signal.getsignal(signal.SIGTERM)

    def job():
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt the job")

    assert jobs.run_job(argparse.Namespace(), tmp_path, job) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).pow(2).mean().backward()
    opt.step()
    ema = jobs.EMA(dict(model.named_parameters()), 0.9)
    g = torch.Generator().manual_seed(5)
    torch.rand(3, generator=g)
    path = tmp_path / "checkpoints" / "toy.safetensors"
    jobs.save_checkpoint(path, {"m": model}, opt, ema.state, {"step": 1}, {"g": g})

    other = torch.nn.Linear(3, 2)
    other_opt = torch.optim.AdamW(other.parameters(), lr=0.1)
    other_ema = jobs.EMA(dict(other.named_parameters()), 0.9)
    other_g = torch.Generator()
    meta = jobs.load_checkpoint(path, {"m": other}, other_opt, other_ema.state, "cpu", {"g": other_g})
    assert meta["step"] == 1
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], other_opt.state_dict()["state"][0]["exp_avg"])
    assert all(torch.equal(ema.state[k], other_ema.state[k]) for k in ema.state)
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=other_g))


def _toy_loop(out, steps, minutes=60.0):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = jobs.TrainConfig(out=str(out), steps=steps, minutes=minutes, log_every=1, progress=False)
    loop = jobs.Loop("toy", cfg, {"model": model}, opt, "cpu")

    def train_step(step):
        loss = model(torch.ones(1, 2)).pow(2).mean()
        jobs.optimizer_step(opt, loss, model.parameters())
        return {"loss": loss}

    return loop, train_step, model


def test_the_loop_logs_checkpoints_resumes_and_keeps_its_budget(tmp_path):
    loop, train_step, _ = _toy_loop(tmp_path, 3)
    saved = []
    loop.on_save.append(saved.append)
    loop.run(train_step)
    assert loop.step == 3 and saved[-1]["step"] == 3 and "loss" in loop.last
    assert json.loads((tmp_path / "checkpoints" / "toy.json").read_text())["step"] == 3

    loop, train_step, _ = _toy_loop(tmp_path, 5)  # the same run with more steps goes on from step 3
    assert loop.step == 3 and loop.resumed["step"] == 3
    loop.run(train_step)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5] and all(r["stage"] == "toy" for r in log)

    loop, train_step, _ = _toy_loop(tmp_path / "budget", 5, minutes=0.0)
    loop.run(train_step)
    assert loop.step == 0


def test_an_interrupted_loop_saves_its_step(tmp_path):
    loop, train_step, _ = _toy_loop(tmp_path, 5)

    def interrupted(step):
        if step == 2:
            raise KeyboardInterrupt
        return train_step(step)

    with pytest.raises(KeyboardInterrupt):
        loop.run(interrupted)
    assert json.loads((tmp_path / "checkpoints" / "toy.json").read_text())["step"] == 2


def test_warmup_and_ema():
    assert [jobs.warmup(s, 4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert jobs.warmup(0, 0) == 1.0
    p = torch.nn.Parameter(torch.zeros(2))
    ema = jobs.EMA({"unet.p": p}, decay=0.5)
    p.data.fill_(1.0)
    ema.update(0)  # decay ramps up: min(0.5, 1 / 10)
    torch.testing.assert_close(ema.part("unet")["p"], torch.full((2,), 0.9))


def test_min_snr_weights_for_epsilon_and_v():
    t = torch.tensor([0, 500, 999])
    eps = jobs.noise_scheduler({})
    a = eps.alphas_cumprod[t].float()
    snr = a / (1 - a)
    torch.testing.assert_close(jobs.snr_weight(eps, t, 5.0), snr.clamp(max=5.0) / snr)
    v = jobs.noise_scheduler({"prediction_type": "v_prediction"})
    torch.testing.assert_close(jobs.snr_weight(v, t, 5.0), snr.clamp(max=5.0) / (snr + 1))
    floor = jobs.snr_weight(eps, t, 0.0, floor=0.1)
    assert floor[-1] > 1 and floor[0] == 1.0  # the noisiest step weighs as SNR 0.1; the clean one as before


def test_timesteps_and_batches_are_drawn_per_step():
    g = torch.Generator().manual_seed(0)
    assert (jobs.sample_timesteps(500, 1000, 1.0, g) >= 700).all()
    assert (jobs.sample_timesteps(500, 1000, 0.0, g) < 700).any()
    means, stds = torch.randn(10, 4, 2, 2), torch.ones(10, 4, 2, 2)
    prompts = torch.arange(10)

    def batches(**options):
        scheduler = jobs.noise_scheduler(options.pop("scheduler", {}))
        return jobs.DenoisingBatches(means, stds, prompts, 0.5, scheduler, seed=0, stream=7, **options)

    a, b = batches(cfg_dropout=0.0)(3, 4), batches(cfg_dropout=0.0)(3, 4)
    assert torch.equal(a.noisy, b.noisy) and torch.equal(a.prompts, b.prompts)
    assert torch.equal(a.target, a.noise)
    assert not torch.equal(a.noisy, batches(cfg_dropout=0.0)(4, 4).noisy)
    assert (batches(cfg_dropout=1.0)(3, 4).prompts == jobs.EMPTY).all()
    v = batches(cfg_dropout=0.0, scheduler={"prediction_type": "v_prediction"})(3, 4)
    velocity = jobs.noise_scheduler({}).get_velocity(v.latents, v.noise, v.timesteps)  # same betas
    torch.testing.assert_close(v.target, velocity)


def test_the_bank_holds_images_and_their_prompts():
    images, index = jobs.make_bank(5, 0, "cpu", chunk=2)
    assert images.dtype == torch.uint8 and images.shape == (5, 3, 64, 64)
    first = data.sample(2, seed=0, split="train")
    assert [data.all_prompts()[i] for i in index[:2]] == first.prompts
    np.testing.assert_array_equal(
        images[:2].permute(0, 2, 3, 1).numpy(), (first.images * 255 + 0.5).astype(np.uint8)
    )
    assert jobs.EMPTY == len(data.all_prompts())


def test_quick_eval_without_a_classifier_says_how_to_train_it(monkeypatch, tmp_path):
    monkeypatch.setattr(jobs, "CLASSIFIER_PATH", tmp_path / "absent.safetensors")
    assert "labkit train classifier" in jobs.quick_eval(None, 10)["skipped"]
