"""Every tunable default of cw, named, in one place."""

from __future__ import annotations

import os

#: Root of the cluster directories on the shared filesystem (``$CW_HOME``).
HOME = os.path.expanduser(os.environ.get("CW_HOME", "~/.cw"))
#: Name of the cluster directory under HOME (``$CW_CLUSTER``).
CLUSTER = os.environ.get("CW_CLUSTER", "default")
#: Name of the embedded local cluster's directory under HOME (what `cw.Client()` starts when it
#: finds no master).
LOCAL_CLUSTER = "local"

#: Port the master tries first; if it is taken, it binds a random one and publishes it.
PORT = 7757
#: Largest message a master or worker accepts (bytes). Larger ones cut the sender off.
MAX_MESSAGE = 512 * 1024 * 1024
#: Room for the frames around the payload (version, kind, MAC, header) above MAX_MESSAGE.
HEADER_ROOM = 64 * 1024
#: Bytes of a message from a peer without a session (an OPEN is about 150).
OPEN_MESSAGE = 4096
#: Bytes of the first message on a new session (a HELLO, or a STATUS or RETRY request),
#: before it verifies: a HELLO lists the jobs a client waits for or a worker holds.
HELLO_MESSAGE = 64 * 1024 * 1024
#: Messages the master queues from one connection before it stops reading it (backpressure).
PEER_QUEUE = 1000
#: Handshakes (an OPEN answered, no message on the session yet) the master holds at once ...
PENDING_MAX = 1024
#: ... each for at most this many seconds.
HANDSHAKE_TIMEOUT = 10.0
#: A peer sends a new OPEN when its last one has gone unanswered this many seconds.
HANDSHAKE_RETRY = 2.0
#: The master answers a connection without a session (CHALLENGE, BYE, REJECT) at most once
#: per this many seconds ...
STRANGER_EVERY = 1.0
#: ... at most this many times over the connection's life ...
STRANGER_REPLIES = 16
#: ... and at most this many times a second in all (BYE, REJECT) ...
STRANGER_RATE = 200
#: ... except CHALLENGEs, which answer only OPENs signed with the cluster key on
#: connections that passed the gate: at most this many a second, so that a thousand
#: array tasks starting at once all open their sessions within a second or two.
CHALLENGE_RATE = 2000
#: Seconds a session may stay silent before the master forgets it (peers heartbeat every second).
SESSION_IDLE = 60.0
#: Connections a master accepts at once; it also keeps FD_RESERVE descriptors of its
#: open-file limit (raised to the hard limit at start) for itself.
MAX_CONNECTIONS = 10_000
FD_RESERVE = 256
#: Milliseconds a new connection has to finish the ZeroMQ handshake before it is closed.
HANDSHAKE_IVL = 5000
#: Seconds a connection token (the gate in front of the wire, see cw/security.py) stays
#: valid around its time: clocks of the hosts of one cluster may differ this much.
TOKEN_WINDOW = 300.0
#: Tokens the master remembers (each is accepted once).
TOKEN_CACHE = 100_000

#: With $CW_TRACE set, a process notes at most this many events (benchmarks' per-hop breakdown).
TRACE_EVENTS = 1_000_000

#: A blob (arguments, a result, a function) of at least this many bytes is large: on the
#: wire it is signed by its SHA-256, computed once (cw.protocol), and the store keeps it
#: in a file beside the database rather than in its pages (cw.store.blobs).
LARGE_BLOB_BYTES = 64 * 1024

#: Messages whose blobs total at least this many bytes are sent without a copy.
ZERO_COPY_BYTES = 64 * 1024

#: Seconds between heartbeats when a link is otherwise idle.
HEARTBEAT = 1.0
#: Seconds of silence after which the master declares a worker lost.
WORKER_TIMEOUT = 10.0
#: Seconds of silence after which a worker or client declares the master lost.
MASTER_TIMEOUT = 10.0
#: Seconds a client waits for the master's welcome before raising.
CONNECT_TIMEOUT = 10.0
#: A worker exits after the master has been unreachable this many seconds.
GIVE_UP = 600.0
#: Reconnection attempts start this many seconds apart and double up to BACKOFF_MAX.
BACKOFF = 1.0
BACKOFF_MAX = 30.0

#: Times a job may lose its worker before it fails with WorkerLostError.
MAX_RETRIES = 3

#: Batching: at most this many jobs or bytes in one message on any hop.
BATCH_JOBS = 1000
BATCH_BYTES = 16 * 1024 * 1024
#: Frames in one message, at most: a batch of BATCH_JOBS jobs carries one blob each, and
#: at most one function each. A receiver counts frames before it computes a MAC.
MAX_FRAMES = 2 * BATCH_JOBS + 16
#: A worker keeps about this many seconds of work queued per slot (adaptive prefetch).
PREFETCH_SECONDS = 0.02
#: ... and never more than this many jobs per slot.
PREFETCH_MAX = 500
#: An executor child gets its tasks in batches of about this many seconds of work ...
EXECUTOR_BATCH_SECONDS = 0.005
#: ... and never more than this many tasks at once.
EXECUTOR_BATCH_MAX = 200
#: After a message or result of at least this many bytes, a master or executor hands
#: freed memory back to the system (malloc_trim, at most once a second, once idle), so
#: that it returns to its baseline.
RELEASE_BYTES = 1024 * 1024
#: Arguments that pickle to at most this many bytes and hold a set get their default key
#: (in a named run) from a pickle with every set in sorted order: a set's order changes
#: with each interpreter's string hashing, and the key must not. Larger ones keep their bytes.
CANONICAL_KEY_BYTES = 4 * 1024 * 1024
#: Seconds a worker keeps looking for processes of killed executors' jobs (to end them).
ORPHAN_SWEEP = 5.0
#: Weight of a new sample in the smoothed runtime of a function (exponential moving average).
RUNTIME_WEIGHT = 0.2
#: A worker tells the master which jobs its executors started (a HEARTBEAT) once no RESULT
#: has told it within this many seconds: a short job's result says it first.
STARTED_DELAY = 0.005
#: The master handles at most this many messages per turn before it commits and answers.
MASTER_TURN = 2000
#: Seconds an acknowledgement may wait for a result to ride on.
ACK_DELAY = 0.01

#: The master holds at most this many unfinished jobs in memory; the rest wait in the store.
QUEUE_WINDOW = 100_000
#: ... and at most this many bytes of their arguments.
QUEUE_WINDOW_BYTES = 1024 * 1024 * 1024

#: Client backpressure: at most this many submitted but unacknowledged jobs, or bytes.
MAX_UNACKED_JOBS = 100_000
MAX_UNACKED_BYTES = 1024 * 1024 * 1024

# -- graphs, scattered data, nested jobs ------------------------------------------------
#: The master keeps the values of jobs that are inputs of others, and scattered data, in
#: memory up to this many bytes (more are read back from the store when a worker asks).
MASTER_DATA_CACHE = 512 * 1024 * 1024
#: A worker keeps this many bytes of inputs and scattered data, the most recently used.
WORKER_DATA_CACHE = 1024 * 1024 * 1024
#: An executor process keeps the unpickled inputs and scattered data it was given, up to
#: this many bytes (counted by their pickles), the most recently used.
EXECUTOR_DATA_CACHE = 512 * 1024 * 1024
#: A worker sends again, after a broken link, the results it sent since it last heard from the
#: master (a master killed meanwhile may never have stored them), at most this many seconds old ...
RESULT_RESEND_SECONDS = 30.0
#: ... up to this many bytes of them.
RESULT_RESEND_BYTES = 64 * 1024 * 1024
#: The master remembers, per session, this many finished submissions (seq -> job) in memory
#: for the futures later jobs name as inputs (older ones are looked up in the store).
SESSION_RECENT = 100_000

#: A client left open at exit waits this many seconds for the master to commit what it submitted.
EXIT_FLUSH = 30.0
#: A client warns when its jobs have waited this many seconds at a master with no worker
#: (and again this often while jobs require what no connected worker offers).
NO_WORKERS_WARNING = 60.0
#: Jobs that require what no connected worker offers fail after this many seconds (per Client).
UNSATISFIABLE_TIMEOUT = 1800.0

#: Seconds between rate-limited log lines of the same kind (bad messages, rejected keys).
LOG_EVERY = 10.0
#: Seconds a draining worker lets running jobs finish before handing them back.
GRACE = 30.0
#: Seconds kept, after a SIGTERM, between the end of a worker's grace and the SIGKILL the
#: batch system sends after its own wait (SLURM's KillWait): to hand back what still runs.
TERM_MARGIN = 3.0
#: A worker measures its memory and CPU (for the status) and sends them at least this often.
USAGE_EVERY = 2.0
#: Bytes of a job's stdout, and of its stderr, kept in the store: the tail (per Client and per submit).
OUTPUT_LIMIT = 1024 * 1024
#: Lines of a failed job's stderr shown with its exception in the client.
STDERR_LINES = 20
#: The status document lists this many of the latest failures ...
STATUS_FAILURES = 20
#: ... and the master keeps this many samples of its counters (one per timer tick) for its rates.
STATUS_SAMPLES = 400

# -- shell-command jobs, scratch and outputs ---------------------------------------
#: Seconds a command's leftover processes may hold its output pipes after it ended,
#: before they are killed (they end with the command, as a job's processes end with it).
COMMAND_LEFTOVER_GRACE = 0.2
#: Seconds `cw run-file` waits, after a set's setup failed and it cancelled the rest, for
#: the store to record every job's end, so that its summary counts what the store holds.
RUNFILE_SETTLE_WAIT = 15.0

# -- launchers (SLURM, Grid Engine) ---------------------------------------------
#: Seconds between the keeper's looks at the scheduler (one batched query each).
POLL = 20.0
#: Pause after a heal before the next one; it doubles with each heal in a row.
HEAL_BACKOFF = 10.0
#: ... up to this; a pool that stays full this long starts again from HEAL_BACKOFF.
HEAL_BACKOFF_MAX = 600.0
#: Tasks the keeper may resubmit over the pool's life, per worker of its size.
HEALS_PER_WORKER = 10
#: Seconds a submission or cancel command may take.
COMMAND_TIMEOUT = 60.0
#: Seconds a query (squeue, qstat) may take.
QUERY_TIMEOUT = 20.0
#: Seconds each command of a job environment's deadline() and post_mortem() may take.
PROBE_TIMEOUT = 5.0
#: Where this user's workers on a host keep their local control sockets (``cw pause``
#: without the key): ``<CONTROL_ROOT>/cw-<uid>/`` (``$CW_CONTROL_ROOT``, else /tmp: not
#: ``$TMPDIR``, which batch systems set per job).
CONTROL_ROOT = os.environ.get("CW_CONTROL_ROOT", "/tmp")
#: A job environment's deadline() asks the scheduler again after this many seconds.
DEADLINE_CACHE = 60.0
#: The scheduler signals a worker this many seconds before its time limit, so that
#: it drains (capped at a third of the limit, for short limits).
DRAIN_BEFORE = 90.0
#: Seconds `cw store recover` lets SQLite's shell work on a damaged store.
RECOVER_TIMEOUT = 3600.0
#: Seconds `up` waits for the master to publish itself.
UP_WAIT = 600.0
#: Seconds `down` waits for the workers to drain and the jobs to leave the queue.
DOWN_WAIT = 150.0
#: Seconds a stopping master waits for a companion thread (the keeper) to finish its turn.
COMPANION_JOIN = QUERY_TIMEOUT + COMMAND_TIMEOUT

# -- adaptive pools ------------------------------------------------------------
#: The status document's runtime of a queue: the mean over the functions of this many jobs at its head.
DEMAND_SAMPLE = 100
#: An adaptive pool asks for enough workers to run what is queued in about this many seconds.
ADAPT_TARGET = 60.0
#: ... counting this many seconds for a job whose function has no measured runtime yet.
ADAPT_UNKNOWN_RUNTIME = 5.0
#: Workers idle this long are retired (drained) when the queue does not need them.
ADAPT_IDLE_TIMEOUT = 300.0
#: Seconds between an adaptive pool's decisions (one scheduler query and one status query each).
ADAPT_INTERVAL = 10.0
#: An adaptive pool adds at most max(ADAPT_STEP, its size) tasks per decision: it at most doubles.
ADAPT_STEP = 8
#: Seconds an owner-less pool waits after its owner (a SlurmCluster's process) stopped renewing its lease.
OWNER_LEASE = 120.0
#: Seconds between the keeper's looks at its owner (a process on its host: is it alive?).
OWNER_CHECK = 1.0

# -- cw doctor -------------------------------------------------------------------
#: Seconds each network check (a TCP connect, the signed round trip) may take.
DOCTOR_TIMEOUT = 3.0
#: Seconds `cw doctor --from-node` waits for its job to run and report.
DOCTOR_WAIT = 300.0

