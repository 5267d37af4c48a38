#!/bin/sh
# Builds the CPU image (docker/Dockerfile) and runs it with no container registry at all: the base image is
# a Debian rootfs made by debootstrap from the apt mirror and imported into podman; the torch CPU wheel
# comes from a local directory (bind-mounted into the build); every other wheel comes from PyPI.
# Then it runs the container as the image's unprivileged user (uid 10001) with a detectors directory
# mounted read-only at /detectors, times its start, calls /score and the Open Inference Protocol (v2)
# endpoints with a small PNG, prints the image sizes and removes the container.
#
# Usage: docker/build_local.sh [--install-deps] [--rebuild-base] [--no-run | --no-build] [DETECTORS_DIR]
#   DETECTORS_DIR   served at /detectors (read-only): sub-directories NAME/detector.json or
#                   NAME/detector/detector.json (default: $DETECTORS_DIR, else runs)
#   --install-deps  apt-get install what is missing (podman debootstrap curl, and crun or runc); without
#                   it the script only says what is missing
#   --rebuild-base  debootstrap and import the base again even if they exist
#   --no-run        stop after the build
#   --no-build      skip steps 1-3 (rootfs, base image, build): run and call the IMAGE that exists
#
# Environment (all optional):
#   WORK_DIR         work folder: rootfs/, pip/ (git- and docker-ignored)   default: <repo>/.container
#   SUITE, MIRROR    what debootstrap installs from                 default: bookworm, http://deb.debian.org/debian
#   BASE_IMAGE       the imported base image                        default: localhost/oodforge-base:$SUITE
#   IMAGE            the built image                                default: localhost/oodforge-api:local
#   WHEEL_DIR        folder with torch-VERSION+cpu-cp311-*.whl, mounted at /wheels during the build
#                    (default /opt/wheels); none there = the Dockerfile's TORCH_SPEC (download.pytorch.org)
#   TORCH_SPEC       pip arguments for torch; overrides the wheel found in WHEEL_DIR
#   CA_BUNDLE        CA certificates pip trusts during the build, for a TLS-intercepting proxy
#                    (default: /etc/ssl/certs/ca-certificates.crt if present; the image does not keep it)
#   PORT             host port published to the container's 8000    default: 8000
#   NETWORK          podman network for the run: bridge (-p 127.0.0.1:PORT:8000) or host   default: bridge
#   DETECTOR         OODFORGE_DEFAULT_DETECTOR in the container     default: the server's rule (oal, ce, first)
#   API_KEY          if set: OODFORGE_API_KEYS in the container and the Bearer token of the requests
#   START_TIMEOUT    seconds to wait for the first 200 from /healthz   default: 300
#   KEEP=1           leave the container running at the end (it is removed by default)
#   PODMAN           the podman command                              default: podman
#   RUNTIME          podman's OCI runtime        default: crun, runc on hybrid cgroups v1+v2 (crun fails there)
#
# Run it as root (debootstrap and reading the rootfs need root); the container itself runs as uid 10001.
# It is idempotent: an existing rootfs and base image are reused, and podman's layer cache makes a rebuild
# after a code change re-run only the install step.
set -eu

say() { printf '\n==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
die() {
    printf 'docker/build_local.sh: %s\n' "$*" >&2
    exit 1
}
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
mib() { awk -v n="$1" 'BEGIN { printf "%.0f MiB (%.2f GB)", n / 1048576, n / 1e9 }'; }

usage() { sed -n '2,/^set -eu$/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

install_deps=0 rebuild_base=0 run=1 build=1
while [ "$#" -gt 0 ]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --install-deps) install_deps=1 ;;
        --rebuild-base) rebuild_base=1 ;;
        --no-run) run=0 ;;
        --no-build) build=0 ;;
        -*) usage >&2; die "unknown option $1" ;;
        *) break ;;
    esac
    shift
done
[ "$#" -le 1 ] || { usage >&2; die "at most one DETECTORS_DIR"; }

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
WORK_DIR=${WORK_DIR:-$root/.container}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
BASE_IMAGE=${BASE_IMAGE:-localhost/oodforge-base:$SUITE}
IMAGE=${IMAGE:-localhost/oodforge-api:local}
WHEEL_DIR=${WHEEL_DIR:-/opt/wheels}
TORCH_SPEC=${TORCH_SPEC:-}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
PORT=${PORT:-8000}
NETWORK=${NETWORK:-bridge}
DETECTOR=${DETECTOR:-}
API_KEY=${API_KEY:-}
START_TIMEOUT=${START_TIMEOUT:-300}
KEEP=${KEEP:-0}
PODMAN=${PODMAN:-podman}
DETECTORS_DIR=${1:-${DETECTORS_DIR:-runs}}
CONTAINER=oodforge-local-$$
mkdir -p "$WORK_DIR"
rootfs=$WORK_DIR/rootfs
# python3-venv: the Dockerfile runs `python3 -m venv`; passwd: groupadd/useradd (not in minbase);
# ca-certificates: pip's HTTPS in the build
PACKAGES=python3,python3-venv,ca-certificates,passwd

# --- 0. tools -------------------------------------------------------------------------------------
say "checking tools"
[ "$(id -u)" = 0 ] || die "run as root (debootstrap, and tar of the rootfs, need it); the container runs as uid 10001"
# OCI runtime: crun (podman's default) refuses to start anything when the host has cgroups v1 *and* a
# cgroup2 hierarchy with controllers in it ("cgroups in hybrid mode not supported, drop all controllers
# from cgroupv2"), even with --cgroups=disabled; runc copes with that. RUNTIME=... overrides.
if [ -z "${RUNTIME:-}" ]; then
    RUNTIME=crun
    if [ -n "$(cat /sys/fs/cgroup/unified/cgroup.controllers 2>/dev/null)" ]; then
        RUNTIME=runc
        info "cgroups: hybrid v1 + v2 with controllers in v2 ($(tr '\n' ' ' </sys/fs/cgroup/unified/cgroup.controllers)): runc, as crun refuses this"
    fi
fi
# podman runs rootful here (root is needed for debootstrap anyway): native overlay storage and CNI bridge
# networking, so uidmap, slirp4netns and fuse-overlayfs (rootless podman's helpers) are not needed
missing=
for tool in podman:podman debootstrap:debootstrap curl:curl "$RUNTIME:$RUNTIME"; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || missing="$missing ${tool#*:}"
done
if [ -n "$missing" ]; then
    if [ "$install_deps" = 1 ]; then
        info "apt-get install -y --no-install-recommends$missing"
        apt-get update -q
        # shellcheck disable=SC2086 # a list of package names
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
    else
        die "missing packages:$missing (apt-get install$missing, or rerun with --install-deps)"
    fi
fi
info "$($PODMAN --version), $RUNTIME $($RUNTIME --version | head -n 1 | sed 's/^[a-z]* version //'), debootstrap $(dpkg-query -W -f '${Version}' debootstrap 2>/dev/null || echo '?')"
for tool in tar base64 awk; do command -v "$tool" >/dev/null 2>&1 || die "$tool is missing"; done

PODMAN="$PODMAN --runtime $RUNTIME"
# rlimits: as root podman asks the runtime for nofile=1048576 and nproc=4194304; raising a hard limit needs
# CAP_SYS_RESOURCE, which root lacks in some sandboxes ("setrlimit `RLIMIT_NOFILE`: Operation not
# permitted"). Then ask for what this process has: its hard nofile, and nproc capped at kernel.pid_max
# (podman lowers its own nproc to that, and its children cannot go above it).
set -- # the ulimit flags of build and run
cap_eff=$(sed -n 's/^CapEff:[[:space:]]*//p' /proc/self/status)
if [ -n "$cap_eff" ] && [ $(((0x$cap_eff >> 24) & 1)) = 0 ]; then
    nofile=$(awk '/^Max open files/ { print $5 }' /proc/self/limits)
    nproc=$(awk '/^Max processes/ { print $4 }' /proc/self/limits)
    pid_max=$(cat /proc/sys/kernel/pid_max 2>/dev/null || echo "$nproc")
    [ "$nproc" = unlimited ] || [ "$nproc" -gt "$pid_max" ] && nproc=$pid_max
    set -- --ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc"
    info "no CAP_SYS_RESOURCE: $*"
fi
ULIMITS=$*
info "podman command: $PODMAN"

if [ "$build" = 0 ]; then
    say "--no-build: using $IMAGE as it is"
    $PODMAN image exists "$IMAGE" || die "$IMAGE does not exist; run without --no-build first"
    image_size=$($PODMAN image inspect --format '{{.Size}}' "$IMAGE")
    base_size=$($PODMAN image inspect --format '{{.Size}}' "$BASE_IMAGE" 2>/dev/null || echo 0)
else
# --- 1. base rootfs (debootstrap) -------------------------------------------------------------------
if [ "$rebuild_base" = 1 ]; then
    say "--rebuild-base: removing $rootfs and $BASE_IMAGE"
    rm -rf "$rootfs" "$rootfs.partial"
    $PODMAN rmi -f "$BASE_IMAGE" >/dev/null 2>&1 || true
fi
if [ -x "$rootfs/usr/bin/python3" ]; then
    say "rootfs: $rootfs exists, reused"
else
    say "rootfs: debootstrap --variant=minbase --include=$PACKAGES $SUITE $rootfs $MIRROR"
    rm -rf "$rootfs.partial" # a killed run leaves a half-made tree; debootstrap wants an empty one
    start=$(now)
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs.partial" "$MIRROR"
    # the .debs and package lists only make the image bigger; the image never runs apt
    rm -rf "$rootfs.partial"/var/cache/apt/archives/*.deb "$rootfs.partial"/var/lib/apt/lists/*
    mv "$rootfs.partial" "$rootfs"
    info "debootstrap took $(elapsed "$start" "$(now)") s"
fi
info "rootfs: $(du -sh "$rootfs" | cut -f1), $(chroot "$rootfs" python3 --version 2>&1)"

# --- 2. import it as the base image -----------------------------------------------------------------
if [ "$rebuild_base" = 0 ] && $PODMAN image exists "$BASE_IMAGE"; then
    say "base image: $BASE_IMAGE exists, reused"
else
    say "base image: tar -C $rootfs . | podman import - $BASE_IMAGE"
    # an imported tarball has no config: give it the PATH a Debian image has (the Dockerfile's
    # ENV PATH=/opt/venv/bin:$PATH extends it, and CMD's `sh` must be found) and a UTF-8 locale
    tar --numeric-owner -C "$rootfs" -cf - . |
        $PODMAN import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'ENV LANG=C.UTF-8' \
            --change 'CMD ["/bin/bash"]' \
            --message "debootstrap --variant=minbase --include=$PACKAGES $SUITE $MIRROR" \
            - "$BASE_IMAGE"
fi
base_size=$($PODMAN image inspect --format '{{.Size}}' "$BASE_IMAGE")
info "base image size: $(mib "$base_size")"

# --- 3. build docker/Dockerfile on it ---------------------------------------------------------------
say "build: $IMAGE from docker/Dockerfile on $BASE_IMAGE"
set -- $ULIMITS # the build's extra arguments (the ulimits hold no spaces)
# torch: the local CPU wheel, mounted read-only at /wheels for the install step only (not in the image);
# the version is the wheel's, e.g. torch==2.13.0+cpu. PyPI's torch would be the CUDA build.
if [ -z "$TORCH_SPEC" ]; then
    wheel=$(ls "$WHEEL_DIR"/torch-*+cpu-cp311-*.whl 2>/dev/null | sort | tail -n 1 || true)
    if [ -n "$wheel" ]; then
        version=$(basename "$wheel" | cut -d- -f2) # torch-2.13.0+cpu-cp311-... -> 2.13.0+cpu
        TORCH_SPEC="torch==$version --find-links /wheels"
        info "torch: $wheel, mounted at /wheels"
        set -- "$@" --volume "$WHEEL_DIR:/wheels:ro"
    else
        info "torch: no torch-*+cpu-cp311-*.whl in $WHEEL_DIR; using the Dockerfile's TORCH_SPEC (download.pytorch.org)"
    fi
fi
if [ -n "$TORCH_SPEC" ]; then
    info "TORCH_SPEC=$TORCH_SPEC"
    set -- "$@" --build-arg "TORCH_SPEC=$TORCH_SPEC"
fi
# (the Dockerfile's pip cache mount works under buildah too; it stays empty where a proxy strips the
# caching headers, as this sandbox's egress proxy does, so each rebuild downloads every wheel again)
# pip's CA bundle: where HTTPS goes through a TLS-intercepting proxy, the image's ca-certificates do not
# know its CA, and pip (with its own certifi bundle) fails with CERTIFICATE_VERIFY_FAILED. The host's
# bundle is handed to pip through a site config mounted at /etc/xdg/pip for the build only.
if [ -f "$CA_BUNDLE" ]; then
    mkdir -p "$WORK_DIR/pip"
    cp "$CA_BUNDLE" "$WORK_DIR/pip/ca-bundle.crt"
    printf '[global]\ncert = /etc/xdg/pip/ca-bundle.crt\n' >"$WORK_DIR/pip/pip.conf"
    info "pip trusts $CA_BUNDLE (mounted at /etc/xdg/pip)"
    set -- "$@" --volume "$WORK_DIR/pip:/etc/xdg/pip:ro"
fi
# --format docker: the OCI image config has no HEALTHCHECK, podman would drop it with a warning.
# --ignorefile: buildah 1.28 does not pick up docker/Dockerfile.dockerignore by itself.
old_image=$($PODMAN image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
build_start=$(now)
info "podman build --format docker -f docker/Dockerfile --ignorefile docker/Dockerfile.dockerignore --build-arg BASE_IMAGE=$BASE_IMAGE $* -t $IMAGE ."
$PODMAN build --format docker \
    -f docker/Dockerfile --ignorefile docker/Dockerfile.dockerignore \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" "$@" -t "$IMAGE" .
build_s=$(elapsed "$build_start" "$(now)")
# the previous build of IMAGE (now untagged, ~2 GB) goes, with the layers only it used
if [ -n "$old_image" ] && [ "$old_image" != "$($PODMAN image inspect --format '{{.Id}}' "$IMAGE")" ]; then
    info "removing the previous build of $IMAGE (${old_image%"${old_image#????????????}"})"
    $PODMAN rmi "$old_image" >/dev/null 2>&1 || info "  (still in use; left alone)"
fi
image_size=$($PODMAN image inspect --format '{{.Size}}' "$IMAGE")
info "build took $build_s s; image size: $(mib "$image_size")"
$PODMAN images --filter "reference=$IMAGE" --filter "reference=$BASE_IMAGE"

fi # build

if [ "$run" = 0 ]; then
    say "done (--no-run)"
    exit 0
fi

# --- 4. detectors -----------------------------------------------------------------------------------
say "detectors: $DETECTORS_DIR -> /detectors (read-only)"
[ -d "$DETECTORS_DIR" ] || die "DETECTORS_DIR '$DETECTORS_DIR' is not a directory (pass one, e.g. a training run's parent)"
detectors=$(cd "$DETECTORS_DIR" && pwd)
# uid 10001 must be able to read the artifacts: files written with umask 077 (training runs are) are not.
# Rather than chmod the caller's files, stage a readable copy of just the artifacts (detector.json + weights).
if [ -n "$(find "$detectors" \( -type f ! -perm -o+r \) -o \( -type d ! -perm -o+rx \) | head -n 1)" ]; then
    staged=$WORK_DIR/detectors
    info "some files there are not readable by uid 10001: serving a readable copy of the artifacts from $staged"
    rm -rf "$staged"
    mkdir -p "$staged"
    for json in "$detectors"/*/detector.json "$detectors"/*/detector/detector.json; do
        [ -f "$json" ] || continue
        artifact=$(dirname "$json")
        name=${artifact#"$detectors"/}
        mkdir -p "$staged/$name"
        cp -Rp "$artifact"/. "$staged/$name/"
        info "  $name"
    done
    chmod -R a+rX "$staged"
    detectors=$staged
fi

# --- 5. run it --------------------------------------------------------------------------------------
cleanup() {
    if [ "$KEEP" = 1 ]; then
        printf '\n==> KEEP=1: container %s left running (podman rm -f %s)\n' "$CONTAINER" "$CONTAINER"
    else
        printf '\n==> removing container %s\n' "$CONTAINER"
        $PODMAN rm -f "$CONTAINER" >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# shellcheck disable=SC2086 # ULIMITS: flags without spaces
set -- $ULIMITS --user 10001:10001 --volume "$detectors:/detectors:ro"
case $NETWORK in
    bridge) set -- "$@" --publish "127.0.0.1:$PORT:8000" ;;
    host) set -- "$@" --network host ;; # the server listens on the host's port 8000 itself
    *) die "NETWORK must be bridge or host, got '$NETWORK'" ;;
esac
[ "$NETWORK" = host ] && [ "$PORT" != 8000 ] && die "NETWORK=host serves on port 8000; unset PORT"
# podman runs the image's HEALTHCHECK from a systemd timer; without systemd (a container, a sandbox)
# `podman run` logs 'level=error msg="unable to get systemd connection to add healthchecks..."' and the
# container runs without the timer (--health-interval disable does not silence it in podman 4.3).
# Step 6 runs the check once by hand (podman healthcheck run).
[ -n "$DETECTOR" ] && set -- "$@" --env "OODFORGE_DEFAULT_DETECTOR=$DETECTOR"
[ -n "$API_KEY" ] && set -- "$@" --env "OODFORGE_API_KEYS=$API_KEY"
url=http://127.0.0.1:$PORT
say "run: podman run -d --name $CONTAINER $* $IMAGE"
run_start=$(now)
$PODMAN run -d --name "$CONTAINER" "$@" "$IMAGE" >/dev/null
info "waiting for 200 from $url/healthz (up to $START_TIMEOUT s)"
# curl every 0.1 s; the podman checks (a Go binary each, CPU the server's start competes for) every 2 s
healthz_s= readyz_s= polls=0
while :; do
    polls=$((polls + 1))
    t=$(elapsed "$run_start" "$(now)")
    if [ -z "$healthz_s" ] && [ "$(curl -s -o /dev/null -w '%{http_code}' "$url/healthz" || true)" = 200 ]; then
        healthz_s=$t
        info "first 200 from /healthz after $healthz_s s"
    fi
    if [ -n "$healthz_s" ] && [ "$(curl -s -o /dev/null -w '%{http_code}' "$url/readyz" || true)" = 200 ]; then
        readyz_s=$t
        info "first 200 from /readyz (detectors loaded) after $readyz_s s"
        break
    fi
    if [ $((polls % 20)) != 0 ]; then
        sleep 0.1
        continue
    fi
    if [ "$($PODMAN inspect --format '{{.State.Running}}' "$CONTAINER")" != true ]; then
        $PODMAN logs "$CONTAINER" 2>&1 | tail -n 40
        die "the container exited before it was ready (its log is above)"
    fi
    # uvicorn --workers restarts a worker that dies, so a server that cannot even import keeps "running"
    if [ -z "$healthz_s" ] && $PODMAN logs "$CONTAINER" 2>&1 | grep -q 'Child process \[[0-9]*\] died'; then
        $PODMAN logs "$CONTAINER" 2>&1 | tail -n 40
        die "the server's workers die at start-up (their log is above)"
    fi
    if awk -v t="$t" -v m="$START_TIMEOUT" 'BEGIN { exit !(t > m) }'; then
        $PODMAN logs "$CONTAINER" 2>&1 | tail -n 40
        die "not ready after $START_TIMEOUT s (healthz: ${healthz_s:-never}); its log is above"
    fi
    sleep 0.1
done

# --- 6. requests ------------------------------------------------------------------------------------
png=$WORK_DIR/probe.png # 16x16 RGB gradient
printf '%s' 'iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAIAAACQkWg2AAABlklEQVR42hXRURVEIQhFUSMYgQhGMAIRiGCEE8EIRiACEYhABCLMG7/ZrMt1jMEcyGAN9kAHNjgDBnfwBj6IQQ5q0IMxJnMikzXZE53Y5EyY3Mmb+CQmOalJzw8IUxBhCVtQwYQjIFzhCS6EkEIJLR9YzIUs1mIvdGGLs2BxF2/hi1jkoha9PrCZG9mszd7oxjZnw+Zu3sY3sclNbXp/QJmKKEvZiiqmHAXlKk9xJZRUSmn9gDENMZaxDTXMOAbGNZ7hRhhplNH2gcM8yGEd9kEPdjgHDvfwDn6IQx7q0OcD/wK/Sr4jv9hfkG/1N/x/Fx44BCQU9Pc94zIvclmXfdGLXc79j9/Lu/glLnmpS98PPOZDHuuxH/qwx3n/5ffxHv6IRz7q0e8DznTEWc521DHn+D/KdZ7jTjjplNP+gWAGEqxgBxpYcOIf/AYv8CCCDCro+EAyE0lWshNNLDn5P/MmL/Ekkkwq6fxAMQspVrELLaw49S/lFq/wIoosquj6QDMbaVazG22sOf2v8Dav8SaabKrp5geIAnAQC3NfwAAAAABJRU5ErkJggg==' |
    base64 -d >"$png"
body=$WORK_DIR/response.json
failures=0
# request LABEL EXPECTED curl-args...: prints the status and the first 300 characters of the body
request() {
    label=$1 expected=$2
    shift 2
    [ -z "$API_KEY" ] || set -- -H "Authorization: Bearer $API_KEY" "$@"
    status=$(curl -s -o "$body" -w '%{http_code}' "$@" || echo 000)
    info "$label -> HTTP $status"
    info "  $(head -c 300 "$body" 2>/dev/null)"
    if [ "$status" = 404 ] && [ "$expected" = v2 ] && grep -q '"detail":"Not Found"' "$body" 2>/dev/null; then
        info "  not available yet (404): this build has no Open Inference Protocol routes"
        return 0
    fi
    [ "$status" = 200 ] || failures=$((failures + 1))
}

say "HEALTHCHECK of the image: podman healthcheck run"
if health=$($PODMAN healthcheck run "$CONTAINER" 2>&1); then
    info "${health:-healthy}"
else
    info "unhealthy: $health"
    failures=$((failures + 1))
fi

say "POST /score (multipart, field files)"
request "POST $url/score" score -F "files=@$png;type=image/png" "$url/score"
model=$(sed -n 's/^{"detector":{"name":"\([^"]*\)".*/\1/p' "$body")
model=${model:-${DETECTOR:-ce}}

say "GET /v2/health/ready"
request "GET $url/v2/health/ready" v2 "$url/v2/health/ready"

say "POST /v2/models/$model/infer (BYTES input 'image', the PNG as base64)"
printf '{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"content_type": "image/png"}, "data": ["%s"]}]}' \
    "$(base64 "$png" | tr -d '\n')" >"$WORK_DIR/infer.json"
request "POST $url/v2/models/$model/infer" v2 -H 'Content-Type: application/json' \
    --data-binary "@$WORK_DIR/infer.json" "$url/v2/models/$model/infer"

# --- 7. summary -------------------------------------------------------------------------------------
say "summary"
info "image:        $IMAGE, $(mib "$image_size")"
info "base image:   $BASE_IMAGE, $(mib "$base_size")"
if [ "$build" = 1 ]; then info "build:        $build_s s"; else info "build:        (not built by this run)"; fi
info "start:        podman run -> first 200 from /healthz: $healthz_s s, from /readyz: $readyz_s s"
info "container ran as: $($PODMAN exec "$CONTAINER" id 2>/dev/null || echo '?')"
[ "$failures" = 0 ] || die "$failures request(s) did not answer 200 (see above)"
