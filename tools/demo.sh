#!/usr/bin/env bash
# pycfs demo: rootless import of a podman image into a composefs repository.
#
#   bash tools/demo.sh
#
# As root (e.g. on a fresh Debian 12 machine) it installs what is needed (tools/setup.sh),
# creates the unprivileged user `pycfs-demo` (override: PYCFS_DEMO_USER), installs pycfs
# for it in /opt/pycfs-demo/venv, puts that user's podman storage and composefs repository
# on a loop-mounted reflink XFS (/var/tmp/pycfs-demo/xfs; PYCFS_DEMO_XFS=0 to skip), and
# runs the demo *as that user*, so what you see is the rootless path.  As an ordinary user it runs the demo as you, with the checkout's .venv
# (run tools/setup.sh first).
#
# The demo: build a small image from tools/demo/ (with a mode-0000 /etc/shadow and a 0700
# home directory owned by container uid 1000) into the user's own containers-storage with
# `podman import`, then
#   pycfs oci pull containers-storage:localhost/pycfs-demo:latest
#   pycfs oci images
set -euo pipefail

checkout=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
demo_user=${PYCFS_DEMO_USER:-pycfs-demo}
image=localhost/pycfs-demo:latest
venv_root=/opt/pycfs-demo/venv
work_root=/var/tmp/pycfs-demo

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# Runs as the demo user (or the invoking user). $1: python with pycfs, $2: the demo tar.
demo_as_user() {
    local python=$1 tar=$2
    set -euo pipefail
    pycfs() { "$python" -m pycfs.tools.cli "$@"; }
    echo "running as $(id -un) (uid $(id -u)); repository: ${PYCFS_REPO:-$HOME/.var/lib/composefs}"

    echo "== podman import $tar -> localhost/pycfs-demo:latest"
    local before
    before=$(podman image inspect --format '{{.Id}}' localhost/pycfs-demo:latest 2>/dev/null || true)
    podman import --quiet --change 'CMD ["/usr/bin/hello"]' "$tar" localhost/pycfs-demo:latest
    # Each import is a new image (its config has the time): the one it untagged goes, not
    # left behind as <none> by every run of the demo.
    if [ -n "$before" ] && [ "$before" != "$(podman image inspect --format '{{.Id}}' localhost/pycfs-demo:latest)" ]; then
        podman rmi --force "$before" >/dev/null 2>&1 || true
    fi
    podman image inspect --format 'image {{.Id}}  layers: {{len .RootFS.Layers}}  driver: {{.GraphDriver.Name}}' \
        localhost/pycfs-demo:latest

    echo "== pycfs init"
    pycfs init
    if ! pycfs oci pull --help >/dev/null 2>&1; then
        echo "pycfs oci pull is not available in this checkout yet: stopping here"
        return 0
    fi
    echo "== pycfs oci pull containers-storage:localhost/pycfs-demo:latest"
    time pycfs oci pull containers-storage:localhost/pycfs-demo:latest
    echo "== pycfs oci images"
    pycfs oci images
}

package_files() {
    local f
    for f in pyproject.toml README.md host helper protocol tools; do
        [[ -e $checkout/$f ]] && echo "$f"
    done
}

# Source files that make up the installed package: a change means reinstalling.
source_hash() {
    (cd "$checkout" && find $(package_files) -name __pycache__ -prune -o -type f -print | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16)
}

# A world-readable venv with pycfs (non-editable): the checkout may sit below /root.
install_for_users() {
    local stamp=$venv_root/.pycfs-source src
    if [[ -f $stamp && $(cat "$stamp") == "$(source_hash)" ]]; then
        echo "pycfs already installed in $venv_root"
        return
    fi
    umask 022
    mkdir -p "$(dirname "$venv_root")"
    [[ -x $venv_root/bin/python ]] || /usr/bin/python3 -m venv "$venv_root"
    # Build from a copy so nothing is written into the checkout.
    src=$(mktemp -d)
    (cd "$checkout" && cp -r $(package_files) "$src/")
    find "$src" -name __pycache__ -prune -exec rm -rf {} +
    "$venv_root/bin/python" -m pip install --quiet --disable-pip-version-check "$src"
    "$venv_root/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --force-reinstall "$src"
    rm -rf "$src"
    source_hash >"$stamp"
    echo "pycfs installed in $venv_root"
}

prepare_user() {
    local user=$1 uid gid home
    id "$user" >/dev/null 2>&1 || useradd -m -s /bin/bash "$user"
    # useradd allocates sub-uid/gid ranges; add them if the user predates that.
    grep -q "^$user:" /etc/subuid || usermod --add-subuids 300000-365535 "$user"
    grep -q "^$user:" /etc/subgid || usermod --add-subgids 300000-365535 "$user"
    uid=$(id -u "$user") gid=$(id -g "$user") home=$(getent passwd "$user" | cut -d: -f6)
    # No systemd login session here: make the runtime dir rootless podman needs.
    install -d -m 0700 -o "$uid" -g "$gid" "/run/user/$uid"
    # Pin the overlay driver (podman may otherwise pick vfs for a new user).
    if [[ ! -f $home/.config/containers/storage.conf ]]; then
        install -d -o "$uid" -g "$gid" "$home/.config" "$home/.config/containers"
        printf '[storage]\ndriver = "overlay"\n' >"$home/.config/containers/storage.conf"
        chown "$uid:$gid" "$home/.config/containers/storage.conf"
    fi
}

# The point of pycfs is reflinking: podman's storage and the repository must share a
# filesystem that can do it.  Put both on a loop-mounted XFS (mkfs.xfs -m reflink=1) and
# point the demo user at it through CONTAINERS_STORAGE_CONF and PYCFS_REPO; the user's
# normal storage is left alone.  Prints the env assignments, or nothing if that fails
# (no loop devices, e.g. in a container): the demo then runs on the home filesystem.
setup_demo_xfs() {
    local user=$1 img=$work_root/xfs.img mnt=$work_root/xfs uid gid
    [[ ${PYCFS_DEMO_XFS:-1} == 0 ]] && return 0
    uid=$(id -u "$user") gid=$(id -g "$user")
    if ! mountpoint -q "$mnt"; then
        install -d -m 0755 "$mnt"
        if ! { truncate -s 2G "$img" && mkfs.xfs -q -f -m reflink=1 "$img" && mount -o loop "$img" "$mnt"; } >&2; then
            echo "demo: no loop XFS here; running on the home filesystem (content will be copied, not reflinked)" >&2
            rm -f "$img"
            return 0
        fi
        chmod 0755 "$mnt"
    fi
    # The user's podman pause process may hold a mount namespace from before the mount:
    # stop it (the demo user runs no containers) so the next podman sees the XFS.
    (cd / && runuser -u "$user" -- env -i HOME="$(getent passwd "$user" | cut -d: -f6)" PATH=/usr/bin:/bin \
        XDG_RUNTIME_DIR="/run/user/$uid" podman system migrate) >/dev/null 2>&1 || true
    install -d -m 0755 -o "$uid" -g "$gid" "$mnt/$user"
    install -d -m 0700 -o "$uid" -g "$gid" "$mnt/$user/storage"
    # rootless c/storage takes the graphroot of a CONTAINERS_STORAGE_CONF file from rootless_storage_path.
    printf '[storage]\ndriver = "overlay"\ngraphroot = "%s"\nrootless_storage_path = "%s"\n' \
        "$mnt/$user/storage" "$mnt/$user/storage" >"$mnt/$user/storage.conf"
    chmod 0644 "$mnt/$user/storage.conf"
    echo "CONTAINERS_STORAGE_CONF=$mnt/$user/storage.conf PYCFS_REPO=$mnt/$user/repo"
}

# So the demo user can go on from a login shell (`su - pycfs-demo`): pycfs on PATH, and the
# same storage and repository the demo used.  A marked block in ~/.profile, replaced on re-runs.
write_profile() {
    local user=$1 xfs_env=$2 uid home profile begin="# >>> pycfs demo >>>" end="# <<< pycfs demo <<<"
    uid=$(id -u "$user") home=$(getent passwd "$user" | cut -d: -f6)
    profile=$home/.profile
    touch "$profile" && chown "$user:" "$profile"
    sed -i "/^$begin\$/,/^$end\$/d" "$profile"
    {
        echo "$begin"
        echo "# written by pycfs tools/demo.sh"
        echo "export PATH=\"$venv_root/bin:\$PATH\""
        echo ": \"\${XDG_RUNTIME_DIR:=/run/user/$uid}\"; export XDG_RUNTIME_DIR"
        local kv
        for kv in $xfs_env; do echo "export $kv"; done
        echo "$end"
    } >>"$profile"
}

make_tar() {  # $1: python, $2: output
    "$1" "$checkout/tools/demo/mktar.py" "$2"
    chmod 0644 "$2"
}

if [[ $(id -u) == 0 ]]; then
    say "set-up (Debian packages, .venv)"
    bash "$checkout/tools/setup.sh"
    say "demo user $demo_user and a pycfs install it can run"
    prepare_user "$demo_user"
    install_for_users
    install -d -m 0755 "$work_root"
    make_tar /usr/bin/python3 "$work_root/pycfs-demo.tar"
    uid=$(id -u "$demo_user")
    home=$(getent passwd "$demo_user" | cut -d: -f6)
    say "storage and repository on a reflinking XFS"
    xfs_env=$(setup_demo_xfs "$demo_user")
    if [[ -n $xfs_env ]]; then
        echo "$xfs_env"
        echo "(remove later with: umount $work_root/xfs && rm $work_root/xfs.img)"
    fi
    say "the demo, as $demo_user"
    cd /
    # shellcheck disable=SC2086  # $xfs_env is a list of VAR=value words
    runuser -u "$demo_user" -- env -i HOME="$home" USER="$demo_user" LOGNAME="$demo_user" \
        PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 XDG_RUNTIME_DIR="/run/user/$uid" $xfs_env \
        bash -c "$(declare -f demo_as_user); demo_as_user '$venv_root/bin/python' '$work_root/pycfs-demo.tar'" </dev/null
    write_profile "$demo_user" "$xfs_env"
    say "go on as $demo_user from a login shell"
    echo "\$ su - $demo_user -c 'pycfs oci images && podman images'"
    su - "$demo_user" -c 'pycfs oci images && podman images' </dev/null
else
    [[ -x $checkout/.venv/bin/python ]] || { echo "run tools/setup.sh first (as root for the Debian packages)" >&2; exit 1; }
    # Not /tmp: it need not be writable for users (a 0755 /tmp exists).
    tmp=$(mktemp -d -p "${TMPDIR:-$HOME}" pycfs-demo.XXXXXX)
    trap 'rm -rf "$tmp"' EXIT
    make_tar "$checkout/.venv/bin/python" "$tmp/pycfs-demo.tar"
    say "the demo, as $(id -un)"
    demo_as_user "$checkout/.venv/bin/python" "$tmp/pycfs-demo.tar"
fi
