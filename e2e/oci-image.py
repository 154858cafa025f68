#!/usr/bin/env python3
"""Build a minimal, reproducible OCI image archive without Docker (python3 stdlib only).

    oci-image.py NAME:TAG OUT.tar --entrypoint '["/bin/x"]' \
        [--binary PATH[:DEST] ...] [--file SRC:DEST ...] [--with-iptables] [--user 1337] \
        [--cmd '["arg"]'] [--env K=V ...] [--workdir /] [--stamp-version V] [--strip]

The rootfs holds: each --binary (plus every shared library `ldd` reports for it, and the
dynamic loader), each --file (a file or a directory, copied recursively), the system CA
bundle as /etc/ssl/certs/ca-certificates.crt, a minimal /etc/passwd and /etc/group (root and
uid/gid 1337 `trellis-proxy`), /tmp (1777) and /run. --with-iptables adds iptables/ip6tables
(nft and legacy multi-call binaries, their xtables modules and libraries, and the
iptables{,-nft,-legacy}{,-restore,-save} symlinks), following the host's alternatives for the
unsuffixed names.

--strip removes the symbol tables of the image's copies of the --binary files (binutils'
`strip`; a panic still names its location, a backtrace no longer names functions).
--stamp-version V rewrites the version slot (trellis_config::version) in the image's copy of
every Trellis binary, so the image reports V without the workspace being recompiled; binaries
without a slot (a tool, a library) are copied unchanged, but at least one must have it.

The output is an OCI image-layout archive (oci-layout, index.json with the
io.containerd.image.name annotation, one uncompressed layer, config, manifest) that
`skopeo copy oci-archive:...` pushes to a registry (and `ctr images import` would accept). It is reproducible: entries are sorted, mtimes are
fixed, owners are 0:0 with no names, so the same inputs always give the same digests.
"""
import argparse
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile

MTIME = 0  # fixed timestamp for every entry (reproducible digests)
PROXY_UID = 1337
XTABLES_DIR = "/usr/lib/x86_64-linux-gnu/xtables"
# trellis_config::version: the marker, then the version NUL-padded to SLOT_LEN bytes in all.
VERSION_MARKER = b"trellis-version-slot:"
VERSION_SLOT_LEN = 80
VERSION_RE = re.compile(r"^[0-9A-Za-z.+-]+$")
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def die(msg):
    print(f"oci-image.py: error: {msg}", file=sys.stderr)
    sys.exit(1)


def sha(b):
    return hashlib.sha256(b).hexdigest()


class Rootfs:
    def __init__(self, root):
        self.root = root

    def path(self, dest):
        if not dest.startswith("/"):
            die(f"destination must be absolute: {dest}")
        p = os.path.normpath(os.path.join(self.root, dest.lstrip("/")))
        if not (p == self.root or p.startswith(self.root + os.sep)):
            die(f"destination escapes the rootfs: {dest}")
        return p

    def mkdir(self, dest, mode=0o755):
        p = self.path(dest)
        os.makedirs(p, exist_ok=True)
        os.chmod(p, mode)

    def write(self, dest, data, mode=0o644):
        p = self.path(dest)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
        os.chmod(p, mode)

    def copy_file(self, src, dest):
        """Copy the content of src (symlinks followed) to dest, keeping the permission bits."""
        if not os.path.isfile(src):
            die(f"not a file: {src}")
        p = self.path(dest)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        if os.path.lexists(p):
            os.unlink(p)
        shutil.copyfile(src, p)
        os.chmod(p, stat.S_IMODE(os.stat(src).st_mode))

    def copy_tree(self, src, dest):
        for dirpath, dirnames, filenames in os.walk(src, followlinks=True):
            rel = os.path.relpath(dirpath, src)
            ddir = dest if rel == "." else os.path.join(dest, rel)
            self.mkdir(ddir, stat.S_IMODE(os.stat(dirpath).st_mode))
            for fn in filenames:
                self.copy_file(os.path.join(dirpath, fn), os.path.join(ddir, fn))

    def symlink(self, target, dest):
        p = self.path(dest)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        if os.path.lexists(p):
            os.unlink(p)
        os.symlink(target, p)


def shared_libs(path):
    """Absolute paths of the shared libraries (and loader) `ldd` reports; [] for static binaries."""
    r = subprocess.run(["ldd", path], capture_output=True, text=True)
    out = r.stdout + r.stderr
    if "not a dynamic executable" in out or "statically linked" in out:
        return []
    if r.returncode != 0:
        die(f"ldd {path} failed: {out.strip()}")
    libs = []
    for line in r.stdout.splitlines():
        line = line.strip()
        if "=> not found" in line:
            die(f"{path}: missing shared library: {line}")
        m = re.match(r"^\S+\s+=>\s+(/\S+)\s+\(0x", line) or re.match(r"^(/\S+)\s+\(0x", line)
        if m:
            libs.append(m.group(1))
    return libs


def add_binary(fs, src, dest, seen):
    if not os.path.isfile(src):
        die(f"binary not found: {src}")
    fs.copy_file(src, dest)
    add_libs_of(fs, src, seen)


def stamp_version(path, version):
    """Rewrite the version slot of the binary at path; False if it has none."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    at = data.find(VERSION_MARKER)
    if at < 0:
        return False
    if data.find(VERSION_MARKER, at + 1) >= 0:
        die(f"{path}: more than one version slot")
    start = at + len(VERSION_MARKER)
    room = VERSION_SLOT_LEN - len(VERSION_MARKER)
    data[start:start + room] = version.encode().ljust(room, b"\0")
    with open(path, "wb") as f:
        f.write(data)
    return True


def add_libs_of(fs, src, seen):
    for lib in shared_libs(src):
        if lib in seen:
            continue
        seen.add(lib)
        fs.copy_file(lib, lib)  # same path as on the host, so the loader finds it


def add_iptables(fs, seen):
    sbin = "/usr/sbin"
    multis = {"nft": "xtables-nft-multi", "legacy": "xtables-legacy-multi"}
    for m in multis.values():
        add_binary(fs, os.path.join(sbin, m), os.path.join(sbin, m), seen)
    if not os.path.isdir(XTABLES_DIR):
        die(f"{XTABLES_DIR} missing (is the iptables package installed?)")
    for fn in sorted(os.listdir(XTABLES_DIR)):
        src = os.path.join(XTABLES_DIR, fn)
        if fn.endswith(".so") and os.path.isfile(src):
            fs.copy_file(src, src)
            add_libs_of(fs, src, seen)
    for fam in ("iptables", "ip6tables"):
        # the unsuffixed names follow the host's alternative (nft on Debian 12 by default)
        real = os.path.basename(os.path.realpath(os.path.join(sbin, fam)))
        default = real if real in multis.values() else multis["nft"]
        for suffix in ("", "-restore", "-save"):
            for kind, multi in multis.items():
                fs.symlink(multi, f"{sbin}/{fam}-{kind}{suffix}")
            fs.symlink(default, f"{sbin}/{fam}{suffix}")
    for f in ("/etc/protocols", "/etc/services", "/etc/ethertypes"):
        if os.path.isfile(f):
            fs.copy_file(f, f)


def layer_tar(root):
    """A reproducible tar of root: sorted entries, fixed mtime, 0:0 without names."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for n in dirnames + filenames:
            entries.append(os.path.join(dirpath, n))
    entries.sort(key=lambda p: os.path.relpath(p, root).split(os.sep))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for p in entries:
            ti = t.gettarinfo(p, arcname=os.path.relpath(p, root))
            ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = MTIME, 0, 0, "", ""
            ti.mode = stat.S_IMODE(os.lstat(p).st_mode)
            if ti.isreg():
                with open(p, "rb") as f:
                    t.addfile(ti, f)
            else:
                t.addfile(ti)
    return buf.getvalue()


def write_archive(name, layer, config, out):
    cfg = json.dumps(config, sort_keys=True).encode()
    man = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": "sha256:" + sha(cfg), "size": len(cfg)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": "sha256:" + sha(layer), "size": len(layer)}]}, sort_keys=True).encode()
    idx = json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": "sha256:" + sha(man), "size": len(man),
        "annotations": {"io.containerd.image.name": name}}]}, sort_keys=True).encode()
    tmp = out + ".tmp"
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as t:
        for n, d in (("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", idx),
                     ("blobs/sha256/" + sha(layer), layer), ("blobs/sha256/" + sha(cfg), cfg),
                     ("blobs/sha256/" + sha(man), man)):
            ti = tarfile.TarInfo(n)
            ti.size, ti.mtime, ti.mode = len(d), MTIME, 0o644
            t.addfile(ti, io.BytesIO(d))
    os.replace(tmp, out)
    return "sha256:" + sha(man)


def main():
    os.umask(0o022)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name", help="image reference NAME:TAG (as the kubelet will ask for it)")
    ap.add_argument("out", help="output OCI archive path")
    ap.add_argument("--entrypoint", required=True, help='JSON list, e.g. \'["/bin/x"]\'')
    ap.add_argument("--cmd", help="JSON list of default arguments")
    ap.add_argument("--binary", action="append", default=[], metavar="PATH[:DEST]",
                    help="executable to copy with its shared libraries (DEST defaults to PATH)")
    ap.add_argument("--file", action="append", default=[], metavar="SRC:DEST",
                    help="file or directory to copy to DEST")
    ap.add_argument("--with-iptables", action="store_true",
                    help="add iptables/ip6tables (nft + legacy) with modules and libraries")
    ap.add_argument("--user", help="image user, e.g. 1337")
    ap.add_argument("--env", action="append", default=[], metavar="K=V")
    ap.add_argument("--workdir", default="/")
    ap.add_argument("--strip", action="store_true", help="strip the --binary files' symbols")
    ap.add_argument("--stamp-version", metavar="V",
                    help="version the image's Trellis binaries report (rewrites their version slot)")
    a = ap.parse_args()
    if a.stamp_version is not None and (
            not VERSION_RE.match(a.stamp_version)
            or len(a.stamp_version) >= VERSION_SLOT_LEN - len(VERSION_MARKER)):
        die(f"--stamp-version {a.stamp_version!r}: want [0-9A-Za-z.+-], "
            f"at most {VERSION_SLOT_LEN - len(VERSION_MARKER) - 1} characters")

    def jlist(s, what):
        try:
            v = json.loads(s)
        except ValueError as e:
            die(f"--{what} is not JSON: {e}")
        if not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            die(f"--{what} must be a JSON list of strings")
        return v

    entry = jlist(a.entrypoint, "entrypoint")
    if ":" not in a.name.rsplit("/", 1)[-1]:
        die(f"image name needs a tag: {a.name}")
    first = a.name.split("/", 1)[0]
    if "/" not in a.name or not ("." in first or ":" in first or first == "localhost"):
        print(f"oci-image.py: warning: {a.name} has no registry-like first component; the kubelet "
              f"would look it up on Docker Hub (use e.g. local.test/{a.name})", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="oci-rootfs-") as root:
        os.chmod(root, 0o755)
        fs = Rootfs(root)
        for d in ("/etc", "/bin", "/usr", "/usr/bin", "/usr/sbin", "/lib", "/run", "/var"):
            fs.mkdir(d)
        fs.mkdir("/tmp", 0o1777)
        fs.write("/etc/passwd", (f"root:x:0:0:root:/root:/bin/sh\n"
                                 f"trellis-proxy:x:{PROXY_UID}:{PROXY_UID}:trellis-proxy:/tmp:/sbin/nologin\n").encode())
        fs.write("/etc/group", f"root:x:0:\ntrellis-proxy:x:{PROXY_UID}:\n".encode())
        if not os.path.isfile(CA_BUNDLE):
            die(f"{CA_BUNDLE} missing (install ca-certificates)")
        fs.copy_file(CA_BUNDLE, CA_BUNDLE)
        seen = set()
        if a.with_iptables:
            add_iptables(fs, seen)
        stamped = 0
        for spec in a.binary:
            src, _, dest = spec.partition(":")
            add_binary(fs, src, dest or src, seen)
            if a.strip:
                r = subprocess.run(["strip", "--strip-all", fs.path(dest or src)], capture_output=True, text=True)
                if r.returncode != 0:
                    die(f"strip {src} failed: {r.stderr.strip()}")
            if a.stamp_version is not None:
                stamped += stamp_version(fs.path(dest or src), a.stamp_version)
        if a.stamp_version is not None and not stamped:
            die("--stamp-version: no --binary has a version slot")
        for spec in a.file:
            src, sep, dest = spec.partition(":")
            if not sep or not dest:
                die(f"--file needs SRC:DEST, got {spec}")
            if os.path.isdir(src):
                fs.copy_tree(src, dest)
            elif os.path.isfile(src):
                fs.copy_file(src, dest)
            else:
                die(f"--file source not found: {src}")
        layer = layer_tar(root)

    env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"] + a.env
    conf = {"Entrypoint": entry, "Env": env, "WorkingDir": a.workdir}
    if a.cmd:
        conf["Cmd"] = jlist(a.cmd, "cmd")
    if a.user:
        conf["User"] = a.user
    config = {"architecture": "amd64", "os": "linux", "config": conf,
              "rootfs": {"type": "layers", "diff_ids": ["sha256:" + sha(layer)]}}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    digest = write_archive(a.name, layer, config, a.out)
    print(f"{a.name} {digest} {a.out} ({len(layer)} bytes layer)")


if __name__ == "__main__":
    main()
