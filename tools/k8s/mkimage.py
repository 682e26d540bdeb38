#!/usr/bin/env python3
"""Builds a container image as a docker-archive tarball, without docker or a
registry: one layer tar, the image config JSON and manifest.json, as
`ctr images import` and `docker load` read them.

Used by scripts/image (the trellis image) and scripts/k8s-cluster (the
sandbox "pause" image). The output is a function of the input files only:
entries are sorted and carry no times or owners of the build machine, so the
same inputs give the same image ID, and the tag can be derived from it.

  mkimage.py --out FILE (--name REPO --tag-prefix PREFIX | --ref REF)
             [--add SRC:DEST] [--add-elf SRC:DEST] [--user NAME:UID]
             [--entrypoint JSON] [--cmd JSON] [--env K=V] [--workdir DIR]

--add copies a file; --add-elf also copies every shared library `ldd` lists
for it and the loader, each at its host path with the symlinks on the way
(so /lib64/ld-linux-x86-64.so.2 resolves as it does on the host). --user
writes /etc/passwd and /etc/group with root and that user and makes it the
image's default user. The image reference, REPO:PREFIX-<12 hex of the image
ID> (or REF, for an image that needs a fixed name), is printed as the last
line.
"""

import argparse
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile


class ImageError(Exception):
    """A problem with the inputs; the message says what to change."""


class Layer:
    """The files of the one layer, keyed by their path in the image."""

    def __init__(self):
        self.entries = {}  # path -> ("dir", mode) | ("file", mode, bytes) | ("link", target)

    def _parents(self, path):
        parent = os.path.dirname(path)
        while parent not in ("/", ""):
            kind = self.entries.get(parent)
            if kind is not None and kind[0] != "dir":
                raise ImageError(f"{parent} is a {kind[0]} in the image, not a directory")
            self.entries.setdefault(parent, ("dir", 0o755))
            parent = os.path.dirname(parent)

    def add_dir(self, path, mode=0o755):
        self._parents(path)
        self.entries[path] = ("dir", mode)

    def add_bytes(self, path, data, mode=0o644):
        self._parents(path)
        self.entries[path] = ("file", mode, data)

    def add_file(self, src, dest):
        """Copies the file src (symlinks followed) to dest."""
        try:
            with open(src, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ImageError(f"cannot read {src}: {e.strerror}") from e
        mode = 0o755 if os.stat(src).st_mode & 0o111 else 0o644
        self.add_bytes(dest, data, mode)

    def add_host_path(self, path):
        """Adds the host file at path under the same path, with each symlink
        met on the way (e.g. /lib -> usr/lib) as a symlink in the image."""
        path = os.path.normpath(path)
        for _ in range(40):  # symlink hops, as the kernel allows
            parts = path.strip("/").split("/")
            cur = ""
            for i, part in enumerate(parts):
                cur = cur + "/" + part
                if os.path.islink(cur):
                    target = os.readlink(cur)
                    self._parents(cur)
                    self.entries[cur] = ("link", target)
                    base = target if target.startswith("/") else os.path.join(os.path.dirname(cur), target)
                    path = os.path.normpath(os.path.join(base, *parts[i + 1:]))
                    break
            else:
                self.add_file(path, path)
                return
        raise ImageError(f"too many symlinks resolving {path}")

    def tar(self):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
            for path in sorted(self.entries):
                entry = self.entries[path]
                info = tarfile.TarInfo(path.lstrip("/"))
                info.mtime = 0
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                if entry[0] == "dir":
                    info.type, info.mode = tarfile.DIRTYPE, entry[1]
                    t.addfile(info)
                elif entry[0] == "link":
                    info.type, info.mode, info.linkname = tarfile.SYMTYPE, 0o777, entry[1]
                    t.addfile(info)
                else:
                    info.mode, info.size = entry[1], len(entry[2])
                    t.addfile(info, io.BytesIO(entry[2]))
        return buf.getvalue()


def shared_libraries(binary):
    """The libraries and loader `ldd` lists for binary; none when static."""
    try:
        out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise ImageError("ldd not found: install libc-bin") from e
    text = out.stdout + out.stderr
    if "not a dynamic executable" in text or "statically linked" in text:
        return []
    if out.returncode != 0:
        raise ImageError(f"ldd {binary} failed: {text.strip()}")
    libs = []
    for line in out.stdout.splitlines():
        line = line.strip()
        if "=> not found" in line:
            raise ImageError(f"{binary} needs {line.split()[0]}, which is not installed")
        m = re.match(r"\S+ => (/\S+) \(", line) or re.match(r"(/\S+) \(", line)
        if m:
            libs.append(m.group(1))
    return libs


def split_pair(value, flag):
    src, sep, dest = value.partition(":")
    if not sep or not src or not dest.startswith("/"):
        raise ImageError(f"{flag} {value}: expected SRC:/ABSOLUTE/DEST")
    return src, dest


def build(args):
    layer = Layer()
    for value in args.add:
        src, dest = split_pair(value, "--add")
        layer.add_file(src, dest)
    for value in args.add_elf:
        src, dest = split_pair(value, "--add-elf")
        layer.add_file(src, dest)
        for lib in shared_libraries(src):
            layer.add_host_path(lib)
    layer.add_dir("/tmp", 0o1777)
    user = None
    if args.user:
        name, _, uid = args.user.partition(":")
        if not name or not uid.isdigit():
            raise ImageError(f"--user {args.user}: expected NAME:UID, e.g. trellis:1337")
        layer.add_bytes("/etc/passwd", f"root:x:0:0:root:/:/nonexistent\n{name}:x:{uid}:{uid}:{name}:/:/nonexistent\n".encode())
        layer.add_bytes("/etc/group", f"root:x:0:\n{name}:x:{uid}:\n".encode())
        layer.add_bytes("/etc/nsswitch.conf", b"passwd: files\ngroup: files\nhosts: files dns\n")
        user = uid

    blob = layer.tar()
    diff_id = "sha256:" + hashlib.sha256(blob).hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Env": args.env or ["PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Entrypoint": json.loads(args.entrypoint) if args.entrypoint else None,
            "Cmd": json.loads(args.cmd) if args.cmd else None,
            "WorkingDir": args.workdir,
            "User": user or "",
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "tools/k8s/mkimage.py"}],
    }
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    image_id = hashlib.sha256(config_bytes).hexdigest()
    ref = args.ref or f"{args.name}:{args.tag_prefix}-{image_id[:12]}"
    layer_name = diff_id[len("sha256:"):] + "/layer.tar"
    tags = [ref] + [t for t in args.also_tag if t != ref]
    manifest = [{"Config": image_id + ".json", "RepoTags": tags, "Layers": [layer_name]}]

    outer = Layer()
    outer.add_bytes("/" + image_id + ".json", config_bytes)
    outer.add_bytes("/" + layer_name, blob)
    outer.add_bytes("/manifest.json", json.dumps(manifest, separators=(",", ":")).encode())
    tmp = args.out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(outer.tar())
    os.replace(tmp, args.out)
    return ref, layer


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--name", help="repository, e.g. trellis.local/trellis")
    p.add_argument("--tag-prefix", help="the tag before -<image id>, e.g. the version")
    p.add_argument("--ref", help="a fixed reference instead of --name and --tag-prefix")
    p.add_argument("--also-tag", action="append", default=[], metavar="REF",
                   help="another reference of the same image (repeatable)")
    p.add_argument("--add", action="append", default=[], metavar="SRC:DEST")
    p.add_argument("--add-elf", action="append", default=[], metavar="SRC:DEST")
    p.add_argument("--user", metavar="NAME:UID")
    p.add_argument("--entrypoint", metavar="JSON")
    p.add_argument("--cmd", metavar="JSON")
    p.add_argument("--env", action="append", metavar="K=V")
    p.add_argument("--workdir", default="/")
    p.add_argument("--list", action="store_true", help="print the layer's files (to stderr)")
    args = p.parse_args()
    if not args.ref and not (args.name and args.tag_prefix):
        p.error("give --name and --tag-prefix, or --ref")
    try:
        ref, layer = build(args)
    except (ImageError, json.JSONDecodeError) as e:
        print(f"mkimage: {e}", file=sys.stderr)
        return 1
    if args.list:
        for path in sorted(layer.entries):
            e = layer.entries[path]
            desc = f"-> {e[1]}" if e[0] == "link" else (f"{len(e[2])} bytes" if e[0] == "file" else "")
            print(f"  {e[0]:4} {path} {desc}", file=sys.stderr)
    print(ref)
    return 0


if __name__ == "__main__":
    sys.exit(main())
