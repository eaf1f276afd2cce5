"""Training: task/fold splits, the loop, safe checkpoints.

```python
from napari_mtml.config import TrainConfig
from napari_mtml.training import train
gen = train(TrainConfig(healthy=["scans/"], out="run"))
for event in gen: ...          # events of napari_mtml.training.events; gen.close() cancels
```
"""

from napari_mtml.training import events
from napari_mtml.training.crossval import FoldSplit, task_folds
from napari_mtml.training.events import *  # noqa: F403 - every event is part of this API
from napari_mtml.training.trainer import TrainingOutOfMemory, WarmupExponentialLR, train

__all__ = [
    "train",
    "task_folds",
    "FoldSplit",
    *events.__all__,
    "TrainingOutOfMemory",
    "WarmupExponentialLR",
]
