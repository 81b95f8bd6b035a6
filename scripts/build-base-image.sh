#!/usr/bin/env bash
# Builds the Container provider's base image from local files: debootstrap (minbase) of Debian
# bookworm with openssh-server, python3 and ca-certificates, then `docker import`.
#
#   scripts/build-base-image.sh            # prints the image name; builds only when missing
#   SKYWARD_CONTAINER_BINARY=podman scripts/build-base-image.sh
#
# The tag is a hash of this file, so the image is reused while the recipe is unchanged and rebuilt
# when it changes. Needs root (debootstrap) and the debootstrap package. Progress goes to stderr;
# stdout carries only the image name.
set -euo pipefail

runtime="${SKYWARD_CONTAINER_BINARY:-docker}"
mirror="${SKYWARD_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
suite=bookworm
recipe_hash="$(sha256sum "$0" | cut -c1-12)"
image="skyward-base:${recipe_hash}"

if "$runtime" image inspect "$image" >/dev/null 2>&1; then
    echo "$image"
    exit 0
fi

if ! command -v debootstrap >/dev/null; then
    echo "build-base-image: debootstrap is not installed (hint: apt-get install -y debootstrap)" >&2
    exit 1
fi
if [ "$(id -u)" != 0 ]; then
    echo "build-base-image: debootstrap needs root (hint: run this script with sudo once)" >&2
    exit 1
fi

work="$(mktemp -d /var/tmp/skyward-base.XXXXXX)"
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"

echo "build-base-image: debootstrap $suite into $root (about a minute)" >&2
debootstrap --variant=minbase --include=openssh-server,python3,ca-certificates,procps \
    "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 || {
    echo "build-base-image: debootstrap failed; last lines:" >&2
    tail -n 50 "$work/debootstrap.log" >&2
    exit 1
}

# Host keys are made per container at start (see skyward-entry), never baked into the image.
rm -f "$root"/etc/ssh/ssh_host_*
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb
mkdir -p "$root/etc/ssh/sshd_config.d"
cat >"$root/etc/ssh/sshd_config.d/skyward.conf" <<'CONF'
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UseDNS no
HostKey /etc/ssh/ssh_host_ed25519_key
AllowStreamLocalForwarding yes
MaxStartups 64:30:128
CONF

# PID 1 of a node: installs the pool's public key, makes host keys, runs sshd in the foreground.
# SIGTERM to PID 1 (the worker's self-destruct) ends sshd and with it the container.
cat >"$root/usr/local/sbin/skyward-entry" <<'ENTRY'
#!/bin/sh
set -eu
user="${SKYWARD_SSH_USER:-root}"
if ! getent passwd "$user" >/dev/null; then
    useradd --create-home --shell /bin/sh "$user"
fi
home="$(getent passwd "$user" | cut -d: -f6)"
if [ -n "${SKYWARD_AUTHORIZED_KEY:-}" ]; then
    mkdir -p "$home/.ssh"
    printf '%s\n' "$SKYWARD_AUTHORIZED_KEY" >"$home/.ssh/authorized_keys"
    chmod 700 "$home/.ssh"
    chmod 600 "$home/.ssh/authorized_keys"
    chown -R "$user" "$home/.ssh"
fi
# One ed25519 host key (what the pool pins); RSA key generation would cost a second per node.
[ -e /etc/ssh/ssh_host_ed25519_key ] || ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key
mkdir -p /run/sshd
exec /usr/sbin/sshd -D -e
ENTRY
chmod 755 "$root/usr/local/sbin/skyward-entry"

echo "build-base-image: importing as $image" >&2
tar -C "$root" -c . | "$runtime" import \
    --change 'CMD ["/usr/local/sbin/skyward-entry"]' \
    --change 'EXPOSE 22' \
    --change "LABEL dev.skyward.base=${recipe_hash}" \
    - "$image" >/dev/null
echo "$image"
