#!/usr/bin/env bash
# Make sure every base image the given Dockerfiles name (FROM lines) is present, making a
# LOCAL STAND-IN only where an image is missing and cannot be pulled (a machine without a
# container registry). Where a registry is reachable it pulls, and makes no stand-in.
#
#   scripts/docker-standins.sh [Dockerfile ...]      (default: ./Dockerfile)
#
# For each image named in a FROM line (stage names like `FROM builder` are skipped):
#   1. present in the engine            -> nothing to do ("present");
#   2. `docker pull` succeeds           -> the real image ("pulled");
#   3. otherwise, a stand-in with the same name, if a recipe exists for it:
#        debian:bookworm-slim           debootstrap --variant=minbase bookworm, trimmed like the
#                                       official slim image (no docs, man pages, locales), with
#                                       the same dpkg excludes so later apt installs stay slim;
#        rust:X.Y.Z-slim-bookworm       that rootfs plus gcc, libc6-dev, ca-certificates and
#                                       this machine's Rust toolchain, which must be version
#                                       X.Y.Z (rustup's servers cannot be reached), installed
#                                       where the official image has it (/usr/local/rustup,
#                                       /usr/local/cargo/bin on PATH).
#      and a stand-in is labelled `org.click-consumer.standin=true`, and this script SAYS it
#      made one: what such a build checks is the Dockerfile's logic, not Docker Hub's images.
#
# Trust: crates.io is reached here through a proxy whose certificate authority only the host
# trusts. The builder stand-in carries the host's CA bundle (/etc/ssl/certs/ca-certificates.crt)
# so that cargo can fetch crates inside `docker build`, as a file of its own that only cargo
# reads (CARGO_HTTP_CAINFO=/usr/local/share/standin-ca/host-ca-bundle.crt), NOT as the system
# bundle: the builder's /etc/ssl/certs/ca-certificates.crt stays Debian's, and that is the
# file the Dockerfile's runtime stage copies. The runtime stand-in (debian:bookworm-slim) has
# Debian's plain bundle too. scripts/docker-image.sh checks that the built image does not
# carry the host's bundle.
#
# Idempotent: an image that exists is never rebuilt (a second run takes a second or two);
# `--rebuild` drops the stand-ins first. Needs root, debootstrap (installed with apt-get when
# missing) and network access to Debian's mirror.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
WORK=${STANDIN_WORKDIR:-$PWD/target/docker-standins}
HOST_CA=/etc/ssl/certs/ca-certificates.crt
STANDIN_LABEL=org.click-consumer.standin

say() { printf '[docker-standins] %s\n' "$*"; }
die() { printf '[docker-standins] error: %s\n' "$*" >&2; exit 1; }

rebuild=false
files=()
for arg in "$@"; do
    case $arg in
        --rebuild) rebuild=true ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) files+=("$arg") ;;
    esac
done
[[ ${#files[@]} -gt 0 ]] || files=(Dockerfile)

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }
is_standin() { [[ $(docker image inspect -f "{{ index .Config.Labels \"$STANDIN_LABEL\" }}" "$1" 2>/dev/null) == true ]]; }

# The images named by FROM lines, in order, without stage references and duplicates.
base_images() {
    local file stages=() line image
    for file in "$@"; do
        [[ -f $file ]] || die "no such Dockerfile: $file"
        stages=()
        while read -r line; do
            # FROM [--platform=...] image [AS name]
            read -r -a words <<<"$line"
            local i=1
            [[ ${words[1]:-} == --* ]] && i=2
            image=${words[$i]:-}
            if [[ ${words[$((i + 1))]:-} =~ ^[Aa][Ss]$ ]]; then
                stages+=("${words[$((i + 2))]}")
            fi
            [[ -n $image ]] || continue
            [[ " ${stages[*]} " == *" $image "* && ${words[$((i + 2))]:-} != "$image" ]] && continue
            printf '%s\n' "$image"
        done < <(grep -iE '^[[:space:]]*FROM[[:space:]]' "$file")
    done | awk '!seen[$0]++'
}

# debootstrap runs in a chroot that needs these to install packages later.
with_chroot_mounts() {
    local root=$1
    shift
    mount -t proc proc "$root/proc"
    mount --bind /dev "$root/dev"
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    local rc=0
    "$@" || rc=$?
    umount "$root/dev" || umount -l "$root/dev"
    umount "$root/proc" || umount -l "$root/proc"
    return $rc
}

# Like the official slim images: drop docs, man pages, info and locales now and for every
# later `apt-get install` (dpkg path excludes), clean apt's caches and lists.
trim_like_slim() {
    local root=$1
    mkdir -p "$root/etc/dpkg/dpkg.cfg.d" "$root/etc/apt/apt.conf.d"
    cat >"$root/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
# Installed by click-consumer's scripts/docker-standins.sh, as in the official slim images.
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
    cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    cat >"$root/etc/apt/apt.conf.d/docker-no-recommends" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
EOF
    find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
    find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
    rm -rf "$root"/usr/share/{man,groff,info,lintian,linda}/* 2>/dev/null || true
    find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} + 2>/dev/null || true
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
        "$root"/var/log/*.log "$root"/var/log/apt/* "$root"/tmp/* "$root"/var/tmp/*
    : >"$root/etc/resolv.conf"
    # The same sources as the official image (main, updates, security).
    rm -f "$root/etc/apt/sources.list"
    cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${MIRROR%/debian}/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
}

# A trimmed bookworm minbase rootfs, cached in $WORK (it is the base of both stand-ins).
bookworm_rootfs() {
    local root=$WORK/bookworm-slim
    if [[ -f $root/.complete ]]; then
        printf '%s\n' "$root"
        return
    fi
    command -v debootstrap >/dev/null || {
        say "installing debootstrap (apt-get)" >&2
        apt-get install -y -qq debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
    }
    rm -rf "$root"
    mkdir -p "$root"
    say "debootstrap --variant=minbase bookworm (about a minute)" >&2
    debootstrap --variant=minbase bookworm "$root" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log" >&2; die "debootstrap failed (log: $WORK/debootstrap.log)"; }
    trim_like_slim "$root"
    touch "$root/.complete"
    printf '%s\n' "$root"
}

import_rootfs() {
    local root=$1 name=$2
    shift 2
    tar --exclude=./.complete -C "$root" -c . \
        | docker import --change "LABEL $STANDIN_LABEL=true" "$@" - "$name" >/dev/null
}

make_debian_slim() {
    local name=$1 root
    root=$(bookworm_rootfs)
    import_rootfs "$root" "$name" --change 'CMD ["bash"]' \
        --change "LABEL org.click-consumer.standin.recipe=\"debootstrap --variant=minbase bookworm, trimmed like slim\""
}

make_rust_builder() {
    local name=$1 version=$2 root builder sysroot host_version
    host_version=$(rustc --version | awk '{print $2}')
    if command -v rustup >/dev/null && rustup run "$version" rustc --version >/dev/null 2>&1; then
        sysroot=$(rustup run "$version" rustc --print sysroot)
        host_version=$(rustup run "$version" rustc --version | awk '{print $2}')
    else
        sysroot=$(rustc --print sysroot)
    fi
    [[ $host_version == "$version" ]] \
        || die "$name needs Rust $version, this machine has $host_version: cannot make a stand-in (change the Dockerfile's tag or install that toolchain)"
    root=$(bookworm_rootfs)
    builder=$WORK/rust-builder
    rm -rf "$builder"
    cp -a "$root" "$builder"
    say "  + gcc, libc6-dev, ca-certificates (apt-get in a chroot)"
    printf '#!/bin/sh\nexit 101\n' >"$builder/usr/sbin/policy-rc.d"
    chmod 0755 "$builder/usr/sbin/policy-rc.d"
    with_chroot_mounts "$builder" chroot "$builder" sh -c \
        'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc libc6-dev ca-certificates' \
        >"$WORK/builder-apt.log" 2>&1 \
        || { tail -20 "$WORK/builder-apt.log" >&2; die "apt-get install in the builder rootfs failed (log: $WORK/builder-apt.log)"; }
    rm -f "$builder/usr/sbin/policy-rc.d"
    trim_like_slim "$builder"
    say "  + the host's CA bundle ($HOST_CA, which includes the crates.io proxy's CA) for cargo only"
    install -D -m 0644 "$HOST_CA" "$builder/usr/local/share/standin-ca/host-ca-bundle.crt"
    say "  + Rust $version from $sysroot (without its docs)"
    local dest=$builder/usr/local/rustup/toolchains/$version-x86_64-unknown-linux-gnu
    mkdir -p "$dest" "$builder/usr/local/cargo/bin"
    tar -C "$sysroot" --exclude=./share/doc -c . | tar -C "$dest" -x --no-same-owner
    local tool
    for tool in cargo rustc rustdoc; do
        ln -s "../../rustup/toolchains/$version-x86_64-unknown-linux-gnu/bin/$tool" "$builder/usr/local/cargo/bin/$tool"
    done
    import_rootfs "$builder" "$name" \
        --change 'ENV RUSTUP_HOME=/usr/local/rustup' \
        --change 'ENV CARGO_HOME=/usr/local/cargo' \
        --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change "ENV RUST_VERSION=$version" \
        --change 'ENV CARGO_HTTP_CAINFO=/usr/local/share/standin-ca/host-ca-bundle.crt' \
        --change 'CMD ["bash"]' \
        --change "LABEL org.click-consumer.standin.recipe=\"debian:bookworm-slim stand-in + gcc libc6-dev ca-certificates + host Rust $version + host CA bundle\""
    rm -rf "$builder"
}

mkdir -p "$WORK"
mapfile -t images < <(base_images "${files[@]}")
[[ ${#images[@]} -gt 0 ]] || die "no FROM lines in ${files[*]}"

# The runtime base first: the builder stand-in is made from the same rootfs.
mapfile -t images < <(printf '%s\n' "${images[@]}" | awk '/^debian:/ {print; next} {rest[++n]=$0} END {for (i = 1; i <= n; i++) print rest[i]}')

if $rebuild; then
    for image in "${images[@]}"; do
        if is_standin "$image"; then
            say "$image: removing the stand-in (--rebuild)"
            docker image rm "$image" >/dev/null
        fi
    done
fi

made=()
for image in "${images[@]}"; do
    if image_exists "$image"; then
        if is_standin "$image"; then
            say "$image: present (a LOCAL STAND-IN made earlier by this script, not the registry's image)"
        else
            say "$image: present"
        fi
        continue
    fi
    if timeout 120 docker pull -q "$image" >/dev/null 2>"$WORK/pull.err"; then
        say "$image: pulled from the registry"
        continue
    fi
    say "$image: missing and cannot be pulled ($(tail -1 "$WORK/pull.err" | cut -c1-160))"
    start=$SECONDS
    case $image in
        debian:bookworm-slim)
            say "$image: MAKING A LOCAL STAND-IN (debootstrap)"
            make_debian_slim "$image"
            ;;
        rust:*-slim-bookworm)
            version=${image#rust:}
            version=${version%-slim-bookworm}
            [[ $version =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "$image: only full versions (X.Y.Z) have a stand-in recipe"
            if ! image_exists debian:bookworm-slim; then
                say "debian:bookworm-slim: MAKING A LOCAL STAND-IN first (the builder's base)"
                make_debian_slim debian:bookworm-slim
                made+=(debian:bookworm-slim)
            fi
            say "$image: MAKING A LOCAL STAND-IN (bookworm-slim stand-in + this machine's Rust $version)"
            make_rust_builder "$image" "$version"
            ;;
        *)
            die "$image: missing, cannot be pulled, and this script has no stand-in recipe for it"
            ;;
    esac
    made+=("$image")
    say "$image: stand-in ready in $((SECONDS - start)) s, $(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1 / 1e6}')"
done

if [[ ${#made[@]} -gt 0 ]]; then
    say "NOTE: built from LOCAL STAND-INS for: ${made[*]} (no registry here); they check the Dockerfile's logic, not the registry's images."
fi
