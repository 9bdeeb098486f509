"""Plays the Dockerfile's stages outside Docker; see scripts/docker-steps.sh for what and why."""

import fnmatch
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Absolute paths of the image that are mapped into a stage's directory; anything else (the
# system's /usr/bin, /bin/sh, ...) is the host's.
MAPPED = ["/src", "/out", "/opt/itamae", "/usr/local/bin", "/var/lib/itamae", "/var/lib/apt/lists"]
# The runtime image's shared libraries may come only from these packages: the C/C++ runtime of
# the slim base image, and the OpenBLAS the runtime stage installs (with its dependencies).
RUNTIME_LIB_PACKAGES = {"libc6", "libgcc-s1", "libstdc++6", "libopenblas0-pthread",
                        "libgfortran5", "libquadmath0"}
UID = 10001

# Shell functions put in front of every RUN: what must not touch the shared host.
PRELUDE = r'''
set -e
apt-get() {
  case "$1" in
    update) echo "  [apt-get update: skipped]" ;;
    install)
      shift
      for p in "$@"; do
        case "$p" in -*) continue ;; esac
        if dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
          echo "  [apt-get install $p: installed on this host]"
        elif apt-cache show "$p" >/dev/null 2>&1; then
          echo "  [apt-get install $p: in the archive, not installed here]"
        else
          echo "  apt-get install: no package $p in the archive" >&2; return 1
        fi
      done ;;
    *) echo "  [apt-get $*: skipped]" ;;
  esac
}
useradd() { echo "  [useradd $*: skipped]"; }
groupadd() { echo "  [groupadd $*: skipped]"; }
chown() { echo "  [chown $*: skipped]"; }
cargo() {
  if [ "$1" = install ] && [ "$2" = cargo-chef ]; then
    want=$(echo "$*" | sed -n 's/.*--version \([^ ]*\).*/\1/p')
    if command cargo chef --version 2>/dev/null | grep -q "$want"; then
      echo "  [cargo install cargo-chef $want: already installed]"; return 0
    fi
  fi
  command cargo "$@"
}
'''


def log(msg):
    print(msg, flush=True)


def parse(path):
    """Instructions as (keyword, argument text), continuation lines joined, comments dropped.
    `# hadolint` directives are comments too."""
    out, buf = [], ""
    for raw in open(path, encoding="utf-8"):
        line = raw.rstrip("\n")
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        kw, _, rest = buf.strip().partition(" ")
        out.append((kw.upper(), rest.strip()))
        buf = ""
    return out


def dockerignore():
    pats = []
    p = os.path.join(ROOT, ".dockerignore")
    if os.path.exists(p):
        for line in open(p, encoding="utf-8"):
            line = line.strip()
            if line and not line.startswith("#"):
                pats.append(line.rstrip("/"))
    return pats


def ignored(rel, pats):
    for p in pats:
        if p.startswith("**/"):
            if any(fnmatch.fnmatch(part, p[3:]) for part in rel.split("/")) or fnmatch.fnmatch(rel, p[3:]):
                return True
        elif fnmatch.fnmatch(rel, p) or rel.startswith(p + "/"):
            return True
    return False


def make_context(dst):
    """The build context as Docker would send it: the worktree minus .dockerignore."""
    pats = dockerignore()
    n = size = 0
    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel_dir = os.path.relpath(dirpath, ROOT)
        rel_dir = "" if rel_dir == "." else rel_dir
        dirnames[:] = [d for d in dirnames if not ignored(os.path.join(rel_dir, d), pats)]
        for f in filenames:
            rel = os.path.join(rel_dir, f)
            if ignored(rel, pats):
                continue
            os.makedirs(os.path.join(dst, rel_dir), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, rel), os.path.join(dst, rel), follow_symlinks=False)
            n += 1
            size += os.lstat(os.path.join(ROOT, rel)).st_size
    log(f"build context: {n} files, {size / 1e6:.1f} MB (after .dockerignore)")


def map_paths(text, root):
    for prefix in sorted(MAPPED, key=len, reverse=True):
        text = re.sub(r"(?<![\w/.])" + re.escape(prefix) + r"(?=/|\b|$)", root + prefix, text)
    return text


def copy_into(src, dst):
    """COPY semantics for one source: a directory's contents, or a file (to a dir if dst ends
    with /)."""
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
        shutil.copytree(src, dst, dirs_exist_ok=True, symlinks=True)
    else:
        if dst.endswith("/"):
            os.makedirs(dst, exist_ok=True)
            dst = os.path.join(dst, os.path.basename(src))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(src, dst)


class Stage:
    def __init__(self, name, root):
        self.name, self.root = name, root
        self.workdir = "/"
        self.env = {}
        self.user = None
        self.entrypoint = None
        self.healthcheck = None

    def path(self, p):
        p = p if p.startswith("/") else os.path.join(self.workdir, p)
        return self.root + os.path.normpath(p) + ("/" if p.endswith("/") and p != "/" else "")


def run_stages(dockerfile, tmp, build_args, target_dir):
    args = dict(build_args)
    context = os.path.join(tmp, "context")
    os.makedirs(context)
    make_context(context)
    stages, cur = {}, None
    for kw, rest in parse(dockerfile):
        if kw == "ARG":
            name, _, default = rest.partition("=")
            if cur is None or name not in args:
                args.setdefault(name, default)
            continue
        if kw == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            base = re.sub(r"\$\{(\w+)\}", lambda g: args.get(g.group(1), ""), m.group(1))
            name = m.group(2) or "runtime"
            root = os.path.join(tmp, "stages", name)
            if base in stages:
                shutil.copytree(stages[base].root, root, symlinks=True)
                prev = stages[base]
                cur = Stage(name, root)
                cur.workdir, cur.env, cur.user = prev.workdir, dict(prev.env), prev.user
            else:
                os.makedirs(root)
                cur = Stage(name, root)
            stages[name] = cur
            log(f"=== stage {name} (FROM {base}) ===")
            continue
        if kw == "WORKDIR":
            cur.workdir = rest
            os.makedirs(cur.path(rest), exist_ok=True)
        elif kw == "ENV":
            for tok in shlex.split(rest):
                k, _, v = tok.partition("=")
                cur.env[k] = v
        elif kw == "COPY":
            toks = shlex.split(rest)
            src_root = context
            if toks[0].startswith("--from="):
                src_root = stages[toks[0][7:]].root
                toks = toks[1:]
            *srcs, dst = toks
            for s in srcs:
                if src_root == context:
                    src = context if s == "." else os.path.join(context, s)
                else:
                    src = src_root + os.path.normpath("/" + s)
                log(f"COPY {s} -> {dst}")
                copy_into(src, cur.path(dst))
        elif kw == "RUN":
            script = map_paths(rest, cur.root)
            log(f"RUN {rest}")
            env = dict(os.environ)
            env.update({k: map_paths(v, cur.root) for k, v in cur.env.items()})
            env.update({k: v for k, v in args.items()})
            if target_dir:
                env["CARGO_TARGET_DIR"] = target_dir
            cwd = cur.path(cur.workdir)
            os.makedirs(cwd, exist_ok=True)
            # `target/release/...` in the Dockerfile is the build tree's own target dir.
            if target_dir and not os.path.exists(os.path.join(cwd, "target")) and "cargo" in rest:
                os.symlink(target_dir, os.path.join(cwd, "target"))
            started = time.time()
            r = subprocess.run(["bash", "-c", PRELUDE + script], cwd=cwd, env=env)
            if r.returncode != 0:
                sys.exit(f"RUN failed ({r.returncode}) in stage {cur.name}: {rest}")
            log(f"  ok ({time.time() - started:.0f} s)")
        elif kw == "USER":
            cur.user = rest
        elif kw == "ENTRYPOINT":
            cur.entrypoint = rest
        elif kw == "HEALTHCHECK":
            cur.healthcheck = rest
        elif kw in ("VOLUME", "EXPOSE", "LABEL", "CMD"):
            log(f"{kw} {rest}")
        else:
            sys.exit(f"docker_steps.py does not know the instruction {kw}")
    return stages, cur


def check_runtime_libs(stage):
    binary = stage.path("/usr/local/bin/itamaed")
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    bad = []
    for line in out.splitlines():
        m = re.search(r"=>\s+(\S+)", line)
        if not m:
            continue
        if m.group(1) == "not":
            bad.append(line.strip())
            continue
        real = os.path.realpath(m.group(1))
        pkg = subprocess.run(["dpkg", "-S", real], capture_output=True, text=True).stdout
        if not pkg:
            pkg = subprocess.run(["dpkg", "-S", m.group(1)], capture_output=True, text=True).stdout
        name = pkg.split(":")[0].strip() if pkg else "?"
        log(f"  {os.path.basename(m.group(1))} <- {name}")
        if name not in RUNTIME_LIB_PACKAGES:
            bad.append(f"{m.group(1)} from {name}")
    if bad:
        sys.exit(f"itamaed needs libraries the runtime image does not install: {bad}")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_runtime(stage, extra_env, log_path):
    env = {"PATH": stage.root + "/usr/local/bin:/usr/bin:/bin", "HOME": stage.path("/var/lib/itamae")}
    env.update({k: map_paths(v, stage.root) for k, v in stage.env.items()})
    env.update(extra_env)
    argv = [map_paths(a, stage.root) for a in json.loads(stage.entrypoint)]
    uid = stage.user.split(":")[0]
    cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"] + argv
    return subprocess.Popen(cmd, cwd=stage.path(stage.workdir), env=env,
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT), env


def main():
    target_dir = os.environ.get("DOCKER_STEPS_TARGET_DIR") or os.environ.get("CARGO_TARGET_DIR")
    tmp = tempfile.mkdtemp(prefix="itamae-docker-")
    os.chmod(tmp, 0o755)
    try:
        stages, runtime = run_stages(os.path.join(ROOT, "Dockerfile"), tmp, {}, target_dir)
        log("=== runtime image checks ===")
        for p in ["/usr/local/bin/itamaed", "/usr/local/bin/itamae", "/opt/itamae/configs/itamae.toml",
                  "/opt/itamae/models/SmolLM2-135M-Instruct.Q4_1.gguf"]:
            if not os.path.isfile(runtime.path(p)):
                sys.exit(f"runtime image lacks {p}")
            log(f"  {p}: {os.path.getsize(runtime.path(p)) / 1e6:.1f} MB")
        check_runtime_libs(runtime)
        if runtime.user is None or runtime.user.split(":")[0] in ("0", "root"):
            sys.exit(f"runtime USER must be non-root, got {runtime.user}")
        data = runtime.path("/var/lib/itamae")
        os.makedirs(data, exist_ok=True)
        os.chown(data, UID, UID)

        log("start 1: the image's ENV as is, no API keys -> must refuse 0.0.0.0")
        p, _ = start_runtime(runtime, {}, os.path.join(tmp, "run1.log"))
        try:
            code = p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            sys.exit("itamaed started on 0.0.0.0 without API keys")
        text = open(os.path.join(tmp, "run1.log")).read()
        if code == 0 or "key" not in text.lower():
            sys.exit(f"expected a refusal naming the API keys, got exit {code}: {text}")
        log(f"  refused (exit {code}): {text.strip().splitlines()[-1]}")

        port = free_port()
        key = "docker-steps-admin-key-0123456789"
        log(f"start 2: with ITAMAE_API_KEYS, on loopback (127.0.0.1:{port}) as uid {UID}")
        p, env = start_runtime(runtime, {"ITAMAE_API_KEYS": f"admin:{key}", "ITAMAE_HOST": "127.0.0.1",
                                         "ITAMAE_PORT": str(port)}, os.path.join(tmp, "run2.log"))
        try:
            hc = re.search(r"CMD\s+(\[.*\])", runtime.healthcheck, re.S).group(1)
            hc_argv = json.loads(hc)
            deadline = time.time() + 120
            while True:
                r = subprocess.run(hc_argv, env=env, capture_output=True, text=True)
                if r.returncode == 0:
                    log(f"  HEALTHCHECK passed: {r.stdout.strip()}")
                    break
                if p.poll() is not None or time.time() > deadline:
                    sys.exit("HEALTHCHECK never passed; log:\n" + open(os.path.join(tmp, "run2.log")).read()[-3000:])
                time.sleep(0.5)
            for _ in range(240):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5)
                    break
                except Exception:
                    time.sleep(0.5)
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models",
                                         headers={"Authorization": f"Bearer {key}"})
            body = urllib.request.urlopen(req, timeout=10).read().decode()
            log(f"  GET /v1/models with the key: {body[:120]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10)
                sys.exit("GET /v1/models without a key was not refused")
            except urllib.error.HTTPError as e:
                log(f"  without a key: {e.code}")
            owners = {os.stat(os.path.join(dp, f)).st_uid for dp, _, fs in os.walk(data) for f in fs}
            log(f"  data dir files owned by uids {sorted(owners)}")
            if owners - {UID}:
                sys.exit(f"data written by other uids: {owners}")
        finally:
            p.terminate()
            p.wait(timeout=30)
        log("docker steps: all passed")
    finally:
        if os.environ.get("KEEP_TMP") == "1":
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
