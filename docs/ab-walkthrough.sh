#!/usr/bin/env bash
# The A/B walk-through of docs/ab-testing.md, against a running server on the default pipeline's store:
#   COMMITTEE_ADMIN_TOKEN=... COMMITTEE_FEEDBACK_TOKEN=... docs/ab-walkthrough.sh [BASE_URL] [IMAGES]
# An experiment of the mean-prob ensemble against the student, with the student shadowing every
# request; one user per Fashion-MNIST test image; the true labels as feedback; then the report.
set -euo pipefail
BASE=${1:-http://127.0.0.1:8000}
N=${2:-400}
TOKEN=${COMMITTEE_ADMIN_TOKEN:?set COMMITTEE_ADMIN_TOKEN to the server\'s admin token}
FEEDBACK=(); [ -n "${COMMITTEE_FEEDBACK_TOKEN:-}" ] && FEEDBACK=(-H "Authorization: Bearer $COMMITTEE_FEEDBACK_TOKEN")
PY=${PYTHON:-.venv/bin/python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# The first N test images as PNG files, with their true class names (from the served manifest).
"$PY" - "$WORK" "$N" "$BASE" <<'PYTHON'
import gzip, json, sys, urllib.request
from PIL import Image
work, n, base = sys.argv[1], int(sys.argv[2]), sys.argv[3]
root = "/usr/share/datasets/fashion-mnist"
labels = json.load(urllib.request.urlopen(f"{base}/v1/models/fmnist-student"))["manifest"]["labels"]
pixels = gzip.open(f"{root}/t10k-images-idx3-ubyte.gz").read()[16:]
truth = gzip.open(f"{root}/t10k-labels-idx1-ubyte.gz").read()[8:]
for i in range(n):
    Image.frombytes("L", (28, 28), pixels[i * 784:(i + 1) * 784]).save(f"{work}/{i}.png")
    open(f"{work}/{i}.label", "w").write(labels[truth[i]])
PYTHON

echo "# create the experiment"
curl -sf -X POST "$BASE/v1/admin/experiments" -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' -d '{
  "name": "ens-vs-student",
  "arms": [{"name": "ensemble", "variant": "fmnist-ensemble-mean-prob"},
           {"name": "student", "variant": "fmnist-student"}],
  "shadow": "fmnist-student"}'
echo

echo "# $N users, one image each"
: > "$WORK/answers"
for i in $(seq 0 $((N - 1))); do
  curl -sf -F "images=@$WORK/$i.png" -H "X-Experiment-Key: user-$i" "$BASE/v1/experiments/ens-vs-student/predict" \
    | "$PY" -c 'import json, sys; a = json.load(sys.stdin); print(a["request_id"], a["arm"])' >> "$WORK/answers"
done
cut -d' ' -f2 "$WORK/answers" | sort | uniq -c

echo "# the true labels as feedback"
paste -d' ' "$WORK/answers" <(for i in $(seq 0 $((N - 1))); do cat "$WORK/$i.label"; echo; done) \
  | "$PY" -c 'import json, sys; print(json.dumps({"feedback": [{"request_id": r, "label": " ".join(l)} for r, _, *l in (x.split() for x in sys.stdin)]}))' \
  > "$WORK/feedback.json"
curl -sf "$BASE/v1/feedback" "${FEEDBACK[@]}" -H 'Content-Type: application/json' -d @"$WORK/feedback.json" \
  | "$PY" -c 'import json, sys; print("recorded", json.load(sys.stdin)["recorded"])'

echo "# the report"
sleep 1  # the shadow of the last requests
curl -sf "$BASE/v1/experiments/ens-vs-student" | "$PY" -m json.tool
