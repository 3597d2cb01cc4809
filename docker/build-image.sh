#!/usr/bin/env bash
# Build a local stand-in for AWS's PyTorch training + inference Deep Learning Containers (CPU), for
# SageMaker local mode (instance_type='local') on a machine that reaches no container registry.
#
#   sudo docker/build-image.sh            # prints the image tag as its last line
#
# Debian bookworm (debootstrap) + Python 3.11 + torch/torchvision in /opt/venv + AWS's toolkits
# (sagemaker-training, sagemaker-pytorch-training, sagemaker-pytorch-inference, TorchServe) + Java
# for TorchServe, imported with `docker import`; no Dockerfile, no base image, no registry.
# The tag ends in a hash of the build inputs (this script, dockerd-entrypoint.py, the CA bundle);
# when that image exists already, the script only prints its tag. It also tags the image
# covid-xray/sagemaker-pytorch:2.14.1-cpu-py311 (no hash). See docker/README.md.
#
# Environment (all optional):
#   COVID_XRAY_IMAGE_REPO     image name (default covid-xray/sagemaker-pytorch)
#   COVID_XRAY_WHEEL_DIRS     host folders pip reads wheels from, space separated: a folder with a
#                             simple/ index is used as an index, any other as --find-links
#                             (default "/opt/wheels /opt/pypi /opt/pypi-more"; missing ones are skipped)
#   COVID_XRAY_CA_BUNDLE      CA bundle whose extra certificates the image trusts (default the host's
#                             /etc/ssl/certs/ca-certificates.crt: a TLS-intercepting proxy's CA comes along)
#   COVID_XRAY_BUILD_DIR      where the root filesystem is assembled (default /var/tmp; needs ~8 GB)
#   COVID_XRAY_IMAGE_REBUILD  1: build even when the tag exists
#   DEBIAN_MIRROR             default http://deb.debian.org/debian
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=${COVID_XRAY_IMAGE_REPO:-covid-xray/sagemaker-pytorch}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
WHEEL_DIRS=${COVID_XRAY_WHEEL_DIRS:-/opt/wheels /opt/pypi /opt/pypi-more}
CA_BUNDLE=${COVID_XRAY_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
BUILD_DIR=${COVID_XRAY_BUILD_DIR:-/var/tmp}
ENTRYPOINT_SRC=$HERE/dockerd-entrypoint.py

TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
PY_TAG=py311  # Debian bookworm's python3
# gcc + python3-dev: sagemaker-training is an sdist with a C extension, and requirements.txt may
# hold more; openjdk: TorchServe's frontend is Java.
APT_PACKAGES=(python3 python3-venv python3-dev gcc libc6-dev openjdk-17-jre-headless ca-certificates)
# setuptools < 81: sagemaker-pytorch-inference and TorchServe still import pkg_resources.
PIP_PACKAGES=(
  "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" "setuptools>=77.0.3,<81"
  "sagemaker-training==5.1.4" "sagemaker-pytorch-training==3.0.0"
  "sagemaker-pytorch-inference==2.0.25" "torchserve==0.12.0" "torch-model-archiver==0.12.0"
)
VENV=/opt/venv
IMAGE_CA=/etc/ssl/certs/ca-certificates.crt

log() { printf '[build-image %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }
# Status 3: Docker cannot run on this machine at all (`make test` then skips the local-mode tests, saying why).
cannot_run() { log "Docker cannot run here: $*"; exit 3; }

[[ $(id -u) == 0 ]] || cannot_run "run as root (debootstrap, chroot, mounts and dockerd need it)"
[[ -f $ENTRYPOINT_SRC ]] || die "$ENTRYPOINT_SRC is missing"

# --- host tools and the Docker daemon ---------------------------------------------------------

need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v dockerd >/dev/null || need+=(docker.io)
command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || need+=(docker-compose)
if ((${#need[@]})); then
  log "installing on the host: ${need[*]}"
  command -v apt-get >/dev/null || cannot_run "no apt-get to install ${need[*]} with; install them by hand"
  { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; } ||
    cannot_run "apt-get could not install ${need[*]}"
fi

if ! docker info >/dev/null 2>&1; then
  DOCKERD_LOG=${DOCKERD_LOG:-/var/log/dockerd.log}
  log "no Docker daemon answers: starting dockerd (log: $DOCKERD_LOG)"
  # --ip: ports the SDK publishes (the endpoint's 8080) bind to loopback only, not to every interface.
  setsid nohup dockerd --ip 127.0.0.1 >"$DOCKERD_LOG" 2>&1 </dev/null &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { tail -20 "$DOCKERD_LOG" >&2; cannot_run "dockerd did not answer within 60 s"; }
fi

# --- the tag: a hash of what goes into the image ----------------------------------------------

ca_hash=none
[[ -f $CA_BUNDLE ]] && ca_hash=$(sha256sum <"$CA_BUNDLE" | cut -c1-64)
inputs_hash=$( { cat "${BASH_SOURCE[0]}" "$ENTRYPOINT_SRC"; echo "$ca_hash $MIRROR"; } | sha256sum | cut -c1-12)
TAG="$REPO:$TORCH_VERSION-cpu-$PY_TAG-$inputs_hash"
# Moved to the newest build: the name the launcher looks for (covid_xray.sagemaker.sdk.LOCAL_IMAGE).
ALIAS="$REPO:$TORCH_VERSION-cpu-$PY_TAG"

if [[ ${COVID_XRAY_IMAGE_REBUILD:-0} != 1 ]] && docker image inspect "$TAG" >/dev/null 2>&1; then
  log "image exists, reusing it"
  docker tag "$TAG" "$ALIAS"
  echo "$TAG"
  exit 0
fi

# --- the root filesystem ------------------------------------------------------------------------

mkdir -p "$BUILD_DIR"
WORK=$(mktemp -d "$BUILD_DIR/covid-xray-image.XXXXXX")
ROOTFS=$WORK/rootfs

unmount_all() {
  # Deepest first; every mount under the rootfs must be gone before anything is deleted.
  local m
  awk -v r="$ROOTFS" 'index($2, r) == 1 {print $2}' /proc/mounts | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m"
  done
}
cleanup() {
  local rc=$?
  unmount_all
  if awk -v r="$ROOTFS" 'index($2, r) == 1 {found=1} END {exit !found}' /proc/mounts; then
    log "warning: mounts remain under $ROOTFS; not deleting $WORK"
  else
    rm -rf --one-file-system "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "debootstrap $SUITE (minbase) into $ROOTFS"
debootstrap --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
  || { tail -30 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }

security_mirror=${MIRROR%/debian}/debian-security
cat >"$ROOTFS/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $security_mirror $SUITE-security main
EOF
# As Debian's slim images: no recommends, no docs/man pages/translations from here on.
cat >"$ROOTFS/etc/apt/apt.conf.d/90covid-xray" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
EOF
cat >"$ROOTFS/etc/dpkg/dpkg.cfg.d/90covid-xray-nodoc" <<'EOF'
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-exclude=/usr/share/lintian/*
EOF
printf '#!/bin/sh\nexit 101\n' >"$ROOTFS/usr/sbin/policy-rc.d"  # no services start in the chroot
chmod +x "$ROOTFS/usr/sbin/policy-rc.d"
cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"

mount -t proc proc "$ROOTFS/proc"
mount --bind /dev "$ROOTFS/dev"

in_root() {
  chroot "$ROOTFS" /usr/bin/env -i HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive \
    PATH=$VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_CERT=$IMAGE_CA SSL_CERT_FILE=$IMAGE_CA REQUESTS_CA_BUNDLE=$IMAGE_CA \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_DEFAULT_TIMEOUT=180 \
    "$@"
}

log "apt: ${APT_PACKAGES[*]}"
in_root sh -c "apt-get update -qq && apt-get -y -qq upgrade && apt-get install -y -qq ${APT_PACKAGES[*]}" \
  >"$WORK/apt.log" 2>&1 || { tail -30 "$WORK/apt.log" >&2; die "apt-get in the chroot failed"; }

# Trust what the host trusts beyond Debian's roots (e.g. a TLS-intercepting proxy's CA), as
# separate certificates so that update-ca-certificates keeps them in the bundle.
if [[ -f $CA_BUNDLE ]]; then
  cp "$CA_BUNDLE" "$ROOTFS/tmp/host-ca-bundle.crt"
  in_root python3 - <<'EOF'
import pathlib, re, sys
pem = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
host = pem.findall(pathlib.Path("/tmp/host-ca-bundle.crt").read_text())
debian = set(pem.findall(pathlib.Path("/etc/ssl/certs/ca-certificates.crt").read_text()))
out = pathlib.Path("/usr/local/share/ca-certificates")
out.mkdir(parents=True, exist_ok=True)
extra = [c for c in host if c not in debian]
for i, cert in enumerate(extra):
    (out / f"build-host-{i:02d}.crt").write_text(cert + "\n")
print(f"{len(extra)} certificate(s) of the build host added", file=sys.stderr)
EOF
  rm "$ROOTFS/tmp/host-ca-bundle.crt"
  in_root update-ca-certificates >/dev/null 2>&1
fi

# The host's wheel folders, read-only, for torch and its CUDA libraries (PyPI has the rest).
pip_sources=()
for dir in $WHEEL_DIRS; do
  [[ -d $dir ]] || continue
  mnt=/mnt/host-wheels/$(basename "$dir")
  mkdir -p "$ROOTFS$mnt"
  mount --bind "$dir" "$ROOTFS$mnt"
  mount -o remount,ro,bind "$ROOTFS$mnt"
  if [[ -d $dir/simple ]]; then pip_sources+=(--extra-index-url "file://$mnt/simple"); else pip_sources+=(--find-links "$mnt"); fi
done

log "pip into $VENV: ${PIP_PACKAGES[*]}"
{ in_root python3 -m venv "$VENV" &&
  in_root pip install -q --upgrade pip &&
  in_root pip install "${pip_sources[@]}" "${PIP_PACKAGES[@]}" &&
  in_root pip check; } >"$WORK/pip.log" 2>&1 || { tail -30 "$WORK/pip.log" >&2; die "pip in the chroot failed"; }
grep -E '^Successfully installed' "$WORK/pip.log" | fold -s -w 160 >&2 || true

install -m 0755 "$ENTRYPOINT_SRC" "$ROOTFS/usr/local/bin/dockerd-entrypoint.py"
mkdir -p "$ROOTFS"/opt/ml/{input/data,input/config,model,output/data,code}

log "checking the toolkits import"
in_root python - <<EOF >&2
import torch, torchvision
assert torch.__version__.split("+")[0] == "$TORCH_VERSION", torch.__version__
assert torchvision.__version__.split("+")[0] == "$TORCHVISION_VERSION", torchvision.__version__
import sagemaker_training.cli.train, sagemaker_pytorch_container.training
import sagemaker_pytorch_serving_container.serving, sagemaker_pytorch_serving_container.torchserve
print("torch", torch.__version__, "torchvision", torchvision.__version__, "ok")
EOF
in_root java -version 2>&1 | sed -n 1p >&2

log "cleaning up the root filesystem"
unmount_all
rmdir "$ROOTFS"/mnt/host-wheels/* "$ROOTFS/mnt/host-wheels" 2>/dev/null || true
in_root_noproc() { chroot "$ROOTFS" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"; }
in_root_noproc apt-get clean
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/debconf/*-old \
  "$ROOTFS"/var/lib/dpkg/*-old "$ROOTFS"/root/.cache "$ROOTFS"/tmp/* "$ROOTFS"/var/tmp/* \
  "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* "$ROOTFS"/usr/share/lintian/* \
  "$ROOTFS"/usr/sbin/policy-rc.d
find "$ROOTFS/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
find "$ROOTFS/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
find "$ROOTFS/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name 'locale.alias' -exec rm -rf {} + 2>/dev/null || true
find "$ROOTFS/var/log" -type f -delete
: >"$ROOTFS/etc/resolv.conf"  # Docker bind-mounts its own
rm -f "$ROOTFS/etc/hostname"
: >"$ROOTFS/etc/machine-id" 2>/dev/null || true

# --- the image ------------------------------------------------------------------------------

changes=(
  --change "ENV PATH=$VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
  --change "ENV LANG=C.UTF-8"
  --change "ENV LC_ALL=C.UTF-8"
  --change "ENV PYTHONDONTWRITEBYTECODE=1"
  --change "ENV PYTHONUNBUFFERED=1"
  --change "ENV PYTHONIOENCODING=UTF-8"
  --change "ENV TEMP=/tmp"
  --change "ENV MKL_THREADING_LAYER=GNU"
  --change "ENV SAGEMAKER_TRAINING_MODULE=sagemaker_pytorch_container.training:main"
  --change "ENV SAGEMAKER_SERVING_MODULE=sagemaker_pytorch_serving_container.serving:main"
  --change "ENV PIP_CERT=$IMAGE_CA"
  --change "ENV REQUESTS_CA_BUNDLE=$IMAGE_CA"
  --change "ENV SSL_CERT_FILE=$IMAGE_CA"
  --change "ENV PIP_DISABLE_PIP_VERSION_CHECK=1"
  --change "ENV PIP_ROOT_USER_ACTION=ignore"
  --change "LABEL com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true"
  --change "LABEL org.opencontainers.image.title=\"covid-xray SageMaker PyTorch $TORCH_VERSION CPU, a local stand-in for AWS's DLCs\""
  --change "LABEL covid-xray.build-inputs=$inputs_hash"
  --change "LABEL framework_version=$TORCH_VERSION"
  --change "EXPOSE 8080 8081"
  --change "WORKDIR /"
  --change 'ENTRYPOINT ["/opt/venv/bin/python", "/usr/local/bin/dockerd-entrypoint.py"]'
  --change 'CMD ["bash"]'
)
log "docker import as $TAG ($(du -sh --one-file-system "$ROOTFS" | cut -f1) uncompressed)"
tar --numeric-owner --one-file-system -C "$ROOTFS" -cf - . | docker import "${changes[@]}" - "$TAG" >/dev/null
docker tag "$TAG" "$ALIAS"
log "done: $(docker image inspect --format '{{.Size}}' "$TAG" | awk '{printf "%.2f GB", $1 / 1e9}')"
echo "$TAG"
