"""The held-out passkey through the server against the in-process run, trial by trial: the same prompts (seed,
length, depth, trial give the key and the haystack's cut), the same answers?

    python compare_passkey.py SERVED.json IN_PROCESS.json [IN_PROCESS.json ...]
"""

import json
import sys

served = json.load(open(sys.argv[1]))["trials"]
local = [t for f in sys.argv[2:] for t in json.load(open(f))["trials"]]
key = lambda t: (t["length"], t["depth"], t["seed"])   # noqa: E731
near = {key(t): t for t in local}
pairs = [(t, near[key(t)]) for t in served if key(t) in near]
same_key = sum(a["key"] == b["key"] for a, b in pairs)
same_answer = sum(a["generated"] == b["generated"] for a, b in pairs)
for depth in sorted({t["depth"] for t in served}):
    cell = [(a, b) for a, b in pairs if a["depth"] == depth]
    print(f"depth {depth:g}: served {sum(a['correct'] for a, _ in cell)}/{len(cell)} correct, in process "
          f"{sum(b['correct'] for _, b in cell)}/{len(cell)}")
print(f"{len(pairs)} trials matched of {len(served)} served; the same key in {same_key}, the same answer in "
      f"{same_answer}")
for a, b in pairs:
    if a["generated"] != b["generated"]:
        print(f"  differs: {a['length']} depth {a['depth']:g} key {a['key']}: served {a['generated']!r}, "
              f"in process {b['generated']!r}")
