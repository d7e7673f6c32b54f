"""Loop mechanics: LR schedule, random streams, global-batch noise, step accounting."""
import math

import pytest
import torch

from modules.config.schema import TrainConfig
from modules.core.seeding import SHARED_STREAM, process_share_randn, step_generator
from modules.errors import TrainingAborted
from modules.run.checkpoint import TrainingState
from modules.run.harness import abort_on_bad_steps, count_step, lr_factor


def test_lr_schedule_is_a_function_of_the_step():
    cfg = TrainConfig(max_steps=110, lr_warmup_steps=10, lr_schedule="cosine")
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(110, cfg) == pytest.approx(0.0, abs=1e-12)
    linear = TrainConfig(max_steps=100, lr_schedule="linear")
    assert lr_factor(25, linear) == pytest.approx(0.75)
    assert lr_factor(50, TrainConfig(lr_schedule="constant")) == 1.0


def test_random_streams_are_reproducible_and_distinct():
    def draw(rank, step=3, micro=0):
        return torch.randn(8, generator=step_generator(7, step, micro, rank, torch.device("cpu")))

    assert torch.equal(draw(0), draw(0))
    streams = [draw(SHARED_STREAM), draw(0), draw(1), draw(0, step=4), draw(0, micro=1)]
    for i in range(len(streams)):
        for j in range(i):
            assert not torch.allclose(streams[i], streams[j])


def test_global_batch_noise_does_not_depend_on_the_split():
    def shared():
        return step_generator(0, 5, 0, SHARED_STREAM, torch.device("cpu"))

    whole = process_share_randn((4, 2, 3), shared(), rank=0, world_size=1)
    halves = [process_share_randn((2, 2, 3), shared(), rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.cat(halves), whole)


class FakeCheckpointer:
    root = "checkpoints"

    def __init__(self):
        self.saved = []

    def save(self, step):
        self.saved.append(step)


def count_or_abort(state, finite, cfg, checkpointer):
    """The old single call: count the step, then save and abort on a breach of train.max_bad_steps
    (the harness's count_step + abort_on_bad_steps)."""
    breach = count_step(state, finite, cfg)
    if breach is not None:
        abort_on_bad_steps(state, breach, checkpointer)


def test_bad_steps_are_counted_and_abort_after_the_limit():
    state, ckpt, cfg = TrainingState(), FakeCheckpointer(), TrainConfig(max_bad_steps=3, log_every=1)
    for finite in (True, False, True, False, False):
        count_or_abort(state, torch.tensor(finite), cfg, ckpt)
    assert (state.step, state.bad_steps, state.consecutive_bad_steps) == (5, 3, 2)
    with pytest.raises(TrainingAborted, match="3 consecutive non-finite steps at step 6"):
        count_or_abort(state, torch.tensor(False), cfg, ckpt)
    assert ckpt.saved == [6]
    restored = TrainingState()
    restored.load_state_dict(state.state_dict())
    assert restored == state


def test_bad_steps_are_read_at_logging_and_checkpoint_steps_only():
    """The flags stay on the device between logging steps; the counts, the abort and a checkpoint's
    saved state are still exact, the abort naming the step where the limit was reached."""
    state, ckpt = TrainingState(), FakeCheckpointer()
    cfg = TrainConfig(max_bad_steps=3, log_every=5, checkpoint_every=7, max_steps=100)
    for finite in (False, True, False, False):
        count_or_abort(state, torch.tensor(finite), cfg, ckpt)
    assert (state.step, state.bad_steps, len(state.unread)) == (4, 0, 4)        # nothing read yet
    count_or_abort(state, torch.tensor(True), cfg, ckpt)                         # step 5: a logging step
    assert (state.bad_steps, state.consecutive_bad_steps, state.unread) == (3, 0, [])
    count_or_abort(state, torch.tensor(False), cfg, ckpt)
    assert state.state_dict()["bad_steps"] == 4 and state.consecutive_bad_steps == 1   # a checkpoint counts
    for finite in (False, False, True):                                          # steps 7 (checkpoint), 8, 9
        count_or_abort(state, torch.tensor(finite), cfg, ckpt)
    assert (state.bad_steps, state.consecutive_bad_steps, ckpt.saved) == (5, 2, [])
    with pytest.raises(TrainingAborted, match=r"3 consecutive non-finite steps at step 8; .* \(step_10: "):
        count_or_abort(state, torch.tensor(True), cfg, ckpt)                     # step 10 reads step 8
    assert ckpt.saved == [10] and state.bad_steps == 6


def test_image_seeds_are_distinct_within_a_run_and_use_every_bit_of_the_base_seed():
    from modules.core.seeding import image_seed, mix_seed
    seeds = [image_seed(0, i) for i in range(50_000)]
    assert len(set(seeds)) == 50_000 and all(0 <= s < 2 ** 32 for s in seeds)   # no repeated noise in an FID set
    bases = (0, 1, 2 ** 32, 2 ** 64, 2 ** 70, -1)
    assert len({image_seed(b, 0) for b in bases}) == len(bases)   # high bits and sign count
    assert len({mix_seed(b) for b in bases}) == len(bases)
