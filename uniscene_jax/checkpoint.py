"""orbax checkpoints of the train state and the input position, in <workdir>/checkpoints.

A checkpoint holds the train state (a pytree of arrays) and the data iterator's state (JSON), so a
resumed run sees exactly the samples an uninterrupted run would have seen. Saves are asynchronous;
only complete steps are ever listed, so the latest step is always restorable.
"""

import json
import os

import orbax.checkpoint as ocp


class Checkpoints:
  """CheckpointManager with the project's two items: 'state' and 'data'."""

  def __init__(self, workdir: str, every_steps: int = 1000, keep: int = 3, use_async: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        save_interval_steps=every_steps,
        max_to_keep=keep,
        enable_async_checkpointing=use_async,
        create=True,
      ),
      item_names=('state', 'data'),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_state: bytes | None = None, force: bool = False) -> bool:
    """Saves when `step` is on the interval (or `force`); returns whether a save started."""
    data = json.loads(data_state.decode()) if data_state else {}
    return self.manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)),
      force=force,
    )

  def restore(self, step: int, abstract_state) -> tuple[object, bytes | None]:
    """(state laid out like `abstract_state` (arrays or ShapeDtypeStructs with shardings), data)."""
    try:
      out = self.manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
        ),
      )
    except ValueError as e:
      if 'mismatch' not in str(e):
        raise
      raise ValueError(
        f'{self.directory}/{step}: the saved train state is laid out differently from this '
        f"run's ({e}). It cannot resume; start a new workdir with "
        f'--config.init_from={os.path.dirname(self.directory)} to warm-start from its weights'
      ) from e
    data = out['data']
    return out['state'], (json.dumps(data).encode() if data else None)

  def restore_raw(self, step: int) -> dict:
    """The saved state of `step` as a tree of host arrays, without a target structure (for
    evaluation and warm starts, which need only some of it)."""
    out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return out['state']

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
