"""The CPU recipes' per-task step defaults and their checks of step counts (no training)."""
import pytest

from ldm_jax.errors import ConfigError
from ldm_jax.recipes import cifar_tasks, digit_tasks


@pytest.mark.parametrize("module,task", [(digit_tasks, t) for t in digit_tasks.TASKS] +
                         [(cifar_tasks, t) for t in cifar_tasks.TASKS])
def test_each_task_trains_its_own_default_steps_unless_told(module, task, tmp_path):
  default = module.ldm_config(task, str(tmp_path), str(tmp_path))
  assert default.train.num_steps == module.LDM_STEPS[task]
  assert module.ldm_config(task, str(tmp_path), str(tmp_path), 7).train.num_steps == 7


def test_bad_step_counts_stop_before_any_work(tmp_path):
  with pytest.raises(ConfigError, match="--ldm_steps: expected a positive number"):
    digit_tasks.run("layout", str(tmp_path / "digits"), ldm_steps=0)
  with pytest.raises(ConfigError, match="--ae_steps"):
    digit_tasks.run("text", str(tmp_path / "digits"), ae_steps=-1)
  with pytest.raises(ConfigError, match="--ae_steps"):
    cifar_tasks.run("sr", str(tmp_path / "cifar"), str(tmp_path), ae_steps=0)
  with pytest.raises(ConfigError, match="--ldm_steps"):
    cifar_tasks.run("inpaint", str(tmp_path / "cifar"), str(tmp_path), ldm_steps=0)
  assert not any(tmp_path.iterdir())
