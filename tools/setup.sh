#!/usr/bin/env bash
# Set up a Debian 12 machine to build, test and demo pycfs.  Idempotent: safe to re-run.
#
#   bash tools/setup.sh            # as root: Debian packages + .venv
#   bash tools/setup.sh --no-apt   # only the venv (e.g. as a user, packages already there)
#
# Installs the Debian packages the tests and the rootless import need (only when some are
# missing, so re-runs are fast and work offline), then makes the virtualenv `.venv` in the
# checkout with `pip install -e .[test]`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PACKAGES=(
    # rootless containers-storage and the images the tests build
    podman uidmap skopeo fuse-overlayfs slirp4netns
    # reflinking and image filesystems, digests, ostree import
    xfsprogs btrfs-progs erofs-utils fsverity ostree
    # ostree commit signatures: gpgv checks them, gpg makes the test keys
    gpg gpgv gpgconf
    # python-prctl builds against libcap; the venv needs venv/pip and headers
    libcap-dev gcc python3 python3-venv python3-dev
    # rootless mounts: a user's FUSE mount goes through fusermount3
    fuse3
    # useradd/usermod, runuser, losetup/mount; GNU time for tools/bench's peak RSS
    passwd util-linux mount ca-certificates time
    # the hostile-store tests prove with strace that nothing outside the store is opened
    strace
)

with_apt=1
[[ "${1:-}" == "--no-apt" ]] && with_apt=0

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    if ((with_apt == 0)) || [[ $(id -u) != 0 ]]; then
        echo "setup: missing Debian packages (install them as root): ${missing[*]}" >&2
        exit 1
    fi
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Another apt (unattended-upgrades on a fresh machine) may hold the dpkg lock: wait for it.
    apt_wait=(-o DPkg::Lock::Timeout=900)
    apt-get "${apt_wait[@]}" update -q
    apt-get "${apt_wait[@]}" install -y -q --no-install-recommends "${PACKAGES[@]}"
else
    echo "setup: Debian packages present"
fi

# Rootless podman (and so the tests and the demo) needs unprivileged user namespaces.
if [[ $(id -u) == 0 ]]; then
    f=/proc/sys/kernel/unprivileged_userns_clone
    if [[ -w $f && $(cat "$f") == 0 ]]; then
        echo 1 >"$f" && echo "setup: enabled unprivileged user namespaces"
    fi
fi

# FUSE mounts as a user need /dev/fuse open to everyone, as udev's default rules make it; a
# container without udev leaves it 0600.
if [[ $(id -u) == 0 && -c /dev/fuse && $(stat -c %a /dev/fuse) != 666 ]]; then
    chmod 0666 /dev/fuse && echo "setup: made /dev/fuse usable by every user (as udev does)"
fi

# Any Python >= 3.11 will do for the checkout's own venv (Debian 12 ships 3.11).
py=${PYTHON:-python3}
if [[ -x .venv/bin/python ]] && .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "setup: reusing .venv ($(.venv/bin/python --version))"
else
    rm -rf .venv
    "$py" -m venv .venv
    echo "setup: created .venv ($(.venv/bin/python --version))"
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
if .venv/bin/pycfs --help >/dev/null 2>&1; then
    echo "setup: pycfs installed in .venv"
else
    # Not fatal: the tests say precisely what is broken.
    echo "setup: pycfs installed in .venv, but 'pycfs --help' fails" >&2
fi
