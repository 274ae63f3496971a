"""liveindex: live indexing of electron diffraction patterns beside the microscope.

The Python API (Jupyter): ``liveindex.index(patterns, detector, phases, **options)`` returns
an orix CrystalMap, through the same code path as ``liveindex index``. The runtime is
``liveindex.stream`` (repository folder stream/), the modalities ``liveindex.models``
(models/); this package only carries the API's entry point.
"""


def index(*args, **kwargs):
    from liveindex.stream.api import index as run

    return run(*args, **kwargs)


index.__doc__ = """Index patterns; see liveindex.stream.api.index (imported on first call, so that
``import liveindex`` stays light)."""
