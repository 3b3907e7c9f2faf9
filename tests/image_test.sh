#!/usr/bin/env bash
# make image-test: build the serve-cpu and train images for real and run the serve image as users do.
# No Docker daemon and no registry here: podman builds (as root, --isolation chroot) on a Debian
# bookworm base made locally with debootstrap, and the built serve image's filesystem runs under
# chroot as its non-root user (podman run cannot set rlimits in this sandbox). Not part of make test.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${IMAGE_TEST_WORK:-/var/tmp/committee-image}
PY=${PYTHON:-.venv/bin/python}
BASE=localhost/bookworm-python
[ "$(id -u)" = 0 ] || { echo "image-test needs root (podman build --isolation chroot, chroot, mount)"; exit 1; }
command -v podman >/dev/null && command -v debootstrap >/dev/null || apt-get install -y -qq podman debootstrap
started=$(date +%s)
mkdir -p "$WORK"

if ! podman image exists "$BASE"; then
  [ -x "$WORK/rootfs/usr/bin/python3" ] || debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log"
  tar -C "$WORK/rootfs" -c . | podman import - "$BASE" >/dev/null
fi

# pip inside the build: this machine's CA (a TLS-intercepting proxy) and its folder of local wheels
pip_args=()
[ -f /etc/ssl/certs/ca-certificates.crt ] && pip_args+=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/host-ca.crt:ro --build-arg PIP_CERT=/etc/ssl/host-ca.crt)
[ -d /opt/wheels ] && pip_args+=(-v /opt/wheels:/opt/wheels:ro --build-arg PIP_FIND_LINKS=/opt/wheels)
for target in serve-cpu train; do
  t0=$(date +%s)
  podman build --isolation chroot --format docker "${pip_args[@]}" --build-arg "PYTHON_BASE=$BASE" \
      --target "$target" -t "localhost/committee:$target" . >"$WORK/build-$target.log" 2>&1 \
    || { tail -30 "$WORK/build-$target.log"; exit 1; }
  echo "built committee:$target in $(( $(date +%s) - t0 )) s"
done
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' localhost/committee

# ---- the serve image's filesystem, as UID 10001, against a small store --------------------------
image=localhost/committee:serve-cpu
root=$(podman image mount "$image")
scratch=$(mktemp -d)
server=""
cleanup() {
  [ -n "$server" ] && kill "$server" 2>/dev/null || true
  for m in proc dev models state tmp; do umount -l "$root/$m" 2>/dev/null || true; done
  podman image unmount "$image" >/dev/null 2>&1 || true
  rm -rf "$scratch"
}
trap cleanup EXIT
"$PY" -c "import sys; from pathlib import Path; sys.path.insert(0, '.'); from tests.onnx_fixtures import build_store; \
build_store(Path('$scratch/store'), Path('$scratch/work'))"
mkdir -p "$scratch/state" && chown 10001 "$scratch/state"
mount -t proc proc "$root/proc"
mount --bind /dev "$root/dev"
mount --bind -o ro "$scratch/store" "$root/models"
mount --bind "$scratch/state" "$root/state"
mount -t tmpfs -o size=64m tmpfs "$root/tmp"

if chroot "$root" /opt/committee/bin/python -c "import torch" 2>/dev/null || chroot "$root" /opt/committee/bin/python -c "import timm" 2>/dev/null; then
  echo "FAIL: torch or timm is importable in the serve image"; exit 1
fi
echo "ok: neither torch nor timm is importable in the serve image"

mapfile -t image_env < <(podman image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$image" | grep .)
port=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
env -i "${image_env[@]}" HOME=/tmp COMMITTEE_HOST=127.0.0.1 "COMMITTEE_PORT=$port" COMMITTEE_CALIBRATE=false \
    chroot --userspec=10001:10001 "$root" /opt/committee/bin/committee-serve --log-level warning &
server=$!
for _ in $(seq 1 120); do curl -sf "http://127.0.0.1:$port/v2/health/ready" >/dev/null && break; sleep 0.5; done
curl -sf "http://127.0.0.1:$port/v2/health/ready" || { echo "FAIL: not ready"; exit 1; }
echo
uid=$(ps -o uid= -p "$(pgrep -P "$server" -n || echo "$server")" | tr -d ' ')
[ "$uid" = 10001 ] || { echo "FAIL: the server runs as uid $uid"; exit 1; }
"$PY" -c "import io, numpy as np; from PIL import Image; b = io.BytesIO(); \
Image.fromarray(np.full((4, 4), 200, np.uint8), 'L').save(b, 'PNG'); open('$scratch/x.png', 'wb').write(b.getvalue())"
answer=$(curl -sf -F "images=@$scratch/x.png" "http://127.0.0.1:$port/v1/models/member-a/predict")
echo "prediction: ${answer:0:160}"
echo "$answer" | grep -q '"label"' || { echo "FAIL: no prediction"; exit 1; }
chroot "$root" /opt/committee/bin/python -c "import sys; print('serve image python', sys.version.split()[0])"

# the train image: torch imports and the command answers
troot=$(podman image mount localhost/committee:train)
mount -t tmpfs -o size=64m tmpfs "$troot/tmp"  # the image is read-only here; torch wants a temporary folder
chroot --userspec=10001:10001 "$troot" /opt/committee/bin/python -c \
    "import torch, timm; print('train image: torch', torch.__version__, 'timm', timm.__version__)"
chroot --userspec=10001:10001 "$troot" /opt/committee/bin/committee-train --help >/dev/null && echo "ok: committee-train answers in the train image"
umount -l "$troot/tmp"
podman image unmount localhost/committee:train >/dev/null
echo "image-test passed in $(( $(date +%s) - started )) s"
