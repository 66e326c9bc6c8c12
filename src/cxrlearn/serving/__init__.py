"""The HTTP service and its web page (:mod:`cxrlearn.serving.app`)."""

#: Largest upload the service accepts, in bytes (``cxrlearn serve --max-upload-mb``).
MAX_UPLOAD_BYTES = 32 * 1024 * 1024
#: Seconds an upload may take to arrive whole (``cxrlearn serve --upload-timeout``): 32 MB at 1 MB/s.
UPLOAD_TIMEOUT_S = 30.0
#: Where the service listens by default: this machine only.
HOST, PORT = "127.0.0.1", 8000
#: Connections served at once; beyond them the service answers 503 (but /healthz, below).
MAX_CONNECTIONS = 64
#: Connections beyond MAX_CONNECTIONS, as a multiple of it, kept for health checks alone (a connection beyond them
#: is closed at once), so a full service still says it is alive.
HEALTH_FACTOR = 3
#: Connections one client address may hold at once (``cxrlearn serve --max-per-client``); one beyond them is closed
#: at once, so one client, or one attacker, cannot fill the service. Behind a reverse proxy every request comes from
#: the proxy's address: raise it to --max-connections there, and limit clients in the proxy.
MAX_PER_CLIENT = 16
#: Seconds a connection may take to send a request's headers whole (after opening, or after its last answer).
HEADER_TIMEOUT_S = 10.0
#: Most images in one forward pass of the service (``cxrlearn serve --max-batch``). On a 2-core CPU, 32 clients
#: got 0.96-1.08 of offline throughput with 16, 0.70 with 32 (docs/benchmarks.md); a GPU gains up to 64-128.
MAX_BATCH = 16
#: Milliseconds a request waits for others to share its forward pass (``cxrlearn serve --batch-wait-ms``): a few,
#: against a forward pass of tens of milliseconds on a CPU.
BATCH_WAIT_MS = 5.0
#: Longest side of the heatmap picture the service returns (``?cam=``): the upload is shown scaled down to it, so an
#: 8,000-pixel image costs a 2,048-pixel overlay's memory, not float copies of 64 million pixels.
OVERLAY_MAX_SIDE = 2048
