"""The synthetic anomaly engine of "Many Tasks Make Light Work" (numpy + scipy only).

Five tasks (ids 0..4): intra_blend, inter_blend, sink, source, smooth_intensity, on 2D and 3D
float32 arrays alike, every random draw from an explicit `numpy.random.Generator`::

    from napari_mtml.anomalies import TASKS, synthesize
    result = synthesize(image, foreground, task="sink", rng=np.random.default_rng(0))
    result.image, result.label, result.mask

See docs/api.md for the contract and ../shared/METHOD.md §1-3 for the method.
"""

from napari_mtml.anomalies.placement import PlacedShape, PlacementError, place_shape
from napari_mtml.anomalies.recipe import (
    BLEND_TASKS,
    TASKS,
    SynthesisResult,
    synthesize,
    task_name,
)
from napari_mtml.anomalies.shapes import Shape, random_shape, ray_to_edge
from napari_mtml.anomalies.tasks import CXR_MAX_PUSH, TaskParams

__all__ = [
    "BLEND_TASKS",
    "CXR_MAX_PUSH",
    "TASKS",
    "PlacedShape",
    "PlacementError",
    "Shape",
    "SynthesisResult",
    "TaskParams",
    "flipped_gaussian_label",
    "place_shape",
    "poisson_blend",
    "random_shape",
    "ray_to_edge",
    "synthesize",
    "task_name",
]


def __getattr__(name):
    # the solver and the label live in their own modules; importing them on first use keeps
    # `import napari_mtml.anomalies` light
    if name == "poisson_blend":
        from napari_mtml.anomalies.poisson import poisson_blend

        return poisson_blend
    if name == "flipped_gaussian_label":
        from napari_mtml.anomalies.labelling import flipped_gaussian_label

        return flipped_gaussian_label
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
