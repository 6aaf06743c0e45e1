"""A short GIF of a policy playing, made in the parent process without running the policy.

The frames come from replaying an episode's recorded actions in a trusted emulator
(:func:`~genopt_projects.atari.policy_runner.replay`: same game, seed and settings as the
rollout, so the replay shows exactly the episode that was scored).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .policy_runner import RolloutConfig, replay


def write_gif(config: RolloutConfig, seed: int, actions: Sequence[int], path: str | Path, *,
              every: int = 2, fps: int = 15) -> int:
    """Write ``path`` (an endless-loop GIF): the frame after reset, then the frame after every
    ``every``-th action; ``fps`` frames per second. Returns the number of frames written.

    With frameskip 4 and ``every=2`` one GIF frame is 8 emulator frames; 15 fps then plays at
    twice real time (60 Hz / 8 = 7.5 agent frames per second of play).
    """
    import imageio.v3 as iio
    import numpy as np

    from .env import ObjectEnv

    with ObjectEnv(config.game, frameskip=config.frameskip, noop_max=config.noop_max,
                   repeat_action_probability=config.repeat_action_probability) as env:
        env.reset(seed=seed)
        frames = [env.render_rgb().copy()]
    for index, (_, frame, _) in enumerate(replay(config, seed, list(actions), frames=True)):
        if (index + 1) % every == 0 or index == len(actions) - 1:
            frames.append(frame.copy())
    iio.imwrite(Path(path), np.stack(frames), extension=".gif", duration=1000 / fps, loop=0)
    return len(frames)


__all__ = ["write_gif"]
