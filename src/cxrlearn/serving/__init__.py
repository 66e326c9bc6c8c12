"""The HTTP service and its web page (:mod:`cxrlearn.serving.app`)."""

#: Largest upload the service accepts, in bytes (``cxrlearn serve --max-upload-mb``).
MAX_UPLOAD_BYTES = 32 * 1024 * 1024
