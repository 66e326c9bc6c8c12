"""The HTTP service and its web page (:mod:`cxrlearn.serving.app`)."""

#: Largest upload the service accepts, in bytes (``cxrlearn serve --max-upload-mb``).
MAX_UPLOAD_BYTES = 32 * 1024 * 1024
#: Seconds an upload may take to arrive whole (``cxrlearn serve --upload-timeout``): 32 MB at 1 MB/s.
UPLOAD_TIMEOUT_S = 30.0
