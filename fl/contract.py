"""The message contract between server and clients: every record name, config
key and metric key that crosses the wire is defined here, once.

Both sides import these names; neither spells a key as a string literal.
Keys are hyphenated like Flower's own (`num-examples`, `server-round`).
"""

from __future__ import annotations

from typing import Final

# --- message types -----------------------------------------------------------
#: Flower routes a message of type "train.explore" to ``@app.train("explore")``.
EXPLORE_ACTION: Final = "explore"
#: "evaluate.decompose": evaluate the round's client models on this node's data
DECOMPOSE_ACTION: Final = "decompose"
GLOBAL_MODEL: Final = "global"  #: record name of the global model in a decompose request
CLIENT_MODEL_PREFIX: Final = "client-"  #: record names "client-0", "client-1", ...
LOSS_PREFIX: Final = "loss-"  #: metric names "loss-0", ..., "loss-global" in its reply

# --- record names inside a RecordDict ---------------------------------------
ARRAYS: Final = "arrays"  #: model view (dense ArrayRecord) or update
PAYLOAD: Final = "payload"  #: sparse wire payload (ArrayRecord of raw bytes, fl/wire)
PAYLOAD_BYTES: Final = "wire-bytes"  #: key of the encoded bytes inside the PAYLOAD record
CONFIG: Final = "config"  #: ConfigRecord with the keys below
METRICS: Final = "metrics"  #: MetricRecord with the keys below

# --- config keys (server -> client) ------------------------------------------
SERVER_ROUND: Final = "server-round"
LOCAL_EPOCHS: Final = "local-epochs"
PROXIMAL_MU: Final = "proximal-mu"  #: same key Flower's FedProx sends
MARGIN_LAMBDA: Final = "margin-lambda"  #: FedLD margin control (0 = off)
MASK_VERSION: Final = "mask-version"
STRUCTURE: Final = "structure"  #: kept units as JSON, sent with a fresh mask (AutoFLIP)

# --- metric keys (client -> server) ------------------------------------------
PARTITION_ID: Final = "partition-id"  #: query reply: the node's place in the population
NUM_EXAMPLES: Final = "num-examples"  #: the key Flower's FedAvg weights by
TRAIN_LOSS: Final = "train-loss"
TRAIN_SECONDS: Final = "train-seconds"
TRAIN_FLOPS: Final = "train-flops"
PEAK_MEMORY_MB: Final = "peak-memory-mb"
#: train reply under Ray: the Ray node that trained it (fl.scaleout.node_number: an int)
RAY_NODE_ID: Final = "ray-node-id"
EVAL_LOSS: Final = "eval-loss"
EVAL_ACCURACY: Final = "eval-accuracy"

# --- cohort mode (simulation.cohort_size > 0; fl/packing.py, server/cohorts.py) ---------
#: config key of the discovery query in cohort mode: "answer as a worker" (no data loaded)
COHORT_QUERY: Final = "cohort-query"
WORKER_INDEX: Final = "worker-index"  #: worker query reply: this worker's place (0..W-1)
NUM_WORKERS: Final = "num-workers"  #: worker query reply: workers in the federation
#: record of a packed message: which client owns which of the records below (JSON)
COHORT_LAYOUT: Final = "cohort-layout"
COHORT_RECORD_PREFIX: Final = "cohort-r"  #: the packed records "cohort-r0", "cohort-r1", ...
