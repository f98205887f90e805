"""BitingLip: batch inference on Dask.

::

    import bitinglip

    with bitinglip.connect() as platform:
        job = platform.submit("embed", model="all-MiniLM-L6-v2", inputs=["hello", "world"])
        df = job.result()
"""

from bitinglip.errors import BitingLipError
from bitinglip.platform.connect import connect
from bitinglip.platform.jobs import Job, Platform, Progress
from bitinglip.platform.tasks import Batch, Loaded, TaskType
from bitinglip.settings import Settings, get_settings

__version__ = "0.1.0"
__all__ = ["Batch", "BitingLipError", "Job", "Loaded", "Platform", "Progress", "Settings", "TaskType",
           "connect", "get_settings"]
