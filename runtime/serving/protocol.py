"""The request and response of the served stream model (``infini_stream``): tensor names, dtypes, meanings.

The one place they are spelled: the repository writer (export/triton_repo.py), the Triton model
(runtime/serving/triton_model.py) and the remote stream (runtime/serving/remote.py) all read them here.

Every request belongs to one sequence (Triton's correlation ID = the stream id, a positive integer) and
carries the sequence batcher's controls. Inputs (each with Triton's batch dimension of 1):

    TOKENS          INT64 [n]   tokens to feed (n >= 0); with MAX_NEW_TOKENS > 0, the prompt to continue
    KEEP            INT32 [1]   logits returned: 0 none, 1 the last token's (default), 2 every fed token's
    MAX_NEW_TOKENS  INT32 [1]   generate this many tokens after TOKENS (default 0: only feed)
    TEMPERATURE     FP32  [1]   0 greedy (default); TOP_K INT32 [1], TOP_P FP32 [1], SEED INT64 [1]: sampling
    STOP            INT64 [k]   stop tokens of the generation (optional)
    RESET           INT32 [1]   1: forget this stream (memory and snapshot) and start it empty
    EXPECTED_POSITION INT64 [1] the position the client last saw (optional): a request that finds the stream
                                elsewhere (another client fed it) is refused and changes nothing

Outputs:

    LOGITS          FP32  [r, V]  r = 0, 1 or n rows (KEEP)
    GENERATED       INT64 [g]     the generated tokens (g <= MAX_NEW_TOKENS)
    POSITION        INT64 [1]     tokens the stream has consumed after this request (fed and generated)
    PERSISTED       INT64 [1]     position of the stream's state on disk after this request, -1 if none

A request takes effect whole or not at all: when its state cannot be persisted (a full disk), the stream is
put back where it was and the request fails, so sending it again feeds its tokens once.
"""

from __future__ import annotations

MODEL_NAME = "infini_stream"
DRAIN_FILE = "DRAIN"   # touched in <repo>/infini_stream/ before a stop: every instance persists its streams
FAILED_FILE = "FAILED"  # <repo>/infini_stream/FAILED.<pid>: why an instance did not load (one line), for the
                        # launcher: tritonserver 2.51 hangs when a Python model's initialize() raises

TOKENS, KEEP, MAX_NEW_TOKENS = "TOKENS", "KEEP", "MAX_NEW_TOKENS"
TEMPERATURE, TOP_K, TOP_P, SEED, STOP, RESET = "TEMPERATURE", "TOP_K", "TOP_P", "SEED", "STOP", "RESET"
EXPECTED = "EXPECTED_POSITION"
LOGITS, GENERATED, POSITION, PERSISTED = "LOGITS", "GENERATED", "POSITION", "PERSISTED"
START, END, READY, CORRID = "START", "END", "READY", "CORRID"

KEEP_CODES = {0: "none", 1: "last", 2: "all"}

# name -> (Triton data type, dims without the batch dimension, optional)
INPUTS = {TOKENS: ("TYPE_INT64", [-1], False), KEEP: ("TYPE_INT32", [1], True),
          MAX_NEW_TOKENS: ("TYPE_INT32", [1], True), TEMPERATURE: ("TYPE_FP32", [1], True),
          TOP_K: ("TYPE_INT32", [1], True), TOP_P: ("TYPE_FP32", [1], True), SEED: ("TYPE_INT64", [1], True),
          STOP: ("TYPE_INT64", [-1], True), RESET: ("TYPE_INT32", [1], True), EXPECTED: ("TYPE_INT64", [1], True)}
OUTPUTS = {LOGITS: ("TYPE_FP32", [-1, "V"]), GENERATED: ("TYPE_INT64", [-1]), POSITION: ("TYPE_INT64", [1]),
           PERSISTED: ("TYPE_INT64", [1])}
CLIENT_DTYPES = {"TYPE_INT64": "INT64", "TYPE_INT32": "INT32", "TYPE_FP32": "FP32", "TYPE_UINT64": "UINT64"}
